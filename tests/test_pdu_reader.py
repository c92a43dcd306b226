"""The listener reads each PDU into one buffer: every byte, in order, however the kernel splits it
(that the listener's associations use it: tests/test_scp.py, the reactor test)."""

from __future__ import annotations

import os
import socket
import threading
import time
import tracemalloc
import types

import pytest

from node.pdu_reader import read_exactly


def _wrapper(sock: socket.socket):
    return types.SimpleNamespace(socket=sock)


def test_a_read_returns_every_byte_sent_in_small_pieces_with_pauses():
    ours, theirs = socket.socketpair()
    payload = os.urandom(300_000)

    def trickle():
        for start in range(0, len(payload), 7_001):  # pieces that fit no power of two
            theirs.sendall(payload[start:start + 7_001])
            if start % 70_010 == 0:
                time.sleep(0.002)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        first = read_exactly(_wrapper(ours), 6)
        rest = read_exactly(_wrapper(ours), len(payload) - 6)
    finally:
        sender.join()
        ours.close()
        theirs.close()
    assert isinstance(first, bytearray) and bytes(first + rest) == payload


def test_a_peer_that_closes_mid_pdu_gives_a_short_read_as_pynetdicom_expects():
    ours, theirs = socket.socketpair()
    theirs.sendall(b"\x04\x00" + b"x" * 998)
    theirs.close()
    try:
        got = read_exactly(_wrapper(ours), 64_000)
    finally:
        ours.close()
    assert bytes(got) == b"\x04\x00" + b"x" * 998  # pynetdicom compares the length and raises Evt17


def test_a_read_timeout_propagates_unchanged():
    ours, theirs = socket.socketpair()
    ours.settimeout(0.05)
    try:
        with pytest.raises(TimeoutError):
            read_exactly(_wrapper(ours), 10)
    finally:
        ours.close()
        theirs.close()



def test_a_pdu_that_claims_4_gib_allocates_only_about_what_arrives():
    ours, theirs = socket.socketpair()

    def send_and_close():
        theirs.sendall(b"y" * 300_000)
        theirs.close()

    sender = threading.Thread(target=send_and_close)
    tracemalloc.start()
    sender.start()
    try:
        got = read_exactly(_wrapper(ours), 2**32 - 1)  # a PDU length field at its maximum
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sender.join()
        ours.close()
    assert bytes(got) == b"y" * 300_000 and peak < 2 * 1024 * 1024
