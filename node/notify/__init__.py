"""Notifications beyond the PACS: HL7 ORU^R01 to the RIS (``hl7``), JSON to chat/paging (``webhook``).

The worker writes the messages into the ``notifications`` table when a result is made (one per
channel and job, so a re-run job never notifies twice); ``Notifier.run_due`` (the node's scheduler,
every few seconds) sends the due ones, with retries 5 s, 10 s, ... up to an hour apart, and marks
each ``sent`` or, after ``notify.max_attempts`` or a permanent refusal, ``failed`` with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging

from node.config import NotifySettings
from node.errors import NodeError
from node.notify.hl7 import HL7Error, send_mllp
from node.notify.webhook import WebhookError, post
from node.store import Store, utcnow

log = logging.getLogger(__name__)


class NotifyError(NodeError):
    """A notification could not be made."""


def backoff_seconds(attempt: int) -> float:
    return float(min(3600.0, 5.0 * 2 ** max(0, attempt - 1)))


class Notifier:
    """Sends due notifications; one per node (the listener's process), several nodes on one store alike."""

    def __init__(self, store: Store, settings: NotifySettings, clock=utcnow):
        self.store, self.settings, self.clock = store, settings, clock

    def _send(self, row: dict) -> str:
        if row["channel"] == "hl7":
            if self.settings.hl7 is None:
                raise NotifyError("notify.hl7 is no longer configured")
            hl7 = self.settings.hl7
            return f"ACK {send_mllp(row['payload'], hl7.host, hl7.port, hl7.timeout_seconds)}"
        if row["channel"] == "webhook":
            if self.settings.webhook is None:
                raise NotifyError("notify.webhook is no longer configured")
            return f"HTTP {post(self.settings.webhook.url, row['payload'], self.settings.webhook.timeout_seconds)}"
        raise NotifyError(f"unknown channel {row['channel']!r}")

    def lease_seconds(self) -> float:
        """How long a notification is held while it is sent: past every timeout of a send."""
        timeouts = [c.timeout_seconds for c in (self.settings.hl7, self.settings.webhook) if c is not None]
        return 2 * max(timeouts, default=10.0) + 30.0

    def run_due(self) -> int:
        """Send every due notification once; returns how many were sent.

        Several nodes may run this on one store: each notification is first leased (claim_notification),
        so only one of them sends it.
        """
        sent = 0
        for row in self.store.due_notifications(self.clock()):
            if not self.store.claim_notification(row["id"], self.clock(), self.lease_seconds()):
                continue  # another node's notifier has it
            attempt = int(row["attempts"]) + 1
            try:
                detail = self._send(row)
            except (HL7Error, WebhookError, NotifyError) as exc:
                permanent = bool(getattr(exc, "permanent", False)) or isinstance(exc, NotifyError)
                if permanent or attempt >= self.settings.max_attempts:
                    self.store.notification_done(row["id"], False, f"attempt {attempt}: {exc}", self.clock())
                    log.error("notification %d (%s) failed: %s", row["id"], row["channel"], exc)
                else:
                    when = self.clock() + dt.timedelta(seconds=backoff_seconds(attempt))
                    self.store.notification_retry(row["id"], when, f"attempt {attempt}: {exc}", self.clock())
                    log.warning("notification %d (%s): %s; next try at %s", row["id"], row["channel"], exc,
                                f"{when:%H:%M:%S}")
                continue
            self.store.notification_done(row["id"], True, f"attempt {attempt}: {detail}", self.clock())
            sent += 1
        return sent
