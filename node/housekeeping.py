"""Housekeeping: spooled studies and their results are removed once they are no longer needed.

A study may go when its results were delivered (its latest job is done) or there was nothing to send
(skipped, cancelled), nothing of it is queued, running or sending, and it is not receiving. Such a
study goes

- after ``retention.days`` since its last job changed (the retention pass), and
- earlier, oldest first, while the spool's file system has less free space than the C-STORE floor
  (``storage.min_free_mb``) plus ``retention.headroom_mb`` (the disk-pressure pass), so that old,
  delivered studies make room before new ones are refused.

A study whose results could not be delivered (latest job failed) stays until an administrator resends
or purges it. Removal deletes the study's spool files, its outbox folders and its instance, study and
job rows in one transaction gated on the study still being removable (so a late instance, a node
beside this one or an administrator never loses a study that came back to life); the event log keeps
one event per removal. Several nodes may run this on one store: only one of them removes a study.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import and_, delete, func, insert, select

from node.config import RetentionSettings
from node.store import FINAL_STATES, JobState, Store, StudyState, events, instances, jobs, naive_utc, studies, utcnow

log = logging.getLogger(__name__)

#: Latest job states whose study has nothing left to deliver.
SETTLED = (JobState.DONE, JobState.SKIPPED, JobState.CANCELLED)


@dataclass
class Removed:
    """What one removal took away."""

    study_instance_uid: str
    instances: int
    bytes: int
    jobs: int


@dataclass
class HousekeepingResult:
    retention: list[Removed] = field(default_factory=list)
    pressure: list[Removed] = field(default_factory=list)
    free_mib_before: int = 0
    free_mib_after: int = 0

    def summary(self) -> dict:
        return {"removed_for_retention": len(self.retention), "removed_for_disk_pressure": len(self.pressure),
                "bytes_removed": sum(r.bytes for r in self.retention + self.pressure),
                "free_mib_before": self.free_mib_before, "free_mib_after": self.free_mib_after}


def removable(store: Store, *, settled_only: bool = True) -> list[tuple[str, dt.datetime]]:
    """(study, last job change) of the studies that may go, oldest first.

    ``settled_only``: only studies whose latest job is done, skipped or cancelled (housekeeping);
    otherwise every study whose jobs are all final, failed ones included (an administrator's purge).
    """
    latest = select(jobs.c.study_instance_uid, func.max(jobs.c.id).label("id"),
                    func.max(jobs.c.updated_at).label("last")).group_by(jobs.c.study_instance_uid).subquery()
    query = (select(latest.c.study_instance_uid, latest.c.last, jobs.c.state)
             .join(jobs, jobs.c.id == latest.c.id)
             .join(studies, studies.c.study_instance_uid == latest.c.study_instance_uid)
             .where(studies.c.state != StudyState.RECEIVING).order_by(latest.c.last))
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
        open_ = {r[0] for r in conn.execute(select(jobs.c.study_instance_uid).where(
            jobs.c.state.not_in(FINAL_STATES))).all()}
    allowed = SETTLED if settled_only else FINAL_STATES
    return [(r.study_instance_uid, r.last) for r in rows if r.study_instance_uid not in open_ and r.state in allowed]


def remove_study(store: Store, storage_root: Path, uid: str, now: dt.datetime, kind: str, why: str, *,
                 settled_only: bool = True) -> Removed | None:
    """Remove one study (files, outbox, rows) if it is still removable; None when it is not any more.

    The study row is deleted first, on condition that the study is not receiving: a late instance
    that reopened it, or another node that removed it already, makes the row count 0 and the whole
    transaction is rolled back. Files go only after the rows are committed.
    """
    with store.engine.begin() as conn:
        if conn.execute(delete(studies).where(studies.c.study_instance_uid == uid,
                                              studies.c.state != StudyState.RECEIVING)).rowcount != 1:
            conn.rollback()
            return None
        states = [r[0] for r in conn.execute(select(jobs.c.state).where(jobs.c.study_instance_uid == uid)
                                             .order_by(jobs.c.id)).all()]
        allowed = SETTLED if settled_only else FINAL_STATES
        if any(s not in FINAL_STATES for s in states) or (states and states[-1] not in allowed):
            conn.rollback()  # a job was queued meanwhile, or results still wait to be delivered
            return None
        files = conn.execute(select(instances.c.path, instances.c.bytes).where(
            instances.c.study_instance_uid == uid)).all()
        outboxes = [r[0] for r in conn.execute(select(jobs.c.outbox).where(
            and_(jobs.c.study_instance_uid == uid, jobs.c.outbox.is_not(None)))).all()]
        conn.execute(delete(instances).where(instances.c.study_instance_uid == uid))
        conn.execute(delete(jobs).where(jobs.c.study_instance_uid == uid))
        size = sum(int(b) for _, b in files)
        conn.execute(insert(events).values(at=now, study_instance_uid=uid, kind=kind,
                                           detail=f"{len(files)} instances ({size / 2**20:.1f} MiB), "
                                                  f"{len(states)} job(s): {why}"))
    for path, _ in files:
        Path(path).unlink(missing_ok=True)
    shutil.rmtree(Path(storage_root) / "spool" / uid, ignore_errors=True)
    for folder in outboxes:
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(Path(storage_root) / "outbox" / uid, ignore_errors=True)
    return Removed(uid, len(files), size, len(states))


class Housekeeper:
    """The retention and disk-pressure passes, run by the node's scheduler every few minutes."""

    def __init__(self, store: Store, storage_root: Path, settings: RetentionSettings, min_free_mb: int,
                 clock: Callable[[], dt.datetime] = utcnow,
                 free_bytes: Callable[[Path], int] = lambda p: shutil.disk_usage(p).free):
        self.store, self.root, self.settings, self.clock = store, Path(storage_root), settings, clock
        self.target_bytes = (min_free_mb + settings.headroom_mb) * 2**20
        self.free_bytes = free_bytes
        self.last: HousekeepingResult | None = None

    def run_once(self) -> HousekeepingResult:
        now = self.clock()
        result = HousekeepingResult(free_mib_before=self.free_bytes(self.root) // 2**20)
        candidates = removable(self.store)
        if self.settings.days is not None:
            cutoff = now - dt.timedelta(days=self.settings.days)
            for uid, last in candidates:
                if naive_utc(last) >= naive_utc(cutoff):
                    break  # oldest first: the rest are younger
                removed = remove_study(self.store, self.root, uid, now, "retention",
                                       f"delivered, older than retention.days = {self.settings.days:g}")
                if removed:
                    result.retention.append(removed)
        taken = {r.study_instance_uid for r in result.retention}
        for uid, _ in candidates:
            if self.free_bytes(self.root) >= self.target_bytes:
                break
            if uid in taken:
                continue
            removed = remove_study(self.store, self.root, uid, now, "disk-pressure",
                                   f"delivered; free space under storage.min_free_mb + retention.headroom_mb "
                                   f"({self.target_bytes // 2**20} MiB)")
            if removed:
                result.pressure.append(removed)
        result.free_mib_after = self.free_bytes(self.root) // 2**20
        if result.retention or result.pressure:
            log.warning("housekeeping removed %d study(ies) past retention and %d for disk space (%.1f MiB)",
                        len(result.retention), len(result.pressure),
                        sum(r.bytes for r in result.retention + result.pressure) / 2**20)
        if self.free_bytes(self.root) < self.target_bytes:
            log.warning("housekeeping: %d MiB free, under the %d MiB it keeps, and nothing delivered is left "
                        "to remove", result.free_mib_after, self.target_bytes // 2**20)
        self.last = result
        return result
