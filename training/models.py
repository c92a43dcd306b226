"""Stage 1: a 2D ResNet on slices with a CAM head. Stage 2: a bidirectional RNN over a study.

The slice network's head is one linear layer applied at every position of the last feature map: the
class activation map (``cam``, in logit units, bias included). The slice logit pools the CAM:

- ``avg``: its mean, which equals global average pooling followed by the linear layer (then Grad-CAM
  on the last block equals the CAM up to a positive factor);
- ``lse``: log-mean-exp, a smooth maximum. Measured on the synthetic CTPA set, average pooling let a
  small embolus (one of 144 CAM cells) be outvoted by the rest of the slice, and the network learned
  where emboli tend to be rather than what they look like (max-slice study AUC 0.44 on held-out
  studies); a smooth maximum lets one cell decide.

Either way the CAM is a plain forward computation that exports to ONNX. The feature vector handed to
stage 2 is the average-pooled feature map next to the feature map pooled with the CAM's spatial
softmax as weights (what the network looked at); with ``feature_scores`` the slice logit and the CAM's
peak follow, and stage 2 may read those two alone (``inputs="scores"``): a sequence model over the
slices' verdicts cannot learn the scanner from 512 feature dimensions. With ``enhancement`` the slab's
arterial enhancement in HU follows (``slab_enhancement``, computed from the input bytes with no
weights), and stage 2 reads its study mean beside the scores (``study_enhancement``): the same slab
score means less in a study whose arteries are all grey.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from training.config import ENHANCEMENT_FLOOR_HU

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


#: Stage 2 reads the study's enhancement as (HU - centre) / scale: about -1.5 to +1.6 on the varied family.
ENHANCEMENT_CENTRE_HU, ENHANCEMENT_SCALE_HU = 350.0, 50.0


def slab_enhancement(pe_window: torch.Tensor, low_hu: float, top_hu: float, quantile: float = 0.9,
                     central: float = 0.6) -> torch.Tensor:
    """(B, S, S) PE-window input in 0-1 -> (B,) the slab's arterial enhancement in HU.

    The pixel ranked at (1 - quantile) from the top among the central ``central`` of the field's pixels
    that lie above ENHANCEMENT_FLOOR_HU and below the window's top (a saturated pixel says only "at
    least the top"); ENHANCEMENT_FLOOR_HU where there are none. Sort and gather only, so that the exported
    graph computes it from the same bytes as training does from its cache.
    """
    size = int(pe_window.shape[-1])  # fixed by the preprocessing spec
    a = round(size * (1.0 - central) / 2.0)
    values = pe_window[:, a:size - a, a:size - a].flatten(1).float()
    floor = (ENHANCEMENT_FLOOR_HU - low_hu) / (top_hu - low_hu)
    inside = (values > floor) & (values < 1.0 - 0.5 / 255.0)
    ordered, _ = torch.sort(torch.where(inside, values, torch.full_like(values, -1.0)), dim=1, descending=True)
    count = inside.sum(dim=1)
    rank = torch.floor((1.0 - quantile) * count.float()).long()
    hu = low_hu + ordered.gather(1, rank[:, None])[:, 0] * (top_hu - low_hu)
    return torch.where(count > 0, hu, torch.full_like(hu, ENHANCEMENT_FLOOR_HU))


def study_enhancement(slab_hu: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) slab enhancements in HU and (B, T) validity -> (B,) the mean over each study's middle half.

    The middle half of the slabs (head first) holds the pulmonary arteries; apex and base hold few."""
    ones = valid.to(slab_hu.dtype)
    n = valid.sum(dim=1)
    index = torch.cumsum(torch.ones_like(slab_hu), dim=1) - 1.0  # slab positions, traceable for any T
    first = torch.div(n, 4, rounding_mode="floor")
    last = torch.maximum(first + 1, torch.div(3 * n, 4, rounding_mode="floor"))
    middle = (index >= first[:, None].to(index.dtype)) & (index < last[:, None].to(index.dtype))
    weights = ones * middle.to(ones.dtype)
    return (slab_hu * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class SliceNet(nn.Module):
    """ResNet-18/34 (plain torch) returning slice logit, pooled feature and CAM."""

    def __init__(self, depth: int = 18, width: int = 64, in_channels: int = 3, output_stride: int = 16,
                 pooling: str = "lse", lse_r: float = 1.0, feature_scores: bool = False, spatial_channels: int = 0,
                 spatial_grid: int = 6, enhancement_window: tuple[float, float] | None = None):
        super().__init__()
        self.feature_scores = feature_scores
        if enhancement_window is not None and enhancement_window[1] <= ENHANCEMENT_FLOOR_HU:
            raise ValueError(f"the PE window {enhancement_window} HU ends below {ENHANCEMENT_FLOOR_HU} HU: "
                             "no enhanced blood to measure")
        #: (low, top) HU of input channel 0 (the PE window); None: no enhancement feature
        self.enhancement_window = enhancement_window
        self.spatial_channels, self.spatial_grid = spatial_channels, spatial_grid
        if pooling not in ("avg", "lse"):
            raise ValueError(f"pooling {pooling!r} is not avg or lse")
        self.pooling, self.lse_r = pooling, lse_r
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], width
        for i, n in enumerate(BLOCKS[depth]):
            cout = width * 2**i
            stride, dilation = (1, 1) if i == 0 else (2, 1)
            if i == 3 and output_stride == 16:
                stride, dilation = 1, 2  # keep resolution in the last stage, widen its view instead
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride if j == 0 else 1, dilation))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 1)
        if spatial_channels > 1 and cin % (spatial_channels - 1):
            raise ValueError(f"spatial_channels - 1 = {spatial_channels - 1} does not divide {cin} feature channels")
        self.feature_dim = (2 * cin + spatial_channels * spatial_grid**2 + (2 if feature_scores else 0)
                            + (1 if enhancement_window is not None else 0))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # each residual block starts as the identity

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, S, S) in 0-1 -> logit (B,), feature (B, F), cam (B, h, w) in logit units."""
        fmap = self.body(self.stem(x))
        cam = torch.einsum("bchw,c->bhw", fmap, self.fc.weight[0]) + self.fc.bias[0]
        flat = cam.flatten(1)
        if self.pooling == "avg":
            logit = flat.mean(dim=1)
        else:
            n = torch.tensor(float(flat.shape[1]), device=flat.device)
            logit = (torch.logsumexp(self.lse_r * flat, dim=1) - torch.log(n)) / self.lse_r
        attention = torch.softmax(flat, dim=1).view_as(cam)
        parts = [fmap.mean(dim=(2, 3)), torch.einsum("bchw,bhw->bc", fmap, attention)]
        if self.spatial_channels:  # a small map for a ConvLSTM: the CAM, then channel-group means of the features
            maps = [cam[:, None]]
            if self.spatial_channels > 1:
                b, c, h, w = fmap.shape
                k = self.spatial_channels - 1
                maps.append(fmap.reshape(b, k, c // k, h, w).mean(dim=2))
            grid = F.adaptive_avg_pool2d(torch.cat(maps, dim=1), self.spatial_grid)
            parts.append(grid.flatten(1))
        if self.feature_scores:  # the slice's own verdict, last: its logit and its CAM's peak
            parts += [logit[:, None], flat.amax(dim=1, keepdim=True)]
        if self.enhancement_window is not None:  # last of all: the slab's arterial enhancement in HU
            low, top = self.enhancement_window
            parts.append(slab_enhancement(x[:, 0], low, top)[:, None].to(logit.dtype))
        feature = torch.cat(parts, dim=1)
        return logit, feature, cam


def build_study_net(feature_dim: int, rnn: str, hidden: int, layers: int = 1, dropout: float = 0.2,
                    inputs: str = "all", spatial_channels: int = 0, spatial_grid: int = 6,
                    enhancement: bool = False) -> nn.Module:
    """Stage 2 as configured: the bidirectional GRU/LSTM (``StudyNet``) or the ConvLSTM."""
    if rnn == "convlstm":
        return ConvLSTMStudyNet(feature_dim, spatial_channels, spatial_grid, hidden, dropout)
    return StudyNet(feature_dim, hidden, layers, rnn, dropout, inputs, enhancement)


class StudyNet(nn.Module):
    """Bidirectional GRU/LSTM over the stage-1 features of a study's slices (head first)."""

    def __init__(self, feature_dim: int, hidden: int = 64, layers: int = 1, rnn: str = "gru",
                 dropout: float = 0.2, inputs: str = "all", enhancement: bool = False):
        super().__init__()
        if inputs not in ("all", "scores"):
            raise ValueError(f"inputs {inputs!r} is not all or scores")
        if enhancement and inputs != "scores":
            raise ValueError("enhancement is read beside the slice scores: inputs must be 'scores'")
        self.inputs, self.enhancement = inputs, enhancement
        if inputs == "scores":  # only the slice scores a feature_scores SliceNet appends to its feature
            feature_dim = 3 if enhancement else 2  # and, last, the study's enhancement on every slab
        self.norm = nn.LayerNorm(feature_dim) if inputs == "all" else nn.Identity()
        self.drop = nn.Dropout(dropout)
        cls = nn.GRU if rnn == "gru" else nn.LSTM
        self.rnn = cls(feature_dim, hidden, layers, batch_first=True, bidirectional=True,
                       dropout=dropout if layers > 1 else 0.0)
        self.slice_head = nn.Linear(2 * hidden, 1)
        self.study_head = nn.Linear(4 * hidden, 1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, F), lengths (B,) or None (all T valid) -> study logit (B,), slice logits (B, T)."""
        t = features.shape[1]
        if lengths is None:
            valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        else:
            valid = torch.arange(t, device=features.device)[None, :] < lengths.to(features.device)[:, None]
        if self.enhancement:  # the scores, then the study's enhancement (scaled) beside them on every slab
            study = (study_enhancement(features[..., -1], valid) - ENHANCEMENT_CENTRE_HU) / ENHANCEMENT_SCALE_HU
            features = torch.cat([features[..., -3:-1], study[:, None, None].expand(-1, t, 1)], dim=2)
        elif self.inputs == "scores":
            features = features[..., -2:]
        x = self.drop(self.norm(features))
        if lengths is None:
            out, _ = self.rnn(x)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
        slice_logits = self.slice_head(out)[..., 0]
        study_logit = self.study_head(pool_slices(out, valid))[:, 0]
        return study_logit, slice_logits


def pool_slices(per_slice: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, D) per-slice states and (B, T) validity -> (B, 2D): their maximum and mean over the valid slices."""
    v = valid[..., None]
    pooled_max = per_slice.masked_fill(~v, float("-inf")).amax(dim=1)
    pooled_mean = (per_slice * v).sum(dim=1) / v.sum(dim=1).clamp(min=1)
    return torch.cat([pooled_max, pooled_mean], dim=1)


def convlstm_inputs(features: torch.Tensor, offset: int, k: int, grid: int) -> torch.Tensor:
    """(B, T, F) stage-1 features -> (B, T, k + 2, grid, grid): the k maps a SliceNet with spatial_channels
    appended at ``offset``, then the two scores (the last two features) spread over the grid."""
    b, t = features.shape[0], features.shape[1]
    maps = features[:, :, offset:offset + k * grid * grid].reshape(b, t, k, grid, grid)
    scores = features[:, :, -2:].reshape(b, t, 2, 1, 1).expand(b, t, 2, grid, grid)
    return torch.cat([maps, scores], dim=2)


class _Scan(nn.Module):
    """One direction of a ConvLSTM over a sequence of maps (B, T, C, g, g) -> hidden maps (B, T, H, g, g).

    Scripted (torch.jit.script) so that its loop over slices stays a loop in ONNX: any number of slices."""

    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv2d(cin + hidden, 4 * hidden, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _, gh, gw = x.shape
        h = torch.zeros(b, self.hidden, gh, gw, dtype=x.dtype, device=x.device)
        c = torch.zeros(b, self.hidden, gh, gw, dtype=x.dtype, device=x.device)
        out = []
        for k in range(t):
            i, f, g, o = torch.chunk(self.conv(torch.cat([x[:, k], h], dim=1)), 4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out, dim=1)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Each sequence of (B, T, ...) reversed within its own length (padding stays at the end)."""
    if lengths is None:
        return x.flip(1)
    t = x.shape[1]
    steps = torch.arange(t, device=x.device)[None, :]
    n = lengths.to(x.device)[:, None]
    index = torch.where(steps < n, n - 1 - steps, steps)
    return torch.gather(x, 1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class ConvLSTMStudyNet(nn.Module):
    """Stage 2 as in the authors' patent (US 11,875,898): a bidirectional ConvLSTM that scans the slices'
    spatial maps rather than their pooled vectors.

    It reads, from each slice's stage-1 feature vector, the ``spatial_channels`` maps of ``grid`` x ``grid``
    cells that a SliceNet with ``spatial_channels`` appends (its CAM and channel-group means of its last
    feature map) and the slice's two scores, spread over the grid as two more channels. Slice logits come
    from each slice's hidden maps (both directions, maximum over the grid), the study logit from their
    maximum and mean over the slices, as in ``StudyNet``; same inputs, same outputs, same bundle format.
    """

    def __init__(self, feature_dim: int, spatial_channels: int, grid: int = 6, hidden: int = 8,
                 dropout: float = 0.2):
        super().__init__()
        if spatial_channels < 1:
            raise ValueError("a ConvLSTM stage 2 needs stage-1 spatial maps (stage1.spatial_channels >= 1)")
        self.k, self.grid = spatial_channels, grid
        self.offset = feature_dim - 2 - spatial_channels * grid * grid
        if self.offset < 0:
            raise ValueError(f"feature_dim {feature_dim} is too small for {spatial_channels} maps of "
                             f"{grid} x {grid} and 2 scores")
        self.drop = nn.Dropout(dropout)
        self.norm = nn.GroupNorm(1, spatial_channels + 2)
        with warnings.catch_warnings():  # torch marks jit.script deprecated; 2.13 (pinned) has it, and
            warnings.simplefilter("ignore", DeprecationWarning)  # its loops are what ONNX Loop is made from
            self.forward_scan = torch.jit.script(_Scan(spatial_channels + 2, hidden))
            self.backward_scan = torch.jit.script(_Scan(spatial_channels + 2, hidden))
        self.slice_head = nn.Linear(2 * hidden, 1)
        self.study_head = nn.Linear(4 * hidden, 1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = features.shape
        g = self.grid
        x = convlstm_inputs(features, self.offset, self.k, g)
        x = self.drop(self.norm(x.reshape(b * t, self.k + 2, g, g)).reshape(b, t, self.k + 2, g, g))
        hidden = torch.cat([self.forward_scan(x), reverse_padded(self.backward_scan(reverse_padded(x, lengths)),
                                                                 lengths)], dim=2)
        per_slice = hidden.amax(dim=(3, 4))  # (B, T, 2H)
        slice_logits = self.slice_head(per_slice)[..., 0]
        if lengths is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=features.device)
        else:
            valid = torch.arange(t, device=features.device)[None, :] < lengths.to(features.device)[:, None]
        return self.study_head(pool_slices(per_slice, valid))[:, 0], slice_logits
