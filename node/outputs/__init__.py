"""What the node sends back: a Secondary Capture series with attention overlays and a TID 1500 SR.

UIDs are derived deterministically from the study UID, the model's sha256 and the output index, so a
re-send after a crash is a duplicate the PACS ignores, never a second report.
"""

from __future__ import annotations

from node.errors import NodeError


class OutputError(NodeError):
    """A result object could not be made from this study and result."""
