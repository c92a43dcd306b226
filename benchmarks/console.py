"""Console page load: the worklist of 1,000 studies, against the CLI's own worklist query in the same run.

    .venv/bin/python benchmarks/console.py [--studies 1000] [--repeat 5]

A store is filled with ``--studies`` studies (one job each, a third of them PE suspected, results as the
worker writes them) and one spooled instance header per study (what the console reads the patient,
accession and study description from). Then, in the same run:

- baseline: ``node.admin.worklist`` (what ``petriage worklist --json`` runs), the same 1,000 rows;
- the console's ``GET /`` over HTTP after a login: first (headers read from the spool) and warm;
- ``GET /api/worklist?limit=1000``;
- Debian's Chromium (Playwright) loading the page to its load event, and to the first row painted.

Prints each time (median of ``--repeat``) and its ratio to the baseline. Times depend on the machine:
compare ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import pydicom  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from node import admin  # noqa: E402
from node.config import load_config  # noqa: E402
from node.store import Store, database_url, instances, jobs, studies  # noqa: E402
from node.web import users  # noqa: E402
from node.web.server import start_console  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(store: Store, root: Path, n: int) -> None:
    now = dt.datetime.now(dt.UTC)
    study_rows, job_rows, instance_rows = [], [], []
    for i in range(n):
        uid, series, sop = generate_uid(), generate_uid(), generate_uid()
        path = root / "spool" / uid / series / f"{sop}.dcm"
        path.parent.mkdir(parents=True)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CT, sop
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CT, sop, uid, series
        ds.PatientName, ds.PatientID, ds.AccessionNumber = f"BENCH^PATIENT{i}", f"PB{i:06d}", f"ACC{i:08d}"
        ds.StudyDate, ds.StudyTime, ds.StudyDescription = "20261204", "101500", "CT ANGIOGRAPHY CHEST"
        ds.save_as(path, enforce_file_format=True)
        at = now - dt.timedelta(minutes=i)
        positive = i % 3 == 0
        p = 0.6 + 0.4 * ((i * 7919) % 100) / 100 if positive else 0.2 * ((i * 7919) % 100) / 100
        result = {"probability": p, "positive": positive, "decision": "PE suspected" if positive else
                  "PE not suspected", "threshold": 0.166, "series": {"description": "CTPA 1.0 mm", "reason": ""}}
        study_rows.append({"study_instance_uid": uid, "state": "complete", "instances": 300, "first_received_at": at,
                           "last_received_at": at, "completed_at": at, "urgent": i % 50 == 0})
        job_rows.append({"study_instance_uid": uid, "state": "done", "priority": int(1000 * positive + 100 * p),
                         "reason": result["decision"], "attempts": 1, "created_at": at, "updated_at": at,
                         "result": json.dumps(result), "delivered": "[\"pacs\"]"})
        instance_rows.append({"sop_instance_uid": sop, "study_instance_uid": uid, "series_instance_uid": series,
                              "sop_class_uid": CT, "transfer_syntax_uid": ExplicitVRLittleEndian, "path": str(path),
                              "bytes": path.stat().st_size, "calling_ae_title": "BENCH", "received_at": at})
    with store.engine.begin() as conn:
        conn.execute(insert(studies), study_rows)
        conn.execute(insert(jobs), job_rows)
        conn.execute(insert(instances), instance_rows)


def timed(fn, repeat: int) -> tuple[float, float]:
    """(first, median of the rest) in seconds."""
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        root = Path(tmp_name)
        cfg = load_config(None, environ={}, overrides=[f"storage.root={root}", "metrics.port=0"])
        store = Store(database_url(root, None))
        t0 = time.perf_counter()
        fill(store, root, a.studies)
        print(f"store filled: {a.studies} studies in {time.perf_counter() - t0:.1f} s")
        users.add(store, "bench", "admin", "bench-password-1")
        server = start_console(cfg, store, port=free_port())
        try:
            client = httpx.Client(base_url=server.url, timeout=120)
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
            assert client.post("/login", data={"name": "bench", "password": "bench-password-1", "csrf": token}
                               ).status_code == 303
            _, base = timed(lambda: admin.worklist(store, limit=a.studies), a.repeat)
            rows_seen = []
            first, warm = timed(lambda: rows_seen.append(client.get("/").text.count("<tr class=")), a.repeat)
            _, api = timed(lambda: client.get("/api/worklist", params={"limit": a.studies}).raise_for_status(),
                           a.repeat)
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
                page = browser.new_page()
                page.goto(server.url + "/login")
                page.fill("input[name=name]", "bench")
                page.fill("input[name=password]", "bench-password-1")
                page.click("form.login button[type=submit]")
                page.wait_for_url(server.url + "/")

                def load() -> None:
                    page.goto(server.url + "/", wait_until="load")

                _, browser_load = timed(load, a.repeat)
                paint = page.evaluate("performance.getEntriesByType('paint').map(e => [e.name, e.startTime])")
                browser.close()
        finally:
            server.stop()
    print(f"rows in the page: {rows_seen[0]}")
    print(f"baseline  admin.worklist (the CLI's query), {a.studies} rows: {base * 1000:8.1f} ms")
    print(f"console   GET /, first (headers from the spool):     {first * 1000:8.1f} ms  ({first / base:5.1f}x)")
    print(f"console   GET /, warm:                               {warm * 1000:8.1f} ms  ({warm / base:5.1f}x)")
    print(f"console   GET /api/worklist, warm:                   {api * 1000:8.1f} ms  ({api / base:5.1f}x)")
    print(f"Chromium  page load event, warm:                     {browser_load * 1000:8.1f} ms  "
          f"({browser_load / base:5.1f}x)")
    print(f"Chromium  paint timings of the last load (ms): {paint}")


if __name__ == "__main__":
    main()
