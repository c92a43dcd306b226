"""Several nodes on one PostgreSQL store: a receiver and two workers (one with two worker processes)
share the queue and the spool; every study is analysed once and its results sent once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SMALL, free_port
from loopback import RecordingPacs, accepts, stop_process_groups, storescu, write_config
from node.commands.serve import Node
from node.config import load_config
from node.phantom import generate_study, write_study
from node.store import FINAL_STATES, JobState, Store
from node.worker import worker_name


def test_a_receiver_and_two_workers_on_one_postgresql_store_analyse_and_send_each_study_once(postgres, tmp_path):
    pacs = RecordingPacs().start(free_port())
    url = postgres.database("nodes")
    shared = [f"storage.root={tmp_path / 'shared'}", f"store.url={url}", "node.host=127.0.0.1",
              f"node.port={free_port()}", "study.quiet_seconds=1", "study.max_wait_seconds=60", "model.device=cpu",
              "model.key_images=1", "metrics.port=0",
              f"destinations=[{{name: pacs, ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}}}]"]

    def node(name: str, role: str, *more: str) -> Node:
        cfg = load_config(None, environ={}, overrides=[*shared, f"node.name={name}", f"node.role={role}", *more])
        return Node(cfg, sweep_seconds=0.2, notify_seconds=0.5, stop_timeout=60)

    studies = [generate_study(9700 + i, pe=i % 2 == 0, options=SMALL) for i in range(4)]
    nodes = [node("rx-1", "receiver"), node("gpu-1", "worker"), node("gpu-2", "worker", "worker.processes=2")]
    receiver = nodes[0]
    try:
        assert receiver.worker is None and nodes[1].server is None and nodes[2].server is None
        assert [len(n.workers) for n in nodes] == [0, 1, 2]
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
        workers = {worker_name(w.pid) for n in nodes[1:] for w in n.workers}
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


def _serve(config: Path, log: Path, role: str = "all") -> subprocess.Popen:
    """A whole node as its own process group (listener, sweep, worker process): killed like a host."""
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "node.cli", "--config", str(config), "serve", "--role", role],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_random_sigkills_of_whole_nodes_on_postgresql_leave_exactly_one_set_of_results_per_study(postgres, tmp_path):
    rng = random.Random(13)  # when and which node: seeded, so a failure can be replayed
    pacs = RecordingPacs().start(free_port())
    url = postgres.database("sigkill")
    configs = []
    for name in ("node-a", "node-b"):  # two full nodes on one host: one store, one spool
        (tmp_path / name).mkdir()
        configs.append(write_config(tmp_path / name, storage={"root": str(tmp_path / "shared")},
                                    store={"url": url}, node={"name": name}, worker={"lease_seconds": 4.0},
                                    model={"device": "cpu", "key_images": 1},
                                    destinations=[{"name": "pacs", "ae_title": pacs.ae_title,
                                                   "host": "127.0.0.1", "port": pacs.port}]))
    cfgs = [load_config(c, environ={}) for c in configs]
    # first both nodes only receive, so that all 30 studies wait in the queue when the kills begin
    procs = [_serve(c, tmp_path / f"node{i}.log", role="receiver") for i, c in enumerate(configs)]
    store = Store(url)
    studies = [generate_study(9800 + i, pe=i % 3 == 0, options=SMALL) for i in range(30)]
    uids = [s.identity.study_instance_uid for s in studies]
    kills = 0
    try:
        for _ in range(100):  # both listening
            if all(accepts("127.0.0.1", c.node.port) for c in cfgs):
                break
            time.sleep(0.2)
        for i, study in enumerate(studies):  # half to each node, one association each
            write_study(study, tmp_path / f"in{i % 2}" / str(i))
        for k in range(2):
            storescu(cfgs[k], tmp_path / f"in{k}")
        while not all(store.jobs_of(u) for u in uids):  # every study complete and queued
            time.sleep(0.2)
        for k, p in enumerate(procs):  # now as full nodes: both analyse and send
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(60)
            procs[k] = _serve(configs[k], tmp_path / f"node{k}.log")
        deadline, next_kill = time.monotonic() + 420, 0.0
        while True:
            jobs = {u: store.jobs_of(u) for u in uids}
            if all(j and j[-1]["state"] in FINAL_STATES for j in jobs.values()):
                break
            assert time.monotonic() < deadline, {u: [x["state"] for x in j] for u, j in jobs.items()}
            busy = any(j and j[-1]["state"] in (JobState.RUNNING, JobState.SENDING) for j in jobs.values())
            if kills < 6 and busy and time.monotonic() > next_kill:  # a node dies mid-work with everything in it
                k = rng.randrange(2)
                os.killpg(procs[k].pid, signal.SIGKILL)
                procs[k].wait(10)
                kills += 1
                time.sleep(rng.uniform(0.1, 1.0))
                procs[k] = _serve(configs[k], tmp_path / f"node{k}.log")
                next_kill = time.monotonic() + rng.uniform(0.5, 2.0)
            time.sleep(rng.uniform(0.2, 1.0))
    finally:
        stop_process_groups(procs)
        pacs.stop()
    assert kills == 6
    for uid in uids:
        [job] = jobs[uid]
        assert job["state"] == JobState.DONE, job
        srs = {s.sop_instance_uid for s in pacs.of_study(uid) if s.modality == "SR"}
        assert len(srs) == 1, (uid, srs)  # one set of results: a resend after a kill repeats the same objects
        objects = {s.sop_instance_uid: s.modality for s in pacs.of_study(uid)}
        # SR, 1 key image, summary, KOS; and the SEG, which a study with no attention above the floor has not
        assert len([m for m in objects.values() if m != "SEG"]) == 4, objects
        assert list(objects.values()).count("SEG") <= 1, objects
