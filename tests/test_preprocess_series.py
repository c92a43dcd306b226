"""node.preprocess (the one preprocessing definition) and node.series (sorting along the normal)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from conftest import SMALL
from node.phantom import write_study
from node.preprocess import (
    PreprocessError,
    PreprocessSpec,
    add_context,
    average_slabs,
    crop_to_field,
    input_pixel_mm,
    preprocess,
    resize,
    resize_mask,
    slab_size,
    study_bolus_hu,
    to_grid,
    window,
)
from node.series import SeriesError, read_volume


def test_spec_round_trips_through_a_plain_dict_and_rejects_nonsense():
    spec = PreprocessSpec(size=128, field_mm=280.0)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(PreprocessError):
        PreprocessSpec(windows=((40.0, 0.0),))
    with pytest.raises(PreprocessError):
        PreprocessSpec.from_dict({"size": 64})


def _chest(artery_hu: float, slabs: int = 12, size: int = 96) -> np.ndarray:
    """Slabs of a toy chest: soft tissue, a spine of cortical bone and marrow, an aorta and a pulmonary
    artery at ``artery_hu`` (the aorta a little less), and a 55 HU clot in the artery."""
    y, x = np.mgrid[:size, :size] - size / 2
    hu = np.where((x**2 + y**2 < (0.45 * size) ** 2) & (np.abs(x) < 0.2 * size), 40.0, -850.0)  # mediastinum, lung
    hu[(x**2 + (y - 0.3 * size) ** 2) < (0.08 * size) ** 2] = 1200.0  # cortical bone
    hu[(x**2 + (y - 0.3 * size) ** 2) < (0.06 * size) ** 2] = 250.0  # marrow
    hu[((x + 0.1 * size) ** 2 + y**2) < (0.1 * size) ** 2] = 0.9 * artery_hu  # aorta
    artery = ((x - 0.1 * size) ** 2 + (y + 0.05 * size) ** 2) < (0.09 * size) ** 2
    hu[artery] = artery_hu
    hu[((x - 0.1 * size) ** 2 + (y + 0.05 * size) ** 2) < (0.03 * size) ** 2] = 55.0  # clot
    return np.repeat(hu[None], slabs, axis=0)


def test_the_bolus_statistic_reads_the_arterial_enhancement_and_ignores_bone_and_tissue():
    for artery_hu in (180.0, 350.0, 600.0):
        assert study_bolus_hu(_chest(artery_hu)) == pytest.approx(artery_hu, rel=0.1)
    assert study_bolus_hu(np.full((4, 32, 32), 40.0)) is None  # no contrast: nothing to measure


def test_a_weak_and_a_strong_bolus_look_alike_after_normalisation_and_the_clot_stays_dark():
    spec = PreprocessSpec(size=96, bolus_reference_hu=350.0)
    plain = PreprocessSpec(size=96)
    weak, strong = _chest(190.0), _chest(560.0)
    normalised = [window(g, spec, study_bolus_hu(g)).astype(int) for g in (weak, strong)]
    as_drawn = [window(g, plain).astype(int) for g in (weak, strong)]
    artery, clot = weak == 190.0, weak == 55.0  # (slabs, rows, columns) of the PE window, channel 0
    pe = [n[:, 0] for n in normalised], [a[:, 0] for a in as_drawn]
    assert abs(pe[1][0][artery] - pe[1][1][artery]).min() > 90  # grey against white as drawn
    assert abs(pe[0][0][artery] - pe[0][1][artery]).max() <= 12  # both near the reference once normalised
    assert pe[0][0][artery].min() - pe[0][0][clot].max() > 80  # the clot is still a defect
    np.testing.assert_array_equal(normalised[0][:, 2], as_drawn[0][:, 2])  # lung window: the lung is untouched
    tissue = weak < 80
    np.testing.assert_array_equal(normalised[0][:, 0][tissue], as_drawn[0][:, 0][tissue])  # below the pivot: as drawn


def test_the_spec_carries_its_bolus_reference_and_preprocess_is_the_grid_then_the_windows():
    spec = PreprocessSpec(size=32, bolus_reference_hu=350.0)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert "bolus_reference_hu" not in PreprocessSpec(size=32).to_dict()  # older bundles and caches keep their form
    with pytest.raises(PreprocessError, match="bolus_reference_hu"):
        PreprocessSpec(bolus_reference_hu=100.0)
    hu = _chest(200.0, slabs=8, size=64)
    grid = to_grid(hu, spec)
    np.testing.assert_array_equal(preprocess(hu, spec, bolus_hu=study_bolus_hu(grid)),
                                  window(grid, spec, study_bolus_hu(grid)))


def test_area_resize_keeps_the_mean_and_maps_constant_images_to_themselves():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 100, (2, 100, 100)).astype(np.float32)
    small = resize(img, 37)
    assert small.shape == (2, 37, 37)
    assert small.mean() == pytest.approx(img.mean(), abs=1e-3)
    np.testing.assert_allclose(resize(np.full((1, 50, 50), 7.0), 64), 7.0, rtol=1e-6)


def test_windows_become_uint8_channels():
    quadrants = np.array([[-1000.0, 100.0], [450.0, 2000.0]])
    hu = np.kron(quadrants, np.ones((16, 16)))[None]  # 32 x 32, four flat quadrants
    out = preprocess(hu, PreprocessSpec(size=16))
    assert out.dtype == np.uint8 and out.shape == (1, 3, 16, 16)
    corners = [out[0, 0, 0, 0], out[0, 0, 0, -1], out[0, 0, -1, 0], out[0, 0, -1, -1]]
    assert corners == [0, 128, 255, 255]  # PE window: centre 100, width 700


def test_field_crop_is_centred_in_millimetres_and_pads_with_air():
    img = np.zeros((1, 10, 10))
    img[0, 4:6, 4:6] = 1.0
    cropped = crop_to_field(img, (2.0, 2.0), 8.0)
    assert cropped.shape == (1, 4, 4) and cropped[0, 1:3, 1:3].sum() == 4
    padded = crop_to_field(img, (2.0, 2.0), 28.0)
    assert padded.shape == (1, 14, 14) and padded[0, 0, 0] == -1000.0
    spec = PreprocessSpec(size=64, field_mm=270.0)
    assert input_pixel_mm((512, 512), (0.7, 0.7), spec) == pytest.approx(270.0 / 64)
    with pytest.raises(PreprocessError, match="pixel spacing"):
        preprocess(np.zeros((1, 8, 8)), spec)
    mask = np.zeros((1, 100, 100), dtype=np.uint8)
    mask[0, 45:55, 45:55] = 1
    assert resize_mask(mask, spec, (1.0, 1.0)).max() == 255


def test_read_volume_sorts_head_first_whatever_the_order_and_gives_hu(positive_study, tmp_path):
    paths = write_study(positive_study, tmp_path)["ctpa"]
    volume = read_volume(list(reversed(paths)))
    assert np.all(np.diff(volume.positions_mm) < 0)
    expected = np.clip(np.rint(positive_study.image.hu + 1024), 0, 4095) - 1024
    np.testing.assert_array_equal(volume.hu, expected)
    assert volume.pixel_spacing_mm == pytest.approx((SMALL.fov_mm / SMALL.matrix,) * 2)
    assert volume.patient_id == positive_study.identity.patient_id


def test_read_volume_refuses_mixed_series(positive_study, negative_study, tmp_path):
    a = write_study(positive_study, tmp_path / "a")["ctpa"][:2]
    b = write_study(negative_study, tmp_path / "b")["ctpa"][:2]
    with pytest.raises(SeriesError, match="more than one series"):
        read_volume(a + b)
    ds = pydicom.dcmread(a[0])
    del ds.ImageOrientationPatient
    ds.save_as(tmp_path / "broken.dcm")
    with pytest.raises(SeriesError, match="ImageOrientationPatient"):
        read_volume([tmp_path / "broken.dcm"])


def test_slabs_average_runs_of_slices_and_keep_a_short_last_one():
    hu = np.arange(10, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), dtype=np.float32)
    slabs = average_slabs(hu, 4)
    assert slabs.shape == (3, 2, 2) and list(slabs[:, 0, 0]) == [1.5, 5.5, 8.5]
    assert average_slabs(hu, 1) is hu
    spec = PreprocessSpec(slab_mm=4.5)
    assert [slab_size(s, spec) for s in (1.0, 1.25, 3.0, 4.5, 5.0)] == [4, 4, 2, 1, 1]
    assert slab_size(1.0, PreprocessSpec()) == 1


def test_context_channels_are_the_neighbouring_slabs_pe_window_with_the_nearest_slab_past_either_end():
    slabs = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2)  # 4 slabs, 3 windows
    out = add_context(slabs, 1)
    assert out.shape == (4, 5, 2, 2)
    np.testing.assert_array_equal(out[:, :3], slabs)
    np.testing.assert_array_equal(out[:, 3], slabs[[0, 0, 1, 2], 0])  # the slab above; the first has none
    np.testing.assert_array_equal(out[:, 4], slabs[[1, 2, 3, 3], 0])  # the slab below; the last has none
    two = add_context(slabs, 2)
    np.testing.assert_array_equal(two[2, 3:], slabs[[1, 0, 3, 3], 0])  # -1, -2, +1, +2
    assert add_context(slabs, 0) is slabs


def test_a_spec_with_context_counts_its_channels_and_one_without_keeps_its_old_form():
    spec = PreprocessSpec(context=1)
    assert spec.channels == 5 and spec.slab_spec().channels == 3
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert "context" not in PreprocessSpec().to_dict()  # bundles and caches made before context read alike
    with pytest.raises(PreprocessError, match="context 4"):
        PreprocessSpec(context=4)
