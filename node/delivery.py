"""Which result objects go to a destination, and by which protocol.

A destination names the objects it takes (``destinations[].objects``: sc, sr, seg, kos); each file of
the outbox is one of them by its SOP class. ``deliver`` sends the chosen files by C-STORE
(``node.scu``) or STOW-RS (``node.stow``) and returns the ``Delivery``; anything it cannot send now is a
``SendError`` the worker retries with backoff.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from node.config import Destination
from node.scu import MEDIUM, Delivery, SendError, send_files

#: SOP Class UID -> the object kind config names it by.
KINDS: dict[str, str] = {
    SecondaryCaptureImageStorage: "sc", Comprehensive3DSRStorage: "sr", SegmentationStorage: "seg",
    KeyObjectSelectionDocumentStorage: "kos",
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


def for_destination(files: Sequence[Path], destination: Destination,
                    kinds: MutableMapping[Path, str] | None = None) -> list[Path]:
    """The files of ``files`` whose kind ``destination`` takes; ``kinds`` keeps the kinds already read,
    so several destinations of one delivery read each file's header once."""
    kinds = {} if kinds is None else kinds
    for f in files:
        if f not in kinds:
            kinds[f] = kind_of(f)
    wanted = set(destination.objects)
    return [f for f in files if kinds[f] in wanted]


def deliver(files: Sequence[Path], destination: Destination, *, calling_ae_title: str,
            priority: int = MEDIUM, kinds: MutableMapping[Path, str] | None = None) -> Delivery:
    """Send the files ``destination`` takes of ``files``, by its protocol (``kinds``: see ``for_destination``)."""
    chosen = for_destination(files, destination, kinds)
    if not chosen:
        return Delivery()
    if destination.kind == "dicomweb":
        from node.stow import stow_files

        return stow_files(chosen, destination)
    return send_files(chosen, destination, calling_ae_title=calling_ae_title, priority=priority)
