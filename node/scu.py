"""Sending results: C-STORE to a destination, every status checked.

``send_files`` opens one association to a destination, proposes each file's SOP class in the file's
own transfer syntax (plus Explicit VR Little Endian), sends them, and returns a ``Delivery``: the SOP
Instance UIDs the destination acknowledged, and the SOP classes it refused at negotiation (not sent:
a PACS that does not take Segmentation Storage will not take it on the next attempt either; the
worker reports them by name). An instance in a compressed syntax the destination did not accept
goes decompressed when it accepted Explicit VR Little Endian. A refused association, a status that
is not success or a warning, or a network error raises ``SendError`` naming the destination and the
status; what was acknowledged before that is still reported in the error, so a retry sends only the rest.

Every request waits until the association's own reactor thread is parked (``hold_reactor``): pynetdicom's
pause handshake can let that thread take the response off the queue, and the request then waits out
the DIMSE timeout for an answer that already came.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, Association

from node.config import Destination
from node.errors import NodeError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: C-STORE request priorities (PS3.7 9.1.1.1.4): HIGH for PE-suspected results.
LOW, MEDIUM, HIGH = 2, 0, 1
#: C-STORE warning statuses: the instance was stored (PS3.4 B.2.3).
WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
            0xB007: "data set does not match SOP class"}


@dataclass
class Delivery:
    """What one destination took: acknowledged SOP Instance UIDs, and refused SOP classes (name: instances)."""

    acknowledged: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"{len(self.acknowledged)} objects"
        if self.refused:
            text += "; refused by the destination, not sent: " + ", ".join(
                f"{name} ({n})" for name, n in sorted(self.refused.items()))
        return text


class SendError(NodeError):
    """A destination did not take every instance; ``acknowledged`` lists the ones it did take."""

    def __init__(self, message: str, acknowledged: list[str]):
        super().__init__(message)
        self.acknowledged = acknowledged


def hold_reactor(assoc: Association, timeout_seconds: float = 5.0) -> bool:
    """Park ``assoc``'s reactor thread on its checkpoint before a request; False if it did not park in time.

    A requestor association runs a reactor thread that takes DIMSE messages off the queue and answers
    requests. pynetdicom's ``send_*`` methods stop it for their response by clearing a checkpoint
    (``_reactor_checkpoint``) and waiting for the thread's ``_is_paused`` flag; after the response they set
    the checkpoint again. The flag is still True from the last pause until the reactor thread runs, so a
    request sent right after another can see it, go out, and the reactor thread, waking now, takes the
    response as an "unexpected C-STORE service message"; the request waits out the DIMSE timeout and
    fails a delivery that succeeded (seen under CPU load, 2026-12-06). Here the checkpoint is cleared
    and the thread is waited for until it is blocked on it (a waiter on the Event's condition), where it
    cannot take anything; ``send_*`` then finds it paused, and sets the checkpoint itself when done.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + timeout_seconds
    while not checkpoint._cond._waiters:  # type: ignore[attr-defined]  # CPython's threading.Condition
        if not assoc.is_alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.0001)
    return True


def client_tls_context(destination: Destination) -> ssl.SSLContext:
    """TLS to a destination: verify its certificate against ``tls_ca`` (and its host name); present
    our certificate when ``tls_cert``/``tls_key`` are set."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(destination.tls_ca))
        if destination.tls_cert and destination.tls_key:
            context.load_cert_chain(str(destination.tls_cert), str(destination.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise SendError(f"{destination.name}: TLS set-up failed: {exc}", []) from exc
    return context


def echo(destination: Destination, *, calling_ae_title: str, timeout_seconds: float = 10.0) -> float:
    """C-ECHO a destination; returns the round trip in seconds, SendError if it does not answer success."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    ae.add_requested_context(Verification)
    where = destination.where
    start = time.perf_counter()
    tls_args = (client_tls_context(destination), destination.host) if destination.tls_ca else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise SendError(f"{where}: association {'rejected' if assoc.is_rejected else 'failed'}", [])
    try:
        hold_reactor(assoc)
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code != SUCCESS:
        raise SendError(f"{where}: C-ECHO answered {'nothing' if code == -1 else f'0x{code:04X}'}", [])
    return time.perf_counter() - start


def read_files(paths: Sequence[Path]) -> list[pydicom.FileDataset]:
    """The data sets to send, or SendError naming the first file that is not readable DICOM."""
    datasets: list[pydicom.FileDataset] = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p))
        except (InvalidDicomError, OSError) as exc:
            raise SendError(f"{Path(p).name}: not a readable DICOM file ({exc})", []) from exc
    return datasets


def send_files(paths: Sequence[Path], destination: Destination, *, calling_ae_title: str,
               timeout_seconds: float = 30.0, priority: int = MEDIUM) -> Delivery:
    """C-STORE ``paths`` to ``destination``; returns what it acknowledged and which SOP classes it refused."""
    datasets = read_files(paths)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_seconds
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    # One presentation context per (class, syntax): a peer picks one syntax per context, so a compressed
    # file proposed beside Explicit VR Little Endian in one context would always go uncompressed.
    for sop_class, syntax in sorted(contexts | {(c, ExplicitVRLittleEndian) for c, _ in contexts}):
        ae.add_requested_context(sop_class, [syntax])
    where = destination.where
    tls_args = (client_tls_context(destination), destination.host) if destination.tls_ca else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise SendError(f"{where}: association {'rejected' if assoc.is_rejected else 'failed'}", [])
    acknowledged: list[str] = []
    refused: Counter[str] = Counter()
    try:
        for ds in datasets:
            accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                        if str(cx.abstract_syntax) == str(ds.SOPClassUID)}
            if not accepted:
                refused[ds.SOPClassUID.name] += 1
                log.warning("%s refused %s: %s not sent", where, ds.SOPClassUID.name, ds.SOPInstanceUID)
                continue
            if str(ds.file_meta.TransferSyntaxUID) not in accepted and ds.file_meta.TransferSyntaxUID.is_compressed:
                # the destination takes the class, not this compression: send it plain (the same instance)
                ds.decompress(generate_instance_uid=False)
            hold_reactor(assoc)
            status = assoc.send_c_store(ds, priority=priority)
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
    return Delivery(acknowledged, dict(refused))
