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
slices' verdicts cannot learn the scanner from 512 feature dimensions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

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


class SliceNet(nn.Module):
    """ResNet-18/34 (plain torch) returning slice logit, pooled feature and CAM."""

    def __init__(self, depth: int = 18, width: int = 64, in_channels: int = 3, output_stride: int = 16,
                 pooling: str = "lse", lse_r: float = 1.0, feature_scores: bool = False):
        super().__init__()
        self.feature_scores = feature_scores
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
        self.feature_dim = 2 * cin + (2 if feature_scores else 0)
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
        if self.feature_scores:  # the slice's own verdict, last: its logit and its CAM's peak
            parts += [logit[:, None], flat.amax(dim=1, keepdim=True)]
        feature = torch.cat(parts, dim=1)
        return logit, feature, cam


class StudyNet(nn.Module):
    """Bidirectional GRU/LSTM over the stage-1 features of a study's slices (head first)."""

    def __init__(self, feature_dim: int, hidden: int = 64, layers: int = 1, rnn: str = "gru",
                 dropout: float = 0.2, inputs: str = "all"):
        super().__init__()
        if inputs not in ("all", "scores"):
            raise ValueError(f"inputs {inputs!r} is not all or scores")
        self.inputs = inputs
        if inputs == "scores":  # only the slice scores a feature_scores SliceNet appends to its feature
            feature_dim = 2
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
        if self.inputs == "scores":
            features = features[..., -2:]
        x = self.drop(self.norm(features))
        t = x.shape[1]
        if lengths is None:
            out, _ = self.rnn(x)
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        else:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=t)
            valid = torch.arange(t, device=x.device)[None, :] < lengths.to(x.device)[:, None]
        slice_logits = self.slice_head(out)[..., 0]
        v = valid[..., None]
        pooled_max = out.masked_fill(~v, float("-inf")).amax(dim=1)
        pooled_mean = (out * v).sum(dim=1) / v.sum(dim=1).clamp(min=1)
        study_logit = self.study_head(torch.cat([pooled_max, pooled_mean], dim=1))[:, 0]
        return study_logit, slice_logits
