"""Export to a model bundle, its verification, and the torch-free inference engine and `petriage analyze`."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
import torch

from node.bundle import MANIFEST, BundleError, load_bundle, sha256_of
from node.cli import main as petriage
from node.inference import Engine, InferenceError, pick_key_slices
from node.phantom import PhantomOptions, generate_study, write_rsna_dataset, write_study
from node.preprocess import PreprocessSpec, add_context, input_to_pixel, study_bolus_hu, to_float, to_grid, window
from node.selection import choose_ctpa
from node.series import SeriesError, index_series, read_volume
from onnx_export import ExportError
from onnx_export.cli import main as export_main
from onnx_export.graphs import tensor_infos
from training.cli import main as train_main
from training.engine import load_slice_net, load_study_net

ROOT = Path(__file__).resolve().parents[1]
TINY = PhantomOptions(matrix=96, slices=24, slice_spacing_mm=12.0)


def study_input(slabs: np.ndarray, spec: PreprocessSpec, pixel_mm) -> np.ndarray:
    """A whole study's model input, written out from the spec: the grid, the bolus measured on all of it,
    the windows, the neighbours (the engine reads the series in chunks and must give the same)."""
    grid = to_grid(slabs, spec, pixel_mm)
    return add_context(window(grid, spec, study_bolus_hu(grid)), spec.context)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny dataset, a training-only second one, and a tiny run through `petriage-train all` (about 20 s);
    the export must read the same studies as training did."""
    root = tmp_path_factory.mktemp("export")
    data, extra = root / "data", root / "extra"
    write_rsna_dataset(data, studies=10, positive_fraction=0.5, seed=11, options=TINY, annotated_fraction=1.0,
                       annotated_slice_fraction=0.5)
    write_rsna_dataset(extra, studies=2, positive_fraction=0.5, seed=12, options=TINY, annotated_fraction=1.0,
                       annotated_slice_fraction=0.5)
    run = root / "run"
    overrides = [f"data.root={data}", f"data.train_extra=[{extra}]",
                 "data.val_fraction=0.34", "data.test_fraction=0.34", "preprocess.size=64",
                 "preprocess.slab_mm=12", "preprocess.context=1", "preprocess.bolus_reference_hu=350",
                 "stage1.width=8", "stage1.epochs=1", "stage1.steps_per_epoch=4", "stage1.batch_size=8",
                 "stage1.feature_scores=true", "stage1.enhancement=true", "stage2.inputs=scores",
                 "stage2.epochs=2", "eval.bootstrap=100", "eval.overlay_examples=2"]
    assert train_main(["all", "--run", str(run), *sum((["--set", o] for o in overrides), [])]) == 0
    return run


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    code = export_main([str(trained_run), "--out", str(out), "--name", "tiny", "--version", "0.0.1", "--fp16",
                        "--parity-studies", "4", "--check-studies", "4"])
    assert code == 0
    return out


@pytest.fixture
def study_dir(tmp_path) -> Path:
    """One study folder as a scanner sends it: CTPA plus localizer, lung and non-contrast series."""
    study = generate_study(77, pe=True, options=PhantomOptions(**{**TINY.__dict__, "order": "shuffled",
                                                                   "companions": ("localizer", "lung",
                                                                                  "noncontrast")}))
    write_study(study, tmp_path / "in")
    return tmp_path / "in"


def test_export_writes_checked_onnx_files_with_symbolic_batch_and_length_and_a_manifest(bundle):
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["format"] == "petriage-bundle/1" and manifest["synthetic_training_data"] is True
    assert "not for clinical use" in manifest["warning"] and "Not for diagnostic use" in manifest["intended_use"]
    by_name = {f["path"]: f for f in manifest["files"]}
    assert {"stage1.onnx", "stage2.onnx", "stage1.int8.onnx", "stage1.fp16.onnx"} <= set(by_name)
    for f in manifest["files"]:
        assert sha256_of(bundle / f["path"]) == f["sha256"]
        onnx.checker.check_model(onnx.load(str(bundle / f["path"])))
    inputs, outputs = tensor_infos(bundle / "stage2.onnx")
    assert inputs[0].shape[:2] == ["batch", "slices"]
    assert {o.name: o.shape for o in outputs} == {"study_logit": ["batch"], "slice_logits": ["batch", "slices"]}
    inputs, outputs = tensor_infos(bundle / "stage1.onnx")
    assert inputs[0].shape == ["batch", 5, 64, 64] and all(o.shape[0] == "batch" for o in outputs)
    assert manifest["parity"]["max_abs_study_probability_difference"] <= 1e-4
    op = manifest["operating_points"][0]
    assert 0 <= op["threshold"] <= 1 and op["name"] == manifest["default_operating_point"]
    assert manifest["preprocess"]["size"] == 64 and manifest["preprocess"]["bolus_reference_hu"] == 350
    assert manifest["training"]["stage1"]["enhancement"] is True  # the recipe's stage 2 input, in the graph


def test_the_manifest_names_the_commit_the_run_trained_at_not_only_the_one_it_was_exported_at(trained_run, bundle):
    trained_at = (trained_run / "code_commit.txt").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", trained_at)  # this checkout is a git clone
    training = json.loads((bundle / MANIFEST).read_text())["training"]
    assert training["code_commit"] == trained_at
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", training["export_commit"])


def test_onnxruntime_gives_the_torch_probability_for_a_study_it_never_saw(trained_run, bundle, tmp_path):
    study = generate_study(4242, pe=True, options=TINY)
    paths = write_study(study, tmp_path)["ctpa"]
    result = Engine(bundle, device="cpu", precision="fp32").analyze(index_series(paths))
    volume = read_volume(paths)
    spec = load_bundle(bundle).spec
    slice_net, _ = load_slice_net(trained_run / "stage1.pt", torch.device("cpu"))
    study_net = load_study_net(trained_run / "stage2.pt", torch.device("cpu"))
    with torch.no_grad():
        x = torch.from_numpy(to_float(study_input(volume.hu, spec, volume.pixel_spacing_mm)))
        logit, feats, cams = slice_net(x)
        study_logit, slice_logits = study_net(feats[None])
    assert abs(result.probability - torch.sigmoid(study_logit[0]).item()) <= 1e-4
    np.testing.assert_allclose(result.slice_probabilities, torch.sigmoid(slice_logits[0]).numpy(), atol=1e-4)
    np.testing.assert_allclose(result.cams, cams.numpy(), atol=1e-3)
    assert result.sop_instance_uids == volume.sop_instance_uids
    assert len(result.key_slices) == 3 and result.model["stage1_precision"] == "fp32"
    measured = study_bolus_hu(to_grid(volume.hu, spec, volume.pixel_spacing_mm))
    assert measured is not None and result.model["bolus_hu"] == pytest.approx(measured, abs=0.05)


def test_the_int8_and_fp16_variants_are_listed_with_their_measured_difference(bundle):
    manifest = load_bundle(bundle).manifest
    for precision in ("int8", "fp16"):
        entry = manifest.file("stage1", precision)
        assert entry is not None and entry.max_abs_study_difference is not None
        assert entry.accepted == (entry.max_abs_study_difference <= 0.01)


def test_thin_slices_are_averaged_into_slabs_of_the_training_spacing_before_the_model(trained_run, bundle, tmp_path):
    thin = PhantomOptions(**{**TINY.__dict__, "slices": 96, "slice_spacing_mm": 3.0})  # same coverage, 4x thinner
    paths = write_study(generate_study(31, pe=True, options=thin), tmp_path)["ctpa"]
    result = Engine(bundle, device="cpu", precision="fp32").analyze(index_series(paths))
    assert result.model["slab_slices"] == 4 and len(result.slice_probabilities) == 96
    assert all(k.index % 4 == 2 for k in result.key_slices)  # the middle slice of a 4-slice slab
    volume = read_volume(paths)
    slabs = volume.hu.reshape(24, 4, *volume.hu.shape[1:]).mean(axis=1)
    slice_net, _ = load_slice_net(trained_run / "stage1.pt", torch.device("cpu"))
    study_net = load_study_net(trained_run / "stage2.pt", torch.device("cpu"))
    with torch.no_grad():
        spec = load_bundle(bundle).spec
        x = torch.from_numpy(to_float(study_input(slabs, spec, volume.pixel_spacing_mm)))
        expected = torch.sigmoid(study_net(slice_net(x)[1][None])[0]).item()
    assert abs(result.probability - expected) <= 1e-4


def test_a_bundle_with_a_changed_byte_is_refused_with_the_file_named(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "stage2.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "stage2.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stage2\.onnx: sha256 .* does not match"):
        load_bundle(copy)


def test_a_bundle_whose_manifest_spec_differs_from_the_exported_model_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["preprocess"]["windows"][0] = [40.0, 400.0]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="preprocessing spec .* differs"):
        load_bundle(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no model.json"):
        load_bundle(copy)


def test_asking_for_cuda_where_onnxruntime_has_none_is_refused_not_run_on_cpu(bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal cannot be shown here")
    with pytest.raises(InferenceError, match="'cuda' asked for"):
        Engine(bundle, device="cuda")
    assert Engine(bundle, device="auto").providers == ["CPUExecutionProvider"]


def test_the_probability_does_not_depend_on_file_order(bundle, tmp_path):
    engine = Engine(bundle, device="cpu")
    probs = []
    for order in ("ascending", "shuffled", "reversed"):
        study = generate_study(9, pe=True, options=PhantomOptions(**{**TINY.__dict__, "order": order}))
        paths = write_study(study, tmp_path / order)["ctpa"]
        probs.append(engine.analyze(index_series(sorted(paths)[::-1])).probability)
    assert probs[0] == probs[1] == probs[2]


INFER_WITHOUT_TORCH = r"""
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "training", "onnx_export"):
            raise ImportError(name + " is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
from node.cli import main
code = main(["--set", "series.max_slice_thickness_mm=12", "analyze", sys.argv[1], "--bundle", sys.argv[2], "--json"])
assert "torch" not in sys.modules and "onnx" not in sys.modules
sys.exit(code)
"""


def test_petriage_analyze_runs_without_torch_and_picks_the_ctpa_series(bundle, study_dir):
    proc = subprocess.run([sys.executable, "-c", INFER_WITHOUT_TORCH, str(study_dir), str(bundle)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["series"]["description"].startswith("CTPA") and len(out["series"]["other_series"]) == 3
    assert 0.0 <= out["probability"] <= 1.0 and out["decision"] in ("PE suspected", "PE not suspected")
    assert out["model"]["providers"] == ["CPUExecutionProvider"] and out["slices"] == TINY.slices
    assert out["notice"] == "AI triage aid - not for diagnostic use"


def test_petriage_analyze_says_what_is_wrong_with_a_bad_folder_or_bundle(bundle, study_dir, tmp_path, capsys):
    assert petriage(["analyze", str(tmp_path / "nothing"), "--bundle", str(bundle)]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"not dicom")
    assert petriage(["analyze", str(tmp_path / "junk"), "--bundle", str(bundle)]) == 1
    assert "no readable DICOM files" in capsys.readouterr().err
    assert petriage(["analyze", str(study_dir), "--bundle", str(tmp_path)]) == 1
    assert "no model.json" in capsys.readouterr().err


def test_series_selection_prefers_contrast_soft_kernel_thin_slices_and_ignores_localizers(study_dir):
    from node.selection import SeriesRules

    loose = SeriesRules(max_slice_thickness_mm=20.0)  # the test phantom's CTPA has 12 mm slices
    choice = choose_ctpa((p for p in study_dir.rglob("*.dcm")), loose)
    assert choice.description.startswith("CTPA")
    assert sorted(choice.rejected.values()).count("localizer") == 1
    others = [p for p in study_dir.rglob("*.dcm") if p.parent != choice.paths[0].parent]
    assert choose_ctpa(others, loose).description.startswith("Lung")  # contrast beats the non-contrast series
    localizer = [p for p in others if choice.rejected.get(p.parent.name) == "localizer"]
    with pytest.raises(SeriesError, match="no series qualifies as a CTPA: .*localizer"):
        choose_ctpa(localizer, loose)


def test_export_refuses_a_run_that_has_not_finished(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "b")]) == 1
    assert "missing (export needs a run that finished" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    with pytest.raises(ExportError):
        from onnx_export.export import export_run

        export_run(tmp_path / "run", tmp_path / "b", name="x", version="0")


def test_key_slices_are_the_most_probable_and_apart():
    probs = np.array([0.1, 0.9, 0.85, 0.2, 0.3, 0.8, 0.1, 0.05])
    assert pick_key_slices(probs, 3, gap=3) == [1, 5]  # 2 and 7 lie next to stronger ones
    assert pick_key_slices(probs, 3, gap=1) == [1, 2, 5]


def test_input_positions_map_back_to_the_original_slice_through_crop_and_resize():
    spec = PreprocessSpec(size=64, field_mm=200.0)
    # 512 px at 0.5 mm: a 200 mm field is 400 px centred at 56..456; 64 input px cover 400 px.
    assert np.allclose(input_to_pixel(np.array([0.0, 32.0]), (512, 512), (0.5, 0.5), spec), [56.0, 256.0])
    padded = PreprocessSpec(size=64, field_mm=400.0)  # 128 px at 2 mm padded to 200 px
    assert np.allclose(input_to_pixel(np.array([32.0, 0.0]), (128, 128), (2.0, 2.0), padded), [64.0, -36.0])


DEMO = ROOT / "models" / "demo"
DEMO_DATA = PhantomOptions(matrix=256, slices=64, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                           embolus_levels=("central", "lobar"))


def test_the_committed_demo_bundle_verifies_is_small_and_says_it_is_synthetic():
    bundle = load_bundle(DEMO)
    m = bundle.manifest
    assert m.synthetic_training_data and m.warning == "synthetic training data - not for clinical use"
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 25 * 2**20
    assert m.spec().slab_mm == 3.0 and m.parity["max_abs_study_probability_difference"] <= 1e-4
    assert "not for clinical use" in (DEMO / "COMMANDS.md").read_text()


def test_the_demo_bundle_ranks_fresh_positive_studies_above_fresh_negative_ones(tmp_path):
    engine = Engine(DEMO, device="cpu")
    probs = {}
    for seed, pe in ((910001, True), (910002, False), (910003, True), (910004, False)):
        paths = write_study(generate_study(seed, pe=pe, options=DEMO_DATA), tmp_path / str(seed))["ctpa"]
        probs[seed] = engine.analyze(index_series(paths)).probability
    assert min(probs[910001], probs[910003]) > max(probs[910002], probs[910004]), probs


def test_the_same_study_compressed_or_shuffled_gets_the_same_probability_from_the_demo_bundle(tmp_path):
    engine = Engine(DEMO, device="cpu")
    probs = []
    for syntax, order in (("explicit", "ascending"), ("jpeg2000", "shuffled"), ("rle", "reversed")):
        opts = PhantomOptions(**{**DEMO_DATA.__dict__, "transfer_syntax": syntax, "order": order})
        paths = write_study(generate_study(910005, pe=True, options=opts), tmp_path / syntax)["ctpa"]
        probs.append(engine.analyze(index_series(paths)).probability)
    assert probs[0] == probs[1] == probs[2]  # lossless: bit-identical HU, identical probability


def test_series_rules_from_config_refuse_thick_derived_and_gapped_series(study_dir):
    from node.selection import SeriesRules
    from node.series import check_spacing

    files = list(study_dir.rglob("*.dcm"))
    choice = choose_ctpa(files, SeriesRules(max_slice_thickness_mm=8.0))
    assert choice.description.startswith("Chest w/o contrast")  # the 12 mm CTPA and lung series are out
    assert sum("12 mm slices (thicker than 8 mm)" == why for why in choice.rejected.values()) == 2
    choice = choose_ctpa(files, SeriesRules(max_slice_thickness_mm=20.0))
    derived = choice.paths[0].parent
    for p in derived.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.save_as(p)
    with pytest.raises(SeriesError, match=r"ImageType DERIVED\\SECONDARY"):
        choose_ctpa(list(derived.glob("*.dcm")), SeriesRules(max_slice_thickness_mm=20.0))
    index = index_series(sorted(derived.glob("*.dcm")))
    assert check_spacing(index) == pytest.approx(TINY.slice_spacing_mm)
    gapped = [p for p in index.paths if p != index.paths[len(index) // 2]]
    with pytest.raises(SeriesError, match="slices missing: a 24.0 mm gap"):
        check_spacing(index_series(gapped))


def test_check_bundle_reports_a_named_test_with_intervals_levels_and_pointing(tmp_path):
    data = tmp_path / "shifted"
    write_rsna_dataset(data, studies=4, positive_fraction=0.5, seed=12,
                       options=PhantomOptions(style="shifted", matrix_cap=96),
                       annotated_fraction=1.0, annotated_slice_fraction=1.0)
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_bundle.py"), "--bundle", str(DEMO),
                           "--test", f"shifted={data}", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "results.json").read_text())["tests"][0]
    assert report["test"] == "shifted" and report["studies"] == {"positive": 2, "negative": 2}
    assert 0.0 <= report["auc"] <= 1.0 and len(report["auc_ci95"]) == 2
    assert report["sensitivity"]["n"] == 2 and report["specificity"]["n"] == 2
    assert report["pointing_game"]["n"] == 2  # every positive here has masks on every positive slice
    assert set(report["sensitivity_by_level"]) == {"central", "lobar", "segmental", "subsegmental"}
    assert (out / "shifted-roc.png").stat().st_size > 0 and (out / "shifted-cams.png").stat().st_size > 0
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_bundle.py"), "--bundle", str(DEMO),
                          "--test", "nothing-here"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "NAME=DATASET" in bad.stderr


def test_check_bundle_runs_the_validation_split_when_asked(tmp_path):
    data = tmp_path / "varied"
    write_rsna_dataset(data, studies=4, positive_fraction=0.5, seed=13,
                       options=PhantomOptions(style="varied", matrix_cap=96), annotated_fraction=0.0)
    studies = json.loads((data / "phantom.json").read_text())["studies"]
    one_each = [next(s for s in studies if s["pe_present"] == pe)["study_instance_uid"] for pe in (True, False)]
    rest = [s["study_instance_uid"] for s in studies if s["study_instance_uid"] not in one_each]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [], "val": one_each, "test": rest}))
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_bundle.py"), "--bundle", str(DEMO),
                           "--test", f"val={data}:{splits}@val", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "results.json").read_text())["tests"][0]
    assert report["split"] == "val" and report["studies"] == {"positive": 1, "negative": 1}
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_bundle.py"), "--bundle", str(DEMO),
                          "--test", f"val={data}:{splits}@validation"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "@train|val|test" in bad.stderr


def _bundle_outputs(bundle: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort
    session = ort.InferenceSession(str(bundle / "stage1.onnx"), providers=["CPUExecutionProvider"])
    logit, _, cam = session.run(None, {session.get_inputs()[0].name: x})
    return logit, cam


def test_a_bundles_stage1_read_back_as_torch_weights_computes_the_bundles_logits_and_cams(trained_run, bundle):
    from training.from_bundle import state_from_onnx
    net = load_slice_net(trained_run / "stage1.pt", torch.device("cpu"))[0]  # its weights get replaced
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    net.load_state_dict(state_from_onnx(bundle / "stage1.onnx", net))
    x = np.random.default_rng(3).random((4, 5, 64, 64), dtype=np.float32)
    logit, cam = _bundle_outputs(bundle, x)
    with torch.no_grad():
        ours = net.eval()(torch.from_numpy(x))
    np.testing.assert_allclose(ours[0].numpy(), logit, atol=1e-4)
    np.testing.assert_allclose(ours[2].numpy(), cam, atol=1e-4)


def test_recalibrated_batch_norms_keep_the_eval_function_and_let_training_mode_start_from_it(trained_run, bundle):
    from training.from_bundle import recalibrate_batchnorm, state_from_onnx
    net = load_slice_net(trained_run / "stage1.pt", torch.device("cpu"))[0]
    net.load_state_dict(state_from_onnx(bundle / "stage1.onnx", net))
    rng = np.random.default_rng(4)
    batches = [torch.from_numpy(rng.random((8, 5, 64, 64), dtype=np.float32)) for _ in range(4)]
    x = torch.cat(batches)

    def outputs(train: bool) -> torch.Tensor:
        with torch.no_grad():  # a copy: training mode would move the running statistics
            return copy.deepcopy(net).train(train)(x)[0]

    before_eval, before_train = outputs(False), outputs(True)
    assert recalibrate_batchnorm(net, batches) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    after_eval, after_train = outputs(False), outputs(True)
    torch.testing.assert_close(after_eval, before_eval, atol=1e-4, rtol=0)
    # Folded (identity) BNs normalise by the batch in training mode and change the function; measured ones
    # barely do.
    assert (after_train - after_eval).abs().max() * 10 < (before_train - before_eval).abs().max()


def test_petriage_train_continues_stage1_from_an_exported_bundle_and_refuses_another_input(trained_run, bundle,
                                                                                          tmp_path, capsys):
    config = trained_run / "config.yaml"
    again = tmp_path / "again"
    args = ["stage1", "--config", str(config), "--run", str(again), "--set", f"stage1.init={bundle}",
            "--set", "stage1.epochs=1", "--set", "stage1.steps_per_epoch=1", "--set", "stage1.lr=1e-9"]
    assert train_main(args) == 0, capsys.readouterr().err
    assert "batch norms recalibrated" in capsys.readouterr().out
    net = load_slice_net(again / "stage1_last.pt", torch.device("cpu"))[0].eval()
    x = np.random.default_rng(5).random((4, 5, 64, 64), dtype=np.float32)
    logit, _ = _bundle_outputs(bundle, x)
    with torch.no_grad():
        ours = net(torch.from_numpy(x))[0].numpy()
    # One step at a vanishing rate: only the BNs' running statistics moved (momentum 0.1 towards one batch).
    np.testing.assert_allclose(ours, logit, atol=0.05 * np.abs(logit).max())
    other = tmp_path / "other"
    code = train_main([*args[:4], str(other), *args[5:], "--set", "preprocess.size=48"])
    assert code == 1  # a training error, named, not a traceback
    assert "was trained on" in capsys.readouterr().err and not (other / "stage1_last.pt").exists()
