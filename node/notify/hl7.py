"""HL7 v2.5.1 ORU^R01 over MLLP: the result message for the RIS, and sending it with ACK handling.

The message (built and validated with hl7apy):

- MSH: sending/receiving application and facility from ``notify.hl7``, a unique control ID;
- PID: patient ID, name, birth date and sex copied from the source images (the RIS matches on them);
- OBR: accession number as placer/filler order number, the study description, the study date and
  time, result status F (C when the study was reported before: a corrected result);
- TQ1: priority S (stat) for PE suspected, R (routine) otherwise;
- OBX 1: pulmonary embolism (SCT 59282003) present/absent (CWE), abnormal flag A when present;
- OBX 2: the probability (NM), OBX 3: the operating threshold (NM), OBX 4: the Study Instance UID
  (DCM 113014), OBX 5: the model and the notice "AI triage aid - not for diagnostic use".

MLLP frames a message as <VT> message <FS><CR>. The receiver's ACK decides: MSA-1 AA or CA is
delivered; AE/CE is a transient error (retried); AR/CR is a rejection (not retried: the message
would be rejected again).
"""

from __future__ import annotations

import datetime as dt
import socket
import uuid

import pydicom
from hl7apy.core import Message
from hl7apy.parser import parse_message

from node.config import HL7Settings
from node.errors import NodeError
from node.inference import NOTICE

START, END = b"\x0b", b"\x1c\x0d"


class HL7Error(NodeError):
    """An HL7 message could not be delivered; ``permanent`` when retrying cannot help (rejected)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def _text(value: object) -> str:
    """A value safe inside an HL7 field: no delimiters or line breaks."""
    return "".join(" " if c in "|^~\\&\r\n" else c for c in str(value or "")).strip()


def _person_name(value: object) -> str:
    """DICOM PN family^given^middle^prefix^suffix maps onto HL7 XPN component for component."""
    parts = str(value or "").split("=")[0].split("^")
    return "^".join(_text(p) for p in parts[:5])


def build_oru(settings: HL7Settings, source: pydicom.Dataset, summary: dict, *, corrected: bool = False,
              now: dt.datetime | None = None, control_id: str | None = None) -> str:
    """The ORU^R01 message (ER7, segments separated by CR) for one analysed study."""
    now = now or dt.datetime.now(dt.UTC)
    positive = bool(summary["positive"])
    status = "C" if corrected else "F"
    m = Message("ORU_R01", version="2.5.1")
    m.msh.msh_3 = _text(settings.sending_application)
    m.msh.msh_4 = _text(settings.sending_facility)
    m.msh.msh_5 = _text(settings.receiving_application)
    m.msh.msh_6 = _text(settings.receiving_facility)
    m.msh.msh_7 = now.strftime("%Y%m%d%H%M%S")
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = control_id or uuid.uuid4().hex[:20]
    m.msh.msh_11 = "P"
    result = m.add_group("ORU_R01_PATIENT_RESULT")
    patient = result.add_group("ORU_R01_PATIENT")
    patient.pid.pid_1 = "1"
    patient.pid.pid_3 = f"{_text(getattr(source, 'PatientID', ''))}^^^^MR"
    patient.pid.pid_5 = _person_name(getattr(source, "PatientName", "")) or "UNKNOWN"
    if getattr(source, "PatientBirthDate", ""):
        patient.pid.pid_7 = _text(source.PatientBirthDate)
    if getattr(source, "PatientSex", ""):
        patient.pid.pid_8 = _text(source.PatientSex)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    accession = _text(getattr(source, "AccessionNumber", ""))
    order.obr.obr_1 = "1"
    if accession:
        order.obr.obr_2 = accession
        order.obr.obr_3 = accession
    order.obr.obr_4 = f"CTPA^{_text(getattr(source, 'StudyDescription', '')) or 'CT pulmonary angiogram'}^L"
    study_dt = f"{getattr(source, 'StudyDate', '')}{str(getattr(source, 'StudyTime', '')).split('.')[0]}"
    if study_dt.strip():
        order.obr.obr_7 = _text(study_dt)
    order.obr.obr_25 = status
    timing = order.add_group("ORU_R01_TIMING_QTY")
    timing.tq1.tq1_1 = "1"
    timing.tq1.tq1_9 = "S^Stat^HL70485" if positive else "R^Routine^HL70485"
    values = [
        ("CWE", "59282003^Pulmonary embolism^SCT",
         "52101004^Present^SCT" if positive else "2667000^Absent^SCT", "A" if positive else "N"),
        ("NM", "PE-PROB^Probability of pulmonary embolism^99PETRIAGE", f"{summary['probability']:.4f}", ""),
        ("NM", "PE-THRESHOLD^Operating threshold^99PETRIAGE", f"{summary['threshold']:.4f}", ""),
        ("ST", "113014^Study Instance UID^DCM", _text(summary["study_instance_uid"]), ""),
        ("ST", "MODEL^Algorithm^99PETRIAGE",
         _text(f"{summary['model'].get('name')} {summary['model'].get('version')} - {NOTICE}"), ""),
    ]
    for i, (kind, code, value, flag) in enumerate(values, 1):
        obs = order.add_group("ORU_R01_OBSERVATION")
        obs.obx.obx_1 = str(i)
        obs.obx.obx_2 = kind
        obs.obx.obx_3 = code
        obs.obx.obx_5 = value
        if kind == "NM":
            obs.obx.obx_6 = "1^no units^UCUM"
        if flag:
            obs.obx.obx_8 = flag
        obs.obx.obx_11 = status
    m.validate()
    return m.to_er7()


def send_mllp(message: str, host: str, port: int, timeout_seconds: float) -> str:
    """Send one message over MLLP and return the ACK's control ID; HL7Error unless it is accepted."""
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds) as conn:
            conn.sendall(START + message.encode("utf-8") + END)
            reply = b""
            while END not in reply:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        raise HL7Error(f"MLLP {host}:{port}: {exc.strerror or exc}") from exc
    if not reply.startswith(START) or END not in reply:
        raise HL7Error(f"MLLP {host}:{port}: no framed ACK (got {len(reply)} bytes)")
    text = reply[1:reply.index(END)].decode("utf-8", "replace")
    try:
        ack = parse_message(text.replace("\n", "\r"), find_groups=False)
        code = str(ack.msa.msa_1.value).strip().upper()
        detail = str(ack.msa.msa_3.value or "").strip() if hasattr(ack.msa, "msa_3") else ""
    except Exception as exc:  # noqa: BLE001 - hl7apy raises many kinds; any is "not an ACK"
        raise HL7Error(f"MLLP {host}:{port}: the reply is not an HL7 ACK ({exc})") from exc
    if code in ("AA", "CA"):
        return str(ack.msa.msa_2.value)
    raise HL7Error(f"MLLP {host}:{port}: ACK {code}{': ' + detail if detail else ''}", permanent=code in ("AR", "CR"))
