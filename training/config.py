"""Training configuration: YAML file, then ``--set section.key=value`` overrides, validated once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from node.config import apply_overrides, describe, read_yaml
from node.errors import ConfigError
from node.preprocess import BOLUS_CAP_HU, BOLUS_FLOOR_HU, PreprocessSpec
from training.augment import AugmentRanges

_WIDE = AugmentRanges()  # the intensity ranges every run up to the nineteenth trained with


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSettings(_Section):
    root: Path = Path("data/phantom")  # RSNA-STR PE layout: train.csv, train/, masks/
    cache_dir: Path | None = None  # default: <root>/.cache
    val_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    split_seed: int = 0
    # More datasets in the same layout whose studies join the training split only: validation and test
    # stay the root's own split, so runs with and without them are measured on the same studies.
    train_extra: list[Path] = []

    @property
    def cache_folder(self) -> Path:
        """Where slice caches live: ``cache_dir``, else ``<root>/.cache``."""
        return self.cache_dir or Path(self.root) / ".cache"


class PreprocessSettings(_Section):
    windows: list[tuple[float, float]] = [(100.0, 700.0), (40.0, 400.0), (-600.0, 1500.0)]
    size: int = Field(default=192, ge=32, le=1024)
    field_mm: float | None = Field(default=None, ge=50, le=1000)  # centre crop in mm before resizing
    # Thinner series are averaged into slabs of about this thickness at inference: set it to the
    # training data's slice spacing (training itself needs data at that spacing).
    slab_mm: float | None = Field(default=None, ge=0.5, le=20)
    # Neighbouring slabs on each side as extra channels (PE window): the cache stays per slab, the
    # neighbours are stacked at batch time as the node stacks them (node.preprocess.add_context).
    context: int = Field(default=0, ge=0, le=3)
    # Normalise each study's contrast bolus before the windows: the enhanced blood rescaled so that the
    # study's measured arterial enhancement reads this many HU (node.preprocess.study_bolus_hu); unset: off.
    bolus_reference_hu: float | None = Field(default=None, gt=BOLUS_FLOOR_HU, le=BOLUS_CAP_HU)

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(windows=tuple(self.windows), size=self.size, field_mm=self.field_mm,
                              slab_mm=self.slab_mm, context=self.context,
                              bolus_reference_hu=self.bolus_reference_hu)

    def pe_window_hu(self) -> tuple[float, float]:
        """(low, top) HU of the first window, the PE window that input channel 0 holds."""
        centre, width = (float(v) for v in self.windows[0])
        return centre - width / 2.0, centre + width / 2.0

    def channel_windows(self) -> list[tuple[float, float]]:
        """(centre, width) of every input channel, the context channels included."""
        windows = [(float(c), float(w)) for c, w in self.windows]
        return windows + [windows[0]] * (2 * self.context)


#: PE-window pixels above this count as enhanced blood for stage1.enhancement (training/models.py): the
#: floor of the preprocessing's own bolus statistic, one definition.
ENHANCEMENT_FLOOR_HU = BOLUS_FLOOR_HU


class IntensitySettings(_Section):
    """How far the "full" augmentation moves a slice's grey levels (training/augment.py, intensity).

    The defaults are wide: a lumen of 150 HU may read 52 HU after the HU scale and offset alone, inside
    the clots' drawn 0-90 HU. Narrower ranges keep what HU calibration guarantees on every scanner
    (water near 0, a clot darker than any enhanced lumen) while the data itself varies the bolus."""

    hu_scale: tuple[float, float] = _WIDE.hu_scale
    hu_offset: tuple[float, float] = _WIDE.hu_offset  # HU
    gamma: tuple[float, float] = _WIDE.gamma
    window_jitter: float = Field(default=_WIDE.window_jitter, ge=0, le=0.5)  # of each window's width

    @model_validator(mode="after")
    def _ranges_are_ordered(self) -> IntensitySettings:
        for name in ("hu_scale", "hu_offset", "gamma"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: the low end {low} is above the high end {high}")
        for name in ("hu_scale", "gamma"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"{name}: must stay above 0, got {getattr(self, name)[0]}")
        return self


class Stage1Settings(_Section):
    depth: Literal[18, 34] = 18
    width: int = Field(default=64, ge=8, le=128)  # channels of the first stage (64 = standard ResNet)
    output_stride: Literal[16, 32] = 16  # 16 dilates the last stage: a finer attention map
    pooling: Literal["avg", "lse"] = "lse"  # slice logit from the CAM: mean, or log-mean-exp (smooth max)
    lse_r: float = Field(default=1.0, gt=0)
    epochs: int = Field(default=10, ge=1)
    steps_per_epoch: int = Field(default=100, ge=1)
    batch_size: int = Field(default=32, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    positive_fraction: float = Field(default=0.5, gt=0, lt=1)  # share of PE slices in each batch
    # Share of the negatives drawn where positives lie along the body (relative slice position), so
    # that the level of a slice cannot stand in for the embolus.
    matched_negatives: float = Field(default=0.5, ge=0, le=1)
    attention_weight: float = Field(default=1.0, ge=0)  # lambda; 0 switches the attention loss off
    # "cells": every CAM cell against the mask (training/losses.py), applied to PE-negative slices too
    attention_loss: Literal["mass", "mse", "cells"] = "mass"
    # With "cells": also the mean BCE of every embolus cell and of each slice's k hottest other cells
    # (training/losses.py, hard_cell_loss); 0: off. A study is called by its hottest cell, so the
    # cells that decide it are weighed like the slice loss rather than as 1 of 144.
    hard_cells: int = Field(default=0, ge=0, le=64)
    # Crops of this many input pixels alongside each full-slice batch (training/crops.py); None: none.
    crop: int | None = Field(default=None, ge=32)
    crop_batch: int = Field(default=48, ge=2)
    feature_scores: bool = False  # append the slice logit and CAM peak to the feature stage 2 reads
    # Append the slab's arterial enhancement (training/models.py, slab_enhancement: a percentile of the
    # PE window's bright pixels, in HU, computed in the graph from the input itself) after the scores;
    # stage 2 reads its study mean beside the scores. No parameter, and not in the stage-1 loss.
    enhancement: bool = False
    grad_clip: float = Field(default=5.0, gt=0)
    # "flip-shift": left-right flips and shifts only (the first recipe); "full": HU scale/offset,
    # window jitter, gamma, noise, blur/sharpen, rotation, scale, shift, flip (training/augment.py).
    augment: bool = True
    augmentation: Literal["flip-shift", "full"] = "flip-shift"
    # With "full": share of images whose contrast bolus is made weaker or stronger (enhanced blood
    # only; training/augment.py, bolus): weak-bolus negatives were bundle 0.3.0's hardest false positives.
    bolus_probability: float = Field(default=0.0, ge=0, le=1)
    # With "full": the HU scale and offset, gamma and window jitter ranges (IntensitySettings above).
    intensity: IntensitySettings = Field(default_factory=IntensitySettings)
    # Share of each batch's negatives taken from the highest-scoring negatives of a random pool,
    # re-scored every epoch from the second on (hard negatives: mimics such as veins, flow artefacts).
    hard_negatives: float = Field(default=0.0, ge=0, le=1)
    # DataLoader workers that read, crop and augment each step's batches (training/loader.py); 0: none.
    workers: int = Field(default=0, ge=0, le=64)
    # Spatial maps appended to each slice's feature vector for a ConvLSTM stage 2: the CAM and
    # (spatial_channels - 1) channel-group means of the last feature map, pooled to spatial_grid cells a side.
    spatial_channels: int = Field(default=0, ge=0, le=17)
    spatial_grid: int = Field(default=6, ge=1, le=32)
    hard_pool: int = Field(default=768, ge=32)
    # Share of the PE-negative crops centred on the CAM peak of those hard negatives (the very spot
    # that fooled the network last epoch: a flow artefact, a bifurcation, a lymph node).
    hard_crops: float = Field(default=0.0, ge=0, le=1)
    # Share of the embolus crops centred on a small clot (at most 10 clot pixels within 6 mm at the
    # cache's pixels: segmental and subsegmental clots), which uniform crops rarely pick (crops.py).
    small_clot_crops: float = Field(default=0.0, ge=0, le=1)
    # Start from these weights (a longer schedule in two runs); None: scratch. A run's stage-1 checkpoint,
    # or an exported bundle's folder: its folded stage 1 is read back and its BNs recalibrated on this
    # run's training slabs (training/from_bundle.py); the bundle's preprocessing must be this run's.
    init: Path | None = None
    # "bf16": on the CPU, bfloat16 autocast and channels-last weights for the training steps and the
    # per-epoch validation and hard-negative passes (a 1.9x faster step on a CPU with AVX-512 BF16;
    # benchmarks/train_precision.py). Features for stage 2 and the exported model stay float32. CUDA
    # always trains under bfloat16 autocast.
    precision: Literal["fp32", "bf16"] = "fp32"


class Stage2Settings(_Section):
    # convlstm: the authors' patent's variant, a ConvLSTM over stage 1's spatial maps (needs
    # stage1.spatial_channels and stage1.feature_scores); gru/lstm read the pooled vectors or the scores.
    rnn: Literal["gru", "lstm", "convlstm"] = "gru"
    inputs: Literal["all", "scores"] = "all"  # "scores": the slice logit and CAM peak only
    hidden: int = Field(default=64, ge=4)
    layers: int = Field(default=1, ge=1, le=4)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    slice_loss_weight: float = Field(default=0.5, ge=0)  # where per-image labels exist
    # Feature augmentation against another scanner's feature statistics: each training study's
    # features are multiplied by exp(N(0, feature_scale)) per dimension and get N(0, feature_noise x
    # the feature's spread) added per slice. 0 switches either off.
    feature_scale: float = Field(default=0.0, ge=0, le=1)
    feature_noise: float = Field(default=0.0, ge=0, le=2)
    # Which epoch's weights are kept. val_loss: the lowest validation loss (a proper score, smooth from epoch
    # to epoch). val_auc, what runs before bundle 0.5.1 used: the highest validation study AUC, the loss only
    # breaking ties; on 200 studies the AUC moves by a few thousandths from epoch to epoch, and the twentieth
    # run kept its second epoch that way (AUC 0.928 against 0.926 later, loss 0.453 against 0.315).
    keep: Literal["val_loss", "val_auc"] = "val_loss"


class EvalSettings(_Section):
    target_sensitivity: float = Field(default=0.9, gt=0, le=1)
    bootstrap: int = Field(default=2000, ge=100)
    pointing_tolerance_mm: float = Field(default=10.0, ge=0)
    overlay_examples: int = Field(default=16, ge=1)


class TrainConfig(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0)  # 0: torch's default
    data: DataSettings = Field(default_factory=DataSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    stage1: Stage1Settings = Field(default_factory=Stage1Settings)
    stage2: Stage2Settings = Field(default_factory=Stage2Settings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @model_validator(mode="after")
    def _convlstm_has_its_maps(self) -> TrainConfig:
        if self.stage2.rnn == "convlstm" and (self.stage1.spatial_channels < 1 or not self.stage1.feature_scores):
            raise ValueError("stage2.rnn=convlstm reads stage 1's spatial maps and scores: set "
                             "stage1.spatial_channels >= 1 and stage1.feature_scores=true")
        return self

    @model_validator(mode="after")
    def _enhancement_goes_with_the_scores(self) -> TrainConfig:
        if self.stage1.enhancement and (not self.stage1.feature_scores or self.stage2.inputs != "scores"
                                        or self.stage2.rnn == "convlstm"):
            raise ValueError("stage1.enhancement is read by a gru/lstm stage 2 beside the slice scores: set "
                             "stage1.feature_scores=true and stage2.inputs=scores")
        if self.stage1.enhancement:
            centre, width = self.preprocess.windows[0]
            top = self.preprocess.pe_window_hu()[1]
            if top <= ENHANCEMENT_FLOOR_HU:
                raise ValueError(f"stage1.enhancement measures blood above {ENHANCEMENT_FLOOR_HU:g} HU in the first "
                                 f"window; preprocess.windows[0] ({centre:g}, {width:g}) ends at {top:g} HU")
        return self

    @model_validator(mode="after")
    def _hard_cells_need_the_cells_loss(self) -> TrainConfig:
        if self.stage1.hard_cells and self.stage1.attention_loss != "cells":
            raise ValueError("stage1.hard_cells weighs CAM cells against the mask: it needs "
                             "stage1.attention_loss=cells")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_train_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a training config (defaults when no file) with ``section.key=value`` overrides."""
    data = read_yaml(Path(path)) if path is not None else {}
    apply_overrides(data, overrides)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, str(path or "defaults"))) from exc
