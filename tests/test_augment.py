"""Stage-1 augmentation: intensity changes act on HU through the windows; geometry moves mask and image together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.errors import ConfigError
from training.augment import AugmentRanges, geometry, intensity

WINDOWS = [(100.0, 700.0), (40.0, 400.0), (-600.0, 1500.0)]
FIXED = AugmentRanges(hu_scale=(1.0, 1.0), hu_offset=(0.0, 0.0), window_jitter=0.0, gamma=(1.0, 1.0),
                      noise=(0.0, 0.0), blur_probability=0.0, sharpen_probability=0.0)


def windowed(hu: np.ndarray) -> torch.Tensor:
    chans = [np.clip((hu - (c - w / 2)) / w, 0, 1) for c, w in WINDOWS]
    return torch.from_numpy(np.stack(chans, axis=1).astype(np.float32))


def test_without_any_change_the_intensity_augmentation_is_the_identity():
    x = windowed(np.random.default_rng(0).uniform(-300, 400, (4, 16, 16)))
    torch.testing.assert_close(intensity(x, WINDOWS, np.random.default_rng(1), FIXED), x)


def test_an_hu_offset_moves_every_channel_as_its_window_maps_hu():
    hu = np.random.default_rng(0).uniform(-100, 200, (2, 16, 16))  # inside every window: nothing clipped
    shifted = AugmentRanges(**{**FIXED.__dict__, "hu_offset": (50.0, 50.0), "hu_scale": (1.2, 1.2)})
    out = intensity(windowed(hu), WINDOWS, np.random.default_rng(1), shifted)
    torch.testing.assert_close(out, windowed(hu * 1.2 + 50.0), atol=1e-5, rtol=0)


def test_geometry_moves_the_mask_with_the_image_and_fills_with_air():
    hu = np.full((8, 64, 64), -1000.0)
    mask = np.zeros((8, 64, 64), dtype=np.float32)
    hu[:, 20:28, 36:44] = 400.0
    mask[:, 20:28, 36:44] = 1.0
    x, m = geometry(windowed(hu), torch.from_numpy(mask), np.random.default_rng(3), WINDOWS)
    for i in range(8):
        bright = x[i, 0].numpy() > 0.5
        inside = m[i].numpy() > 0.5
        assert inside.sum() > 10
        assert (bright & inside).sum() / (bright | inside).sum() > 0.9  # the same square, wherever it went
    air = windowed(np.full((1, 1, 1), -1000.0))[0, :, 0, 0]
    torch.testing.assert_close(x[:, :, 0, 0].min(dim=0).values, air, atol=1e-5, rtol=0)  # corners: air


def test_a_weaker_bolus_dims_the_enhanced_blood_and_leaves_soft_tissue_clot_and_lung_alone():
    hu = np.zeros((2, 8, 8))
    hu[:, :2] = 400.0  # contrast-filled artery
    hu[:, 2:4] = 40.0  # soft tissue
    hu[:, 4:6] = 60.0  # clot
    hu[:, 6:] = -800.0  # lung
    weak = AugmentRanges(**{**FIXED.__dict__, "bolus_probability": 1.0, "bolus_factor": (0.25, 0.25)})
    out = intensity(windowed(hu), WINDOWS, np.random.default_rng(1), weak)
    expected = hu.copy()
    expected[:, :2] = 80.0 + (400.0 - 80.0) * 0.25  # 160 HU: a weak bolus
    torch.testing.assert_close(out, windowed(expected), atol=2e-3, rtol=0)


def test_the_bolus_change_reads_each_context_channel_from_its_own_slab():
    windows = WINDOWS + [WINDOWS[0]]  # a neighbour's PE window as a fourth channel
    centre, neighbour = np.full((1, 4, 4), 40.0), np.full((1, 4, 4), 400.0)
    x = torch.cat([windowed(centre), windowed(neighbour)[:, :1]], dim=1)
    weak = AugmentRanges(**{**FIXED.__dict__, "bolus_probability": 1.0, "bolus_factor": (0.5, 0.5)})
    out = intensity(x, windows, np.random.default_rng(0), weak)
    torch.testing.assert_close(out[:, :3], x[:, :3])  # the centre slab has no blood: unchanged
    torch.testing.assert_close(out[:, 3], windowed(np.full((1, 4, 4), 240.0))[:, 0], atol=2e-3, rtol=0)


def test_without_the_bolus_change_nothing_is_drawn_so_earlier_runs_draw_the_same_batches():
    from training.augment import bolus

    x = windowed(np.random.default_rng(0).uniform(-300, 400, (4, 16, 16)))
    rng = np.random.default_rng(5)
    before = rng.bit_generator.state
    assert bolus(x, WINDOWS, rng, AugmentRanges()) is x
    assert rng.bit_generator.state == before
    bolus(x, WINDOWS, rng, AugmentRanges(bolus_probability=0.5))
    assert rng.bit_generator.state != before


def _augmented_pe_window_hu(hu: float, settings, draws: int) -> np.ndarray:
    """The HU that ``draws`` uniform slices of ``hu`` read in the PE window after the loader's augmentation."""
    from training.loader import augment

    images = np.rint(windowed(np.full((draws, 32, 32), hu)).numpy() * 255.0).astype(np.uint8)
    x, _, _ = augment(settings, images, np.zeros((draws, 32, 32), np.uint8), np.zeros(draws, np.float32),
                      np.zeros(draws, bool), np.random.default_rng(int(hu)), WINDOWS)
    centre, width = WINDOWS[0]
    return centre - width / 2.0 + x[:, 0, 8:24, 8:24].mean(dim=(1, 2)).numpy() * width


def test_calibrated_intensity_ranges_keep_a_weak_lumen_brighter_than_a_clot_where_the_wide_ones_do_not():
    from training.config import IntensitySettings, Stage1Settings

    wide = Stage1Settings(augmentation="full")
    calibrated = Stage1Settings(augmentation="full", intensity=IntensitySettings(
        hu_scale=(0.9, 1.1), hu_offset=(-20.0, 20.0), gamma=(0.9, 1.1), window_jitter=0.02))
    lumen, clot = 200.0, 45.0  # a weak bolus and a clot of the middle of the drawn range (node/phantom/styles.py)
    in_order = {}
    for name, settings in (("wide", wide), ("calibrated", calibrated)):
        lumen_read = _augmented_pe_window_hu(lumen, settings, 300)
        clot_read = _augmented_pe_window_hu(clot, settings, 300)
        in_order[name] = float(np.mean(clot_read[:, None] < lumen_read[None, :]))  # every (clot, lumen) pair
    assert in_order["calibrated"] == 1.0 and in_order["wide"] < 0.97, in_order


def test_intensity_ranges_must_be_ordered_and_keep_scale_and_gamma_positive():
    from training.config import load_train_config

    for bad in ("stage1.intensity.hu_scale=[1.1,0.9]", "stage1.intensity.gamma=[0,1]",
                "stage1.intensity.hu_offset=[20,-20]", "stage1.intensity.window_jitter=0.9"):
        with pytest.raises(ConfigError, match="stage1.intensity"):
            load_train_config(None, [bad])
    assert load_train_config(None, []).stage1.intensity.hu_scale == AugmentRanges().hu_scale
