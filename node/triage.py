"""Worklist priority: which study a radiologist should read first, from configurable rules.

A study's priority is a number (higher is read first) made of:

- its state: ``positive`` (PE suspected) > ``pending`` (not yet analysed) > ``negative``; a study
  that could not be analysed (skipped, failed) counts as ``pending``: a human must look at it;
- for an analysed study, ``probability_weight`` x its probability (so among positives the most
  certain comes first);
- ``urgent_bonus`` when the source marked it urgent: the C-STORE request's Priority HIGH, or a
  RequestedProcedurePriority / ReportingPriority of STAT, HIGH or URGENT (``urgent_values``).

The same number orders the worker's queue, so an urgent study is analysed before a routine one and
a positive result is sent before a negative one.
"""

from __future__ import annotations

from collections.abc import Iterable

import pydicom

from node.config import TriageSettings

#: Attributes where a scanner or RIS says how urgent a study is (top level or in RequestAttributesSequence).
URGENCY_KEYWORDS = ("RequestedProcedurePriority", "ReportingPriority")


def urgency_values(ds: pydicom.Dataset) -> list[str]:
    """The urgency values a dataset carries, upper-case (empty when it says nothing)."""
    found = []
    for item in [ds, *list(ds.get("RequestAttributesSequence") or [])]:
        for keyword in URGENCY_KEYWORDS:
            value = item.get(keyword)
            if value:
                found.append(str(value).strip().upper())
    return found


def is_urgent(values: Iterable[str], urgent_values: Iterable[str]) -> bool:
    wanted = {v.upper() for v in urgent_values}
    return any(v.upper() in wanted for v in values)


def priority(settings: TriageSettings, *, positive: bool | None, probability: float | None = None,
             urgent: bool = False) -> int:
    """The worklist priority; ``positive`` None means not analysed (pending, skipped or failed)."""
    if positive is None:
        value = float(settings.pending)
    else:
        value = float(settings.positive if positive else settings.negative)
        value += settings.probability_weight * float(probability or 0.0)
    if urgent:
        value += settings.urgent_bonus
    return int(round(value))
