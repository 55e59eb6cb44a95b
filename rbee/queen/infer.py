"""The ``infer`` job: validate, place, lease a slot, stream, release.

Steps, each narrated by the queen (actor ``queen-rbee``):

1. ``route_job``: the node (the one named, or the scheduler's placement with its reason),
   its hive started if needed (the hive's startup narration is relayed in between);
2. ``infer_start``: the model reference resolved by that hive's catalog (canonical
   reference and sha256: a worker is reused only when its resolved model, backend and
   device match) and the backend checked against the node's facts;
3. ``infer_schedule`` / ``infer_queue`` / ``infer_lease``: a slot of a worker serving
   that want, at once when one is free and nobody waits ahead, else in the want's FIFO
   ("Waiting for a slot of gemma3-270m on localhost: position 3 of 5", again as it
   moves). A worker is spawned by the scheduler's rule (no worker yet, or every slot busy
   and ``--max-workers-per-model`` allows); the spawn runs in the queen's own nursery,
   not in the job, and its narration goes to every job waiting for it;
4. ``infer_worker``, the worker's inference events (``started``, ``narration``,
   ``prefill``*, ``token``*, ``metrics``, ``end``) and ``infer_complete``.

The lease is released on every way out. A worker that answers ``503 full`` (a slot that
freed a moment late after a cancel) puts the job back at the head of its queue.

Cancellation: leaving the worker's SSE closes that connection (the worker cancels on a
client disconnect) and a shielded ``DELETE /v1/inference/{job_id}`` makes it explicit, so
decode stops within one token. A job cancelled while it waits leaves its queue and never
reaches a worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
from typing import Any, Callable

import httpx
import trio

from ..client.jobs import auth_headers, error_from_response
from ..errors import (
    BackendUnavailableError,
    RbeeError,
    WorkerError,
    HiveLostError,
    WorkerLostError,
    WorkerStalledError,
    error_for_code,
)
from ..narration import narrate, sse
from ..narration.events import Done, End, Error, Event, NarrationEvent, Prefill, Ready, Started, Token
from ..requests import InferRequest
from .hives import Hive, HiveManager
from .jobs import Job, JobRegistry
from .nodes import LOCALHOST, Node, NodeRegistry
from .placement import NodeView, memory_free_bytes, place
from .scheduler import ModelIdentity, Scheduler, Slot, Want, WorkerRecord, lease

ACTOR = "queen-rbee"
#: Worker narration actions that mean "loaded and registered with the hive".
READY_ACTIONS = frozenset({"callback_ready", "ready", "worker_ready"})
#: After the worker is ready, how long its startup narration may still take to arrive
#: (keeps the story whole for the jobs that watched the load).
READY_TAIL_S = 0.5
CANCEL_GRACE_S = 1.0
#: How long a broken worker stream on a remote node waits for the SSH transport to say
#: whether the node itself was lost (it usually knows already).
NODE_LOSS_SETTLE_S = 0.25
#: A worker that refused with ``503 full``: pause before the job takes the queue's head again.
REQUEUE_PAUSE_S = 0.05
#: How often one job may be put back at its queue's head before it fails.
MAX_REQUEUES = 50


class _WorkerFull(Exception):
    """The worker answered 503 before anything was relayed: back to the queue's head."""


def best_backend(facts: dict[str, Any] | None) -> str:
    """The node's best backend from its facts (``cuda`` > ``metal`` > ``cpu``)."""
    names = backend_names(facts)
    for choice in ("cuda", "metal"):
        if choice in names:
            return choice
    return "cpu"


def backend_names(facts: dict[str, Any] | None) -> list[str]:
    """The backends a node's facts list (``cpu`` always)."""
    backends = (facts or {}).get("backends") or []
    names = [b if isinstance(b, str) else b.get("name") for b in backends]
    return names if "cpu" in names else ["cpu", *names]


def check_backend(node: str, facts: dict[str, Any] | None, backend: str, device: int) -> None:
    """``BackendUnavailableError`` naming the fix when the node lacks that backend or device."""
    names = backend_names(facts)
    if backend not in names:
        raise BackendUnavailableError(
            f"node {node} has no {backend} backend (it has {', '.join(names)}); choose one of those with"
            f" --backend, or another node with --node"
        )
    if backend == "cpu":
        if device != 0:
            raise BackendUnavailableError(f"the cpu backend has one device, 0; not {device}")
        return
    devices = [d for d in (facts or {}).get("devices") or [] if d.get("backend") == backend]
    indices = sorted(int(d.get("index", 0)) for d in devices)
    if indices and device not in indices:
        raise BackendUnavailableError(
            f"node {node} has no {backend} device {device} (it has {', '.join(map(str, indices))});"
            " choose one with --device"
        )


class InferJob:
    """Runs ``infer`` jobs (``await infer.run(job)``); owns the spawns it starts."""

    def __init__(
        self,
        nodes: NodeRegistry,
        hives: HiveManager,
        http: httpx.AsyncClient,
        scheduler: Scheduler,
        jobs: JobRegistry,
        spawn_nursery: trio.Nursery,
        on_finished: Callable[[InferRequest, str, End, float | None], None] | None = None,
        on_leased: Callable[[str, float], None] | None = None,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self.nodes = nodes
        self.hives = hives
        self.http = http
        self.scheduler = scheduler
        self.jobs = jobs
        self._spawn_nursery = spawn_nursery
        #: (node, reference) -> what that node's catalog resolved it to, and by which hive
        #: (a restarted hive asks again: its catalog may have changed).
        self._resolved: dict[tuple[str, str], tuple[Hive, ModelIdentity]] = {}
        self._local_facts: dict[str, Any] | None = None
        self._on_finished = on_finished
        self._on_leased = on_leased
        self.stall_timeout_s = stall_timeout_s

    # -- the job ----------------------------------------------------------------------------

    async def run(self, job: Job) -> None:
        """The job's body; narration and events go to the job's stream."""
        req: InferRequest = job.spec
        try:
            node = await self._route(job, req)
            hive = self.hives.get(node.name) or await self.hives.ensure(node, job.sink)
            identity = await self._resolve(hive, req)
            backend = req.backend or best_backend(hive.facts)
            device = req.device or 0
            check_backend(node.name, hive.facts, backend, device)
            want = Want(identity, node.name, backend, device, label=req.model)
            narrate(ACTOR, "infer_start",
                    f"Inference of {req.model} starts on node {node.name} ({backend}:{device})",
                    target=req.model, node=node.name, model_ref=identity.reference,
                    cute=f"{req.model} on {node.name}, coming right up! 🐝",
                    story=f"On {node.name} the job would ask {req.model}, on {backend}:{device}.")
            await self._lease_and_stream(job, req, hive, want)
        finally:
            self.scheduler.job_finished(job.job_id)

    async def _route(self, job: Job, req: InferRequest) -> Node:
        if req.node is not None:
            node = self.nodes.get(req.node)
            facts = self._known_facts(node)
            if req.backend is not None and req.backend != "cpu":
                # A backend the node lacks fails here, before any hive or worker starts.
                facts = facts or await self._detect_local(node)
                check_backend(node.name, facts, req.backend, req.device or 0)
            reason = "its rbee-hive is up" if self.hives.get(node.name) else "starting its rbee-hive"
            narrate(ACTOR, "route_job", f"Routing job to node {node.name} ({reason})", target=node.name,
                    node=node.name, cute=f"Off to {node.name} we fly! 🐝",
                    story=f"The queen sent the job to node {node.name}, as asked ({reason}).")
            return node
        views = await self._node_views(req)
        choice = place(views, backend=req.backend)
        node = self.nodes.get(choice.node)
        if req.backend is not None and req.backend != "cpu" and node.is_local and not self._known_facts(node):
            check_backend(node.name, await self._detect_local(node), req.backend, req.device or 0)
        narrate(ACTOR, "route_job", f"Routing job to node {node.name}: {choice.reason}", target=node.name,
                node=node.name, reason=choice.reason, cute=f"Off to {node.name} we fly! 🐝",
                story=f"The queen looked over her nodes and chose {node.name}: {choice.reason}.")
        return node

    async def _node_views(self, req: InferRequest) -> list[NodeView]:
        """What placement may know without starting anything: running hives, cached facts."""
        reference = req.ref.reference
        views = []
        for node in self.nodes.list():
            hive = self.hives.get(node.name)
            facts = self._known_facts(node)
            workers = [w for w in self.scheduler.workers.values() if w.node == node.name]
            resolved = self._resolved.get((node.name, reference), (None, None))[1]
            loaded = [w for w in workers if resolved is not None and w.model.matches(resolved)]
            on_disk = None
            if hive is not None and not loaded:
                on_disk = await self._on_disk(hive, reference)
            views.append(NodeView(
                name=node.name,
                running=hive is not None,
                backends=tuple(backend_names(facts)) if facts else None,
                free_slots=sum(w.free_slots for w in loaded),
                loaded=bool(loaded),
                on_disk=on_disk,
                memory_free_bytes=memory_free_bytes(facts),
                is_local=node.is_local,
                reachable=node.name not in self.hives.unreachable,
            ))
        return views

    async def _on_disk(self, hive: Hive, reference: str) -> bool:
        try:
            listing = await hive.request("GET", "/v1/models")
        except RbeeError:
            return False
        return any(reference in (m.get("reference"), m.get("alias")) for m in listing.get("models", []))

    def _known_facts(self, node: Node) -> dict[str, Any] | None:
        hive = self.hives.get(node.name)
        if hive is not None and hive.facts:
            return hive.facts
        if node.detect:
            return node.detect
        return self._local_facts if node.is_local else None

    async def _detect_local(self, node: Node) -> dict[str, Any] | None:
        """``rbee-hive detect`` on this machine, once (a one-shot command, not a daemon)."""
        if not node.is_local:
            return node.detect or None
        if self._local_facts is None:
            argv = shlex.split(node.rbee_hive_command) + ["detect"]
            try:
                done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
                self._local_facts = json.loads(done.stdout) if done.returncode == 0 else None
            except (OSError, ValueError):
                self._local_facts = None
        return self._local_facts

    def forget_resolved(self, node: str) -> None:
        """Forget what the catalog of ``node`` resolved (a model was removed from it)."""
        for key in [k for k in self._resolved if k[0] == node]:
            del self._resolved[key]

    async def _resolve(self, hive: Hive, req: InferRequest) -> ModelIdentity:
        """The model's identity from the node's catalog (cached for the hive's life)."""
        key = (hive.node.name, req.ref.reference)
        by, identity = self._resolved.get(key, (None, None))
        if identity is None or by is not hive:
            answer = await hive.request("POST", "/v1/models/resolve", json={"model": req.ref.reference})
            identity = ModelIdentity(answer["reference"], answer.get("sha256"))
            self._resolved[key] = (hive, identity)
        self.scheduler.note_resolved(req.ref.reference, identity)
        return identity

    async def _lease_and_stream(self, job: Job, req: InferRequest, hive: Hive, want: Want) -> None:
        node = want.node
        waited_from = trio.current_time()
        at_head = False
        for _ in range(MAX_REQUEUES):

            def on_wait(position: int, length: int) -> None:
                narrate(ACTOR, "infer_queue",
                        f"Waiting for a slot of {want.name} on {node}: position {position} of {length}",
                        target=want.name, node=node, position=position, queue_length=length,
                        cute=f"Waiting in line: bee {position} of {length} ⏳",
                        story=f"The job waited its turn, {position} of {length} in the line for {want.name}.")

            def start_spawn(w: Want) -> None:
                narrate(ACTOR, "infer_schedule",
                        f"No worker of {w.name} on {node} has a free slot: asking rbee-hive to spawn one",
                        target=w.name, node=node,
                        cute=f"No free bee for {w.name}: hatching a new worker on {node}! 🥚",
                        story=f"Every worker of {w.name} on {node} was busy or missing, so the queen asked the "
                              "hive for one more.")
                self._spawn_nursery.start_soon(self._spawn, hive, w)

            async with lease(self.scheduler, job.job_id, want, start_spawn=start_spawn, on_wait=on_wait,
                             at_head=at_head) as slot:
                waited = trio.current_time() - waited_from
                worker = slot.worker
                narrate(ACTOR, "infer_lease",
                        f"Slot {len(worker.leases)} of {worker.slots_total} on worker {worker.worker_id}"
                        f" ({want.name} on {node}) is this job's"
                        + (f" after {waited:.1f} s in the queue" if waited >= 0.05 else ""),
                        target=worker.worker_id, worker_id=worker.worker_id, node=node,
                        queue_wait_ms=round(waited * 1000, 1),
                        cute=f"Got a seat on {worker.worker_id}! 🎟️",
                        story=f"A slot of {worker.worker_id} on {node} was the job's at last.")
                if self._on_leased is not None:
                    self._on_leased(want.name, waited)
                try:
                    await self._use(job, req, hive, slot)
                    return
                except _WorkerFull:
                    at_head = True
            await trio.sleep(REQUEUE_PAUSE_S)
        raise WorkerError(f"the workers of {want.name} on {node} kept refusing the job as full; retry")

    async def _use(self, job: Job, req: InferRequest, hive: Hive, slot: Slot) -> None:
        """Stream the inference from the leased worker; narrate ``infer_worker``/``infer_complete``."""
        worker = slot.worker
        wid, node = worker.worker_id, worker.node
        url = await hive.reach(worker.url)
        narrate(ACTOR, "infer_worker", f"Worker {wid} is ready at {worker.url}", target=wid, worker_id=wid, node=node,
                cute=f"{wid} is all ears! 👂", story=f"The queen handed the prompt to {wid} on {node}.")
        end, first_token_s = await self._infer(job, req, url, hive, worker)
        if self._on_finished is not None:
            self._on_finished(req, node, end, first_token_s)
        narrate(
            ACTOR,
            "infer_complete",
            f"Inference complete: {end.tokens_out} tokens at {end.tokens_per_sec:.1f} tok/s ({end.stop_reason})",
            target=job.job_id,
            worker_id=wid,
            node=node,
            tokens_out=end.tokens_out,
            tokens_per_sec=end.tokens_per_sec,
            cute=f"{end.tokens_out} tokens, done! 🎉",
            story=f"{wid} had told its answer, {end.tokens_out} tokens long.",
        )

    async def _infer(self, job: Job, req: InferRequest, url: str, hive: Hive,
                     worker: WorkerRecord) -> tuple[End, float | None]:
        """Stream one inference from the worker into the job; returns its ``End``.

        The truth of how it ended: the worker's own error (its class kept, the node named),
        a broken stream is ``worker_lost``, silence past the stall timeout ``worker_stalled``.
        """
        headers = auth_headers(worker.api_key)
        where = f"worker {worker.worker_id} on node {worker.node}"
        try:
            async with self.http.stream("POST", f"{url}/v1/inference", json=req.worker_body(job.job_id),
                                        headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    error = error_from_response(response)
                    if response.status_code == 503 and error.code == "full":
                        raise _WorkerFull(error.message)
                    raise error
                return await self._relay_inference(job, response, where, hive, worker)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
                with contextlib.suppress(httpx.TransportError):
                    await self.http.delete(f"{url}/v1/inference/{job.job_id}", headers=headers)
            raise
        except httpx.ConnectError as exc:
            raise await self._lost(hive, f"{where} does not answer at {url} ({exc})") from None
        except httpx.TransportError as exc:
            raise await self._lost(hive, f"{where} was lost in the middle of the job: its stream broke ({exc})") from None

    async def _relay_inference(self, job: Job, response: httpx.Response, where: str, hive: Hive,
                               worker: WorkerRecord) -> tuple[End, float | None]:
        decoder = sse.Decoder()
        end: End | None = None
        started_at = trio.current_time()
        first_token_s: float | None = None
        # The stall clock runs from `started` on and is wound by tokens and prefill
        # progress only: the worker's keep-alive pings say the socket lives, not the job.
        stall_deadline = math.inf
        chunks = response.aiter_raw()
        while True:
            with trio.move_on_at(stall_deadline) as waiting:
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
            if waiting.cancelled_caught:
                self._kill_stalled(hive, worker)
                raise WorkerStalledError(f"{where} stalled for {self.stall_timeout_s:g} s: no token and no "
                                         "prefill progress (--stall-timeout); the worker is being killed")
            now = trio.current_time()  # once per chunk: a chunk holds many tokens
            for event in decoder.feed(chunk):
                kind = type(event)
                if kind is Token or kind is Prefill:
                    stall_deadline = now + self.stall_timeout_s
                    if kind is Token and first_token_s is None:
                        first_token_s = now - started_at
                elif kind is Done:
                    if end is None:
                        raise WorkerLostError(f"{where} ended the job's stream without an end event")
                    return end, first_token_s
                elif kind is Error:
                    error = error_for_code(event.code, event.message)
                    if isinstance(error, WorkerError) and worker.node not in error.message:
                        error.message = f"{error.message} (node {worker.node})"
                    raise error
                elif kind is End:
                    end = event
                elif kind is Started:
                    started_at = now
                    stall_deadline = now + self.stall_timeout_s
                job.sink(event)
        raise await self._lost(hive, f"{where} was lost in the middle of the job: its stream stopped without [DONE]")

    async def _lost(self, hive: Hive, what: str) -> RbeeError:
        """The error of a worker stream that broke: its node's loss when that is the cause
        (the SSH connection carrying the stream went down: said by the hive's transport a
        moment later, so wait for it briefly), else ``worker_lost`` saying ``what``."""
        lost = hive.ssh.unreachable() if hive.ssh is not None else None
        if hive.ssh is not None and lost is None:
            with trio.move_on_after(NODE_LOSS_SETTLE_S):
                await hive.exited.wait()
            lost = hive.ssh.unreachable()
        if lost is not None:
            return HiveLostError(f"node {hive.node.name} became unreachable in the middle of the job ({lost});"
                                 " its hive stops its workers on its own, and new jobs go to other nodes")
        return WorkerLostError(what)

    def _kill_stalled(self, hive: Hive, worker: WorkerRecord) -> None:
        """Ask the worker's hive to kill it (it would not answer a polite stop), in the
        background: the job fails now. The hive's events then say it is gone."""
        async def kill() -> None:
            with contextlib.suppress(RbeeError, httpx.TransportError), trio.move_on_after(10):
                await hive.request("POST", f"/v1/workers/{worker.worker_id}/shutdown",
                                   json={"reason": f"stalled for {self.stall_timeout_s:g} s", "kill": True})

        self._spawn_nursery.start_soon(kill)

    # -- spawns (in the queen's nursery: they outlive the job that asked) -------------------

    def _watchers(self, want: Want, watchers: set[str]) -> Callable[[Event], None]:
        """A sink that hands an event to every job waiting for ``want`` (and those that did)."""

        def sink(event: Event) -> None:
            watchers.update(t.job_id for t in self.scheduler.waiting_tickets(want))
            for job_id in list(watchers):
                job = self.jobs.find(job_id)
                if job is None or job.finished.is_set():
                    watchers.discard(job_id)
                    continue
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    job.sink(event)

        return sink

    async def _spawn(self, hive: Hive, want: Want) -> None:
        """Start a worker for ``want`` on the hive; relay its startup to the waiting jobs."""
        watchers: set[str] = set()
        sink = self._watchers(want, watchers)
        failure: RbeeError | None = None
        try:
            body = {"model": want.model.reference, "backend": want.backend, "device": want.device}
            # The spawn request waits while the model is provisioned: the hive narrates the
            # download on its stdout meanwhile, which we relay live (progress bars). The
            # worker's narration SSE replays those same events from the spawn on: skip them.
            relayed: set[tuple[Any, ...]] = set()

            def live(event: Event) -> None:
                sink(event)
                if isinstance(event, NarrationEvent):
                    relayed.add(_identity(event))

            with hive.listen(live):
                spawned = await hive.request("POST", "/v1/workers/spawn", json=body)
            record = self.scheduler.upsert(WorkerRecord(
                worker_id=spawned["worker_id"], node=hive.node.name,
                model=ModelIdentity(spawned.get("model_ref") or want.model.reference,
                                    spawned.get("sha256") or want.model.sha256),
                backend=spawned.get("backend", want.backend), device=int(spawned.get("device", want.device)),
                slots_total=int((spawned.get("slots") or {}).get("total") or 1),
                url=spawned["url"], api_key=spawned.get("api_key"),
                memory_bytes=int(spawned.get("memory_bytes") or 0),
                idle_timeout_s=float(spawned.get("idle_timeout_s") or 0.0), label=want.name,
            ))
            said_failure = await self._relay_startup(hive, record, sink, relayed)
            if record.state == "gone" or record.worker_id not in self.scheduler.workers:
                reason = self.scheduler.exit_reasons.get(record.worker_id, "it exited")
                where = f"worker {record.worker_id} for {want.name} on node {hive.node.name}"
                if said_failure is not None:
                    # The worker said why (its load failed): that error, its class kept.
                    failure = error_for_code(said_failure.code, f"{where} failed to start: {said_failure.message}")
                else:
                    failure = WorkerError(f"{where} failed to start ({reason}); see its narration above")
        except RbeeError as exc:
            failure = exc
        finally:
            self.scheduler.spawn_ended(want, failure)
        if failure is not None:
            narrate(ACTOR, "spawn_failed", f"No worker for {want.name} on {hive.node.name}: {failure.message}",
                    level="warn", node=hive.node.name, target=want.name)

    async def _relay_startup(self, hive: Hive, record: WorkerRecord, sink: Callable[[Event], None],
                             seen: set[tuple[Any, ...]]) -> RbeeError | None:
        """Relay the worker's narration until the hive's events say it is ready (or gone);
        returns the error the worker narrated about its own start, if it did."""
        said_ready = trio.Event()
        said_failure: RbeeError | None = None
        async with trio.open_nursery() as nursery:

            async def relay() -> None:
                with contextlib.suppress(RbeeError, httpx.TransportError):
                    async with hive.open_sse(f"/v1/workers/{record.worker_id}/narration") as events:
                        async for event in events:
                            if isinstance(event, Done):
                                break
                            if isinstance(event, NarrationEvent) and _identity(event) in seen:
                                continue
                            sink(event)
                            nonlocal said_failure
                            if isinstance(event, NarrationEvent) and event.level == "error" \
                                    and isinstance(event.extra.get("error_code"), str) and said_failure is None:
                                # e.g. model_load phase=failed: "Cannot load the model: <cause>"
                                said_failure = error_for_code(str(event.extra["error_code"]), event.human)
                            if isinstance(event, Ready) or (
                                isinstance(event, NarrationEvent) and event.action in READY_ACTIONS
                            ):
                                said_ready.set()
                said_ready.set()  # the narration ended: the worker exited

            nursery.start_soon(relay)
            while record.state == "spawning" and record.worker_id in self.scheduler.workers:
                await self.scheduler.worker_changed.wait()
            with trio.move_on_after(READY_TAIL_S):
                await said_ready.wait()
            nursery.cancel_scope.cancel()
        return said_failure


def _identity(event: NarrationEvent) -> tuple[Any, ...]:
    """What makes one narration event the same event when it arrives twice."""
    return (event.actor, event.action, event.human, event.ts_ms, event.worker_id)


def submit_checks(nodes: NodeRegistry, req: InferRequest) -> None:
    """What the queen refuses before a job exists: an unknown node (404)."""
    if req.node is not None and req.node != LOCALHOST:
        nodes.get(req.node)

