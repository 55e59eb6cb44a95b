"""``serve(config)``: run one hive until it is told to stop, and leave no worker behind.

Startup narration goes to stdout as JSON lines, because that is what the queen reads (over
SSH for a remote node) before the HTTP server is up: ``hive_start``, ``model_dirs``,
``catalog_damaged`` and ``catalog_rebuilt`` when ``models.db`` could not be read,
``stale_worker`` for each worker a crashed hive left (ended now, its PID file removed),
``server_bind`` {port, url}, ``hive_ready``. A state directory that cannot be written
stops the hive before any of it (``StateError``: one line, exit 1; see ``main``).

Shutdown comes from ``POST /v1/shutdown``, SIGTERM/SIGINT (``handle_signals``), or EOF on
standard input (``watch_stdin``: the SSH session or the parent that started us went
away). Order: no new workers; every worker stopped in parallel (``POST /v1/shutdown``,
SIGTERM, SIGKILL); then the HTTP server and the service tasks are cancelled; ``hive_stopped``.

Nursery layout: one service nursery holds the HTTP server, the provisioning flights, the
worker watchers, the idle timeout and the shutdown triggers; cancelling it ends them all.
"""

from __future__ import annotations

import math
import os
import signal
import stat
from pathlib import Path

import trio
from hypercorn.trio import serve as hypercorn_serve

from ..http_client import OUR_DAEMONS, async_client
from ..http_common import hypercorn_config
from ..narration import narrate
from ..paths import check_writable, listed_model_dirs, model_dirs, models_dir, rbee_home
from .app import create_app
from .auth import load_token
from .catalog import ModelCatalog
from .childproc import forget_hive, record_hive, stop_stale_hive, sweep_stale_workers
from .config import ACTOR, HiveConfig
from .detect import detect_node
from .provision import Provisioner, rebuild_catalog
from .service import HiveState
from .workers import WorkerRegistry

#: How long open HTTP answers may take to finish once the hive stops.
HTTP_DRAIN_S = 1.0


def stdin_is_attached() -> bool:
    """Standard input is a pipe or socket (a parent or SSH session holds its other end).

    /dev/null, a terminal, a file or a closed fd 0 do not count: their EOF (or lack of
    one) says nothing about whether whoever started us is still there.
    """
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def serve(config: HiveConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the hive until shutdown; ``task_status.started(port)`` once it listens."""
    home = rbee_home()
    check_writable(home)
    token = config.api_token if config.api_token is not None else load_token(None)
    narrate(ACTOR, "hive_start", f"rbee-hive starting (state in {home})", cute="The hive is waking up! 🐝",
            story=f"On this node a hive woke up, keeping its honey in {home}.")
    if config.replace_stale:
        stale = await trio.to_thread.run_sync(stop_stale_hive, home / "run")
        if stale is not None:
            pid, outcome = stale
            narrate(ACTOR, "stale_hive", f"A stale rbee-hive (pid {pid}) from a queen that lost this node was "
                    f"still running here: {outcome}", level="warn", pid=pid, outcome=outcome)
    await trio.to_thread.run_sync(record_hive, home / "run")
    try:
        await _serve_recorded(config, home, token, task_status=task_status)
    finally:
        forget_hive(home / "run")


async def _serve_recorded(config: HiveConfig, home: Path, token: str | None, *,
                          task_status: trio.TaskStatus[int]) -> None:
    _narrate_model_dirs()
    catalog = await _open_catalog(home)
    pid_dir = home / "workers"
    for worker_id, pid, outcome in await trio.to_thread.run_sync(sweep_stale_workers, pid_dir):
        narrate(ACTOR, "stale_worker", f"Stale worker {worker_id} (pid {pid}) from an earlier hive: {outcome}",
                level="warn", worker_id=worker_id, pid=pid, outcome=outcome)
    node = await trio.to_thread.run_sync(detect_node)
    # Workers are plain HTTP on loopback: no TLS setup (see rbee.http_client).
    async with async_client(OUR_DAEMONS) as http, trio.open_nursery() as services:
        workers = WorkerRegistry(config, services, http, pid_dir)
        state = HiveState(config=config, node=node, catalog=catalog, provisioner=Provisioner(catalog, services),
                          workers=workers, nursery=services, api_token=token)
        http_stop, http_done = trio.Event(), trio.Event()
        port = await services.start(_serve_http, state, http_stop, http_done)
        url_host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "localhost") else config.host
        url = f"http://{url_host}:{port}"
        workers.callback_url = f"{url}/v1/workers/ready"
        narrate(ACTOR, "server_bind", f"rbee-hive listening on {url}", port=port, url=url)
        services.start_soon(workers.run_idle_timeout)
        if config.handle_signals:
            services.start_soon(_watch_signals, state.shutdown)
        if config.watch_stdin:
            services.start_soon(_watch_stdin, state.shutdown, config.heartbeat_timeout_s)
        backends = ", ".join(node.get("backends") or [])
        narrate(ACTOR, "hive_ready", f"rbee-hive is ready on {node.get('hostname')} (backends: {backends})", url=url,
                cute=f"The hive on {node.get('hostname')} is open for business! 🍯",
                story=f"The hive on {node.get('hostname')} stood ready, with {backends} to offer.")
        task_status.started(port)
        await state.shutdown.wait()
        state.closing = True
        count = len(workers.list())
        narrate(ACTOR, "hive_shutdown", f"rbee-hive shutting down: stopping {count} worker(s)", workers=count,
                cute=f"Closing the hive: {count} bee(s) to tuck in! 🌙",
                story=f"The hive began to close, and sent its {count} worker(s) to rest.")
        with trio.CancelScope(shield=True):
            await workers.stop_all("the hive is shutting down")
            workers.events.close()  # GET /v1/events ends with [DONE], after every worker's exited
            # Graceful end of HTTP: answers under way (the 202 of POST /v1/shutdown, the
            # [DONE] of narration streams) are written, then the server stops.
            http_stop.set()
            with trio.move_on_after(HTTP_DRAIN_S * 2):
                await http_done.wait()
        services.cancel_scope.cancel()
    narrate(ACTOR, "hive_stopped", "rbee-hive stopped; no worker left", cute="The hive is quiet. 💤",
            story="When the last worker was gone, the hive closed its doors.")


def _narrate_model_dirs() -> None:
    dirs = ", ".join(str(d) for d in model_dirs())
    narrate(ACTOR, "model_dirs", f"file: references are taken from {dirs} (add a folder with RBEE_MODEL_DIRS)")
    for entry in listed_model_dirs()[1]:
        narrate(ACTOR, "model_dirs", f"RBEE_MODEL_DIRS entry {entry!r} is left out: give folders as absolute paths",
                level="warn")


async def _open_catalog(home: Path) -> ModelCatalog:
    """``models.db``; a damaged one is set aside (by ``ModelCatalog``) and the catalog
    rebuilt from the model files under ``$RBEE_HOME/models``, said in one line each."""
    catalog = await trio.to_thread.run_sync(ModelCatalog, home / "models.db")
    if catalog.set_aside is not None:
        root = models_dir()
        narrate(ACTOR, "catalog_damaged", f"models.db could not be read ({catalog.damage}): kept aside as "
                f"{catalog.set_aside.name}; rebuilding the catalog from the model files under {root}",
                level="warn", target=str(catalog.set_aside))
        rebuilt = await trio.to_thread.run_sync(rebuild_catalog, catalog, root)
        names = ", ".join(e.reference for e in rebuilt) or "none"
        narrate(ACTOR, "catalog_rebuilt", f"Catalog rebuilt: {len(rebuilt)} model file(s) registered again ({names});"
                " other models are registered again when next used", models=len(rebuilt))
    return catalog


async def _serve_http(state: HiveState, stop: trio.Event, done: trio.Event, *,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    hc = hypercorn_config(state.config.host, state.config.port, graceful_timeout_s=HTTP_DRAIN_S)
    app = create_app(state)

    async def run(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, hc, shutdown_trigger=stop.wait, task_status=task_status)  # type: ignore[arg-type]

    try:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(run)
            task_status.started(int(bound[0].rsplit(":", 1)[1]))
    finally:
        done.set()


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            narrate(ACTOR, "signal", f"Received {signal.Signals(signum).name}: shutting down")
            shutdown.set()


async def _watch_stdin(shutdown: trio.Event, heartbeat_timeout_s: float) -> None:
    # A dup, so closing our stream never closes fd 0 itself. What arrives on stdin is the
    # queen's heartbeat (its content means nothing); its end, or its silence for
    # ``heartbeat_timeout_s`` when set, means the queen is gone.
    stream = trio.lowlevel.FdStream(os.dup(0))
    async with stream:
        while True:
            with trio.move_on_after(heartbeat_timeout_s if heartbeat_timeout_s > 0 else math.inf) as quiet:
                try:
                    data = await stream.receive_some(4096)
                except (trio.BrokenResourceError, OSError):
                    data = b""
            if quiet.cancelled_caught:
                narrate(ACTOR, "heartbeat_lost", f"Heard no heartbeat from the queen for {heartbeat_timeout_s:g} s "
                        "(the network to it is down, or it is gone): stopping the workers and shutting down",
                        level="warn", timeout_s=heartbeat_timeout_s)
                break
            if not data:
                narrate(ACTOR, "stdin_closed", "Standard input closed (whoever started this hive is gone): shutting down")
                break
    shutdown.set()
