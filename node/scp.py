"""The DICOM listener (pynetdicom): C-ECHO, and C-STORE of every storage SOP class.

The C-STORE handler decodes nothing but three UIDs from the header, writes the bytes the sender
sent (``event.encoded_dataset()``) to the spool atomically and durably, records the instance, and
only then answers success. CT images are what the node analyses; every other object is stored and
ignored, so a PACS's auto-forward never sees an error. Statuses are named, never bare numbers.
"""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Config
from node.spool import SpoolError, check_uid, instance_path, write_atomic
from node.store import Received, Store, StoreError

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (the sender may retry)
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand

#: Explicit VR Little Endian first: pynetdicom's default order puts Implicit VR first, which makes a
#: sender convert every image instead of keeping the bytes the modality made.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless,
    DeflatedExplicitVRLittleEndian, JPEGLSNearLossless, JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit,
    ImplicitVRLittleEndian, ExplicitVRBigEndian,
]
UID_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


class StorageHandler:
    """C-STORE: spool, record, then answer."""

    def __init__(self, store: Store, spool_root: Path, *, fsync: bool = True):
        self.store, self.spool_root, self.fsync = store, Path(spool_root), fsync

    def __call__(self, event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=UID_TAGS)
            sop = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            study = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        except (InvalidDicomError, SpoolError, ValueError, EOFError) as exc:
            log.warning("C-STORE from %s refused: %s", calling, exc)
            return CANNOT_UNDERSTAND
        if sop != str(event.request.AffectedSOPInstanceUID):
            log.warning("C-STORE from %s refused: SOPInstanceUID differs from the request's", calling)
            return DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        path = instance_path(self.spool_root, study, series, sop)
        existed = path.exists()
        try:
            write_atomic(path, data, fsync=self.fsync)
        except SpoolError as exc:
            log.error("C-STORE from %s: %s", calling, exc)
            return OUT_OF_RESOURCES
        try:
            self.store.record_instance(Received(sop, study, series, str(event.request.AffectedSOPClassUID),
                                                str(event.context.transfer_syntax), path, len(data), calling))
        except StoreError as exc:
            if not existed:
                path.unlink(missing_ok=True)  # not recorded: keep nothing, the sender retries
            log.error("C-STORE from %s: %s", calling, exc)
            return OUT_OF_RESOURCES
        return SUCCESS


def make_ae(config: Config) -> AE:
    """The application entity with every storage SOP class and Verification, as configured."""
    node = config.node
    ae = AE(ae_title=node.ae_title)
    for context in StoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu_size
    ae.acse_timeout = node.acse_timeout_seconds
    ae.dimse_timeout = node.dimse_timeout_seconds
    ae.network_timeout = node.network_timeout_seconds
    if node.allowed_calling_aets:
        ae.require_calling_aet = list(node.allowed_calling_aets)
    return ae


def start_scp(config: Config, store: Store, *, block: bool = False, fsync: bool = True):
    """Start listening on ``node.host:node.port``; returns the server (call ``shutdown()`` to stop)."""
    ae = make_ae(config)
    handlers: list = [(evt.EVT_C_STORE, StorageHandler(store, Path(config.storage.root) / "spool", fsync=fsync)),
                      (evt.EVT_C_ECHO, lambda event: SUCCESS)]
    log.info("listening as %s on %s:%d", config.node.ae_title, config.node.host, config.node.port)
    return ae.start_server((config.node.host, config.node.port), block=block, evt_handlers=handlers)
