"""Sending results: C-STORE to a destination, every status checked.

``send_files`` opens one association to a destination, proposes each file's SOP class in the file's
own transfer syntax (plus Explicit VR Little Endian), sends them, and returns the SOP Instance UIDs
the destination acknowledged. A refused association, a status that is not success or a warning, or a
network error raises ``SendError`` naming the destination and the status; what was acknowledged
before that is still reported in the error, so a retry sends only the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from node.config import Destination
from node.errors import NodeError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: C-STORE warning statuses: the instance was stored (PS3.4 B.2.3).
WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
            0xB007: "data set does not match SOP class"}


class SendError(NodeError):
    """A destination did not take every instance; ``acknowledged`` lists the ones it did take."""

    def __init__(self, message: str, acknowledged: list[str]):
        super().__init__(message)
        self.acknowledged = acknowledged


def send_files(paths: Sequence[Path], destination: Destination, *, calling_ae_title: str,
               timeout_seconds: float = 30.0) -> list[str]:
    """C-STORE ``paths`` to ``destination``; returns the acknowledged SOP Instance UIDs (all of them)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class in {c for c, _ in contexts}:
        syntaxes = sorted({ts for c, ts in contexts if c == sop_class} | {ExplicitVRLittleEndian})
        ae.add_requested_context(sop_class, syntaxes)
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise SendError(f"{where}: association {'rejected' if assoc.is_rejected else 'failed'}", [])
    acknowledged: list[str] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == SUCCESS or code in WARNINGS:
                if code in WARNINGS:
                    log.warning("%s stored %s with a warning: %s", where, ds.SOPInstanceUID, WARNINGS[code])
                acknowledged.append(str(ds.SOPInstanceUID))
                continue
            reason = "no response (timeout or connection lost)" if code == -1 else f"status 0x{code:04X}"
            raise SendError(f"{where}: C-STORE of {ds.SOPClassUID.name} failed: {reason}", acknowledged)
    finally:
        if assoc.is_established:
            assoc.release()
    return acknowledged
