"""Sending results to a DICOMweb archive: STOW-RS (dicomweb-client), every instance's outcome checked.

``stow_files`` posts the files in one multipart request to ``{url}/studies`` and reads the STOW-RS
response (PS3.18 10.5.3): instances in its Referenced SOP Sequence were stored; instances in its Failed
SOP Sequence were not, with a Failure Reason. A failure that names the SOP class (0x0122 "SOP class not
supported", 0xA900 "does not match SOP class") counts as refused, like a SOP class a DIMSE peer refuses
at negotiation: not sent again. Any other failure, an HTTP error or a network error raises
``SendError`` with what was stored before it, so the worker retries with its backoff and sends only the
rest. The same ``Delivery`` as ``node.scu.send_files`` comes back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pydicom

from node.config import Destination
from node.scu import Delivery, SendError, read_files

log = logging.getLogger(__name__)

#: STOW-RS failure reasons (PS3.18 Table 10.5.3-4 / PS3.4 status codes) that refuse the SOP class itself.
REFUSED_CLASS = {0x0122: "SOP class not supported", 0xA900: "data set does not match SOP class"}


def _session(destination: Destination):
    import requests

    session = requests.Session()
    if destination.tls_ca is not None:
        session.verify = str(destination.tls_ca)
    if destination.tls_cert is not None and destination.tls_key is not None:
        session.cert = (str(destination.tls_cert), str(destination.tls_key))
    if destination.username:
        try:
            password = destination.password_file.read_text().strip() if destination.password_file else ""
        except OSError as exc:
            raise SendError(f"{destination.where}: cannot read password_file: {exc.strerror}", []) from exc
        session.auth = (destination.username, password)
    return session


def qido_ping(destination: Destination, *, timeout_seconds: float = 10.0) -> float:
    """Ask a DICOMweb destination for one study (QIDO-RS); seconds it took, or SendError saying why not."""
    import requests

    start = time.perf_counter()
    try:
        resp = _session(destination).get(destination.url.rstrip("/") + "/studies", params={"limit": "1"},
                                         headers={"Accept": "application/dicom+json"}, timeout=timeout_seconds)
    except (requests.RequestException, OSError) as exc:
        raise SendError(f"{destination.where}: QIDO-RS failed: {type(exc).__name__}: {exc}", []) from exc
    if resp.status_code not in (200, 204):
        raise SendError(f"{destination.where}: QIDO-RS answered HTTP {resp.status_code}", [])
    return time.perf_counter() - start


def stow_files(paths: Sequence[Path], destination: Destination, *, timeout_seconds: float = 60.0) -> Delivery:
    """STOW-RS ``paths`` to ``destination``; returns what it stored and which SOP classes it refused."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    datasets = read_files(paths)
    if not datasets:
        return Delivery()
    where = destination.where
    client = DICOMwebClient(destination.url.rstrip("/"), session=_session(destination), timeout=timeout_seconds)
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        body = (exc.response.text[:200] if exc.response is not None else "").strip()
        raise SendError(f"{where}: STOW-RS answered HTTP {code}{': ' + body if body else ''}", []) from exc
    except (requests.RequestException, OSError) as exc:
        raise SendError(f"{where}: STOW-RS failed: {type(exc).__name__}: {exc}", []) from exc
    stored = [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])]
    refused: Counter[str] = Counter()
    other = []
    for item in response.get("FailedSOPSequence", []):
        reason = int(item.get("FailureReason", 0))
        uid = pydicom.uid.UID(str(item.get("ReferencedSOPClassUID", "")))
        if reason in REFUSED_CLASS:
            refused[uid.name] += 1
            log.warning("%s refused %s (%s)", where, uid.name, REFUSED_CLASS[reason])
        else:
            other.append(f"{item.get('ReferencedSOPInstanceUID')} (failure 0x{reason:04X})")
    missing = {str(ds.SOPInstanceUID) for ds in datasets} - set(stored)
    if other or len(missing) > sum(refused.values()):
        detail = "; ".join(other) or f"{len(missing)} instance(s) neither stored nor reported failed"
        raise SendError(f"{where}: STOW-RS did not store every instance: {detail}", stored)
    return Delivery(stored, dict(refused))
