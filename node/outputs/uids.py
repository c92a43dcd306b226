"""Deterministic UIDs for the node's outputs, derived from what was analysed.

A result is a result of a study, a model and the instances the model read. The same three give the
same UIDs (a result re-sent after a crash is a duplicate the PACS already has); a study that grew,
lost a damaged slice or met another model gives new ones (a PACS that keeps the first copy of an
instance never hides a changed result behind a stale one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pydicom.uid import generate_uid

#: pydicom's registered root for UIDs made from a hash (2.25-style would also do; this keeps them short).
PREFIX = "1.2.826.0.1.3680043.8.498."


def result_key(study_instance_uid: str, model_sha256: str, analysed_sop_instance_uids: Iterable[str]) -> str:
    """A digest of the study, the model and the analysed instances (in any order; a frame counts once each)."""
    digest = hashlib.sha256(f"{study_instance_uid}\n{model_sha256}\n".encode())
    for uid in sorted(analysed_sop_instance_uids):
        digest.update(f"{uid}\n".encode())
    return digest.hexdigest()


def output_uid(study_instance_uid: str, key: str, kind: str, index: int = 0) -> str:
    """A UID for output ``kind`` number ``index`` of the result ``key`` (``result_key``) of this study."""
    return generate_uid(prefix=PREFIX, entropy_srcs=[study_instance_uid, key, kind, str(index)])
