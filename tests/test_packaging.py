"""The node installs and imports without torch; the distribution keeps its promises."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK_TORCH = r"""
import importlib.abc, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, NoTorch())
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch was importable despite the block")

import node
names = [m.name for m in pkgutil.walk_packages(node.__path__, "node.")]
# node.migrations holds Alembic's scripts (env.py runs only inside Alembic): imported by the store's
# migrate() through Alembic, and that path is imported here with node.store.
names = [n for n in names if n == "node.migrations" or not n.startswith("node.migrations.")]
for name in names:
    __import__(name)
assert "torch" not in sys.modules
print(len(names))
"""


def test_node_and_every_submodule_import_where_torch_cannot_be_imported():
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 10  # the walk really found the node's modules


def test_runtime_dependencies_leave_torch_to_the_train_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"]).lower()
    assert "torch" not in runtime
    assert any(dep.startswith("torch==2.13.0") for dep in project["optional-dependencies"]["train"])
    for extra in ("train", "gpu", "dev"):
        assert project["optional-dependencies"][extra]


def test_ci_runs_the_readme_test_command_and_nothing_else():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[-1] == "exec make test"
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_the_code_passes_ruff_and_mypy():
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "node", "training", "onnx_export", "tests",
                           "scripts", "benchmarks"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr
    mypy = subprocess.run([sys.executable, "-m", "mypy", "node", "training", "onnx_export"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert mypy.returncode == 0, mypy.stdout + mypy.stderr
