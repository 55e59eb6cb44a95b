"""Which worker slot runs a job: worker records, leases and a bounded queue, with no I/O.

The queen's only truth about its workers. Hives push what happens to their workers (the
``GET /v1/events`` stream: spawned, ready, capacity, exited); the queen's own leases
decide which slots are busy. Nothing here talks to a network or a process: the infer job
and the hive readers call these methods, and a table-driven test drives every state and
event without starting anything (the shape of h11's state machine).

**Worker states.** ``spawning -> ready <-> busy -> gone``: ``ready`` has no lease,
``busy`` at least one (it may still have free slots), ``gone`` is final. ``TRANSITIONS``
maps each (state, event) pair to the next state; a pair it lacks is a bug of the caller
(``TransitionError``), except the late news that ``gone`` swallows (a worker's ``ready``
or ``capacity`` arriving after its ``exited``; a lease released after its worker died).

**Admission.** A job is admitted for a model when the jobs of that model that hold no slot
yet (routing, resolving, queued, waiting for a worker that still loads) are fewer than the
model's free slots plus ``max_queue``. Otherwise ``QueueFullError`` (HTTP 503 with
``Retry-After``) at once, before the job exists.

**The queue.** One FIFO per ``Want`` (model identity, node, backend, device). A slot that
frees (a release, a worker that became ready) goes to the head of the queue of a want the
worker serves. A job that a worker refused with ``503 full`` (a slot freed a moment late
after a cancel) goes back to the head.

**Copies.** A second worker of one want is started only when every slot of the existing
ones is leased, none is already starting, and ``max_workers_per_model`` allows; the hive's
preflight then decides whether the node has the memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import trio

from ..errors import QueueFullError, RbeeError
from ..narration.events import WorkerChange

#: ``--max-queue`` / ``RBEE_MAX_QUEUE``: jobs of one model that may wait for a slot.
DEFAULT_MAX_QUEUE = 64
#: ``--max-workers-per-model``: copies of one model (per node, backend and device).
DEFAULT_MAX_WORKERS_PER_MODEL = 1
#: After a failed spawn, how long before the same want may try again (waiting jobs
#: keep waiting for the existing workers' slots meanwhile).
SPAWN_RETRY_S = 30.0
#: A queued job says its new position at most this often.
POSITION_EVERY_S = 1.0
#: What a refused client is told to wait before it tries again (``Retry-After``).
RETRY_AFTER_S = 1

SPAWNING, READY, BUSY, GONE = "spawning", "ready", "busy", "gone"
STATES = (SPAWNING, READY, BUSY, GONE)
#: Events: the hive's news (``ready``, ``capacity``, ``exited``) and the queen's leases.
EVENTS = ("ready", "capacity", "lease", "release", "exited")

#: (state, event) -> next state. ``busy`` + ``release`` is ``ready`` when it was the last
#: lease (``_after_release``); ``busy`` + ``lease`` needs a free slot (checked first).
TRANSITIONS: dict[tuple[str, str], str] = {
    (SPAWNING, "ready"): READY,
    (SPAWNING, "capacity"): SPAWNING,
    (SPAWNING, "exited"): GONE,
    (READY, "ready"): READY,
    (READY, "capacity"): READY,
    (READY, "lease"): BUSY,
    (READY, "exited"): GONE,
    (BUSY, "ready"): BUSY,
    (BUSY, "capacity"): BUSY,
    (BUSY, "lease"): BUSY,
    (BUSY, "release"): BUSY,
    (BUSY, "exited"): GONE,
    (GONE, "ready"): GONE,
    (GONE, "capacity"): GONE,
    (GONE, "release"): GONE,
    (GONE, "exited"): GONE,
}


class TransitionError(RuntimeError):
    """An event that the worker's state does not allow: a bug of the caller."""



@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """A model as the catalog resolved it: canonical reference and the file's sha256."""

    reference: str
    sha256: str | None = None

    def matches(self, other: "ModelIdentity") -> bool:
        """Same reference, and the same file when both sides know its hash."""
        if self.reference != other.reference:
            return False
        return self.sha256 is None or other.sha256 is None or self.sha256 == other.sha256


@dataclass(frozen=True, slots=True)
class Want:
    """What a job needs from a worker: this model, on this node, backend and device."""

    model: ModelIdentity
    node: str
    backend: str
    device: int
    #: The model as the user named it (for narration); not part of the identity.
    label: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        """The model as people read it."""
        return self.label or self.model.reference


@dataclass(eq=False)
class WorkerRecord:
    """One worker as the queen knows it."""

    worker_id: str
    node: str
    model: ModelIdentity
    backend: str
    device: int
    slots_total: int = 1
    state: str = SPAWNING
    url: str = ""
    api_key: str | None = None
    memory_bytes: int = 0
    idle_timeout_s: float = 0.0
    #: The jobs holding a slot of it now.
    leases: set[str] = field(default_factory=set)
    #: When its last lease ended (or it became ready): its hive unloads it ``idle_timeout_s`` later.
    idle_since: float = 0.0
    #: The name people used for its model when it was spawned (for listings).
    label: str = ""

    @property
    def free_slots(self) -> int:
        """Slots a new lease may take now (0 unless it serves)."""
        if self.state not in (READY, BUSY):
            return 0
        return max(0, self.slots_total - len(self.leases))

    def serves(self, want: Want) -> bool:
        """Whether a job that wants ``want`` may run on this worker."""
        return (
            self.node == want.node
            and self.model.matches(want.model)
            and self.backend == want.backend
            and self.device == want.device
        )

    def apply(self, event: str, now: float, job_id: str | None = None) -> str:
        """Move the state by one event; returns the new state (``TransitionError`` if refused)."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None or (event == "lease" and self.free_slots == 0):
            raise TransitionError(f"worker {self.worker_id}: {event} in state {self.state}")
        if event == "lease":
            assert job_id is not None
            self.leases.add(job_id)
        elif event == "release":
            self.leases.discard(job_id or "")
            if self.state == BUSY and not self.leases:
                nxt = READY
                self.idle_since = now
        elif event == "ready" and self.state == SPAWNING:
            self.idle_since = now
        elif event == "exited":
            self.leases.clear()
        self.state = nxt
        return nxt

    def unload_in(self, now: float) -> float | None:
        """Seconds until its hive unloads it for being idle; None while busy or never."""
        if self.state != READY or self.idle_timeout_s <= 0:
            return None
        return max(0.0, self.idle_since + self.idle_timeout_s - now)


@dataclass(eq=False)
class Slot:
    """One leased slot: the worker and the job holding it."""

    worker: WorkerRecord
    job_id: str


@dataclass(eq=False)
class Ticket:
    """A job waiting in the queue of its want."""

    job_id: str
    want: Want
    enqueued_at: float
    granted: Slot | None = None
    failure: RbeeError | None = None
    #: Set when the ticket was granted or failed.
    done: trio.Event = field(default_factory=trio.Event)


class _Queue:
    """The FIFO of one want, with an event that fires at each change (positions moved)."""

    def __init__(self) -> None:
        self.tickets: deque[Ticket] = deque()
        self.changed = trio.Event()

    def touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass(frozen=True, slots=True)
class SlotCount:
    """Slots of the workers of one node and model (metrics, listings)."""

    node: str
    model: str
    busy: int
    total: int


class Scheduler:
    """Worker records, leases, admission and the queues of one queen."""

    def __init__(
        self,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_workers_per_model: int = DEFAULT_MAX_WORKERS_PER_MODEL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_queue = max_queue
        self.max_workers_per_model = max_workers_per_model
        self.clock = clock
        self.workers: dict[str, WorkerRecord] = {}
        self._queues: dict[Want, _Queue] = {}
        #: Spawn requests on their way to a hive, per want (the worker has no id yet).
        self._spawns_in_flight: dict[Want, int] = {}
        #: Admitted jobs that hold no slot yet, per model key (see ``admit``).
        self._pending: dict[str, set[str]] = {}
        #: What a model key resolved to (``hf:org/repo`` -> its canonical file reference).
        self._resolved: dict[str, str] = {}
        self._running: set[str] = set()
        #: Why each worker that exited did (the hive's words), for the jobs that waited on it.
        self.exit_reasons: dict[str, str] = {}
        #: Fires at every change of any worker (a spawn waits on it for its worker's ready).
        self.worker_changed = trio.Event()
        #: When a spawn for a want last failed (a second copy that did not fit, say).
        self._spawn_failed_at: dict[Want, float] = {}

    # -- admission ----------------------------------------------------------------------

    def admit(self, job_id: str, model_key: str) -> None:
        """Count a new job of ``model_key`` (the parsed reference); ``QueueFullError`` when
        the model's free slots and its queue are all taken."""
        pending = self._pending.setdefault(model_key, set())
        free = self.free_slots_of(model_key)
        if len(pending) >= free + self.max_queue:
            raise QueueFullError(
                f"the queue of {model_key} is full: {len(pending) - free} jobs wait for a slot"
                f" (queen-rbee --max-queue {self.max_queue}); retry in a moment, or raise the limit"
                " with queen-rbee --max-queue N (or RBEE_MAX_QUEUE)",
                details={"retry_after": RETRY_AFTER_S, "max_queue": self.max_queue},
            )
        pending.add(job_id)

    def note_resolved(self, model_key: str, identity: ModelIdentity) -> None:
        """Remember what a reference resolved to, so admission counts its workers' slots."""
        self._resolved[model_key] = identity.reference

    def free_slots_of(self, model_key: str) -> int:
        """Free slots of every worker of the model (any node), for admission."""
        reference = self._resolved.get(model_key, model_key)
        return sum(w.free_slots for w in self.workers.values() if w.model.reference == reference)

    def job_finished(self, job_id: str) -> None:
        """Forget an admitted job (every exit path of the job calls this)."""
        for pending in self._pending.values():
            pending.discard(job_id)
        self._running.discard(job_id)

    # -- the hive's news ----------------------------------------------------------------

    def _pulse(self) -> None:
        self.worker_changed.set()
        self.worker_changed = trio.Event()

    def apply_change(self, node: str, change: WorkerChange) -> None:
        """One event of a hive's ``GET /v1/events`` stream."""
        kind = change.change
        if kind in ("stopping", "exited"):
            # A stopping worker takes no new job: for the scheduler it is gone already
            # (the jobs that hold its slots end as its stream ends).
            if change.reason:
                self.exit_reasons[change.worker_id] = change.reason
            self.exited(change.worker_id)
        elif kind in ("present", "spawned", "ready") and change.state != "stopping":
            serving = change.state in ("idle", "busy", "full")
            known = change.worker_id in self.workers
            record = self.upsert(WorkerRecord(
                worker_id=change.worker_id, node=node, model=ModelIdentity(change.model_ref, change.sha256),
                backend=change.backend, device=change.device, slots_total=max(1, change.slots_total),
                state=READY if serving and not known else SPAWNING, url=change.url, api_key=change.api_key,
                memory_bytes=change.memory_bytes, idle_timeout_s=change.idle_timeout_s,
            ))
            record.idle_timeout_s = change.idle_timeout_s or record.idle_timeout_s
            if serving and record.state == SPAWNING:
                self.ready(change.worker_id, change.slots_total)
        elif kind == "capacity":
            self.capacity(change.worker_id, change.slots_total)
        self._pulse()

    def upsert(self, record: WorkerRecord) -> WorkerRecord:
        """A worker the hive told us about (spawned, or present when we connected)."""
        known = self.workers.get(record.worker_id)
        if known is None:
            self.workers[record.worker_id] = record
            if record.state == READY:
                record.idle_since = self.clock()
                self._dispatch(record)
            return record
        # The spawn answer and the event stream both report a new worker: keep the first
        # record (its state may have moved on), fill in what it lacks.
        known.url = known.url or record.url
        known.api_key = known.api_key or record.api_key
        known.memory_bytes = known.memory_bytes or record.memory_bytes
        known.label = known.label or record.label
        return known

    def ready(self, worker_id: str, slots_total: int | None = None) -> None:
        """The worker finished loading: its slots go to the queue's head at once."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        if slots_total:
            worker.slots_total = slots_total
        worker.apply("ready", self.clock())
        self._dispatch(worker)

    def capacity(self, worker_id: str, slots_total: int) -> None:
        """The worker's slot count as its hive reports it (busy counts are our leases')."""
        worker = self.workers.get(worker_id)
        if worker is None:
            return
        worker.apply("capacity", self.clock())
        if slots_total > 0 and slots_total != worker.slots_total:
            worker.slots_total = slots_total
            self._dispatch(worker)

    def exited(self, worker_id: str) -> WorkerRecord | None:
        """The worker is gone: forget it; jobs waiting for its want may need another."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return None
        worker.apply("exited", self.clock())
        for want, queue in self._queues.items():
            if worker.serves(want):
                queue.touch()
        return worker

    def hive_gone(self, node: str) -> list[WorkerRecord]:
        """Every worker of a node whose hive exited is gone (and whoever waits on a worker
        change hears it: a spawn watching a load that will never end, above all)."""
        gone = [w for w in list(self.workers.values()) if w.node == node and self.exited(w.worker_id)]
        for worker in gone:
            self.exit_reasons.setdefault(worker.worker_id, f"its hive on node {node} exited")
        if gone:
            self._pulse()
        return gone

    # -- spawns -------------------------------------------------------------------------

    def needs_spawn(self, want: Want) -> bool:
        """Whether a worker for ``want`` should be started now (see the module doc)."""
        if self._spawns_in_flight.get(want, 0) > 0:
            return False
        serving = [w for w in self.workers.values() if w.serves(want)]
        if not serving:
            return True
        if any(w.state == SPAWNING for w in serving) or any(w.free_slots > 0 for w in serving):
            return False
        # A copy that failed (the node lacked the memory) is not retried at every release.
        failed_at = self._spawn_failed_at.get(want)
        if failed_at is not None and self.clock() - failed_at < SPAWN_RETRY_S:
            return False
        return len(serving) < self.max_workers_per_model

    def spawn_started(self, want: Want) -> None:
        """A spawn request for ``want`` is on its way to the hive."""
        self._spawns_in_flight[want] = self._spawns_in_flight.get(want, 0) + 1

    def spawn_ended(self, want: Want, failure: RbeeError | None = None) -> None:
        """The spawn request answered (the worker is then a record) or failed.

        A failure fails the jobs waiting for ``want`` when no worker serves it or is on
        its way; otherwise they keep waiting for the existing workers' slots.
        """
        left = self._spawns_in_flight.get(want, 0) - 1
        if left > 0:
            self._spawns_in_flight[want] = left
        else:
            self._spawns_in_flight.pop(want, None)
        if failure is None:
            self._spawn_failed_at.pop(want, None)
            return
        self._spawn_failed_at[want] = self.clock()
        if left > 0 or any(w.serves(want) for w in self.workers.values()):
            return
        queue = self._queues.get(want)
        if queue is None:
            return
        while queue.tickets:
            ticket = queue.tickets.popleft()
            ticket.failure = failure
            ticket.done.set()
        queue.touch()

    # -- leases ---------------------------------------------------------------------------

    def try_lease(self, job_id: str, want: Want) -> Slot | None:
        """A free slot for ``want`` when nobody waits ahead of this job, else None."""
        queue = self._queues.get(want)
        if queue is not None and queue.tickets:
            return None
        return self._take(job_id, want)

    def _take(self, job_id: str, want: Want) -> Slot | None:
        free = [w for w in self.workers.values() if w.serves(want) and w.free_slots > 0]
        if not free:
            return None
        # The least loaded worker: copies of a model share the streams.
        return self._grant(min(free, key=lambda w: (len(w.leases), w.worker_id)), job_id)

    def _grant(self, worker: WorkerRecord, job_id: str) -> Slot:
        """Lease a slot of ``worker`` to ``job_id``: the job runs now, it waits no more."""
        worker.apply("lease", self.clock(), job_id)
        for pending in self._pending.values():
            pending.discard(job_id)
        self._running.add(job_id)
        return Slot(worker, job_id)

    def enqueue(self, job_id: str, want: Want, *, at_head: bool = False) -> Ticket:
        """Put a job in the queue of its want (at the head when a worker refused it)."""
        queue = self._queues.setdefault(want, _Queue())
        ticket = Ticket(job_id, want, self.clock())
        if at_head:
            queue.tickets.appendleft(ticket)
        else:
            queue.tickets.append(ticket)
        queue.touch()
        # Slots may be free already (a requeued job, a worker that became ready meanwhile).
        for worker in list(self.workers.values()):
            if worker.serves(want):
                self._dispatch(worker)
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """Take a waiting job out of its queue (cancelled, or its client went away)."""
        queue = self._queues.get(ticket.want)
        if queue is not None and ticket in queue.tickets:
            queue.tickets.remove(ticket)
            queue.touch()

    def position(self, ticket: Ticket) -> tuple[int, int]:
        """(1-based position, queue length) of a waiting ticket; (0, n) once it left."""
        queue = self._queues.get(ticket.want)
        if queue is None:
            return 0, 0
        try:
            return queue.tickets.index(ticket) + 1, len(queue.tickets)
        except ValueError:
            return 0, len(queue.tickets)

    def queue_changed(self, want: Want) -> trio.Event:
        """An event that fires at the next change of ``want``'s queue."""
        return self._queues.setdefault(want, _Queue()).changed

    def release(self, slot: Slot) -> None:
        """End a lease (every exit path of a job that held one); the slot goes to the queue."""
        worker = slot.worker
        worker.apply("release", self.clock(), slot.job_id)
        self._running.discard(slot.job_id)
        if worker.state != GONE:
            self._dispatch(worker)

    def _dispatch(self, worker: WorkerRecord) -> None:
        """Hand the worker's free slots to the heads of the queues it serves, oldest first."""
        while worker.free_slots > 0:
            heads = [(q.tickets[0], q) for want, q in self._queues.items() if q.tickets and worker.serves(want)]
            if not heads:
                return
            ticket, queue = min(heads, key=lambda pair: pair[0].enqueued_at)
            queue.tickets.popleft()
            ticket.granted = self._grant(worker, ticket.job_id)
            ticket.done.set()
            queue.touch()

    # -- what is seen -------------------------------------------------------------------

    @property
    def jobs_queued(self) -> int:
        """Admitted jobs holding no slot yet (queued, or on their way to the queue)."""
        return sum(len(p) for p in self._pending.values())

    @property
    def jobs_running(self) -> int:
        """Jobs holding a slot."""
        return len(self._running)

    def slot_counts(self) -> list[SlotCount]:
        """Busy and total slots per node and model (summed over copies)."""
        counts: dict[tuple[str, str], list[int]] = {}
        for w in self.workers.values():
            if w.state == GONE:
                continue
            row = counts.setdefault((w.node, w.label or w.model.reference), [0, 0])
            row[0] += len(w.leases)
            row[1] += w.slots_total
        return [SlotCount(node, model, busy, total) for (node, model), (busy, total) in sorted(counts.items())]

    def waiting_tickets(self, want: Want) -> list[Ticket]:
        """The jobs waiting for ``want``, head first."""
        queue = self._queues.get(want)
        return list(queue.tickets) if queue is not None else []

    def waiting(self, want: Want) -> int:
        """How many jobs wait in the queue of ``want``."""
        queue = self._queues.get(want)
        return len(queue.tickets) if queue is not None else 0


@contextlib.asynccontextmanager
async def lease(
    scheduler: Scheduler,
    job_id: str,
    want: Want,
    *,
    start_spawn: Callable[[Want], None],
    on_wait: Callable[[int, int], None],
    at_head: bool = False,
    say_every_s: float = POSITION_EVERY_S,
) -> AsyncIterator[Slot]:
    """``async with lease(...) as slot:`` a slot of a worker serving ``want``.

    Takes a free slot at once when nobody waits ahead; otherwise waits in the queue,
    calling ``on_wait(position, length)`` when its position changes (at most once per
    ``say_every_s``: with 200 jobs queued, every release would otherwise tell each of them,
    tens of thousands of lines that cost the queen and the clients CPU), and
    ``start_spawn(want)`` when a worker must be started (the caller runs the spawn
    elsewhere: it outlives this job if the job goes away). The slot is released on every
    way out, cancellation included; a job cancelled while waiting leaves the queue and
    never reaches a worker.
    """
    slot = None if at_head else scheduler.try_lease(job_id, want)
    if slot is None:
        ticket = scheduler.enqueue(job_id, want, at_head=at_head)
        try:
            last, said_at = -1, -math.inf
            while ticket.granted is None:
                if ticket.failure is not None:
                    raise ticket.failure
                if scheduler.needs_spawn(want):
                    scheduler.spawn_started(want)
                    start_spawn(want)
                # Said when the job's place changes (not at every job that joins behind it).
                position, length = scheduler.position(ticket)
                wake_at = math.inf
                if position != last and position > 0:
                    now = trio.current_time()
                    if now - said_at >= say_every_s:
                        on_wait(position, length)
                        last, said_at = position, now
                    else:
                        wake_at = said_at + say_every_s  # say the newest place then
                # Every grant, failure, exit and move of this queue fires it.
                with trio.move_on_at(wake_at):
                    await scheduler.queue_changed(want).wait()
            slot = ticket.granted
        except BaseException:
            scheduler.withdraw(ticket)
            if ticket.granted is not None:  # granted in the same instant it was cancelled
                scheduler.release(ticket.granted)
            raise
    try:
        yield slot
    finally:
        scheduler.release(slot)
