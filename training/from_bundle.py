"""Stage-1 weights from an exported bundle, so a published model can be trained further.

A bundle carries stage 1 as ONNX with every batch normalisation folded into the convolution before
it (``W' = W g / s``, ``b' = b - m g / s``). Read back in graph order, those give a SliceNet that
computes exactly the bundle's function in eval mode, with each BN set to the identity and the folded
bias as its shift. That is not yet a network to train: in training mode a BN normalises by the batch's
own statistics, which the identity BN does not know. ``recalibrate_batchnorm`` measures each BN's
input on training slabs and re-parametrises it so that its running statistics are those measured and
its eval-mode function is unchanged; training mode then starts from (nearly) the same function too.

Why this exists: run folders are scratch, bundles are committed. A session that lost its runs (or a
site that wants to adapt the published model to its own studies) starts from the bundle instead of
repeating hours of stage-1 training.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training import TrainingError
from training.models import BasicBlock, SliceNet


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / "model.json").is_file()


def bundle_preprocess(bundle: Path) -> dict:
    return json.loads((bundle / "model.json").read_text())["preprocess"]


def _conv_bn_pairs(model: SliceNet) -> list[tuple[str, str]]:
    """(conv, bn) state-dict prefixes in the order the exported graph computes them."""
    pairs = [("stem.0", "stem.1")]
    for i, block in enumerate(model.body):
        assert isinstance(block, BasicBlock)
        if block.down is not None:  # the block computes its shortcut first
            pairs.append((f"body.{i}.down.0", f"body.{i}.down.1"))
        pairs += [(f"body.{i}.conv1", f"body.{i}.bn1"), (f"body.{i}.conv2", f"body.{i}.bn2")]
    return pairs


def _scopes(conv: str) -> list[str]:
    """Scope names torch's exporter gives a convolution's output ('/body/body.2/down/down.0/Conv_output_0')."""
    if conv == "stem.0":
        return ["stem"]
    block = ".".join(conv.split(".")[:2])
    return [block, "down" if ".down." in conv else conv.split(".")[-1]]


def state_from_onnx(path: Path, model: SliceNet) -> dict[str, torch.Tensor]:
    """A state dict for ``model``'s architecture holding the folded weights of ONNX stage 1 ``path``."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    pairs = _conv_bn_pairs(model)
    if len(convs) != len(pairs):
        raise TrainingError(f"{path}: {len(convs)} convolutions, this stage-1 architecture has {len(pairs)} "
                            "(depth or output stride differ)")
    own = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for node, (conv, bn) in zip(convs, pairs, strict=True):
        if len(node.input) != 3 or node.input[1] not in values or node.input[2] not in values:
            raise TrainingError(f"{path}: convolution {node.output[0]} has no folded weights and bias")
        if node.output[0].startswith("/") and not all(f"/{part}/" in node.output[0] for part in _scopes(conv)):
            raise TrainingError(f"{path}: convolution {node.output[0]} is not {conv} (graph order differs)")
        weight = torch.from_numpy(values[node.input[1]].copy())
        want = own[f"{conv}.weight"].shape
        if weight.shape[0] != want[0] or weight.shape[2:] != want[2:] or \
                (weight.shape[1] != want[1] and conv != "stem.0"):
            raise TrainingError(f"{path}: {conv} has shape {tuple(weight.shape)}, this model needs {tuple(want)}")
        state[f"{conv}.weight"] = weight
        channels = weight.shape[0]
        state[f"{bn}.weight"] = torch.ones(channels)
        state[f"{bn}.bias"] = torch.from_numpy(values[node.input[2]].copy())
        norm = model.get_submodule(bn)
        assert isinstance(norm, nn.BatchNorm2d)
        eps = norm.eps
        state[f"{bn}.running_mean"] = torch.zeros(channels)
        state[f"{bn}.running_var"] = torch.full((channels,), 1.0 - eps)  # (z - 0) / sqrt(1 - eps + eps) = z
        state[f"{bn}.num_batches_tracked"] = torch.tensor(0)
    einsum = next((n for n in graph.node if n.op_type == "Einsum" and n.input[1] in values), None)
    add = next((n for n in graph.node if einsum is not None and n.op_type == "Add"
                and einsum.output[0] in n.input), None)
    if einsum is None or add is None:
        raise TrainingError(f"{path}: no CAM head (Einsum with the class weights, then the bias)")
    state["fc.weight"] = torch.from_numpy(values[einsum.input[1]].reshape(1, -1).copy())
    bias = next(i for i in add.input if i != einsum.output[0])
    state["fc.bias"] = torch.from_numpy(np.asarray(values[bias], dtype=np.float32).reshape(1).copy())
    return state


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Give every BN the statistics of its input on ``batches``, keeping its eval-mode function.

    With m, s the measured mean and sqrt(var + eps) and m0, s0, g0, b0 the old running statistics and
    affine terms: running stats := (m, var), g := g0 s / s0, b := b0 + g0 (m - m0) / s0. Returns the
    number of BN layers changed.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: dict[int, list] = {id(bn): [0.0, 0.0, 0] for bn in bns}

    def hook(bn: nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        z = args[0].detach().double()
        acc = sums[id(bn)]
        acc[0] = acc[0] + z.sum(dim=(0, 2, 3))
        acc[1] = acc[1] + (z * z).sum(dim=(0, 2, 3))
        acc[2] += z.numel() // z.shape[1]

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not bns or not sums[id(bns[0])][2]:
        raise TrainingError("batch-norm recalibration saw no slabs")
    with torch.no_grad():
        for bn in bns:
            assert bn.running_mean is not None and bn.running_var is not None  # BatchNorm2d tracks them
            total, squares, n = sums[id(bn)]
            mean = total / n
            var = (squares / n - mean * mean).clamp_min(0.0)
            s0 = (bn.running_var.double() + bn.eps).sqrt()
            s = (var + bn.eps).sqrt()
            g0, b0, m0 = bn.weight.double(), bn.bias.double(), bn.running_mean.double()
            bn.weight.copy_(g0 * s / s0)
            bn.bias.copy_(b0 + g0 * (mean - m0) / s0)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return len(bns)
