"""Which result objects go to a destination, and by which protocol.

A destination names the objects it takes (``destinations[].objects``: sc, sr, seg, kos); each file of
the outbox is one of them by its SOP class. ``deliver`` sends the chosen files by C-STORE
(``node.scu``) or STOW-RS (``node.stow``) and returns the ``Delivery``; anything it cannot send now is a
``SendError`` the worker retries with backoff.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from node.config import Destination
from node.scu import MEDIUM, Delivery, SendError, send_files

#: SOP Class UID -> the object kind config names it by.
KINDS = {
    "1.2.840.10008.5.1.4.1.1.7": "sc",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",  # Comprehensive 3D SR Storage
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.59": "kos",  # Key Object Selection Document Storage
}


def kind_of(path: Path) -> str:
    """The object kind of an outbox file (``sc``, ``sr``, ``seg``, ``kos``), by its SOP class."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError) as exc:
        raise SendError(f"{path.name}: not a readable DICOM file ({exc})", []) from exc
    uid = str(ds.get("SOPClassUID", ""))
    if uid not in KINDS:
        raise SendError(f"{path.name}: SOP class {uid or '(none)'} is not one of the node's result objects", [])
    return KINDS[uid]


def for_destination(files: Sequence[Path], destination: Destination) -> list[Path]:
    """The files of ``files`` whose kind ``destination`` takes."""
    wanted = set(destination.objects)
    return [f for f in files if kind_of(f) in wanted]


def deliver(files: Sequence[Path], destination: Destination, *, calling_ae_title: str,
            priority: int = MEDIUM) -> Delivery:
    """Send the files ``destination`` takes of ``files``, by its protocol."""
    chosen = for_destination(files, destination)
    if not chosen:
        return Delivery()
    if destination.kind == "dicomweb":
        from node.stow import stow_files

        return stow_files(chosen, destination)
    return send_files(chosen, destination, calling_ae_title=calling_ae_title, priority=priority)
