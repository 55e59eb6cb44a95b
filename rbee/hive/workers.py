"""The workers of one hive: spawn, watch from birth to exit, stop.

``WorkerRegistry`` keeps the live workers in memory, each in one of the states
``loading`` (spawned, model loading) -> ``idle`` (its ready callback came; no slot busy)
<-> ``busy`` (some of its ``parallel`` slots serve a stream) <-> ``full`` (every slot
does) -> ``stopping``. How many slots are busy is learnt by polling the worker's ``GET
/v1/ready`` (``slots_from_ready``, applied by ``note_slots``); the idle timeout counts
from the moment that number fell to 0 (``idle_seconds``). A worker that exits is
deregistered at once: its exit is noticed through a pidfd (no polling, no 2 s window to
wait for), narrated on the hive's stdout and into the worker's own narration log, whose
SSE readers then get ``[DONE]``.

Everything the worker prints on stdout and stderr goes through the JSON-lines decoder
line by line into that log: its narration as events, any other line as an event with
action ``stdout`` (``stderr`` for its standard error). Nothing is lost, nothing is echoed
to the hive's own stdout (the queen reads the worker's log through the hive's SSE; an
echo would show every line twice).

Stopping (idle timeout, ``POST /v1/workers/{id}/shutdown``, hive shutdown): ``POST
/v1/shutdown`` to the worker with its key, then SIGTERM to its process group after
``stop_grace_s``, then SIGKILL after ``kill_grace_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from ..errors import AuthError, InvalidRequestError, NotFoundError, WorkerError
from ..http_common import bearer_matches
from ..lifetime import HF_SECRETS, RBEE_SECRETS, env_without
from ..narration import jsonlines, narrate
from ..narration.events import Event, NarrationEvent, WorkerChange
from . import childproc
from .catalog import CatalogEntry
from .config import ACTOR, HiveConfig
from .detect import require_built_backend
from .eventlog import EventLog
from .events import WorkerEvents
from .preflight import slots_phrase

WORKER_ACTOR = "llm-worker-rbee"
#: After a worker exited, how long its stdout/stderr readers may still drain the pipes.
DRAIN_S = 1.0
#: Worker states reported by ``GET /v1/workers``.
STATES = ("loading", "idle", "busy", "full", "stopping")
#: The states of a worker that serves (its model is loaded): the hive polls these.
SERVING = ("idle", "busy", "full")
#: The kinds of ``WorkerChange`` on ``GET /v1/events``.
CHANGES = ("present", "spawned", "ready", "capacity", "exited")
#: ``WorkerChange`` fields that ``GET /v1/workers`` does not list as they are: the
#: change's own (kind, reason, exit code, time), the slots (listed as ``slots: {total,
#: busy}``) and the key (listed only for the hive's parent).
_NOT_LISTED = ("change", "reason", "exit_code", "ts_ms", "slots_total", "slots_busy", "api_key")


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now (the worker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def wait_for_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a child to exit and reap it; returns its exit code (negative: a signal).

    Linux: a pidfd, readable the moment the child exits (no polling). Elsewhere: poll.
    """
    if hasattr(os, "pidfd_open"):
        pidfd = os.pidfd_open(proc.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
    else:
        while proc.poll() is None:
            await trio.sleep(0.1)
    return proc.wait()


def new_worker_id() -> str:
    """``worker-<8 hex>``."""
    return f"worker-{secrets.token_hex(4)}"


def slots_from_ready(body: Any, parallel: int) -> int | None:
    """How many slots are busy, from a worker's ``GET /v1/ready`` answer.

    The answer is ``{"ready", "state", "slots": {"total", "busy"}}``. None when it says
    nothing about serving (``loading``, ``error``, not the expected JSON). An answer
    without ``slots`` is judged by its state: ``idle`` 0, ``busy`` 1, ``full`` every slot.
    """
    if not isinstance(body, dict):
        return None
    state = body.get("state")
    if state not in SERVING:
        return None
    slots = body.get("slots")
    busy = slots.get("busy") if isinstance(slots, dict) else None
    if isinstance(busy, int) and not isinstance(busy, bool) and busy >= 0:
        return busy
    return {"idle": 0, "busy": 1, "full": parallel}[state]


def slot_state(busy: int, total: int) -> str:
    """``idle`` (no slot busy), ``full`` (every slot busy) or ``busy`` (in between)."""
    if busy <= 0:
        return "idle"
    return "full" if busy >= total else "busy"


@dataclass(eq=False)
class Worker:
    """One live worker process and what the hive knows about it."""

    worker_id: str
    model_ref: str
    model_path: str
    backend: str
    device: int
    ctx_size: int | None
    #: Slots: streams the worker serves at once (its ``--parallel``).
    parallel: int
    url: str
    api_key: str
    log: EventLog
    planned_bytes: int
    proc: subprocess.Popen[bytes] | None = None
    state: str = "loading"
    #: Busy slots, as the worker last answered ``GET /v1/ready`` (0 before its first answer).
    slots_busy: int = 0
    #: When ``slots_busy`` last fell to 0 (or the worker became ready): the idle timeout counts from here.
    idle_since: float = 0.0
    exited: trio.Event = field(default_factory=trio.Event)
    returncode: int | None = None
    stopping: bool = False
    #: The sha256 of the model file (the catalog entry's).
    sha256: str | None = None
    #: The hive's idle unload timeout for this worker, in seconds (0: never).
    idle_timeout_s: float = 0.0
    #: Why the hive stopped it (``request_stop``'s reason); None while nobody asked.
    stop_reason: str | None = None

    @property
    def pid(self) -> int:
        """The worker's process id."""
        assert self.proc is not None
        return self.proc.pid

    def note_slots(self, busy: int, now: float) -> None:
        """Take the worker's busy slot count: the state follows it, and when the last
        stream ended (busy fell to 0) the idle time starts again from ``now``."""
        if self.state not in SERVING:
            return  # still loading, or stopping: an answer that came too late changes nothing
        if busy == 0 and self.slots_busy > 0:
            self.idle_since = now
        self.slots_busy = busy
        self.state = slot_state(busy, self.parallel)

    def idle_seconds(self, now: float) -> float | None:
        """How long no stream has run on the worker; None while one runs (or it does not serve)."""
        if self.state not in SERVING or self.slots_busy > 0:
            return None
        return now - self.idle_since

    @property
    def slots(self) -> dict[str, int]:
        """``{"total": parallel, "busy": k}``, as ``GET /v1/workers`` lists it."""
        return {"total": self.parallel, "busy": self.slots_busy}

    def exit_reason(self) -> str:
        """Why the worker exited, in words: the stop reason, else how it crashed."""
        if self.stop_reason is not None:
            return self.stop_reason
        code = self.returncode
        if code is None:
            return "exited (exit code unknown)"
        if code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            return f"crashed: killed by signal {-code}{name}"
        if code == 0:
            return "exited on its own with exit code 0"
        return f"crashed: exit code {code}"

    def change(self, kind: str, reason: str | None = None) -> WorkerChange:
        """The ``WorkerChange`` of ``kind`` for the worker as it is now (``GET /v1/events``).

        ``exited`` carries the state ``exited``, the exit code and ``reason`` (by default
        ``exit_reason()``). ``public()`` is built from the same object, so the listing and
        the stream never disagree.
        """
        exited = kind == "exited"
        return WorkerChange(
            change=kind, worker_id=self.worker_id, state="exited" if exited else self.state,
            model_ref=self.model_ref, sha256=self.sha256, backend=self.backend, device=self.device, url=self.url,
            api_key=self.api_key, pid=self.proc.pid if self.proc is not None else None, ctx_size=self.ctx_size,
            slots_total=self.parallel, slots_busy=self.slots_busy, memory_bytes=self.planned_bytes,
            idle_timeout_s=self.idle_timeout_s,
            reason=(reason or self.exit_reason()) if exited else reason,
            exit_code=self.returncode if exited else None, ts_ms=int(time.time() * 1000),
        )

    def public(self, *, with_key: bool) -> dict[str, Any]:
        """The JSON of ``GET /v1/workers`` (the key only for the hive's parent): the fields
        of its ``WorkerChange``, with ``slots: {total, busy}``."""
        change = self.change("present")
        out: dict[str, Any] = {
            f.name: getattr(change, f.name) for f in dataclasses.fields(change) if f.name not in _NOT_LISTED
        }
        out["slots"] = {"total": change.slots_total, "busy": change.slots_busy}
        if with_key:
            out["api_key"] = change.api_key
        return out


class WorkerRegistry:
    """Spawns and tracks the hive's workers; every task lives in the hive's service nursery."""

    def __init__(self, config: HiveConfig, nursery: trio.Nursery, http: httpx.AsyncClient, pid_dir: Path) -> None:
        self.config = config
        self._nursery = nursery
        self._http = http
        self.pid_dir = pid_dir
        self._workers: dict[str, Worker] = {}
        self._logs: dict[str, EventLog] = {}  # every log, including those of workers being provisioned
        self.callback_url = ""  # set by serve() once the hive's port is known
        #: The subscribers of ``GET /v1/events``; every change of a worker is published there.
        self.events = WorkerEvents()

    def list(self) -> list[Worker]:
        """The live workers, oldest first."""
        return list(self._workers.values())

    def get(self, worker_id: str) -> Worker:
        """A live worker; ``NotFoundError`` if there is none by that id."""
        worker = self._workers.get(worker_id)
        if worker is None:
            raise NotFoundError(f"no worker {worker_id!r} on this hive (GET /v1/workers lists them)")
        return worker

    def subscribe(self) -> trio.MemoryReceiveChannel[WorkerChange]:
        """A ``GET /v1/events`` subscription: ``present`` for every live worker, then live changes."""
        return self.events.subscribe(w.change("present") for w in self.list())

    def _publish(self, worker: Worker, kind: str) -> None:
        self.events.publish(worker.change(kind))

    def log_of(self, worker_id: str) -> EventLog:
        """The narration log of a worker (also one still being provisioned, or just exited)."""
        log = self._logs.get(worker_id)
        if log is None:
            raise NotFoundError(f"no worker {worker_id!r} on this hive (GET /v1/workers lists them)")
        return log

    def open_log(self, worker_id: str) -> EventLog:
        """A new log for a worker id about to be provisioned and spawned."""
        log = self._logs[worker_id] = EventLog()
        return log

    def drop_log(self, worker_id: str) -> None:
        """Close and forget the log of a spawn that failed before any process started."""
        log = self._logs.pop(worker_id, None)
        if log is not None:
            log.close()

    def reserved_bytes(self) -> int:
        """Memory planned for the live workers (preflight counts it against a configured limit)."""
        return sum(w.planned_bytes for w in self._workers.values())

    def _say(self, worker: Worker, action: str, human: str, *, level: str = "info", **extra: Any) -> None:
        worker.log.append(narrate(ACTOR, action, human, level=level, worker_id=worker.worker_id,
                                  target=worker.worker_id, **extra))

    def spawn(self, worker_id: str, entry: CatalogEntry, *, backend: str, device: int,
              ctx_size: int | None, parallel: int, planned_bytes: int) -> Worker:
        """Start ``llm-worker-rbee`` for ``entry`` (synchronously: see ``childproc``).

        ``BackendUnavailableError`` before any process starts when our llama.cpp build
        lacks ``backend``, whatever the node reports (``RBEE_DETECT_OVERRIDE``).
        """
        require_built_backend(backend)
        host = self.config.worker_host
        port = free_port(host)
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        worker = Worker(
            worker_id=worker_id, model_ref=entry.reference, model_path=entry.local_path, backend=backend,
            device=device, ctx_size=ctx_size, parallel=parallel, url=f"http://{url_host}:{port}",
            api_key=secrets.token_urlsafe(32),
            log=self._logs.get(worker_id) or self.open_log(worker_id), planned_bytes=planned_bytes,
            sha256=entry.sha256, idle_timeout_s=max(0.0, self.config.idle_timeout_s),
        )
        argv = [
            *self.config.worker_command, "--model", entry.local_path, "--host", host, "--port", str(port),
            "--backend", backend, "--device", str(device), "--worker-id", worker_id,
            "--callback-url", self.callback_url, "--model-ref", entry.reference, "--parallel", str(parallel),
        ]
        if ctx_size:
            argv += ["--ctx-size", str(ctx_size)]
        # The worker has its own key, and downloads nothing: neither the hive's token nor
        # the Hugging Face token go to it.
        env = env_without(*RBEE_SECRETS, *HF_SECRETS)
        env["PYTHONUNBUFFERED"] = "1"
        # The key goes through the environment, not --api-key: a command line is readable
        # by every local user (/proc/PID/cmdline), a process's environment only by its owner.
        env["RBEE_WORKER_API_KEY"] = worker.api_key
        try:
            worker.proc = childproc.start_child(argv, env=env)
        except OSError as exc:
            raise WorkerError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        childproc.write_pid_file(self.pid_dir, worker_id, worker.pid)
        self._workers[worker_id] = worker
        self._say(worker, "worker_spawn", f"Spawned worker {worker_id} (pid {worker.pid}) for {entry.reference} "
                  f"on {backend}:{device} at {worker.url} with {slots_phrase(parallel)}",
                  pid=worker.pid, url=worker.url, parallel=parallel,
                  cute=f"A new bee hatched: {worker_id}! 🐣",
                  story=f"The hive sent {worker_id} off to load {entry.reference} on {backend}:{device}.")
        self._publish(worker, "spawned")
        assert worker.proc.stdout is not None and worker.proc.stderr is not None
        streams = []
        for pipe in (worker.proc.stdout, worker.proc.stderr):
            streams.append(trio.lowlevel.FdStream(os.dup(pipe.fileno())))
            pipe.close()
        self._nursery.start_soon(self._watch, worker, streams[0], streams[1])
        return worker

    async def _pump(self, worker: Worker, stream: trio.lowlevel.FdStream, kind: str) -> None:
        decoder = jsonlines.Decoder(actor=WORKER_ACTOR)
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                events = decoder.feed(data) if data else decoder.close()
                for event in events:
                    worker.log.append(self._own(worker, event, kind))
                if not data:
                    return

    @staticmethod
    def _own(worker: Worker, event: Event, kind: str) -> Event:
        if isinstance(event, NarrationEvent):
            changes: dict[str, Any] = {}
            if event.worker_id is None:
                changes["worker_id"] = worker.worker_id
            if kind == "stderr" and event.action == "stdout":
                changes["action"] = "stderr"
            if changes:
                return dataclasses.replace(event, **changes)
        return event

    async def _watch(self, worker: Worker, out: trio.lowlevel.FdStream, err: trio.lowlevel.FdStream) -> None:
        """The worker's life: read its output, poll its state, deregister it when it exits."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._poll_state, worker)
                async with trio.open_nursery() as pipes:
                    pipes.start_soon(self._pump, worker, out, "stdout")
                    pipes.start_soon(self._pump, worker, err, "stderr")
                    assert worker.proc is not None
                    worker.returncode = await wait_for_exit(worker.proc)
                    # Let the pipes drain what the worker said last, unless a grandchild
                    # holds them open: then stop reading after DRAIN_S.
                    pipes.cancel_scope.deadline = trio.current_time() + DRAIN_S
                nursery.cancel_scope.cancel()
        finally:
            if worker.returncode is None and worker.proc is not None:
                # Cancelled while the worker lives (serve() cancelled from outside rather
                # than shut down): no worker may outlive the hive's watch over it.
                if worker.stop_reason is None:
                    worker.stop_reason = "the hive stopped watching it (cancelled): killed"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
                worker.returncode = worker.proc.wait()
            self._deregister(worker)

    def _deregister(self, worker: Worker) -> None:
        expected = worker.stopping
        self._workers.pop(worker.worker_id, None)
        childproc.remove_pid_file(self.pid_dir, worker.worker_id)
        code = worker.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        self._say(worker, "worker_exit", f"Worker {worker.worker_id} (pid {worker.pid}) {how}; deregistered",
                  level="info" if expected else "warn", exit_code=code, pid=worker.pid,
                  cute=f"{worker.worker_id} flew home. 🏠", story=f"{worker.worker_id} left the hive ({how}).")
        worker.state = "exited"
        self._publish(worker, "exited")
        worker.exited.set()
        worker.log.close()
        # Keep the closed log a while so that a late reader still gets the story and [DONE].
        self._nursery.start_soon(self._forget_log_later, worker.worker_id, worker.log)

    async def _forget_log_later(self, worker_id: str, log: EventLog) -> None:
        await trio.sleep(300)
        if self._logs.get(worker_id) is log:
            del self._logs[worker_id]

    async def _poll_state(self, worker: Worker) -> None:
        """Learn the busy slots from the worker itself, so the idle timeout counts real idleness."""
        while True:
            await trio.sleep(self.config.state_poll_s)
            if worker.state in SERVING:
                await self._poll_once(worker)

    async def _poll_once(self, worker: Worker) -> None:
        """Ask the worker's ``GET /v1/ready`` how many slots are busy, and take the answer."""
        # No keep-alive: an idle connection of ours would hold the worker's graceful
        # shutdown open until its timeout.
        headers = {"Authorization": f"Bearer {worker.api_key}", "Connection": "close"}
        try:
            with trio.move_on_after(max(self.config.state_poll_s, 1.0)):
                response = await self._http.get(f"{worker.url}/v1/ready", headers=headers)
                if response.status_code == 200:
                    busy = slots_from_ready(response.json(), worker.parallel)
                    if busy is not None:
                        before = worker.slots_busy
                        worker.note_slots(busy, trio.current_time())
                        if worker.slots_busy != before:
                            self._publish(worker, "capacity")
        except (httpx.HTTPError, ValueError):
            pass  # a worker that does not answer is judged by its process, not by HTTP

    def mark_ready(self, authorization: str | None, body: Any) -> Worker:
        """The worker's ready callback: check its key, move it to idle."""
        if not isinstance(body, dict) or not isinstance(body.get("worker_id"), str):
            raise InvalidRequestError(
                "the ready callback needs a JSON body with worker_id",
                details=[{"field": "worker_id", "constraint": "string", "message": "the id the hive gave the worker"}],
            )
        worker = self._workers.get(body["worker_id"])
        # An unknown id is compared against a fresh random key: the same time as a wrong key.
        key = worker.api_key if worker else secrets.token_urlsafe(32)
        if not bearer_matches(authorization, key) or worker is None:
            raise AuthError("the ready callback must carry the bearer key the hive minted for that worker")
        if worker.state == "loading":
            worker.state = "idle"
            worker.idle_since = trio.current_time()
            self._say(worker, "worker_ready", f"Worker {worker.worker_id} is ready (idle) at {worker.url}",
                      url=worker.url, cute=f"{worker.worker_id} is buzzing and ready! 🐝",
                      story=f"{worker.worker_id} reported back to the hive: ready for work.")
            self._publish(worker, "ready")
        return worker

    def request_stop(self, worker: Worker, reason: str, *, kill: bool = False) -> None:
        """Begin stopping one worker (once; later calls change nothing but ``kill``).

        ``kill``: SIGKILL its process group at once, for a worker that cannot be asked
        (stalled: stopped by a signal or wedged in a driver, it would never answer).
        """
        if kill and not worker.exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)  # not reaped yet (exited unset): ours
        if worker.stopping or worker.exited.is_set():
            return
        worker.stopping = True
        worker.state = "stopping"
        worker.stop_reason = reason
        self._say(worker, "worker_stop", f"Stopping worker {worker.worker_id}: {reason}",
                  cute=f"Time for {worker.worker_id} to rest 💤",
                  story=f"The hive asked {worker.worker_id} to stop: {reason}.")
        # Said at once (its exit may take seconds): the queen stops giving it jobs now.
        self.events.publish(worker.change("stopping", reason))
        self._nursery.start_soon(self._stop_sequence, worker)

    async def stop(self, worker: Worker, reason: str, *, kill: bool = False) -> None:
        """Stop one worker: POST /v1/shutdown, then SIGTERM, then SIGKILL (at once with
        ``kill``); returns once it exited."""
        self.request_stop(worker, reason, kill=kill)
        await worker.exited.wait()

    async def _stop_sequence(self, worker: Worker) -> None:
        with trio.move_on_after(min(2.0, self.config.stop_grace_s)):
            try:
                # The reason travels on: a job the worker cuts short ends with it.
                await self._http.post(f"{worker.url}/v1/shutdown", json={"reason": worker.stop_reason},
                                      headers={"Authorization": f"Bearer {worker.api_key}", "Connection": "close"})
            except httpx.HTTPError:
                pass  # still loading or wedged: the signals below take over
        with trio.move_on_after(self.config.stop_grace_s):
            await worker.exited.wait()
        for signum, grace in ((signal.SIGTERM, self.config.kill_grace_s), (signal.SIGKILL, None)):
            if worker.exited.is_set():
                return
            # The worker leads its own process group: signal the group, so anything it
            # started goes too. It is not reaped yet (exited is unset), so the id is ours.
            try:
                os.killpg(worker.pid, signum)
            except ProcessLookupError:
                pass
            if grace is not None:
                with trio.move_on_after(grace):
                    await worker.exited.wait()

    async def stop_all(self, reason: str) -> None:
        """Stop every worker, in parallel; returns when none is left."""
        for worker in self.list():
            self.request_stop(worker, reason)
        for worker in self.list():
            await worker.exited.wait()

    async def run_idle_timeout(self) -> None:
        """Stop workers with no stream for ``idle_timeout_s`` (runs for the hive's life).

        Idle time counts from the moment the worker's busy slots fell to 0 (or it became
        ready), never while a stream runs. Before a worker is stopped it is asked once
        more, so a stream that began since the last poll keeps it.
        """
        timeout = self.config.idle_timeout_s
        if timeout <= 0:
            return
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            for worker in self.list():
                idle = worker.idle_seconds(trio.current_time())
                if idle is None or idle < timeout:
                    continue
                await self._poll_once(worker)
                idle = worker.idle_seconds(trio.current_time())
                if idle is not None and idle >= timeout:
                    self.request_stop(worker, f"idle for {timeout:g} s: idle timeout (RBEE_WORKER_IDLE_TIMEOUT)")
