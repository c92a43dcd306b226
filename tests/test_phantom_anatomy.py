"""The synthetic CTPA looks like the specification: HU per structure, emboli inside arteries, labels
that follow the masks, and confounders that are not emboli."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SMALL
from node.phantom import HU_RANGE, PhantomOptions, Structure, generate_study
from node.phantom.anatomy import build_anatomy
from node.phantom.render import VISIBLE_SHARE, render
from node.phantom.spec import UNENHANCED_BLOOD_HU

MEDIUM = PhantomOptions(matrix=192, slices=100, slice_spacing_mm=3.0)


def within_spec(stats, structure, slack_hu=0.0):
    mean, std, n = stats[structure]
    lo, hi = HU_RANGE[structure]
    margin = 3.0 * std / np.sqrt(n) + slack_hu  # sampling error of the mean, plus any slack
    return lo - margin <= mean <= hi + margin, (mean, std, n, lo, hi)


@pytest.fixture(scope="module")
def studies_with_embolus_cores():
    """The first three positive seeds whose emboli have a core of at least 30 voxels."""
    found = []
    for seed in range(40):
        study = generate_study(seed, pe=True, options=MEDIUM)
        stats = study.structure_hu()
        if Structure.EMBOLUS in stats and stats[Structure.EMBOLUS][2] >= 30:
            found.append((study, stats))
        if len(found) == 3:
            return found
    pytest.fail("fewer than three seeds of 40 gave emboli with a 30-voxel core")


def test_hu_inside_arteries_emboli_and_lungs_matches_the_specification(studies_with_embolus_cores):
    for study, stats in studies_with_embolus_cores:
        for structure in (Structure.PULMONARY_ARTERY, Structure.EMBOLUS, Structure.LUNG):
            ok, detail = within_spec(stats, structure)
            assert ok, (study.seed, structure.name, detail)


def test_veins_enhance_less_than_arteries_but_far_more_than_emboli(studies_with_embolus_cores):
    for _, stats in studies_with_embolus_cores:
        ok, detail = within_spec(stats, Structure.PULMONARY_VEIN)
        assert ok, detail
        assert stats[Structure.PULMONARY_VEIN][0] < stats[Structure.PULMONARY_ARTERY][0]
        assert stats[Structure.PULMONARY_VEIN][0] > HU_RANGE[Structure.EMBOLUS][1] + 30


def test_every_embolus_voxel_lies_inside_an_artery_of_the_same_patient_without_emboli(positive_study):
    clean = render(positive_study.anatomy.without_emboli(), positive_study.grid, noise=False)
    lumen = np.isin(clean.labels, [Structure.PULMONARY_ARTERY, Structure.FLOW_ARTEFACT])
    mask = positive_study.image.mask
    assert mask.sum() > 0
    assert np.all(lumen[mask])


def test_slice_and_study_labels_follow_the_mask(positive_study, negative_study):
    assert positive_study.pe_present and not negative_study.pe_present
    np.testing.assert_array_equal(positive_study.slice_labels, positive_study.image.mask.any(axis=(1, 2)))
    visible = sorted({k for e in positive_study.emboli for k in e.slices})
    assert visible == list(np.nonzero(positive_study.slice_labels)[0])
    assert not negative_study.image.mask.any() and negative_study.emboli == []


def test_the_mask_is_the_embolus_label_where_the_image_shows_the_clot(positive_study):
    image = positive_study.image
    label = image.labels == Structure.EMBOLUS
    assert np.all(label[image.mask])
    np.testing.assert_array_equal(image.mask, label & (image.shown >= VISIBLE_SHARE))
    assert image.mask.sum() >= 0.9 * label.sum()  # a classic study's clots sit in arteries it shows well


def test_emboli_come_at_every_level_with_sizes_between_2_and_20_mm():
    per_study = [build_anatomy(seed, pe=True).emboli for seed in range(40)]
    emboli = [e for study in per_study for e in study]
    assert {e.level for e in emboli} == {"central", "lobar", "segmental"}
    assert all(2.0 <= e.size_mm <= 20.0 for e in emboli)
    assert {e.occlusive for e in emboli} == {True, False}
    assert min(e.size_mm for e in emboli) < 4 and max(e.size_mm for e in emboli) > 16
    assert min(map(len, per_study)) == 1 and max(map(len, per_study)) >= 3


def test_flow_artefacts_lower_enhancement_but_stay_far_above_emboli():
    for seed in range(40):
        study = generate_study(seed, pe=False, options=MEDIUM)
        if study.anatomy.flow_artefacts:
            break
    else:
        pytest.fail("no seed of 40 drew a flow artefact")
    stats = study.structure_hu()
    assert Structure.FLOW_ARTEFACT in stats
    mean = stats[Structure.FLOW_ARTEFACT][0]
    assert HU_RANGE[Structure.EMBOLUS][1] + 50 < mean < stats[Structure.PULMONARY_ARTERY][0]
    assert not study.image.mask.any()


def test_lymph_nodes_sit_outside_the_arterial_lumen(positive_study):
    nodes = [e for e in positive_study.anatomy.ellipsoids if e.structure == Structure.LYMPH_NODE]
    assert nodes
    labels = positive_study.image.labels
    assert (labels == Structure.LYMPH_NODE).any()
    assert not np.any(positive_study.image.mask & (labels == Structure.LYMPH_NODE))


def test_patients_vary_in_size_noise_and_contrast_timing():
    anatomies = [build_anatomy(seed, pe=False) for seed in range(12)]
    for attr, spread in (("size", 0.1), ("noise_sigma", 5.0), ("hu_artery", 60.0), ("hu_aorta", 60.0)):
        values = [getattr(a, attr) for a in anatomies]
        assert max(values) - min(values) > spread, attr


def test_a_noncontrast_render_shows_unenhanced_blood_and_no_emboli(positive_study):
    plain = render(positive_study.anatomy, positive_study.grid, contrast=False, noise=False)
    artery = plain.labels == Structure.PULMONARY_ARTERY
    assert abs(float(np.median(plain.hu[artery])) - UNENHANCED_BLOOD_HU) < 15
    assert not plain.mask.any() and not (plain.labels == Structure.EMBOLUS).any()


def test_the_same_seed_gives_the_same_study_and_another_seed_does_not():
    a = generate_study(5, pe=True, options=SMALL)
    b = generate_study(5, pe=True, options=SMALL)
    c = generate_study(6, pe=True, options=SMALL)
    np.testing.assert_array_equal(a.image.hu, b.image.hu)
    assert a.identity == b.identity and a.identity.study_instance_uid != c.identity.study_instance_uid
    assert not np.array_equal(a.image.hu, c.image.hu)
