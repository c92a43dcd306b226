"""Prometheus metrics (prometheus-client), served by the node at ``http://metrics.host:metrics.port/metrics``.

Counted in the listener's process as they happen:

- ``petriage_instances_received_total{status}``: C-STORE requests answered, by named status;
- ``petriage_studies_completed_total``: studies marked complete (quiet or max-wait).

Read from the store at each scrape (so they include what the worker process did, and survive restarts):

- ``petriage_queue_jobs{state}``: jobs by state; ``petriage_oldest_queued_job_age_seconds``;
- ``petriage_notifications{channel,state}``;
- ``petriage_send_failures_total``: failed C-STORE attempts to destinations (events ``send-retry`` and
  jobs failed while sending);
- ``petriage_inference_seconds`` and ``petriage_end_to_end_seconds`` (last image received to result
  sent) as histograms over the most recent ``WINDOW`` finished jobs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from node.store import JobState, Store, events, jobs, naive_utc, studies, utcnow

log = logging.getLogger(__name__)

WINDOW = 10_000
INFERENCE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
END_TO_END_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


def _histogram(name: str, doc: str, values: Sequence[float], buckets: Iterable[float]) -> HistogramMetricFamily:
    bounds = [*buckets, float("inf")]
    counts = [sum(1 for v in values if v <= b) for b in bounds]
    return HistogramMetricFamily(name, doc, buckets=[(str(b) if b != float("inf") else "+Inf", c)
                                                     for b, c in zip(bounds, counts, strict=True)],
                                 sum_value=float(sum(values)))


class StoreCollector:
    """What the store knows, collected at scrape time."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        summary = self.store.queue_summary(utcnow())
        with self.store.engine.connect() as conn:
            retries = conn.execute(select(func.count()).select_from(events).where(events.c.kind == "send-retry")
                                   ).scalar_one()
            failed_sending = conn.execute(select(func.count()).select_from(jobs).where(
                jobs.c.state == JobState.FAILED, jobs.c.reason.like("%sending failed%"))).scalar_one()
            done = conn.execute(select(jobs.c.result, jobs.c.updated_at, studies.c.last_received_at)
                                .join(studies, studies.c.study_instance_uid == jobs.c.study_instance_uid)
                                .where(jobs.c.state == JobState.DONE).order_by(jobs.c.id.desc()).limit(WINDOW)).all()
        depth = GaugeMetricFamily("petriage_queue_jobs", "Jobs by state.", labels=["state"])
        for state, count in summary["jobs"].items():
            depth.add_metric([state], float(count))
        yield depth
        yield GaugeMetricFamily("petriage_oldest_queued_job_age_seconds", "Age of the oldest queued job.",
                                value=summary["oldest_queued_age_seconds"] or 0.0)
        family = GaugeMetricFamily("petriage_notifications", "Notifications by channel and state.",
                                   labels=["channel", "state"])
        for (channel, state), count in summary["notifications"].items():
            family.add_metric([channel, state], float(count))
        yield family
        yield CounterMetricFamily("petriage_send_failures", "Failed sends of results to destinations.",
                                  value=float(retries + failed_sending))
        inference, end_to_end = [], []
        for result, finished, last_received in done:
            summary = json.loads(result or "{}")
            if "seconds" in summary:
                inference.append(float(summary["seconds"]))
            if finished is not None and last_received is not None:
                end_to_end.append(max(0.0, (naive_utc(finished) - naive_utc(last_received)).total_seconds()))
        yield _histogram("petriage_inference_seconds", "Model run time per study.", inference, INFERENCE_BUCKETS)
        yield _histogram("petriage_end_to_end_seconds", "Last image received to result sent.", end_to_end,
                         END_TO_END_BUCKETS)


class NodeMetrics:
    """The registry of one node process: live counters plus the store collector."""

    def __init__(self, store: Store):
        self.registry = CollectorRegistry()
        self.received = Counter("petriage_instances_received", "C-STORE requests answered, by status.",
                                ["status"], registry=self.registry)
        self.completed = Counter("petriage_studies_completed", "Studies marked complete.", registry=self.registry)
        self.registry.register(StoreCollector(store))

    def serve(self, host: str, port: int):
        """Start the HTTP endpoint; returns (server, thread)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)
        return server, thread
