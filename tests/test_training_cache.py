"""The slice cache at scale: a damaged study is named and left out, a killed build continues where it
stopped, and ``petriage-train cache`` says what it will cost before it starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from node.phantom import PhantomOptions, write_rsna_dataset
from node.preprocess import PreprocessSpec
from training.cli import main as train_main
from training.data import build_cache, open_cache, read_rsna

TINY = PhantomOptions(matrix=96, slices=24, slice_spacing_mm=12.0)
SPEC = PreprocessSpec(size=64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache-set")
    write_rsna_dataset(root, studies=6, positive_fraction=0.5, seed=8, options=TINY, annotated_fraction=1.0)
    return root


def damaged_copy(dataset: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the set whose first masked study's mask file is cut in half (a damaged download).
    (One damaged image is not enough: the series reader repairs a study around it, as the node does.)"""
    root = tmp_path / "damaged"
    shutil.copytree(dataset, root)
    study = next(s for s in read_rsna(root) if s.mask_file is not None)
    data = study.mask_file.read_bytes()
    study.mask_file.write_bytes(data[: len(data) // 2])
    return root, study.study_instance_uid


def test_a_study_that_cannot_be_decoded_is_left_out_with_its_reason_and_the_rest_is_cached(dataset, tmp_path):
    root, bad = damaged_copy(dataset, tmp_path)
    studies = read_rsna(root)
    cache = build_cache(studies, SPEC, tmp_path / "cache", workers=2)
    assert set(cache.skipped) == {bad} and cache.skipped[bad]
    assert {s["study_instance_uid"] for s in cache.studies} == {s.study_instance_uid for s in studies} - {bad}
    assert open_cache(cache.folder).skipped == cache.skipped  # kept in the index
    with pytest.raises(Exception, match="not in the cache"):
        cache.study(bad)


def test_a_killed_build_continues_with_the_studies_it_had_not_reached(dataset, tmp_path):
    studies = read_rsna(dataset)
    reference = build_cache(studies, SPEC, tmp_path / "fresh")

    class KilledError(Exception):
        pass

    def kill_after_two(i: int, n: int, message: str) -> None:
        if message == "caching slices" and i == 2:
            raise KilledError

    with pytest.raises(KilledError):
        build_cache(studies, SPEC, tmp_path / "resumed", progress=kill_after_two)
    assert not any((tmp_path / "resumed").glob("*/index.json"))  # not a cache yet
    calls: list[tuple[int, int]] = []
    cache = build_cache(studies, SPEC, tmp_path / "resumed",
                        progress=lambda i, n, m: calls.append((i, n)) if m == "caching slices" else None)
    assert calls[0] == (3, 6) and calls[-1] == (6, 6)  # two were done; four decoded now
    np.testing.assert_array_equal(np.asarray(cache.images), np.asarray(reference.images))
    np.testing.assert_array_equal(np.asarray(cache.masks), np.asarray(reference.masks))
    assert [s["study_instance_uid"] for s in cache.studies] == [s["study_instance_uid"] for s in reference.studies]


def test_the_cache_command_estimates_then_builds_and_then_finds_it_complete(dataset, tmp_path, capsys):
    root, bad = damaged_copy(dataset, tmp_path)
    args = ["cache", "--set", f"data.root={root}", "--set", f"data.cache_dir={tmp_path / 'c'}",
            "--set", "preprocess.size=64", "--set", "preprocess.field_mm=null", "--set", "preprocess.slab_mm=null"]
    assert train_main([*args, "--estimate"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "5 studies, 120 images -> 120 slabs of 64 px: 1.5 MB" in out and "with 2 workers" in out
    assert "1 study cannot be read and will be left out" in out
    assert not any((tmp_path / "c").glob("*/index.json"))  # an estimate builds nothing
    assert train_main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "5 studies cached (1 left out)" in out and f"study {bad} left out" in out
    assert "Traceback" not in out
    assert train_main(args) == 0
    assert "the cache is complete" in " ".join(capsys.readouterr().out.split())
