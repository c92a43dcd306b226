"""Several receiver processes on one port (node.receivers, SO_REUSEPORT): twelve DCMTK senders at once,
every instance recorded once, the associations spread over the processes, the C-STORE counter right
in the node's process, and a killed receiver process replaced."""

from __future__ import annotations

import os
import signal
import threading
import time

from conftest import free_port
from loopback import storescu
from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study

TINY = PhantomOptions(matrix=64, slices=6, slice_spacing_mm=10.0)


def _received(node: Node) -> float:
    return node.metrics.registry.get_sample_value("petriage_instances_received_total", {"status": "success"}) or 0


def test_three_receiver_processes_share_one_port_and_lose_nothing_of_twelve_senders(tmp_path):
    cfg = load_config(None, environ={}, overrides=[
        f"storage.root={tmp_path / 'var'}", "node.host=127.0.0.1", f"node.port={free_port()}",
        "node.role=receiver", "node.receivers=3", "metrics.port=0", "study.quiet_seconds=30"])
    folders, uids = [], []
    for k in range(12):
        study = generate_study(96100 + k, pe=False, options=TINY)
        folders.append(tmp_path / f"in{k}")
        write_study(study, folders[-1])
        uids.append(study.identity.study_instance_uid)
    per_study = len(list(folders[0].rglob("*.dcm")))
    node = Node(cfg, sweep_seconds=0.2, stop_timeout=30)
    try:
        assert len(node.receivers) == 2 and all(p.is_alive() for p in node.receivers)  # and listening
        threads = [threading.Thread(target=storescu, args=(cfg, f)) for f in folders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        deadline = time.monotonic() + 10
        while _received(node) < 12 * per_study and time.monotonic() < deadline:
            time.sleep(0.1)  # the receivers report their counts every half second
        assert _received(node) == 12 * per_study
        assert sum(node.received_by_process.values()) == 12 * per_study
        answered_by = {pid for pid, n in node.received_by_process.items() if n}
        assert len(answered_by) >= 2, node.received_by_process  # spread by the kernel: 3 * (1/3)^12 to fail
        assert answered_by <= {os.getpid(), *(p.pid for p in node.receivers)}
        for uid in uids:
            assert node.store.study(uid)["instances"] == per_study
        killed = node.receivers[0].pid
        os.kill(killed, signal.SIGKILL)
        node.receivers[0].join(10)
        node.supervise()
        assert node.receivers[0].pid != killed and node.receivers[0].is_alive()
    finally:
        node.stop()
    assert not [p for p in node.receivers if p.is_alive()]
