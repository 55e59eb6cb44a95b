"""The queen's Prometheus metrics (prometheus-client), one registry per queen.

``QueenMetrics`` owns its own ``CollectorRegistry`` (never the process-global one), so
several queens in one process (tests) never share values. The scheduler's live state
(jobs queued and running, worker slots) is not stored here: a ``snapshot`` callable is
read once per scrape, and its four gauge families come from that one reading. Everything
else is counted as it happens, by the job code calling ``observe_queue_wait``,
``job_finished`` and ``observe_inference``.

Families (one ``# HELP`` each; the text format adds ``_total``/``_bucket``/``_sum``/``_count``):

=================================  =========  ===============  =====================================
name                               type       labels           what
=================================  =========  ===============  =====================================
``rbee_jobs_queued``               gauge                       jobs waiting for a worker slot
``rbee_jobs_running``              gauge                       jobs holding a slot
``rbee_jobs_finished_total``       counter    operation,       jobs ended, by outcome
                                              outcome          (completed|failed|cancelled|rejected)
``rbee_queue_wait_seconds``        histogram  model            submit -> slot granted
``rbee_tokens_generated_total``    counter    model, node      tokens relayed to clients
``rbee_first_token_seconds``       histogram  model            time to first token of a job
``rbee_tokens_per_second``         histogram  model            decode rate of a job
``rbee_worker_slots_busy``         gauge      node, model      busy slots (summed over workers)
``rbee_worker_slots_total``        gauge      node, model      all slots (summed over workers)
=================================  =========  ===============  =====================================

The client library's counters and histograms also carry a ``_created`` timestamp series;
it is left out of the exposition (it would be a second family per metric, and nothing
here needs it). ``render(accept)`` picks the text format from a scrape's ``Accept``
header (``prometheus_client.exposition.choose_encoder``): the classic text format 0.0.4
unless the scraper asks for another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from .scheduler import SlotCount

#: The outcomes a finished job may have (``job_finished``).
OUTCOMES = ("completed", "failed", "cancelled", "rejected")
#: Operations whose counters exist from the start (at 0), so that rates work from the
#: first scrape; another operation gets its series when it first finishes.
KNOWN_OPERATIONS = ("infer", "download")

#: Queue wait: from a millisecond (a free slot) to two minutes (a deep queue, a cold load).
QUEUE_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Time to first token: warm jobs take tens of milliseconds, a cold load seconds.
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Decode rate of one job: a big model on a CPU to a tiny one on a GPU.
TOKENS_PER_SECOND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0)


@dataclass(frozen=True)
class SchedulerSnapshot:
    """The scheduler's state at one instant (read at each scrape)."""

    jobs_queued: int
    jobs_running: int
    slots: list[SlotCount]


class _Exposition:
    """The one collector of a queen's registry: the event metrics (without their
    ``_created`` series) and the snapshot's gauges."""

    def __init__(self, stored: Iterable[Counter | Histogram], snapshot: Callable[[], SchedulerSnapshot]) -> None:
        self._stored = tuple(stored)
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Registering must not call the snapshot (the scheduler may not exist yet).
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        queued = GaugeMetricFamily("rbee_jobs_queued", "Jobs waiting for a worker slot.")
        queued.add_metric([], snap.jobs_queued)
        yield queued
        running = GaugeMetricFamily("rbee_jobs_running", "Jobs holding a worker slot.")
        running.add_metric([], snap.jobs_running)
        yield running
        for stored in self._stored:
            for metric in stored.collect():
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
                yield metric
        busy: dict[tuple[str, str], int] = {}
        total: dict[tuple[str, str], int] = {}
        for row in snap.slots:
            key = (row.node, row.model)
            busy[key] = busy.get(key, 0) + row.busy
            total[key] = total.get(key, 0) + row.total
        busy_family = GaugeMetricFamily(
            "rbee_worker_slots_busy", "Busy slots of the workers of a node and model.", labels=["node", "model"]
        )
        total_family = GaugeMetricFamily(
            "rbee_worker_slots_total", "Slots of the workers of a node and model.", labels=["node", "model"]
        )
        for key in sorted(total):
            busy_family.add_metric(list(key), busy[key])
            total_family.add_metric(list(key), total[key])
        yield busy_family
        yield total_family


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


class QueenMetrics:
    """The metrics of one queen, in a registry of its own."""

    def __init__(self, snapshot: Callable[[], SchedulerSnapshot]) -> None:
        self.registry = CollectorRegistry()
        # registry=None: these are not registered anywhere; _Exposition collects them.
        self._jobs_finished = Counter(
            "rbee_jobs_finished", "Jobs that ended, by operation and outcome.",
            ["operation", "outcome"], registry=None,
        )
        for operation in KNOWN_OPERATIONS:
            for outcome in OUTCOMES:
                self._jobs_finished.labels(operation, outcome)
        self._queue_wait = Histogram(
            "rbee_queue_wait_seconds", "Time from a job's submission until it got a worker slot.",
            ["model"], buckets=QUEUE_WAIT_BUCKETS, registry=None,
        )
        self._tokens = Counter(
            "rbee_tokens_generated", "Tokens generated by the workers and relayed to clients.",
            ["model", "node"], registry=None,
        )
        self._first_token = Histogram(
            "rbee_first_token_seconds", "Time to the first token of an inference job.",
            ["model"], buckets=FIRST_TOKEN_BUCKETS, registry=None,
        )
        self._tokens_per_second = Histogram(
            "rbee_tokens_per_second", "Decode rate of an inference job (tokens per second).",
            ["model"], buckets=TOKENS_PER_SECOND_BUCKETS, registry=None,
        )
        stored = (self._jobs_finished, self._queue_wait, self._tokens, self._first_token, self._tokens_per_second)
        self.registry.register(_Exposition(stored, snapshot))

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        """A job of ``model`` waited ``seconds`` for its slot (0 when one was free)."""
        self._queue_wait.labels(model).observe(max(0.0, seconds))

    def job_finished(self, operation: str, outcome: str) -> None:
        """A job ended; ``outcome`` is completed, failed, cancelled or rejected (queue full)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {'|'.join(OUTCOMES)}, not {outcome!r}")
        self._jobs_finished.labels(operation, outcome).inc()

    def observe_inference(
        self,
        model: str,
        node: str,
        *,
        tokens_out: int,
        first_token_s: float | None,
        tokens_per_sec: float | None,
    ) -> None:
        """One inference's figures. ``None`` (or a non-finite or negative value) means
        unknown and is not observed; a ``tokens_per_sec`` of 0 is not observed either
        (the worker reports 0 when it had no rate to give, e.g. one token or none)."""
        if tokens_out > 0:
            self._tokens.labels(model, node).inc(tokens_out)
        if _usable(first_token_s):
            self._first_token.labels(model).observe(first_token_s)  # type: ignore[arg-type]
        if _usable(tokens_per_sec) and tokens_per_sec:
            self._tokens_per_second.labels(model).observe(tokens_per_sec)  # type: ignore[arg-type]

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its ``Content-Type``; ``accept`` is the scraper's
        ``Accept`` header (empty: the classic text format 0.0.4)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
