"""The ConvLSTM stage 2 (the authors' patent's variant): selectable in the config, padding-proof, and
exported to ONNX with any number of slices, so the node's engine gives the probability torch gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node.inference import Engine
from node.phantom import PhantomOptions, generate_study, write_rsna_dataset, write_study
from node.preprocess import preprocess, to_float
from node.series import index_series, read_volume
from onnx_export.cli import main as export_main
from training.cli import main as train_main
from training.config import load_train_config
from training.engine import load_slice_net, load_study_net
from training.models import ConvLSTMStudyNet, SliceNet, reverse_padded

TINY = PhantomOptions(matrix=96, slices=24, slice_spacing_mm=12.0)


def test_a_padded_batch_scores_each_study_as_it_scores_alone():
    torch.manual_seed(0)
    net = ConvLSTMStudyNet(2 * 16 + 3 * 16 + 2, spatial_channels=3, grid=4, hidden=4, dropout=0.0).eval()
    a, b = torch.randn(1, 9, 82), torch.randn(1, 5, 82)
    padded = torch.zeros(2, 9, 82)
    padded[0], padded[1, :5] = a[0], b[0]
    with torch.no_grad():
        together, slices = net(padded, torch.tensor([9, 5]))
        alone_a, slices_a = net(a)
        alone_b, slices_b = net(b)
    torch.testing.assert_close(together, torch.cat([alone_a, alone_b]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slices[1, :5], slices_b[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slices[0], slices_a[0], rtol=1e-5, atol=1e-6)


def test_reversing_within_each_length_keeps_the_padding_at_the_end():
    x = torch.arange(6.0).repeat(2, 1)
    out = reverse_padded(x, torch.tensor([6, 3]))
    assert out.tolist() == [[5, 4, 3, 2, 1, 0], [2, 1, 0, 3, 4, 5]]


def test_the_slice_net_appends_its_maps_before_the_two_scores():
    net = SliceNet(width=8, feature_scores=True, spatial_channels=3, spatial_grid=2).eval()
    with torch.no_grad():
        logit, feature, cam = net(torch.rand(2, 3, 64, 64))
    assert feature.shape == (2, net.feature_dim) and net.feature_dim == 2 * 64 + 3 * 4 + 2
    torch.testing.assert_close(feature[:, -2], logit)  # the scores stay last, where inputs=scores reads them
    cam_grid = torch.nn.functional.adaptive_avg_pool2d(cam[:, None], 2).flatten(1)
    torch.testing.assert_close(feature[:, 128:132], cam_grid)  # the first map is the CAM


def test_a_convlstm_without_spatial_maps_is_a_configuration_error():
    with pytest.raises(Exception, match="stage1.spatial_channels"):
        load_train_config(None, ["stage2.rnn=convlstm"])


def test_a_convlstm_run_exports_and_the_node_engine_gives_torchs_probability(tmp_path):
    data = tmp_path / "data"
    write_rsna_dataset(data, studies=10, positive_fraction=0.5, seed=21, options=TINY, annotated_fraction=1.0)
    run = tmp_path / "run"
    overrides = [f"data.root={data}", "data.val_fraction=0.34", "data.test_fraction=0.34", "preprocess.size=96",
                 "stage1.width=8", "stage1.epochs=1", "stage1.steps_per_epoch=3", "stage1.batch_size=8",
                 "stage1.feature_scores=true", "stage1.spatial_channels=3", "stage2.rnn=convlstm",
                 "stage2.hidden=4", "stage2.epochs=2", "eval.bootstrap=100", "eval.overlay_examples=2"]
    assert train_main(["all", "--run", str(run), *sum((["--set", o] for o in overrides), [])]) == 0
    bundle = tmp_path / "bundle"
    assert export_main([str(run), "--out", str(bundle), "--name", "tiny-convlstm", "--version", "0.0.1",
                        "--parity-studies", "2", "--check-studies", "2"]) == 0
    study = generate_study(4343, pe=True, options=TINY)
    paths = write_study(study, tmp_path / "study")["ctpa"]
    result = Engine(bundle, device="cpu", precision="fp32").analyze(index_series(paths))
    volume = read_volume(paths)
    slice_net, ckpt = load_slice_net(run / "stage1.pt", torch.device("cpu"))
    study_net = load_study_net(run / "stage2.pt", torch.device("cpu"))
    from node.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    with torch.no_grad():
        _, feats, _ = slice_net(torch.from_numpy(to_float(preprocess(volume.hu, spec, volume.pixel_spacing_mm))))
        study_logit, slice_logits = study_net(feats[None])
    assert isinstance(study_net, ConvLSTMStudyNet)
    assert abs(result.probability - torch.sigmoid(study_logit[0]).item()) <= 1e-4
    np.testing.assert_allclose(result.slice_probabilities, torch.sigmoid(slice_logits[0]).numpy(), atol=1e-4)
    assert len(result.slice_probabilities) == len(volume.sop_instance_uids) > 2
