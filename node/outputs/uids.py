"""Deterministic UIDs for the node's outputs (the same study, model and index give the same UID)."""

from __future__ import annotations

from pydicom.uid import generate_uid

#: pydicom's registered root for UIDs made from a hash (2.25-style would also do; this keeps them short).
PREFIX = "1.2.826.0.1.3680043.8.498."


def output_uid(study_instance_uid: str, model_sha256: str, kind: str, index: int = 0) -> str:
    """A UID for output ``kind`` number ``index`` of this study and model."""
    return generate_uid(prefix=PREFIX, entropy_srcs=[study_instance_uid, model_sha256, kind, str(index)])
