"""Phantom style families: the domain-randomised training family and the held-out shifted family."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from node.errors import PhantomError
from node.phantom import PhantomOptions, generate_study, write_study
from node.phantom.anatomy import build_anatomy
from node.phantom.render import VISIBLE_SHARE
from node.phantom.spec import Structure
from node.phantom.study import _render_thick
from node.phantom.styles import draw_variation
from node.validation import dciodvfy
from tests.conftest import require_tool

SEEDS = range(200, 230)


def test_the_varied_family_draws_scanner_settings_over_wide_ranges():
    draws = [draw_variation(seed, "varied") for seed in SEEDS]
    assert {256, 512} <= {v.matrix for v in draws} <= {256, 320, 384, 448, 512}
    fov = [v.fov_mm for v in draws]
    spacing = [v.slice_spacing_mm for v in draws]
    artery = [v.hu_artery for v in draws]
    assert min(fov) < 280 and max(fov) > 420 and all(250 <= f <= 450 for f in fov)
    assert min(spacing) < 0.8 and max(spacing) > 4.0 and all(0.6 <= s <= 5.0 for s in spacing)
    assert min(artery) < 200 and max(artery) > 550
    assert any(v.sharpen > 0 for v in draws) and any(v.kernel_sigma_mm > 0.5 for v in draws)
    assert any(v.motion > 0 for v in draws)


def test_varied_emboli_come_at_every_level_size_and_kind():
    studies = [build_anatomy(seed, pe=True, variation=draw_variation(seed, "varied")).emboli for seed in SEEDS]
    emboli = [e for study in studies for e in study]
    assert set(Counter(e.level for e in emboli)) == {"central", "lobar", "segmental", "subsegmental"}
    assert set(Counter(e.kind for e in emboli)) == {"occlusive", "partial", "mural", "saddle"}
    sizes = [e.size_mm for e in emboli]
    assert min(sizes) < 4.0 and max(sizes) > 22.0
    per_study = [len(study) for study in studies]  # a saddle embolus is drawn as three clots
    assert min(per_study) == 1 and max(per_study) >= 6


def test_the_shifted_family_uses_other_primitives_and_settings_than_training():
    varied = [draw_variation(seed, "varied") for seed in SEEDS]
    shifted = [draw_variation(seed, "shifted") for seed in SEEDS]
    assert {v.embolus_primitive for v in varied} == {"capsule"} and {v.embolus_primitive for v in shifted} == {"blobs"}
    assert {v.noise_model for v in varied} == {"gaussian"}
    assert {v.noise_model for v in shifted} == {"laplace-attenuation"}
    assert all(v.edge_mm == 0 for v in varied) and all(v.edge_mm >= 1.5 for v in shifted)
    assert all(v.artery_taper <= 0.2 for v in varied) and all(v.artery_taper >= 0.25 for v in shifted)
    # other body, heart and tree primitives than training ever sees
    assert {v.body_power for v in varied} == {2.0} and all(v.body_power >= 2.6 for v in shifted)
    assert {v.heart_scale for v in varied} == {1.0} and all(v.heart_scale >= 1.08 for v in shifted)
    assert {v.branch_heading for v in varied} == {0.45} and all(v.branch_heading >= 1.2 for v in shifted)
    assert all(v.level_weights[2] > v.level_weights[0] for v in shifted)  # mostly segmental, not central


@pytest.fixture(scope="module")
def styled_studies():
    return {style: generate_study(3, pe=True, options=PhantomOptions(style=style, matrix_cap=160))
            for style in ("varied", "shifted")}


def test_a_styled_study_is_written_with_its_drawn_settings_and_shows_its_emboli(styled_studies):
    for style, study in styled_studies.items():
        v = study.anatomy.variation
        assert v is not None and v.family == style
        assert study.image.hu.shape == (study.options.slices, min(v.matrix, 160), min(v.matrix, 160))
        assert study.options.thickness_mm == pytest.approx(v.slice_spacing_mm * v.thickness_ratio, abs=1e-3)
        assert study.pe_present and study.emboli
        hu = study.image.hu[study.image.mask]
        artery = study.image.hu[study.image.labels == Structure.PULMONARY_ARTERY]
        assert np.median(hu) < np.median(artery) - 80  # a filling defect: darker than the lumen around it


def test_the_same_seed_gives_the_same_styled_study():
    options = PhantomOptions(style="shifted", matrix_cap=96)
    a, b = generate_study(5, pe=False, options=options), generate_study(5, pe=False, options=options)
    np.testing.assert_array_equal(a.image.hu, b.image.hu)


def test_subsegmental_emboli_need_a_styled_family():
    with pytest.raises(PhantomError, match="subsegmental needs a styled family"):
        PhantomOptions(embolus_levels=("subsegmental",))
    with pytest.raises(PhantomError, match="style"):
        PhantomOptions(style="cartoon")


@pytest.mark.peers
def test_styled_series_pass_dciodvfy_without_errors_or_warnings(styled_studies, tmp_path):
    require_tool("dciodvfy")
    for study in styled_studies.values():
        paths = write_study(study, tmp_path)["ctpa"]
        for path in (paths[0], paths[len(paths) // 2]):
            verdict = dciodvfy(path)
            assert verdict.errors == () and verdict.warnings == (), (verdict.errors, verdict.warnings)


def test_a_clot_voxel_the_thick_slice_barely_darkens_is_left_out_of_the_mask():
    # Segmental clots on 3.5 mm slices: a clot voxel averaged with the lung around its small artery stays
    # "inside the clot" by volume while the image shows little of it; the mask keeps what the image shows.
    opts = PhantomOptions(style="varied", matrix_cap=192, embolus_levels=("segmental", "subsegmental"), noise=False)
    study = generate_study(10, pe=True, options=opts)
    clean = _render_thick(study.anatomy.without_emboli(), study.grid, study.options.thickness_mm, noise=False)
    darkening = clean.hu - study.image.hu
    kept = study.image.mask
    left_out = (study.image.owner > 0) & ~kept & (darkening > 0)
    assert kept.sum() > 20 and left_out.sum() > 20
    assert np.median(darkening[kept]) > 2 * np.median(darkening[left_out])
    assert np.all(study.image.shown[kept] >= VISIBLE_SHARE)
    assert study.slice_labels.tolist() == kept.any(axis=(1, 2)).tolist()
