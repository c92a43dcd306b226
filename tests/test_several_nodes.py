"""Several nodes on one PostgreSQL store: a receiver and two workers (each its own worker process)
share the queue and the spool; every study is analysed once and its results sent once."""

from __future__ import annotations

import time

from conftest import SMALL, free_port
from loopback import RecordingPacs, storescu
from node.commands.serve import Node
from node.config import load_config
from node.phantom import generate_study, write_study
from node.store import FINAL_STATES, JobState
from node.worker import worker_name


def test_a_receiver_and_two_workers_on_one_postgresql_store_analyse_and_send_each_study_once(postgres, tmp_path):
    pacs = RecordingPacs().start(free_port())
    url = postgres.database("nodes")
    shared = [f"storage.root={tmp_path / 'shared'}", f"store.url={url}", "node.host=127.0.0.1",
              f"node.port={free_port()}", "study.quiet_seconds=1", "study.max_wait_seconds=60", "model.device=cpu",
              "model.key_images=1", "metrics.port=0",
              f"destinations=[{{name: pacs, ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}}}]"]

    def node(name: str, role: str) -> Node:
        cfg = load_config(None, environ={}, overrides=[*shared, f"node.name={name}", f"node.role={role}"])
        return Node(cfg, sweep_seconds=0.2, notify_seconds=0.5, stop_timeout=60)

    studies = [generate_study(9700 + i, pe=i % 2 == 0, options=SMALL) for i in range(4)]
    nodes = [node("rx-1", "receiver"), node("gpu-1", "worker"), node("gpu-2", "worker")]
    receiver = nodes[0]
    try:
        assert receiver.worker is None and nodes[1].server is None and nodes[2].server is None
        for i, study in enumerate(studies):
            write_study(study, tmp_path / f"in{i}")
            storescu(receiver.cfg, tmp_path / f"in{i}")
        uids = [s.identity.study_instance_uid for s in studies]
        deadline = time.monotonic() + 240
        while True:
            for n in nodes:
                n.supervise()
            jobs = {u: receiver.store.jobs_of(u) for u in uids}
            if all(j and j[-1]["state"] in FINAL_STATES for j in jobs.values()):
                break
            assert time.monotonic() < deadline, jobs
            time.sleep(0.3)
        beats = {(b["node"], b["component"]) for b in receiver.store.node_heartbeats()}
        workers = {worker_name(n.worker.pid) for n in nodes[1:] if n.worker is not None}
    finally:
        for n in nodes:
            n.stop()
        pacs.stop()
    for uid in uids:
        [job] = jobs[uid]  # analysed once: one job per study
        assert job["state"] == JobState.DONE and "sent to pacs" in job["reason"], job
        sent = pacs.of_study(uid)
        assert len([s for s in sent if s.modality == "SR"]) == 1  # one SR per study, never two
        assert len({s.sop_instance_uid for s in sent}) == len(sent)  # nothing sent twice
    assert {j[0]["lease_owner"] for j in jobs.values()} <= workers  # analysed by the worker nodes' processes
    assert beats >= {("rx-1", "listener"), ("gpu-1", "worker"), ("gpu-2", "worker")}
