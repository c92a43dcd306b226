"""Group commit of received instances: the listener's association threads hand their rows to one
recorder thread, which writes every row waiting at that moment in one transaction.

Each C-STORE still waits until its own row is committed (the promise holds: durable on disk and in the
store before success), but with several associations at once, one commit (one fsync of the SQLite WAL,
one round trip to PostgreSQL) serves all the instances that arrived while the previous one ran. Nothing
waits for a batch to fill: a lone sender's instance is committed at once, in a batch of one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from node.store import Received, Store, StoreError

log = logging.getLogger(__name__)


class GroupRecorder:
    """``record(item)`` from any thread; rows are committed by one thread, up to ``max_batch`` at a time."""

    def __init__(self, store: Store, max_batch: int = 64):
        self.store, self.max_batch = store, max_batch
        self._queue: queue.SimpleQueue[tuple[Received, Future] | None] = queue.SimpleQueue()
        self.batches = 0  # transactions committed, and the rows in them (what group commit saved)
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name="petriage-group-commit", daemon=True)
        self._thread.start()

    def record(self, item: Received) -> bool:
        """Record one instance; returns False for a duplicate; StoreError if the store refused it."""
        if not self._thread.is_alive():
            raise StoreError("the instance recorder has stopped")
        done: Future = Future()
        self._queue.put((item, done))
        return bool(done.result())

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: Sequence[tuple[Received, Future]]) -> None:
        try:
            results = self.store.record_instances([item for item, _ in batch])
        except StoreError as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            for one in batch:  # one bad row must not fail the others: each on its own
                self._commit([one])
            return
        except Exception as exc:  # noqa: BLE001 - never leave a sender's thread waiting for ever
            log.exception("recording %d instances failed", len(batch))
            for _, done in batch:
                done.set_exception(StoreError(f"cannot record the instance: {type(exc).__name__}"))
            return
        self.batches += 1
        self.rows += len(batch)
        for (_, done), result in zip(batch, results, strict=True):
            done.set_result(result)
