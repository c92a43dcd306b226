"""Run the independent DICOM validators (dicom3tools' dciodvfy) on files we wrote."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    """What dciodvfy said of one file."""

    path: Path
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def dciodvfy_available() -> bool:
    return shutil.which("dciodvfy") is not None


def dciodvfy(path: Path) -> Verdict:
    """Validate one file against its IOD with dciodvfy (which must be installed)."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return Verdict(Path(path), tuple(ln for ln in lines if ln.startswith("Error")),
                   tuple(ln for ln in lines if ln.startswith("Warning")))
