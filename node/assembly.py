"""Study completion: a study is complete when no instance of it has arrived for ``quiet_seconds``, or
``max_wait_seconds`` after its first instance, whichever comes first. A study that keeps receiving
after that is analysed again at most once per ``max_wait_seconds``, and once more when it is quiet.

The decision lives in the store (``Store.complete_quiet_studies``), so half-received studies survive a
restart of the node: the sweep simply finds them again. APScheduler runs the sweep every few seconds;
tests call ``Assembler.sweep`` with a supplied clock instead.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from node.config import StudySettings, TriageSettings
from node.store import Store, utcnow
from node.triage import priority

log = logging.getLogger(__name__)


class Assembler:
    """Marks quiet studies complete and queues them for analysis."""

    def __init__(self, store: Store, settings: StudySettings, clock: Callable[[], dt.datetime] = utcnow,
                 triage: TriageSettings | None = None, on_complete: Callable[[int], None] | None = None):
        self.store, self.settings, self.clock = store, settings, clock
        self.triage, self.on_complete = triage or TriageSettings(), on_complete

    def sweep(self) -> list[str]:
        done = self.store.complete_quiet_studies(
            self.clock(), self.settings.quiet_seconds, self.settings.max_wait_seconds,
            priority_of=lambda urgent: priority(self.triage, positive=None, urgent=urgent))
        for uid in done:
            log.info("study ...%s complete, queued for analysis", uid[-8:])
        if done and self.on_complete is not None:
            self.on_complete(len(done))
        return done
