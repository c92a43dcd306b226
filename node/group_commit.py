"""Group commit of received instances, led by the association threads themselves.

Each C-STORE still waits until its own row is committed (the promise holds: durable on disk and in the
store before success), but with several associations at once, one commit (one fsync of the SQLite WAL,
one round trip to PostgreSQL) serves all the instances that arrived while the previous one ran.

No thread of its own: the first caller to find no commit running leads, committing its row (and any
that queued meanwhile) in its own thread; callers that arrive while a commit runs queue, and when it
ends the oldest of them is woken to lead the next one with everything queued by then. A lone sender's
instance is therefore committed at once, with no hand-over to another thread (measured: that hop cost
a lone association about a tenth of its time per image), and nothing ever waits for a batch to fill.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence

from node.store import Received, Store, StoreError

log = logging.getLogger(__name__)


class _Slot:
    """One caller's row, its outcome, and the event that wakes it (its row done, or its turn to lead)."""

    __slots__ = ("item", "result", "error", "finished", "wake")

    def __init__(self, item: Received):
        self.item = item
        self.result = False
        self.error: StoreError | None = None
        self.finished = False
        self.wake = threading.Event()


class GroupRecorder:
    """``record(item)`` from any thread; rows are committed up to ``max_batch`` at a time."""

    def __init__(self, store: Store, max_batch: int = 64):
        self.store, self.max_batch = store, max_batch
        self._lock = threading.Lock()
        self._waiting: deque[_Slot] = deque()
        self._leading = False
        self._closed = False
        self.batches = 0  # transactions committed, and the rows in them (what group commit saved)
        self.rows = 0

    @property
    def waiting(self) -> int:
        """Rows queued behind the commit that is running."""
        return len(self._waiting)

    def record(self, item: Received) -> bool:
        """Record one instance; returns False for a duplicate; StoreError if the store refused it."""
        slot = _Slot(item)
        with self._lock:
            if self._closed:
                raise StoreError("the instance recorder has stopped")
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                self._waiting.append(slot)
        if not lead:
            slot.wake.wait()  # its row done by a leader, or woken to lead (then not finished)
        if not slot.finished:  # this thread leads: its own row and whatever queued meanwhile
            with self._lock:
                batch = [slot]
                while self._waiting and len(batch) < self.max_batch:
                    batch.append(self._waiting.popleft())
            try:
                self._commit(batch)
            finally:
                for one in batch:  # even an interrupted commit answers every caller it took
                    if not one.finished:
                        self._finish(one, error=StoreError("the instance was not recorded"))
                with self._lock:  # hand the lead to the oldest caller still waiting, or give it up
                    if self._waiting:
                        self._waiting.popleft().wake.set()
                    else:
                        self._leading = False
        if slot.error is not None:
            raise slot.error
        return slot.result

    def close(self) -> None:
        """Refuse new rows; rows already queued are still committed by their leader."""
        with self._lock:
            self._closed = True

    def _commit(self, batch: Sequence[_Slot]) -> None:
        try:
            results = self.store.record_instances([slot.item for slot in batch])
        except StoreError as exc:
            if len(batch) == 1:
                self._finish(batch[0], error=exc)
                return
            for one in batch:  # one bad row must not fail the others: each on its own
                self._commit([one])
            return
        except Exception as exc:  # noqa: BLE001 - never leave a sender's thread waiting for ever
            log.exception("recording %d instances failed", len(batch))
            for slot in batch:
                self._finish(slot, error=StoreError(f"cannot record the instance: {type(exc).__name__}"))
            return
        self.batches += 1
        self.rows += len(batch)
        for slot, result in zip(batch, results, strict=True):
            self._finish(slot, result=result)

    @staticmethod
    def _finish(slot: _Slot, result: bool = False, error: StoreError | None = None) -> None:
        slot.result, slot.error, slot.finished = result, error, True
        slot.wake.set()
