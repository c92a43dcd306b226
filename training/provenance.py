"""Which code a run trained with: the git commit at its start, kept in the run folder for the exporter.

A bundle's ``training.code_commit`` must name the code that trained it, not the checkout it was exported
from hours later. ``record`` writes ``RUN/code_commit.txt`` when a run starts (once: a resumed stage keeps
the first), with ``+dirty`` when tracked files differed from that commit; ``recorded`` reads it back.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

FILE = "code_commit.txt"
_HERE = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=_HERE, check=False)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def current_commit() -> str | None:
    """HEAD of this checkout, with ``+dirty`` when tracked files have uncommitted changes; None outside git."""
    head = _git("rev-parse", "HEAD")
    if not head:
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head}+dirty" if dirty else head


def record(run: Path) -> None:
    path = Path(run) / FILE
    if not path.exists():
        path.write_text(f"{current_commit() or 'unknown'}\n")


def recorded(run: Path) -> str | None:
    path = Path(run) / FILE
    text = path.read_text().strip() if path.exists() else ""
    return text if text and text != "unknown" else None
