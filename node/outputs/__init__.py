"""What the node sends back: a Secondary Capture series with attention overlays and a TID 1500 SR.

UIDs are derived from what was analysed (``node.outputs.uids``): a re-send after a crash is a
duplicate the PACS ignores, a changed result is a new one.

The patient and study module of every output is copied from the source images by highdicom, which
parses dates, times and the sex code and warns, quoting the value, about a name it finds odd. A
vendor's invalid birth date must not cost the study its result, and a patient's name must not
reach a log: ``for_outputs`` clears the values highdicom cannot parse, and highdicom's log records
and warnings that quote a patient's name are dropped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator

import pydicom
from pydicom.valuerep import DA, TM

from node.errors import NodeError

DATE_KEYWORDS = ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate")
TIME_KEYWORDS = ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime")


class OutputError(NodeError):
    """A result object could not be made from this study and result."""


class _NoPatientData(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "patient" not in str(record.msg).lower()


logging.getLogger("highdicom").addFilter(_NoPatientData())


@contextlib.contextmanager
def names_unquoted() -> Iterator[None]:
    """highdicom also warns (warnings module), quoting it, about a one-component name such as
    "ANONYMOUS": wrap every highdicom constructor that copies the patient module in this."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r'The string ".*" is unlikely to represent the intended person')
        yield


def _parses(kind, value) -> bool:
    try:
        kind(value)
        return True
    except (ValueError, TypeError, OverflowError):
        return False


def for_outputs(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The source header itself, or a copy whose dates, times and sex code highdicom cannot copy are emptied."""
    bad = [k for keywords, kind in ((DATE_KEYWORDS, DA), (TIME_KEYWORDS, TM)) for k in keywords
           if ds.get(k) not in (None, "") and not _parses(kind, str(ds.get(k)))]
    if str(ds.get("PatientSex", "") or "").strip() not in ("", "M", "F", "O"):
        bad.append("PatientSex")
    if not bad:
        return ds
    out = copy.deepcopy(ds)  # never change the caller's header
    for keyword in bad:
        out[keyword].value = ""
    return out
