"""The queen's Prometheus metrics: render, parse back with prometheus-client's own parser,
check every family (type, labels, values). No process needed."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rbee.queen.metrics import (
    FIRST_TOKEN_BUCKETS,
    OUTCOMES,
    QUEUE_WAIT_BUCKETS,
    TOKENS_PER_SECOND_BUCKETS,
    QueenMetrics,
    SchedulerSnapshot,
)
from rbee.queen.scheduler import SlotCount as SlotRow

FAMILIES = {
    "rbee_jobs_queued": "gauge",
    "rbee_jobs_running": "gauge",
    "rbee_jobs_finished": "counter",
    "rbee_queue_wait_seconds": "histogram",
    "rbee_tokens_generated": "counter",
    "rbee_first_token_seconds": "histogram",
    "rbee_tokens_per_second": "histogram",
    "rbee_worker_slots_busy": "gauge",
    "rbee_worker_slots_total": "gauge",
}


class Scheduler:
    """A stand-in for the scheduler's state: the test sets it, each scrape reads it."""

    def __init__(self) -> None:
        self.state = SchedulerSnapshot(jobs_queued=0, jobs_running=0, slots=[])
        self.reads = 0

    def snapshot(self) -> SchedulerSnapshot:
        self.reads += 1
        return self.state


def parse(metrics: QueenMetrics) -> dict:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {"text": text, "families": families}


def samples(family, name: str) -> dict[tuple, float]:
    """``{sorted label items: value}`` of the samples called ``name``."""
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def test_every_family_once_with_its_type_and_help() -> None:
    scheduler = Scheduler()
    parsed = parse(QueenMetrics(scheduler.snapshot))
    assert {name: f.type for name, f in parsed["families"].items()} == FAMILIES
    assert all(f.documentation for f in parsed["families"].values())
    help_lines = [line for line in parsed["text"].splitlines() if line.startswith("# HELP")]
    assert len(help_lines) == len(FAMILIES)
    assert "_created" not in parsed["text"]
    assert scheduler.reads == 1  # one snapshot per scrape, none at construction


def test_values_after_observations() -> None:
    scheduler = Scheduler()
    metrics = QueenMetrics(scheduler.snapshot)
    scheduler.state = SchedulerSnapshot(
        jobs_queued=5,
        jobs_running=3,
        slots=[
            SlotRow("localhost", "gemma3-270m", busy=2, total=4),
            SlotRow("localhost", "gemma3-270m", busy=1, total=8),
            SlotRow("mac", "gemma3-270m", busy=0, total=4),
            SlotRow("localhost", "hf:org/repo", busy=0, total=2),
        ],
    )
    metrics.observe_queue_wait("gemma3-270m", 0.0008)
    metrics.observe_queue_wait("gemma3-270m", 0.3)
    metrics.observe_queue_wait("gemma3-270m", 500.0)  # past the last bucket: +Inf only
    metrics.observe_queue_wait("hf:org/repo", -1.0)  # clock skew: counted as 0
    for outcome in ("completed", "completed", "failed", "cancelled", "rejected"):
        metrics.job_finished("infer", outcome)
    metrics.job_finished("download", "completed")
    metrics.observe_inference("gemma3-270m", "localhost", tokens_out=16, first_token_s=0.04, tokens_per_sec=80.0)
    metrics.observe_inference("gemma3-270m", "localhost", tokens_out=10, first_token_s=2.0, tokens_per_sec=600.0)
    metrics.observe_inference("gemma3-270m", "mac", tokens_out=1, first_token_s=None, tokens_per_sec=0.0)
    metrics.observe_inference("hf:org/repo", "localhost", tokens_out=0, first_token_s=math.nan, tokens_per_sec=None)

    families = parse(metrics)["families"]

    assert samples(families["rbee_jobs_queued"], "rbee_jobs_queued") == {(): 5.0}
    assert samples(families["rbee_jobs_running"], "rbee_jobs_running") == {(): 3.0}

    finished = samples(families["rbee_jobs_finished"], "rbee_jobs_finished_total")
    expected = {(("operation", op), ("outcome", o)): 0.0 for op in ("infer", "download") for o in OUTCOMES}
    expected[(("operation", "infer"), ("outcome", "completed"))] = 2.0
    for outcome in ("failed", "cancelled", "rejected"):
        expected[(("operation", "infer"), ("outcome", outcome))] = 1.0
    expected[(("operation", "download"), ("outcome", "completed"))] = 1.0
    assert finished == expected

    wait = families["rbee_queue_wait_seconds"]
    buckets = samples(wait, "rbee_queue_wait_seconds_bucket")
    gemma = {float(dict(k)["le"]): v for k, v in buckets.items() if dict(k)["model"] == "gemma3-270m"}
    assert sorted(gemma) == sorted([*QUEUE_WAIT_BUCKETS, math.inf])
    assert gemma[0.001] == 1 and gemma[0.25] == 1 and gemma[0.5] == 2 and gemma[120.0] == 2 and gemma[math.inf] == 3
    assert samples(wait, "rbee_queue_wait_seconds_count") == {(("model", "gemma3-270m"),): 3.0, (("model", "hf:org/repo"),): 1.0}
    sums = samples(wait, "rbee_queue_wait_seconds_sum")
    assert sums[(("model", "gemma3-270m"),)] == pytest.approx(500.3008)
    assert sums[(("model", "hf:org/repo"),)] == 0.0

    assert samples(families["rbee_tokens_generated"], "rbee_tokens_generated_total") == {
        (("model", "gemma3-270m"), ("node", "localhost")): 26.0,
        (("model", "gemma3-270m"), ("node", "mac")): 1.0,
    }

    first = families["rbee_first_token_seconds"]
    assert samples(first, "rbee_first_token_seconds_count") == {(("model", "gemma3-270m"),): 2.0}
    assert samples(first, "rbee_first_token_seconds_sum")[(("model", "gemma3-270m"),)] == pytest.approx(2.04)
    first_buckets = {float(dict(k)["le"]): v for k, v in samples(first, "rbee_first_token_seconds_bucket").items()}
    assert sorted(first_buckets) == sorted([*FIRST_TOKEN_BUCKETS, math.inf])
    assert first_buckets[0.025] == 0 and first_buckets[0.05] == 1 and first_buckets[2.5] == 2

    rate = families["rbee_tokens_per_second"]
    assert samples(rate, "rbee_tokens_per_second_count") == {(("model", "gemma3-270m"),): 2.0}
    rate_buckets = {float(dict(k)["le"]): v for k, v in samples(rate, "rbee_tokens_per_second_bucket").items()}
    assert sorted(rate_buckets) == sorted([*TOKENS_PER_SECOND_BUCKETS, math.inf])
    assert min(TOKENS_PER_SECOND_BUCKETS) == 1 and max(TOKENS_PER_SECOND_BUCKETS) == 500
    assert rate_buckets[75.0] == 0 and rate_buckets[100.0] == 1 and rate_buckets[500.0] == 1 and rate_buckets[math.inf] == 2

    # Slots are summed over the workers of one node and model.
    assert samples(families["rbee_worker_slots_busy"], "rbee_worker_slots_busy") == {
        (("model", "gemma3-270m"), ("node", "localhost")): 3.0,
        (("model", "gemma3-270m"), ("node", "mac")): 0.0,
        (("model", "hf:org/repo"), ("node", "localhost")): 0.0,
    }
    assert samples(families["rbee_worker_slots_total"], "rbee_worker_slots_total") == {
        (("model", "gemma3-270m"), ("node", "localhost")): 12.0,
        (("model", "gemma3-270m"), ("node", "mac")): 4.0,
        (("model", "hf:org/repo"), ("node", "localhost")): 2.0,
    }


def test_the_snapshot_is_read_at_each_scrape() -> None:
    scheduler = Scheduler()
    metrics = QueenMetrics(scheduler.snapshot)
    scheduler.state = SchedulerSnapshot(1, 0, [SlotRow("localhost", "m", 0, 4)])
    first = parse(metrics)["families"]
    scheduler.state = SchedulerSnapshot(0, 4, [SlotRow("localhost", "m", 4, 4)])
    second = parse(metrics)["families"]
    assert samples(first["rbee_jobs_queued"], "rbee_jobs_queued") == {(): 1.0}
    assert samples(second["rbee_jobs_queued"], "rbee_jobs_queued") == {(): 0.0}
    assert samples(second["rbee_jobs_running"], "rbee_jobs_running") == {(): 4.0}
    assert samples(second["rbee_worker_slots_busy"], "rbee_worker_slots_busy") == {(("model", "m"), ("node", "localhost")): 4.0}
    # A worker gone: its series is gone too (no stale gauge).
    scheduler.state = SchedulerSnapshot(0, 0, [])
    third = parse(metrics)["families"]
    assert samples(third["rbee_worker_slots_total"], "rbee_worker_slots_total") == {}
    assert scheduler.reads == 3


def test_two_queens_share_nothing() -> None:
    a, b = Scheduler(), Scheduler()
    one, two = QueenMetrics(a.snapshot), QueenMetrics(b.snapshot)
    a.state = SchedulerSnapshot(7, 1, [])
    one.job_finished("infer", "completed")
    one.observe_queue_wait("m", 1.0)
    one.observe_inference("m", "localhost", tokens_out=5, first_token_s=0.1, tokens_per_sec=50.0)
    assert one.registry is not two.registry
    families = parse(two)["families"]
    assert samples(families["rbee_jobs_queued"], "rbee_jobs_queued") == {(): 0.0}
    assert set(samples(families["rbee_jobs_finished"], "rbee_jobs_finished_total").values()) == {0.0}
    assert samples(families["rbee_queue_wait_seconds"], "rbee_queue_wait_seconds_count") == {}
    assert samples(families["rbee_tokens_generated"], "rbee_tokens_generated_total") == {}
    assert samples(families["rbee_first_token_seconds"], "rbee_first_token_seconds_count") == {}
    # And the process-global registry holds none of ours.
    from prometheus_client import REGISTRY

    assert not any(f.name.startswith("rbee_") for f in REGISTRY.collect())


def test_a_bad_outcome_is_refused() -> None:
    metrics = QueenMetrics(Scheduler().snapshot)
    with pytest.raises(ValueError, match="completed|failed"):
        metrics.job_finished("infer", "done")


def test_openmetrics_when_the_scraper_asks() -> None:
    metrics = QueenMetrics(Scheduler().snapshot)
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n") and b"_created" not in body
