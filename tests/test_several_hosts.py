"""A receiver and a worker as two hosts: each node runs in its own network namespace (``ip netns``),
reaching the PostgreSQL store and the PACS only over a veth link, as separate machines would; the
storage root is the shared mount. Needs root and ``ip netns``: where the kernel or the container
does not allow network namespaces the test says so and is skipped (the same nodes run on one host in
test_several_nodes.py)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgcluster import postgres_bindir, throwaway_cluster

from conftest import SMALL, free_port, require_peer, require_tool
from loopback import RecordingPacs, accepts, stop_process_groups, write_config
from node.phantom import generate_study, write_study
from node.store import FINAL_STATES, JobState, Store

SUBNET = "10.231"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _netns_works() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        return "needs root and iproute2's ip"
    name = f"pt-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        return f"ip netns add failed: {exc.stderr.decode(errors='replace').strip()}"
    _ip("netns", "del", name)
    return None


@contextlib.contextmanager
def hosts(count: int) -> Iterator[list[tuple[str, str, str]]]:
    """``count`` network namespaces, each linked to this one by a veth pair: (namespace, its address,
    this side's address)."""
    tag = secrets.token_hex(2)
    made: list[tuple[str, str, str]] = []
    try:
        for k in range(count):
            ns, outside, inside = f"pt-{tag}-{k}", f"{SUBNET}.{k}.1", f"{SUBNET}.{k}.2"
            _ip("netns", "add", ns)
            made.append((ns, inside, outside))
            _ip("link", "add", f"pt{tag}{k}a", "type", "veth", "peer", "name", f"pt{tag}{k}b")
            _ip("link", "set", f"pt{tag}{k}b", "netns", ns)
            _ip("addr", "add", f"{outside}/24", "dev", f"pt{tag}{k}a")
            _ip("link", "set", f"pt{tag}{k}a", "up")
            _ip("-n", ns, "addr", "add", f"{inside}/24", "dev", f"pt{tag}{k}b")
            _ip("-n", ns, "link", "set", f"pt{tag}{k}b", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield made
    finally:
        for ns, _, _ in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # its veth goes with it


def _serve(ns: str, config: Path, role: str, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "node.cli", "--config", str(config),
                                 "serve", "--role", role], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1])


def test_a_receiver_and_a_worker_on_two_network_hosts_share_the_queue_and_send_each_result_once(tmp_path):
    why = _netns_works()
    if why is not None:
        pytest.skip(f"network namespaces are not available here ({why})")
    require_peer(postgres_bindir() is not None, "PostgreSQL (initdb, pg_ctl)")
    storescu = require_tool("storescu")
    with hosts(2) as [(rx_ns, rx_ip, rx_gw), (wk_ns, _wk_ip, wk_gw)], \
            throwaway_cluster(free_port(), listen="*", trusted=f"{SUBNET}.0.0/16") as cluster:
        url = cluster.database("hosts")
        pacs = RecordingPacs().start(free_port(), host="0.0.0.0")  # noqa: S104 - reached from the worker's host
        common = {"storage": {"root": str(tmp_path / "shared")}, "worker": {"lease_seconds": 10.0},
                  "model": {"device": "cpu", "key_images": 1}, "study": {"quiet_seconds": 1.0}}
        port = free_port()
        configs = {}
        for name, gateway, host in (("rx", rx_gw, rx_ip), ("wk", wk_gw, "127.0.0.1")):
            (tmp_path / name).mkdir()
            # each host reaches the store and the PACS at its own link's far end, as over a network
            configs[name] = write_config(tmp_path / name, **common, node={"name": name, "host": host, "port": port},
                                         store={"url": url.replace("127.0.0.1", gateway)},
                                         destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": gateway,
                                                        "port": pacs.port}])
        procs = [_serve(rx_ns, configs["rx"], "receiver", tmp_path / "rx.log"),
                 _serve(wk_ns, configs["wk"], "worker", tmp_path / "wk.log")]
        store = Store(url)
        try:
            deadline = time.monotonic() + 60
            while not accepts(rx_ip, port):
                assert time.monotonic() < deadline, (tmp_path / "rx.log").read_text()[-2000:]
                time.sleep(0.2)
            assert not accepts("127.0.0.1", port)  # the receiver listens on its own host only
            studies = [generate_study(9900 + i, pe=i % 2 == 0, options=SMALL) for i in range(3)]
            for i, study in enumerate(studies):
                write_study(study, tmp_path / "in" / str(i))
            subprocess.run([storescu, "-aec", "PETRIAGE", "+sd", "+r", rx_ip, str(port), str(tmp_path / "in")],
                           check=True, timeout=120, env={"TCP_NODELAY": "1"}, capture_output=True)
            uids = [s.identity.study_instance_uid for s in studies]
            deadline = time.monotonic() + 240
            while True:
                jobs = {u: store.jobs_of(u) for u in uids}
                if all(j and j[-1]["state"] in FINAL_STATES for j in jobs.values()):
                    break
                assert time.monotonic() < deadline, (jobs, (tmp_path / "wk.log").read_text()[-3000:])
                time.sleep(0.3)
            beats = {(b["node"], b["component"]) for b in store.node_heartbeats()}
        finally:
            stop_process_groups(procs)
            pacs.stop()
            store.engine.dispose()
    for uid in uids:
        [job] = jobs[uid]  # one job per study
        assert job["state"] == JobState.DONE and "sent to pacs" in job["reason"], job
        sent = pacs.of_study(uid)
        assert len([s for s in sent if s.modality == "SR"]) == 1
        assert len({s.sop_instance_uid for s in sent}) == len(sent)
    assert beats >= {("rx", "listener"), ("wk", "worker")}
