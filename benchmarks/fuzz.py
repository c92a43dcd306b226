"""Fuzz the running node from outside: N mutated CT objects over real associations, then check it held.

    .venv/bin/python benchmarks/fuzz.py [--objects 10000] [--studies 10] [--seed 0] [--json FILE]

The node runs whole (listener, sweep, worker process with the bundled model) with study quiet 3 s
and max-wait 20 s. Each study is a stack of ``objects / studies`` slices made from a phantom CTPA's
images at regular positions; every object is then mutated once, in its data set only (the file meta
stays valid so it can be offered): bytes flipped, the data set cut short, bytes inserted, an
element length made huge, a chunk duplicated. Objects go out in one association per 50 (pynetdicom
sends the file's bytes as they are), with a C-ECHO after each association.

Checked, and printed as figures:

- the node answers every object with a status a sender understands (success 0x0000, cannot
  understand 0xC000, does not match SOP class 0xA900, out of resources 0xA700), never 0xC211 (an
  exception in our handler) and never silence, and answers C-ECHO throughout;
- every acknowledged object is in the spool byte for byte (its data set as sent);
- every study ends with a final job whose reason is named, none "internal error";
- analyses per study stay within what the completion rules allow for the times its instances were
  stored: one per max-wait window while they arrive, one per pause longer than the quiet period, and
  one when it is quiet for good.

Exit code 0 when all hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import tempfile
import time
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from ingest import free_port  # benchmarks/ is on sys.path when this runs as a script
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.store import FINAL_STATES

UNDERSTOOD = {0x0000, 0xC000, 0xA900, 0xA700}
KINDS = ("flip", "truncate", "insert", "huge-length", "duplicate-chunk")
QUIET_SECONDS, MAX_WAIT_SECONDS = 3.0, 20.0


class _Count(logging.Handler):
    """Counts log records that carry a traceback (an exception escaped into pynetdicom or the node)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.tracebacks = 0
        self.examples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.tracebacks += 1
            if len(self.examples) < 5:
                self.examples.append(f"{record.name}: {record.getMessage()[:200]}")


def _split(whole: bytes) -> tuple[bytes, bytes]:
    meta_end = 132 + 12 + int.from_bytes(whole[140:144], "little")  # the group length element ends the meta
    return whole[:meta_end], whole[meta_end:]


def mutate(body: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One mutation of a data set's bytes, mostly in the header (the first 2 KiB)."""
    kind = str(rng.choice(KINDS))
    out = bytearray(body)
    head = min(len(out), 2048)
    at = int(rng.integers(0, head if rng.random() < 0.8 else len(out)))
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            out[int(rng.integers(0, head))] = int(rng.integers(0, 256))
    elif kind == "truncate":
        del out[at:]
    elif kind == "insert":
        out[at:at] = rng.integers(0, 256, int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
    elif kind == "huge-length":  # an explicit-VR element header's 2- or 4-byte length made enormous
        out[at:at + 4] = int(rng.choice([0xFFFF, 0xFFFFFFF0, 0x7FFFFFFF])).to_bytes(4, "little")
    else:
        size = int(rng.integers(8, 513))
        out[at:at] = bytes(out[at:at + size])
    return kind, bytes(out)


def make_objects(n_objects: int, n_studies: int, tmp: Path, seed: int) -> list[tuple[str, str, bytes, bytes]]:
    """(study uid, kind, file bytes, data set bytes) of every mutated object, study by study."""
    options = PhantomOptions(matrix=64, slices=24, slice_spacing_mm=4.5)
    templates = [pydicom.dcmread(p) for p in write_study(generate_study(880000 + seed, pe=True, options=options),
                                                         tmp / "template")["ctpa"]]
    templates.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))
    rng = np.random.default_rng(seed)
    out = []
    per_study = math.ceil(n_objects / n_studies)
    for s in range(n_studies):
        study, series = (generate_uid(entropy_srcs=[str(seed), str(s), kind]) for kind in ("study", "series"))
        for k in range(min(per_study, n_objects - len(out))):
            ds = templates[k % len(templates)]
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                entropy_srcs=[str(seed), str(s), str(k)])
            ds.ImagePositionPatient = [*list(ds.ImagePositionPatient)[:2], -4.5 * k]
            ds.InstanceNumber = k + 1
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            meta, body = _split(buffer.getvalue())
            kind, bad = mutate(body, rng)
            out.append((study, kind, meta + bad, bad))
    return out


def analyses_allowed(times: list[float]) -> int:
    """Analyses the completion rules allow for a study whose instances arrived at ``times`` (seconds):
    one per max-wait window while they arrive, one per pause longer than the quiet period (the study
    fell quiet and was complete), and the last one when it is quiet for good."""
    if not times:
        return 0
    times = sorted(times)
    pauses = sum(1 for a, b in zip(times, times[1:], strict=False) if b - a > QUIET_SECONDS)
    return math.ceil((times[-1] - times[0]) / MAX_WAIT_SECONDS) + pauses + 1


def send(objects: list[tuple[str, str, bytes, bytes]], port: int, ae_title: str, tmp: Path,
         sop_class: str, sent_at: list[float] | None = None) -> tuple[list[int], list[str]]:
    """C-STORE every object (50 per association) as its bytes are; returns statuses (-1: no answer) and
    why each failed C-ECHO failed. ``sent_at`` gets each object's answer time (time.monotonic)."""
    statuses: list[int] = []
    echo_failures: list[str] = []
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoding
    path = tmp / "object.dcm"
    try:
        for lo in range(0, len(objects), 50):
            ae = AE(ae_title="FUZZER")
            ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
            for _, _, whole, _ in objects[lo:lo + 50]:
                if not assoc.is_established:  # the node aborted the last one: a new association
                    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
                if not assoc.is_established:
                    statuses.append(-1)
                    continue
                path.write_bytes(whole)
                try:
                    status = assoc.send_c_store(path)
                    statuses.append(int(status.Status) if status else -1)
                except Exception:  # noqa: BLE001 - a local encoding failure is no answer from the node
                    statuses.append(-1)
                if sent_at is not None:
                    sent_at.append(time.monotonic())
            if assoc.is_established:
                echo = assoc.send_c_echo()
                if not echo:
                    echo_failures.append(f"objects {lo}-{lo + 49}: no C-ECHO answer"
                                         + ("" if assoc.is_established else ", the association ended"))
                elif echo.Status != 0:
                    echo_failures.append(f"objects {lo}-{lo + 49}: C-ECHO status 0x{int(echo.Status):04X}")
                assoc.release()
            else:
                echo_failures.append(f"objects {lo}-{lo + 49}: the association had ended before the C-ECHO "
                                     f"({'aborted' if assoc.is_aborted else 'not established'})")
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses, echo_failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parents[1] / "models" / "demo"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for every job")
    args = parser.parse_args(argv)
    counter = _Count()
    logging.getLogger().addHandler(counter)
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"making {args.objects} mutated objects in {args.studies} studies...", flush=True)
        objects = make_objects(args.objects, args.studies, tmp, args.seed)
        cfg = load_config(None, environ={}, overrides=[
            f"storage.root={tmp / 'node'}", "node.host=127.0.0.1", f"node.port={free_port()}",
            f"study.quiet_seconds={QUIET_SECONDS}", f"study.max_wait_seconds={MAX_WAIT_SECONDS}",
            f"model.bundle={Path(args.bundle).resolve()}", "model.device=cpu", "metrics.port=0",
            "storage.min_free_mb=0"])
        node = Node(cfg, sweep_seconds=0.5, stop_timeout=120)
        try:
            t0 = time.perf_counter()
            sent_at: list[float] = []
            statuses, echo_failures = send(objects, cfg.node.port, cfg.node.ae_title, tmp,
                                           "1.2.840.10008.5.1.4.1.1.2", sent_at)
            seconds_sending = time.perf_counter() - t0
            print(f"sent in {seconds_sending:.0f} s; waiting for every study's analysis...", flush=True)
            uids = sorted({study for study, *_ in objects})
            deadline = time.perf_counter() + args.timeout
            while True:
                node.supervise()
                received = [u for u in uids if node.store.study(u)]
                jobs = {u: node.store.jobs_of(u) for u in received}
                settled = all(node.store.study(u)["state"] == "complete" and j and all(
                    x["state"] in FINAL_STATES for x in j) for u, j in jobs.items())
                if settled or time.perf_counter() > deadline:
                    break
                time.sleep(1.0)
            spooled = {hashlib.sha256(_split(p.read_bytes())[1]).hexdigest()
                       for p in (tmp / "node" / "spool").rglob("*.dcm")}
        finally:
            node.stop()
    acknowledged = [bad for (_, _, _, bad), status in zip(objects, statuses, strict=True) if status == 0]
    altered = sum(1 for bad in acknowledged if hashlib.sha256(bad).hexdigest() not in spooled)
    all_jobs = [x for j in jobs.values() for x in j]
    internal = [x["reason"] for x in all_jobs if str(x["reason"] or "").startswith("internal error")]
    unnamed = [x for x in all_jobs if x["state"] not in FINAL_STATES or not x["reason"]]
    stored_at: dict[str, list[float]] = {}
    for (study, *_), status, at in zip(objects, statuses, sent_at, strict=False):
        if status == 0:
            stored_at.setdefault(study, []).append(at)
    per_study = {u: len(j) for u, j in jobs.items()}
    over = {u[-8:]: (n, analyses_allowed(stored_at.get(u, []))) for u, n in per_study.items()
            if n > analyses_allowed(stored_at.get(u, []))}
    figures = {
        "objects": len(objects), "studies": len(uids), "seconds_sending": round(seconds_sending, 1),
        "mutations": dict(Counter(kind for _, kind, _, _ in objects)),
        "statuses": {(f"0x{s:04X}" if s >= 0 else "no answer"): n for s, n in sorted(Counter(statuses).items())},
        "acknowledged": len(acknowledged), "acknowledged_but_altered": altered,
        "echo_failures": len(echo_failures), "echo_failure_reasons": echo_failures,
        "tracebacks_logged": counter.tracebacks, "traceback_examples": counter.examples,
        "jobs": dict(Counter(str(x["state"]) for x in all_jobs)), "internal_errors": len(internal),
        "internal_error_examples": internal[:5], "jobs_without_a_final_named_reason": len(unnamed),
        "analyses_per_study_max": max(per_study.values(), default=0),
        "analyses_per_study_allowed_max": max((analyses_allowed(t) for t in stored_at.values()), default=0),
        "studies_over_their_allowance": over,
        "reasons": dict(Counter(str(x["reason"]).split(":")[0].split(",")[0] for x in all_jobs).most_common(12)),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    ok = (set(statuses) <= UNDERSTOOD and not altered and not echo_failures and not counter.tracebacks
          and not internal and not unnamed and all(jobs.values()) and not over)
    print("fuzz: all properties held" if ok else "fuzz: a property failed (see the figures above)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
