"""The web console's one base exception."""

from __future__ import annotations

from node.errors import NodeError


class WebError(NodeError):
    """A console request or an account change that cannot be done; the message says why."""
