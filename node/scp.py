"""The DICOM listener (pynetdicom): C-ECHO, and C-STORE of every storage SOP class.

The C-STORE handler decodes nothing but three UIDs from the header, writes the bytes the sender
sent behind a File Format header (node/file_meta.py) to the spool atomically and durably, records the instance, and
only then answers success. CT images are what the node analyses; every other object is stored and
ignored, so a PACS's auto-forward never sees an error. Statuses are named, never bare numbers.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
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
from pynetdicom.transport import ThreadedAssociationServer

from node import pdu_reader, reactor
from node.config import Config
from node.errors import NodeError
from node.file_meta import part10_header
from node.group_commit import GroupRecorder
from node.spool import SpoolError, check_uid, instance_path, write_atomic
from node.storage_mark import StorageMark
from node.store import Received, Store, StoreError
from node.triage import URGENCY_KEYWORDS, is_urgent, urgency_values

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (the sender may retry)
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand
STATUS_NAMES = {SUCCESS: "success", OUT_OF_RESOURCES: "out_of_resources",
                DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "does_not_match_sop_class", CANNOT_UNDERSTAND: "cannot_understand"}

#: Explicit VR Little Endian first: pynetdicom's default order puts Implicit VR first, which makes a
#: sender convert every image instead of keeping the bytes the modality made.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless,
    DeflatedExplicitVRLittleEndian, JPEGLSNearLossless, JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit,
    ImplicitVRLittleEndian, ExplicitVRBigEndian,
]
UID_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
URGENCY_TAGS = ["RequestAttributesSequence", *URGENCY_KEYWORDS]
HIGH_PRIORITY = 1  # C-STORE request Priority HIGH (PS3.7 9.1.1.1.4)


class StorageHandler:
    """C-STORE: check space, spool, record, then answer."""

    def __init__(self, store: Store, spool_root: Path, *, fsync: bool = True, min_free_bytes: int = 0,
                 urgent_values: tuple[str, ...] = (), on_status: Callable[[str], None] | None = None,
                 mark: StorageMark | None = None, recorder: GroupRecorder | None = None):
        self.store, self.spool_root, self.fsync, self.on_status = store, Path(spool_root), fsync, on_status
        self.mark, self.recorder = mark, recorder
        self.min_free_bytes, self.urgent_values = min_free_bytes, {v.upper() for v in urgent_values}

    def _space_left(self, incoming: int) -> bool:
        where = self.spool_root
        while not where.exists() and where.parent != where:  # the spool is made with the first instance
            where = where.parent
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            return False
        return free - incoming >= self.min_free_bytes

    def __call__(self, event) -> int:
        status = self._store(event)
        if self.on_status is not None:
            self.on_status(STATUS_NAMES.get(status, f"0x{status:04X}"))
        return status

    def _store(self, event) -> int:
        calling = event.assoc.requestor.ae_title.strip()
        request = event.request
        try:  # the File Format header, then the sender's bytes as they came (one copy, no re-encoding)
            data = part10_header(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                                 str(event.context.transfer_syntax)) + request.DataSet.getbuffer()
        except Exception as exc:  # noqa: BLE001 - a dataset that cannot even be framed as a file: refuse it, named
            log.warning("C-STORE from %s refused: the data set cannot be read (%s)", calling, type(exc).__name__)
            return CANNOT_UNDERSTAND
        if self.mark is not None and not self.mark.present():
            log.error("C-STORE from %s refused: storage.root %s has lost its mark (shared storage not mounted?)",
                      calling, self.mark.root)
            return OUT_OF_RESOURCES
        if not self._space_left(len(data)):
            log.error("C-STORE from %s refused: less than %d MiB would be free on the storage file system",
                      calling, self.min_free_bytes // 2**20)
            return OUT_OF_RESOURCES
        try:
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=UID_TAGS + URGENCY_TAGS)
            sop = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            study = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            urgent = int(getattr(event.request, "Priority", 0) or 0) == HIGH_PRIORITY or is_urgent(
                urgency_values(ds), self.urgent_values)
        except (InvalidDicomError, SpoolError) as exc:
            log.warning("C-STORE from %s refused: %s", calling, exc)
            return CANNOT_UNDERSTAND
        except Exception as exc:  # noqa: BLE001 - any failure to read the sender's header is its data's fault
            # (pydicom raises ValueError, EOFError, KeyError, NotImplementedError for an unknown VR ...):
            # refuse it by name, never let pynetdicom turn it into 0xC211 with a traceback.
            log.warning("C-STORE from %s refused: the header cannot be read (%s: %.120s)", calling,
                        type(exc).__name__, exc)
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
            record = self.recorder.record if self.recorder else self.store.record_instance
            record(Received(sop, study, series, str(event.request.AffectedSOPClassUID),
                            str(event.context.transfer_syntax), path, len(data), calling, urgent,
                            str(event.assoc.requestor.address or "")))
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


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2+), requiring client certificates when ``node.tls.ca`` is set."""
    tls = config.node.tls
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class SourceFilter:
    """``verify_request`` for the server: a connection from outside ``node.allowed_source_ips`` is closed
    before association negotiation, and the refusal is logged and recorded as an event."""

    def __init__(self, networks, store: Store):
        self.networks, self.store = list(networks), store

    def __call__(self, request, client_address) -> bool:
        if not self.networks:
            return True
        try:
            address = ipaddress.ip_address(client_address[0])
        except ValueError:
            return False
        if any(address in net for net in self.networks):
            return True
        log.warning("connection from %s refused: not in node.allowed_source_ips", address)
        try:
            self.store.record_event(None, "connection-refused", f"{address}: not in node.allowed_source_ips")
        except StoreError:
            pass
        return False


class ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, made with ``AE.make_server`` so that the source-IP filter is in place
    before it accepts anything, and served by a thread of ours (hence our own ``shutdown``)."""

    source_filter: SourceFilter | None = None
    recorder: GroupRecorder | None = None

    def verify_request(self, request, client_address) -> bool:  # socketserver's hook, before any DICOM
        return self.source_filter is None or self.source_filter(request, client_address)

    def shutdown(self) -> None:
        socketserver.TCPServer.shutdown(self)
        self.server_close()
        if self.recorder is not None:
            self.recorder.close()


class SharedPortListenerServer(ListenerServer):
    """The listener of one of several receiver processes on one port (``node.receivers``)."""

    def server_bind(self) -> None:  # every socket on the port sets it: the kernel spreads the connections
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def wake_on_work(event) -> None:
    """The association's two reactor threads wait for work instead of polling (node/reactor.py)."""
    reactor.install(event.assoc)


def read_pdus_whole(event) -> None:
    """The association's DUL thread reads each PDU into one buffer (node/pdu_reader.py)."""
    pdu_reader.install(event.assoc)


def stop_waking(event) -> None:
    reactor.uninstall(event.assoc)


def start_scp(config: Config, store: Store, *, fsync: bool = True, on_status: Callable[[str], None] | None = None,
              mark: StorageMark | None = None, shared_port: bool = False):
    """Start listening on ``node.host:node.port`` in a background thread; returns the server
    (``shutdown()`` stops it). ``shared_port``: one of several receiver processes on that port."""
    ae = make_ae(config)
    try:
        tls = server_tls_context(config)
    except (OSError, ssl.SSLError) as exc:
        raise NodeError(f"node.tls: cannot load the certificate or key: {exc}") from exc
    recorder = GroupRecorder(store)
    handler = StorageHandler(store, Path(config.storage.root) / "spool", fsync=fsync,
                             min_free_bytes=config.storage.min_free_mb * 2**20,
                             urgent_values=tuple(config.triage.urgent_values), on_status=on_status, mark=mark,
                             recorder=recorder)
    handlers: list = [(evt.EVT_C_STORE, handler), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                      (evt.EVT_CONN_OPEN, wake_on_work), (evt.EVT_CONN_OPEN, read_pdus_whole),
                      (evt.EVT_CONN_CLOSE, stop_waking)]
    log.info("listening as %s on %s:%d%s", config.node.ae_title, config.node.host, config.node.port,
             " (DICOM TLS)" if tls else "")
    try:
        server = ae.make_server((config.node.host, config.node.port), ssl_context=tls, evt_handlers=handlers,
                                server_class=SharedPortListenerServer if shared_port else ListenerServer)
    except OSError as exc:
        recorder.close()
        raise NodeError(f"cannot listen on {config.node.host}:{config.node.port}: {exc.strerror or exc}") from exc
    assert isinstance(server, ListenerServer)
    server.recorder = recorder
    server.source_filter = SourceFilter(config.node.allowed_source_ips, store)  # before the first connection
    threading.Thread(target=server.serve_forever, name=f"petriage-listener:{config.node.port}", daemon=True).start()
    return server
