"""``serve(config)``: one worker's whole life, from bind to exit.

Order (why): the HTTP server comes up first, so that ``/health``, ``/v1/ready`` (state
``loading``) and the progress SSE answer while the model loads; then the model loads on
a thread; then the ready callback goes to the parent; then the worker serves until SIGTERM
or ``POST /v1/shutdown``. Shutdown: refuse new requests, cancel every running job (the core
ends them at its next step, each client gets ``end`` with ``stop_reason: cancelled``), close
the HTTP server (open streams get ``graceful_timeout`` to finish), then free the model.
The model is freed last because a stream still being written may hold the engine.

Failures are narrated on stdout and raised as ``RbeeError`` (``BackendUnavailableError``,
``ModelLoadError``, ``CallbackError``); the CLI turns them into one line on stderr and an
exit code. A failed load keeps the HTTP server up just long enough for the progress
streams to carry the ``error`` event.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import AsyncIterator

import hypercorn.trio
import trio

from ..errors import BackendUnavailableError, BindFailedError, ModelLoadError, RbeeError, ShuttingDownError, WorkerError
from ..http_common import hypercorn_config
from ..narration import Loading
from ..narration.render import LOADER_ACTOR
from .app import create_app
from .callback import callback_body, post_ready_callback
from .config import WorkerConfig
from .lifecycle import shutdown_signals, watch_signals
from .narrator import Narrator
from .state import CANCELLED_JOB_GRACE, WorkerState


def _advertised_url(bound: str, host: str) -> tuple[str, int]:
    """The URL others should use and the port, from hypercorn's ``http://host:port``."""
    port = int(bound.rsplit(":", 1)[1])
    # A wildcard bind is reachable on loopback; the parent (the hive) runs on this machine.
    if host in ("0.0.0.0", "", "::"):
        return f"http://127.0.0.1:{port}", port
    return bound, port


def check_backend(config: WorkerConfig, say: Narrator) -> None:
    """``BackendUnavailableError`` (narrated) if the backend or device is missing here."""
    from .engine import available_backends, backend_device_count

    available = available_backends()
    problem = None
    if config.backend not in available:
        problem = (f"backend {config.backend!r} is not available on this machine; "
                   f"available: {', '.join(available)}")
    elif config.backend != "cpu":
        devices = backend_device_count(config.backend)
        if not 0 <= config.device < devices:
            problem = (f"{config.backend} device {config.device} does not exist; "
                       f"this machine has {devices} {config.backend} device(s)")
    if problem is not None:
        say("device_init", problem, level="error", backend=config.backend, device=config.device,
            available=",".join(available))
        raise BackendUnavailableError(problem, details={"backend": config.backend, "available": available})


def check_model_file(config: WorkerConfig, say: Narrator) -> int:
    """The model file's size; ``ModelLoadError`` (narrated) naming it when it is missing."""
    path = Path(config.model_path)
    try:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}", details={"path": str(path)})
        return path.stat().st_size
    except ModelLoadError as exc:
        say("model_load", exc.message, level="error", target=str(path))
        raise
    except OSError as exc:
        say("model_load", f"cannot read model file {path}: {exc.strerror}", level="error", target=str(path))
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from None


async def serve(config: WorkerConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``config.model_path`` until shut down; ``task_status.started(url)`` once bound.

    Returns normally after a requested shutdown; raises ``RbeeError`` after a failure.
    """
    say = Narrator(config.worker_id)
    # Signals are caught from the first line on: a SIGTERM at any point is a clean exit.
    with shutdown_signals() as signals:
        say("startup", f"Starting worker {config.worker_id} for {config.effective_model_ref} "
            f"on {config.backend}:{config.device}", pid=os.getpid(), backend=config.backend,
            device=config.device, cute="Waking up! 🐝",
            story=f"Worker {config.worker_id} woke up to serve {config.effective_model_ref}.")
        check_backend(config, say)
        size = check_model_file(config, say)
        state = WorkerState(config)
        server_stop = trio.Event()
        failure: RbeeError | None = None
        async with trio.open_nursery() as server_nursery:
            try:
                binds = await server_nursery.start(functools.partial(
                    hypercorn.trio.serve, create_app(state),
                    hypercorn_config(config.host, config.port, graceful_timeout_s=config.graceful_timeout),
                    shutdown_trigger=server_stop.wait,
                ))
            except* OSError as group:  # port taken, address not ours: one line, no traceback
                failure = _bind_failed(config, group.exceptions[0], say)
                binds = None
            if binds is not None:
                url, port = _advertised_url(binds[0], config.host)
                state.url = url
                say("server_bind", f"Listening on {url}", port=port, url=url)
                task_status.started(url)
                try:
                    await _run(state, say, size, signals)
                except RbeeError as exc:
                    failure = exc
                finally:
                    # Graceful: open streams get config.graceful_timeout for their last events.
                    server_stop.set()
        _free_model(state, say)
    if failure is not None:
        raise failure


def _bind_failed(config: WorkerConfig, error: BaseException, say: Narrator) -> WorkerError:
    while isinstance(error, BaseExceptionGroup):  # hypercorn's own nurseries wrap it
        error = error.exceptions[0]
    reason = getattr(error, "strerror", None) or str(error)
    message = f"cannot listen on {config.host}:{config.port}: {reason}"
    say("server_bind", message, level="error", port=config.port)
    return BindFailedError(message)


async def _run(state: WorkerState, say: Narrator, size: int, signals: AsyncIterator[int] | None) -> None:
    """Load, call back, serve until asked to stop, then stop the running job."""
    failure: RbeeError | None = None
    async with trio.open_nursery() as nursery:
        state.nursery = nursery
        nursery.start_soon(watch_signals, signals, state, say)
        try:
            with trio.CancelScope() as startup:
                nursery.start_soon(_cancel_when_set, state.shutdown_requested, startup)
                await _load_model(state, say, size)
                await _call_back(state, say)
            await state.shutdown_requested.wait()
        except RbeeError as exc:
            failure = exc
        state.begin_stopping()
        reason = "the worker failed" if failure is not None else "shutdown requested"
        say("server_shutdown", f"Shutting down ({reason}): stopping the running job and the HTTP server",
            cute="Time to rest! 🐝", story=f"The worker put its work down ({reason}).")
        jobs = list(state.jobs.values())
        cause = state.stop_error or failure or ShuttingDownError(
            f"worker {state.config.worker_id} shut down in the middle of the job")
        for job in jobs:
            job.cancel(because=cause)
        with trio.move_on_after(CANCELLED_JOB_GRACE):
            for job in jobs:
                await job.done.wait()
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _load_model(state: WorkerState, say: Narrator, size: int) -> None:
    from .engine import Engine

    config = state.config
    threads = config.effective_threads
    say("device_init", f"Using backend {config.backend} device {config.device} with {threads} threads",
        backend=config.backend, device=config.device, threads=threads)
    path = Path(config.model_path)
    loader = Narrator(config.worker_id, actor=LOADER_ACTOR)
    megabytes = f"{size / 1e6:.0f} MB"
    loader("model_load", f"Loading model from {path} ({megabytes}, context {config.ctx_size} "
           f"x {config.parallel} slots)", target=str(path), phase="start", bytes_total=size,
           parallel=config.parallel,
           cute=f"Unpacking {path.name}: {megabytes} of brains for {config.worker_id}! 🧠",
           story=f"The loader opened {path.name} and began to read its {megabytes} of weights.")
    state.set_progress(Loading(stage="loading", bytes_done=0, bytes_total=size))
    started = time.monotonic()
    token = trio.lowlevel.current_trio_token()

    def step(percent: int) -> bool:  # on this (Trio) thread: one 10% step of the load
        if state.stopping or state.shutdown_requested.is_set():
            return False  # a shutdown stops the load at its next step
        done = -(-size * percent // 100)  # rounded up, so that a bar reads 10%, not 9%
        elapsed = time.monotonic() - started
        state.set_progress(Loading(stage="loading", bytes_done=done, bytes_total=size))
        loader("model_load", f"Loading {path.name}: {percent}% ({done / 1e6:.0f} of {megabytes})",
               target=str(path), phase="progress", percent=percent, bytes_done=done, bytes_total=size,
               bytes_per_sec=round(done / elapsed) if elapsed > 0 else None,
               cute=f"Nom nom: {percent}% of the weights munched! 🍯",
               story=f"Page by page the loader read on: {percent}% of the weights were in.")
        return True

    def on_progress(percent: int) -> bool:  # on the engine's thread, which waits for the step
        try:
            return trio.from_thread.run_sync(step, percent, trio_token=token)
        except trio.RunFinishedError:
            return False  # the worker is gone: stop reading

    load = functools.partial(Engine.load, path, backend=config.backend, device=config.device,
                             n_ctx=config.ctx_size, n_threads=threads, n_slots=config.parallel,
                             on_progress=on_progress)
    try:
        # A SIGTERM during the load abandons the thread at once; the load itself stops at
        # its next progress step (it touches nothing shared) and the process exits.
        engine = await trio.to_thread.run_sync(load, abandon_on_cancel=True)
    except RbeeError as exc:
        loader("model_load", f"Cannot load the model: {exc.message}", level="error",
               target=str(path), phase="failed", error_code=exc.code)
        state.set_failed(exc)
        raise
    duration_ms = round((time.monotonic() - started) * 1000, 1)
    layers = engine.n_layers
    state.set_progress(Loading(stage="loaded", layers_done=layers, layers_total=layers,
                               bytes_done=size, bytes_total=size))
    state.set_loaded(engine)
    memory = "RAM" if engine.backend == "cpu" else "VRAM"
    in_memory = f"{engine.size_bytes / 1e6:.0f} MB"
    loader("model_load", f"Model loaded! {engine.description}, {in_memory} in {memory} in {duration_ms:.0f} ms: "
           f"{layers} layers, context {engine.n_ctx} x {engine.n_slots} slots", target=str(path),
           phase="done", duration_ms=duration_ms, size_bytes=engine.size_bytes, n_layers=layers, n_ctx=engine.n_ctx,
           parallel=engine.n_slots,
           cute=f"Model loaded! {in_memory} cozy in {memory}!",
           story=f"At last the model lay ready: {layers} layers resting in {memory}, "
                 f"{engine.n_slots} slots waiting for questions.")


async def _call_back(state: WorkerState, say: Narrator) -> None:
    config = state.config
    if not config.callback_url:
        return
    body = callback_body(worker_id=config.worker_id, url=state.url, model_ref=config.effective_model_ref,
                         backend=config.backend, device=config.device)
    await post_ready_callback(config.callback_url, body, api_key=config.api_key, say=say)


def _free_model(state: WorkerState, say: Narrator) -> None:
    engine = state.engine
    if engine is None:
        return
    state.engine = None
    size = engine.size_bytes
    engine.close()
    say("memory_freed", f"Freed the model ({size / 1e6:.0f} MB)", bytes_freed=size)
