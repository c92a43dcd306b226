"""Torch modules to self-contained ONNX files with symbolic batch (and sequence) dimensions.

The TorchScript-based exporter (``dynamo=False``) is used on purpose: measured with torch 2.13 it maps
``nn.GRU``/``nn.LSTM`` to the native ONNX recurrent op with every dimension symbolic, in 0.2 s, while
the dynamo exporter took 28 s and baked the example's length (40) into the per-slice output's shape.
Every export is still checked: ``onnx.checker``, declared output shapes symbolic, and a run at two
other batch sizes and lengths whose outputs must have the matching shapes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from node.bundle import SPEC_METADATA_KEY, TensorInfo
from node.preprocess import PreprocessSpec
from onnx_export import ExportError
from training.models import ConvLSTMStudyNet, SliceNet, StudyNet, convlstm_inputs, pool_slices

OPSET = 17
STAGE1_INPUTS, STAGE1_OUTPUTS = ["image"], ["slice_logit", "feature", "cam"]
STAGE2_INPUTS, STAGE2_OUTPUTS = ["features"], ["study_logit", "slice_logits"]


class _Stage2(torch.nn.Module):
    """One study or a batch of equal-length studies, every slice valid (no packing in the graph)."""

    def __init__(self, net: StudyNet):
        super().__init__()
        self.net = net

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(features)


class _ConvLSTMStage2(torch.nn.Module):
    """The ConvLSTM stage 2 for export, scripted whole: its loops over slices become ONNX Loops, so the
    graph takes any number of slices. ``net(features)`` with every slice valid and dropout off, from the
    same pieces (``convlstm_inputs``, the scans, ``pool_slices``); only the padding handling is left out."""

    def __init__(self, net: ConvLSTMStudyNet):
        super().__init__()
        self.k, self.grid, self.offset = net.k, net.grid, net.offset
        self.norm, self.forward_scan, self.backward_scan = net.norm, net.forward_scan, net.backward_scan
        self.slice_head, self.study_head = net.slice_head, net.study_head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = convlstm_inputs(features, self.offset, self.k, self.grid)
        b, t, c, g = x.shape[0], x.shape[1], self.k + 2, self.grid
        x = self.norm(x.reshape(b * t, c, g, g)).reshape(b, t, c, g, g)
        hidden = torch.cat([self.forward_scan(x), self.backward_scan(x.flip([1])).flip([1])], dim=2)
        per_slice = hidden.amax(dim=[3, 4])
        valid = torch.ones(b, t, dtype=torch.bool, device=features.device)
        study = self.study_head(pool_slices(per_slice, valid)).squeeze(-1)
        return study, self.slice_head(per_slice).squeeze(-1)


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice for dynamo=False
        torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def tensor_infos(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Declared inputs and outputs of an ONNX file (a str dimension is symbolic)."""
    model = onnx.load(str(path), load_external_data=False)

    def info(v) -> TensorInfo:
        t = v.type.tensor_type
        return TensorInfo(name=v.name, shape=[d.dim_param or d.dim_value for d in t.shape.dim],
                          dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name)

    return [info(v) for v in model.graph.input], [info(v) for v in model.graph.output]


def check_graph(path: Path, feeds: list[dict[str, np.ndarray]], symbolic: dict[str, list[int]],
                expect: list[dict[str, tuple[int, ...]]]) -> None:
    """Checker, symbolic output dims and real runs whose output shapes follow the inputs."""
    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker refused it: {exc}") from exc
    _, outputs = tensor_infos(path)
    for out in outputs:
        for axis in symbolic.get(out.name, []):
            if not isinstance(out.shape[axis], str):
                raise ExportError(f"{path.name}: output {out.name} has fixed size {out.shape[axis]} on axis {axis}; "
                                  "it must be symbolic (the exporter baked the example's size in)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for feed, shapes in zip(feeds, expect, strict=True):
        got = dict(zip(names, session.run(None, feed), strict=True))
        for name, shape in shapes.items():
            if got[name].shape != shape:
                raise ExportError(f"{path.name}: output {name} came out {got[name].shape} for an input of "
                                  f"{[v.shape for v in feed.values()]}, expected {shape}")


def export_stage1(net: SliceNet, spec: PreprocessSpec, path: Path) -> None:
    """Slice network: image (B, C, S, S) float32 0-1 -> slice_logit (B), feature (B, F), cam (B, h, w)."""
    example = torch.rand(2, spec.channels, spec.size, spec.size)
    _export(net, example, path, STAGE1_INPUTS, STAGE1_OUTPUTS,
            {"image": {0: "batch"}, "slice_logit": {0: "batch"}, "feature": {0: "batch"}, "cam": {0: "batch"}})
    _set_metadata(path, {SPEC_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True),
                         "petriage.stage": "stage1"})
    with torch.no_grad():
        _, feature, cam = net.eval()(example)
    feeds = [{"image": np.random.default_rng(b).random((b, spec.channels, spec.size, spec.size), dtype=np.float32)}
             for b in (1, 3)]
    check_graph(path, feeds, {"slice_logit": [0], "feature": [0], "cam": [0]},
                [{"slice_logit": (b,), "feature": (b, feature.shape[1]), "cam": (b, *cam.shape[1:])} for b in (1, 3)])


def export_stage2(net: StudyNet | ConvLSTMStudyNet, feature_dim: int, path: Path) -> None:
    """Study network: features (B, T, F) -> study_logit (B), slice_logits (B, T)."""
    example = torch.randn(2, 40, feature_dim)
    if isinstance(net, ConvLSTMStudyNet):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module: torch.nn.Module = torch.jit.script(_ConvLSTMStage2(net.eval()))
    else:
        module = _Stage2(net)
    _export(module, example, path, STAGE2_INPUTS, STAGE2_OUTPUTS,
            {"features": {0: "batch", 1: "slices"}, "study_logit": {0: "batch"},
             "slice_logits": {0: "batch", 1: "slices"}})
    _set_metadata(path, {"petriage.stage": "stage2"})
    shapes = [(1, 97), (3, 7)]
    feeds = [{"features": np.random.default_rng(t).standard_normal((b, t, feature_dim)).astype(np.float32)}
             for b, t in shapes]
    check_graph(path, feeds, {"study_logit": [0], "slice_logits": [0, 1]},
                [{"study_logit": (b,), "slice_logits": (b, t)} for b, t in shapes])
