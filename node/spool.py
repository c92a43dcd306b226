"""The spool: received instances as files, written atomically and durably.

Layout: ``<storage.root>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A file exists under its final name only once all its bytes are on disk: they are written to a
temporary file in the same folder, flushed and fsynced, renamed over the final name, and the folder
is fsynced so the rename itself survives a power cut. A crash leaves at most a ``.tmp`` file, never a
half-written instance, and ``sweep_partials`` removes those at start-up. UIDs are checked before they
become path components, so a crafted UID cannot leave the spool.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from node.errors import NodeError

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TMP_SUFFIX = ".tmp"


class SpoolError(NodeError):
    """An instance could not be written to, or placed in, the spool."""


def check_uid(value: object, keyword: str) -> str:
    """A DICOM UID (digits and dots, at most 64 characters) or SpoolError naming the keyword."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not UID.match(text):
        raise SpoolError(f"{keyword} {text[:80]!r} is not a valid UID")
    return text


def instance_path(root: Path, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str) -> Path:
    return (Path(root) / check_uid(study_instance_uid, "StudyInstanceUID")
            / check_uid(series_instance_uid, "SeriesInstanceUID")
            / f"{check_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either nothing, the old bytes, or all new bytes."""
    path = Path(path)
    try:
        new_dirs = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            with tmp.open("xb") as fh:
                fh.write(data)
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if fsync:
            _fsync_dir(path.parent)
            if new_dirs:  # the new study/series folders' own entries
                _fsync_dir(path.parent.parent)
                _fsync_dir(path.parent.parent.parent)
    except OSError as exc:
        raise SpoolError(f"cannot write {path.name}: {exc.strerror or exc}") from exc


def sweep_partials(root: Path) -> int:
    """Delete temporary files a crash left behind; returns how many."""
    count = 0
    for tmp in Path(root).rglob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count
