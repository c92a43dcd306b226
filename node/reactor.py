"""Wake pynetdicom's two reactor threads when there is work, instead of letting them poll.

Each association runs two threads that poll: the DUL reactor (socket in, PDUs out) sleeps
``_run_loop_delay`` between looks, and the association reactor (DIMSE messages to the handler)
sleeps 1 ms. A short delay buys latency with CPU: at 0.1 ms an idle association's DUL thread
wakes 10,000 times a second and takes the GIL each time, from the handlers that fsync and record
instances, and four associations on two cores spend a good part of a core on looking. A long
delay makes every C-STORE wait for the next look.

For the listener's associations (``install`` at ``EVT_CONN_OPEN``, before either thread starts;
``uninstall`` at ``EVT_CONN_CLOSE``) the two sleeps become waits that end at once when the thread has something to do:

- the DUL thread waits in ``select`` on its socket and an eventfd that the association thread
  pokes whenever it queues a primitive to send (the C-STORE-RSP);
- the association thread waits on an Event that the DUL thread sets whenever it queues a decoded
  DIMSE message or an A-RELEASE/A-ABORT for it.

Neither waits longer than ``CAP`` without looking, so pynetdicom's own timers and kill flags work
as before. Every other thread (the node's own SCU associations, pynetdicom's callers) sleeps as
pynetdicom asks. pynetdicom is pinned; tests/test_scp.py checks that these hooks are in place.
"""

from __future__ import annotations

import os
import queue
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul

CAP = 0.01  # the longest either reactor waits before its own checks (idle and ARTIM timers, kill flags)
ASSOCIATION_POLL = 0.001  # the association reactor's sleep in pynetdicom (the one replaced)


class Waker:
    """One association's wake-ups: an eventfd for its DUL thread, an Event for its association thread."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.arrived = threading.Event()
        self._lock = threading.Lock()
        self.closed = False

    def poke(self) -> None:
        with self._lock:
            if not self.closed:
                try:
                    os.eventfd_write(self.fd, 1)
                except BlockingIOError:  # the counter is full: the DUL thread has plenty to wake for
                    pass

    def drain(self) -> None:
        with self._lock:
            if not self.closed:
                try:
                    os.eventfd_read(self.fd)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self.fd)

    def __del__(self) -> None:
        self.close()


def _after_put(q: queue.Queue, then: Callable[[], None]) -> None:
    put = q.put

    def put_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        then()

    q.put = put_and_wake  # type: ignore[method-assign]


def uninstall(assoc) -> None:
    """Close the association's eventfd (``EVT_CONN_CLOSE``). Safe from any thread: a DUL thread inside
    ``select`` on it wakes by its cap, and a closed waker is neither poked nor drained again."""
    waker: Waker | None = getattr(assoc, "_petriage_waker", None)
    if waker is not None:
        waker.close()


def install(assoc) -> None:
    """Give one association event-driven reactors. Call before it starts (``EVT_CONN_OPEN``)."""
    waker = Waker()
    assoc.dul._petriage_waker = waker
    assoc._petriage_waker = waker
    _after_put(assoc.dul.to_provider_queue, waker.poke)  # something to send: wake the DUL thread
    _after_put(assoc.dul.to_user_queue, waker.arrived.set)  # A-RELEASE, A-ABORT ...: the association thread
    _after_put(assoc.dimse.msg_queue, waker.arrived.set)  # a whole DIMSE message: the association thread


class _DulTime:
    """``time`` as pynetdicom.dul sees it: ``sleep`` waits for data or a poke on an installed DUL thread."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        waker: Waker | None = getattr(thread, "_petriage_waker", None)
        if waker is None or waker.closed:
            time.sleep(seconds)
            return
        wrapper = getattr(thread, "socket", None)
        raw = getattr(wrapper, "socket", None)
        if getattr(thread, "_kill_thread", False) or raw is None or not getattr(wrapper, "_is_connected", False):
            time.sleep(seconds)
            return
        if not thread.to_provider_queue.empty():  # type: ignore[attr-defined]
            return
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return
        try:
            select.select([raw, waker.fd], [], [], CAP)
        except (OSError, ValueError):  # the socket is gone: pynetdicom's own check turns that into Evt17
            return
        waker.drain()


class _AssociationTime:
    """``time`` as pynetdicom.association sees it: the reactor's 1 ms poll waits for a message instead."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        thread = threading.current_thread()
        waker: Waker | None = getattr(thread, "_petriage_waker", None)
        if waker is None or seconds != ASSOCIATION_POLL:
            time.sleep(seconds)
            return
        if thread.dimse.msg_queue.empty() and thread.dul.to_user_queue.empty():  # type: ignore[attr-defined]
            waker.arrived.wait(CAP)
        waker.arrived.clear()


_dul.time = _DulTime()  # type: ignore[assignment]
_association.time = _AssociationTime()  # type: ignore[assignment]
