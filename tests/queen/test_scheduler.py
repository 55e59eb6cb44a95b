"""The scheduler with no process: every state x event pair, admission, the queue, leases."""

from __future__ import annotations

import functools
import itertools
from typing import Awaitable, Callable

import pytest
import trio
import trio.testing

from rbee.errors import WorkerError
from rbee.narration.events import WorkerChange
from rbee.queen.scheduler import (
    BUSY,
    EVENTS,
    GONE,
    READY,
    SPAWNING,
    STATES,
    TRANSITIONS,
    ModelIdentity,
    QueueFullError,
    Scheduler,
    TransitionError,
    Want,
    WorkerRecord,
    lease,
)

GEMMA = ModelIdentity("gemma3-270m", "aa" * 32)
OTHER = ModelIdentity("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf", "bb" * 32)
WANT = Want(GEMMA, "localhost", "cpu", 0, label="gemma3-270m")


class Clock:
    """A hand-driven clock for the scheduler (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(worker_id: str = "w1", *, state: str = READY, slots: int = 2, model: ModelIdentity = GEMMA,
           backend: str = "cpu", device: int = 0, node: str = "localhost") -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, node=node, model=model, backend=backend, device=device,
                        slots_total=slots, state=state, url="http://127.0.0.1:1")


def in_state(state: str) -> WorkerRecord:
    """A two-slot worker in ``state`` (``busy`` holds one lease: one slot still free)."""
    worker = record(state=state)
    if state == BUSY:
        worker.leases.add("job-held")
    return worker


# -- the transition table: every pair ---------------------------------------------------------


@pytest.mark.parametrize(("state", "event"), list(itertools.product(STATES, EVENTS)))
def test_every_state_and_event(state: str, event: str) -> None:
    worker = in_state(state)
    job = "job-held" if event == "release" else "job-new"
    expected = TRANSITIONS.get((state, event))
    if expected is None:
        with pytest.raises(TransitionError):
            worker.apply(event, 1.0, job)
        assert worker.state == state
        return
    assert worker.apply(event, 1.0, job) == worker.state
    if (state, event) == (BUSY, "release"):
        assert worker.state == READY and not worker.leases and worker.idle_since == 1.0
    elif event == "exited":
        assert worker.state == GONE and not worker.leases
    else:
        assert worker.state == expected
    if event == "lease":
        assert "job-new" in worker.leases


def test_the_table_covers_the_documented_life() -> None:
    # spawning -> ready <-> busy -> gone, and nothing leaves gone.
    assert TRANSITIONS[(SPAWNING, "ready")] == READY
    assert TRANSITIONS[(READY, "lease")] == BUSY
    assert TRANSITIONS[(BUSY, "exited")] == GONE
    assert all(nxt == GONE for (state, _), nxt in TRANSITIONS.items() if state == GONE)
    assert (SPAWNING, "lease") not in TRANSITIONS and (GONE, "lease") not in TRANSITIONS


def test_a_full_worker_refuses_one_more_lease() -> None:
    worker = record(slots=2)
    worker.apply("lease", 0, "a")
    worker.apply("lease", 0, "b")
    assert worker.free_slots == 0
    with pytest.raises(TransitionError):
        worker.apply("lease", 0, "c")
    worker.apply("release", 5, "a")
    assert worker.state == BUSY and worker.free_slots == 1
    worker.apply("release", 6, "b")
    assert worker.state == READY and worker.idle_since == 6


# -- the right model, backend and device ----------------------------------------------------


@pytest.mark.parametrize("other", [
    record(model=OTHER),
    record(model=ModelIdentity("gemma3-270m", "cc" * 32)),  # same name, another file
    record(backend="cuda"),
    record(device=1),
    record(node="blep"),
])
def test_a_worker_of_anything_else_is_never_leased(other: WorkerRecord) -> None:
    scheduler = Scheduler()
    scheduler.upsert(other)
    assert scheduler.try_lease("job-1", WANT) is None
    assert scheduler.needs_spawn(WANT)


def test_an_unknown_hash_on_one_side_still_matches_by_reference() -> None:
    assert ModelIdentity("gemma3-270m").matches(GEMMA)
    assert not ModelIdentity("gemma3-270m", "cc" * 32).matches(GEMMA)


# -- admission ----------------------------------------------------------------------------------


def test_admission_counts_free_slots_plus_the_queue() -> None:
    scheduler = Scheduler(max_queue=4)
    scheduler.upsert(record(slots=4))
    for n in range(8):
        scheduler.admit(f"job-{n}", "gemma3-270m")
    with pytest.raises(QueueFullError) as refused:
        scheduler.admit("job-8", "gemma3-270m")
    assert refused.value.http_status == 503 and refused.value.details["retry_after"] >= 1
    assert "--max-queue" in refused.value.message
    assert scheduler.jobs_queued == 8
    # A job that leased a slot no longer counts against the queue; a finished one neither.
    scheduler.try_lease("job-0", WANT)
    scheduler.job_finished("job-1")
    assert scheduler.jobs_queued == 6 and scheduler.jobs_running == 1


def test_admission_follows_what_a_reference_resolved_to() -> None:
    scheduler = Scheduler(max_queue=0)
    scheduler.upsert(record(model=OTHER, slots=1))
    with pytest.raises(QueueFullError):
        scheduler.admit("job-1", "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    scheduler.note_resolved("hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF", OTHER)
    scheduler.admit("job-1", "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF")


# -- the queue ----------------------------------------------------------------------------------


def test_slots_go_to_the_queue_in_order() -> None:
    scheduler = Scheduler()
    worker = scheduler.upsert(record(slots=1))
    first = scheduler.try_lease("job-0", WANT)
    assert first is not None and worker.state == BUSY
    tickets = [scheduler.enqueue(f"job-{n}", WANT) for n in (1, 2, 3)]
    assert [scheduler.position(t) for t in tickets] == [(1, 3), (2, 3), (3, 3)]
    # Nobody may jump the queue while it holds tickets.
    assert scheduler.try_lease("job-late", WANT) is None
    scheduler.release(first)
    assert tickets[0].granted is not None and tickets[0].done.is_set()
    assert [scheduler.position(t) for t in tickets[1:]] == [(1, 2), (2, 2)]


def test_a_withdrawn_ticket_never_gets_a_slot() -> None:
    scheduler = Scheduler()
    worker = scheduler.upsert(record(slots=1))
    held = scheduler.try_lease("job-0", WANT)
    gone = scheduler.enqueue("job-1", WANT)
    kept = scheduler.enqueue("job-2", WANT)
    scheduler.withdraw(gone)
    assert held is not None
    scheduler.release(held)
    assert gone.granted is None and kept.granted is not None
    assert worker.leases == {"job-2"}


def test_a_refused_job_goes_back_to_the_head() -> None:
    scheduler = Scheduler()
    scheduler.upsert(record(slots=1))
    held = scheduler.try_lease("job-0", WANT)
    waiting = scheduler.enqueue("job-1", WANT)
    again = scheduler.enqueue("job-2", WANT, at_head=True)
    assert scheduler.position(again) == (1, 2) and scheduler.position(waiting) == (2, 2)
    assert held is not None
    scheduler.release(held)
    assert again.granted is not None and waiting.granted is None


def test_a_worker_that_becomes_ready_serves_the_waiting_jobs() -> None:
    scheduler = Scheduler()
    tickets = [scheduler.enqueue(f"job-{n}", WANT) for n in range(3)]
    scheduler.upsert(record(state=SPAWNING, slots=2))
    assert all(t.granted is None for t in tickets)
    scheduler.ready("w1")
    assert [t.granted is not None for t in tickets] == [True, True, False]


# -- spawns -------------------------------------------------------------------------------------


def test_one_spawn_at_a_time_and_copies_only_when_allowed() -> None:
    scheduler = Scheduler(max_workers_per_model=2)
    assert scheduler.needs_spawn(WANT)
    scheduler.spawn_started(WANT)
    assert not scheduler.needs_spawn(WANT)  # on its way
    scheduler.upsert(record(state=SPAWNING, slots=1))
    scheduler.spawn_ended(WANT)
    assert not scheduler.needs_spawn(WANT)  # still loading
    scheduler.ready("w1")
    assert not scheduler.needs_spawn(WANT)  # a free slot
    scheduler.try_lease("job-0", WANT)
    assert scheduler.needs_spawn(WANT)  # every slot busy, a second copy allowed
    scheduler.upsert(record("w2", slots=1))
    scheduler.try_lease("job-1", WANT)
    assert not scheduler.needs_spawn(WANT)  # max_workers_per_model reached


def test_a_failed_first_spawn_fails_the_waiting_jobs() -> None:
    scheduler = Scheduler()
    tickets = [scheduler.enqueue(f"job-{n}", WANT) for n in range(2)]
    scheduler.spawn_started(WANT)
    scheduler.spawn_ended(WANT, WorkerError("out of memory"))
    assert all(isinstance(t.failure, WorkerError) and t.done.is_set() for t in tickets)
    assert scheduler.waiting(WANT) == 0
    assert scheduler.needs_spawn(WANT)  # the next job tries again


def test_a_failed_copy_leaves_the_jobs_waiting_for_the_first_worker() -> None:
    clock = Clock()
    scheduler = Scheduler(max_workers_per_model=2, clock=clock)
    scheduler.upsert(record(slots=1))
    held = scheduler.try_lease("job-0", WANT)
    ticket = scheduler.enqueue("job-1", WANT)
    scheduler.spawn_started(WANT)
    scheduler.spawn_ended(WANT, WorkerError("the node lacks the memory for a second copy"))
    assert ticket.failure is None and not scheduler.needs_spawn(WANT)  # not retried at once
    assert held is not None
    scheduler.release(held)
    assert ticket.granted is not None


# -- the hive's news ----------------------------------------------------------------------------


def change(kind: str, state: str, **fields: object) -> WorkerChange:
    return WorkerChange(change=kind, worker_id="w9", state=state, model_ref="gemma3-270m", sha256="aa" * 32,
                        url="http://127.0.0.1:2", api_key="k", slots_total=4, **fields)  # type: ignore[arg-type]


def test_events_of_a_hive_drive_the_records() -> None:
    scheduler = Scheduler()
    ticket = scheduler.enqueue("job-1", WANT)
    scheduler.apply_change("localhost", change("spawned", "loading"))
    assert scheduler.workers["w9"].state == SPAWNING and ticket.granted is None
    scheduler.apply_change("localhost", change("ready", "idle"))
    assert scheduler.workers["w9"].state == BUSY and ticket.granted is not None
    scheduler.apply_change("localhost", change("capacity", "busy", slots_busy=1))
    assert scheduler.workers["w9"].slots_total == 4
    scheduler.apply_change("localhost", change("exited", "exited", reason="idle for 300 s", exit_code=0))
    assert "w9" not in scheduler.workers and scheduler.exit_reasons["w9"] == "idle for 300 s"
    assert ticket.granted is not None
    scheduler.release(ticket.granted)  # a release after the worker died is fine


def test_a_worker_present_when_the_queen_connects_is_ready_at_once() -> None:
    scheduler = Scheduler()
    scheduler.apply_change("localhost", change("present", "idle"))
    assert scheduler.try_lease("job-1", WANT) is not None


def test_a_hive_that_exits_takes_its_workers() -> None:
    scheduler = Scheduler()
    scheduler.upsert(record("a"))
    scheduler.upsert(record("b", node="blep"))
    changed = scheduler.worker_changed
    assert [w.worker_id for w in scheduler.hive_gone("localhost")] == ["a"]
    assert list(scheduler.workers) == ["b"]
    # Whoever watched a worker's load (a spawn) hears that it will never end, and why.
    assert changed.is_set() and scheduler.exit_reasons["a"] == "its hive on node localhost exited"


def test_slot_counts_sum_the_copies() -> None:
    scheduler = Scheduler()
    scheduler.upsert(record("a", slots=4))
    scheduler.upsert(record("b", slots=4))
    scheduler.try_lease("job-1", WANT)
    [row] = scheduler.slot_counts()
    assert (row.node, row.model, row.busy, row.total) == ("localhost", "gemma3-270m", 1, 8)


# -- the async lease ----------------------------------------------------------------------------


def in_trio(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run an async test under trio.run (the suite has no async plugin)."""

    @functools.wraps(fn)
    def run() -> None:
        trio.run(fn)

    return run



@in_trio
async def test_lease_waits_narrates_its_position_and_releases() -> None:
    scheduler = Scheduler()
    scheduler.upsert(record(slots=1))
    positions: list[tuple[str, int, int]] = []
    order: list[str] = []

    async def job(job_id: str, hold: trio.Event) -> None:
        async with lease(scheduler, job_id, WANT, start_spawn=lambda w: pytest.fail("no spawn needed"),
                         on_wait=lambda p, n: positions.append((job_id, p, n)), say_every_s=0):
            order.append(job_id)
            await hold.wait()

    holds = {name: trio.Event() for name in ("a", "b", "c")}
    async with trio.open_nursery() as nursery:
        for name in holds:
            nursery.start_soon(job, name, holds[name])
            await trio.testing.wait_all_tasks_blocked()
        assert order == ["a"] and positions == [("b", 1, 1), ("c", 2, 2)]
        holds["a"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b"] and positions[-1] == ("c", 1, 1)
        holds["b"].set()
        holds["c"].set()
    assert order == ["a", "b", "c"]
    assert scheduler.workers["w1"].state == READY and not scheduler.workers["w1"].leases


@in_trio
async def test_a_job_cancelled_in_the_queue_leaves_it_untouched() -> None:
    scheduler = Scheduler()
    worker = scheduler.upsert(record(slots=1))
    held = scheduler.try_lease("job-0", WANT)
    with trio.move_on_after(0.05):
        async with lease(scheduler, "job-1", WANT, start_spawn=lambda w: None, on_wait=lambda p, n: None):
            pytest.fail("a slot was granted to a job that should still wait")
    assert scheduler.waiting(WANT) == 0 and worker.leases == {"job-0"}
    assert held is not None
    scheduler.release(held)
    assert worker.state == READY


@in_trio
async def test_lease_asks_for_one_spawn_for_all_the_waiting_jobs() -> None:
    scheduler = Scheduler()
    spawns: list[Want] = []

    def start_spawn(want: Want) -> None:
        spawns.append(want)

    got: list[str] = []

    async def job(job_id: str) -> None:
        async with lease(scheduler, job_id, WANT, start_spawn=start_spawn, on_wait=lambda p, n: None):
            got.append(job_id)

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(job, f"job-{n}")
        await trio.testing.wait_all_tasks_blocked()
        assert spawns == [WANT] and scheduler.waiting(WANT) == 5
        scheduler.upsert(record(state=SPAWNING, slots=4))
        scheduler.spawn_ended(WANT)
        scheduler.ready("w1")
    assert sorted(got) == [f"job-{n}" for n in range(5)]


@in_trio
async def test_a_failed_spawn_fails_the_lease() -> None:
    scheduler = Scheduler()

    async def fail_later(want: Want) -> None:
        await trio.sleep(0.01)
        scheduler.spawn_ended(want, WorkerError("no memory"))

    async with trio.open_nursery() as nursery:
        with pytest.raises(WorkerError, match="no memory"):
            async with lease(scheduler, "job-1", WANT, start_spawn=lambda w: nursery.start_soon(fail_later, w),
                             on_wait=lambda p, n: None):
                pytest.fail("no worker, no slot")
    assert scheduler.waiting(WANT) == 0


@in_trio
async def test_positions_are_said_at_most_once_per_interval_and_the_newest_at_the_end() -> None:
    scheduler = Scheduler()
    scheduler.upsert(record(slots=1))
    holder = scheduler.try_lease("job-0", WANT)
    ahead = [scheduler.enqueue(f"job-{n}", WANT) for n in range(1, 4)]
    said: list[tuple[int, float]] = []
    start = trio.current_time()

    async def waiter() -> None:
        async with lease(scheduler, "job-last", WANT, start_spawn=lambda w: None,
                         on_wait=lambda p, n: said.append((p, trio.current_time() - start)), say_every_s=0.3):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        # Three moves in quick succession: position 4 said at once, then only the newest
        # (1), once the interval has passed.
        slot = holder
        for ticket in ahead[:3]:
            assert slot is not None
            scheduler.release(slot)  # the head of the queue takes it
            await trio.testing.wait_all_tasks_blocked()
            slot = ticket.granted
        await trio.sleep(0.5)
        assert [p for p, _ in said] == [4, 1] and said[1][1] >= 0.3
        assert slot is not None
        scheduler.release(slot)
