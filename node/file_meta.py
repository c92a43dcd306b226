"""The DICOM File Format header (PS3.10 7.1) of an instance received over the network, as bytes.

The spool keeps each instance as the sender's encoded data set behind a 128-byte preamble, "DICM"
and the File Meta Information group. pynetdicom builds that group for every C-STORE through pydicom
(a FileMetaDataset, then its encoder), which took 7 % of the listener's time per image
(benchmarks/ingest_breakdown.py). Its seven elements take their values from the request and the
presentation context alone, so they are packed here: the same bytes pynetdicom writes, tested
against it (tests/test_scp.py).
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element of group 0002 with a 2-byte length (UI, SH, UL)."""
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"  # FileMetaInformationVersion
_IMPLEMENTATION = (_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"))
                   + _element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")))


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta Information for a data set encoded in ``transfer_syntax_uid``.

    Raises UnicodeEncodeError for a UID that is not ASCII (the caller refuses such a request)."""
    group = (_VERSION
             + _element(0x0002, b"UI", _padded(sop_class_uid, b"\x00"))  # MediaStorageSOPClassUID
             + _element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00"))  # MediaStorageSOPInstanceUID
             + _element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00"))  # TransferSyntaxUID
             + _IMPLEMENTATION)
    return PREAMBLE + _element(0x0000, b"UL", struct.pack("<I", len(group))) + group
