"""``serve(config)``: run one queen until shutdown (``POST /v1/shutdown``, SIGTERM, SIGINT).

Nursery layout (outermost first), which is also the shutdown order:

1. the outer nursery holds the HTTP server and the hive tasks;
2. the job nursery holds every job. Shutdown cancels it first: each job narrates
   ``execute_cancelled`` and its stream ends with ``[DONE]``;
3. after a short drain (so that those ``[DONE]`` reach the clients), the hives are told to
   stop (EOF on stdin; they stop their workers), then the server and the outer nursery end,
   then the asyncio bridge thread stops.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import trio
from hypercorn.trio import serve as hypercorn_serve

from ..errors import BindFailedError
from ..http_client import OUR_DAEMONS, async_client
from ..http_common import hypercorn_config
from ..narration import narrate
from ..paths import check_writable, ensure_dir, rbee_home
from .app import create_app
from .state import QueenState
from .asyncio_bridge import AsyncioBridge
from .hives import HiveManager
from .infer import InferJob
from .jobs import Job, JobRegistry
from .metrics import QueenMetrics, SchedulerSnapshot
from .nodes import NodeRegistry, local_hive_command
from .scheduler import DEFAULT_MAX_QUEUE, DEFAULT_MAX_WORKERS_PER_MODEL, Scheduler
from .ssh import SshLiveness

ACTOR = "queen-rbee"
#: How long finished job streams may take to deliver their last bytes at shutdown.
DRAIN_S = 0.5
#: EH-013b of the original Test-001 spec: a job with no token for 60 s fails.
DEFAULT_STALL_TIMEOUT_S = 60.0
#: What a running job gets to finish when the queen is asked to stop.
DEFAULT_GRACE_PERIOD_S = 30.0


@dataclass
class QueenConfig:
    """How one queen runs; ``port=0`` picks a free port (announced by ``server_bind``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    home: Path | None = None  # RBEE_HOME; None: from the environment
    api_token: str | None = None  # None: RBEE_API_TOKEN from the environment, if set
    local_hive_command: str | None = None  # None: $RBEE_HIVE_COMMAND, else rbee-hive beside our interpreter
    ping_interval_s: float = 15.0
    handle_signals: bool = False  # SIGTERM/SIGINT start a graceful shutdown (the CLI sets it)
    max_queue: int = DEFAULT_MAX_QUEUE  # jobs of one model that may wait for a slot
    max_workers_per_model: int = DEFAULT_MAX_WORKERS_PER_MODEL  # copies of one model per node
    #: A running job whose worker sends no token and no prefill progress for this long
    #: fails (``worker_stalled``) and the worker is killed.
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    #: At shutdown, how long running jobs may go on before they are cancelled.
    grace_period_s: float = DEFAULT_GRACE_PERIOD_S
    #: SSH keep-alives and the hive heartbeat: how a lost node is noticed on both sides.
    liveness: SshLiveness = field(default_factory=SshLiveness)


async def serve(config: QueenConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the queen until it is told to shut down; ``task_status.started(port)`` once bound."""
    home = ensure_dir(config.home) if config.home else rbee_home()
    check_writable(home)  # a read-only or full RBEE_HOME stops the queen here, in one line
    token = config.api_token if config.api_token is not None else (os.environ.get("RBEE_API_TOKEN") or None)
    narrate(ACTOR, "queen_start", f"queen-rbee starting (state in {home})", cute="The queen wakes up! 👑",
            story=f"The queen awoke and opened her court, her records kept in {home}.")
    nodes = NodeRegistry(home / "nodes.db", local_hive_command=local_hive_command(config.local_hive_command),
                         set_aside_damaged=True)
    if nodes.set_aside is not None:
        narrate(ACTOR, "nodes_db_damaged", f"nodes.db could not be read ({nodes.damage}): kept aside as "
                f"{nodes.set_aside.name}, and a new node registry begun; add your nodes again with "
                "`rbee-keeper setup add-node NAME --ssh-host HOST`", level="warn", target=str(nodes.set_aside))
    bridge = AsyncioBridge()
    try:
        # Hives and workers are plain HTTP on loopback (or an SSH forward): no TLS setup.
        async with async_client(OUR_DAEMONS) as http, trio.open_nursery() as outer:
            scheduler = Scheduler(max_queue=config.max_queue, max_workers_per_model=config.max_workers_per_model)
            metrics = QueenMetrics(lambda: SchedulerSnapshot(
                jobs_queued=scheduler.jobs_queued, jobs_running=scheduler.jobs_running,
                slots=scheduler.slot_counts(),
            ))
            hives = HiveManager(outer, bridge, http, home / "run", on_worker_change=scheduler.apply_change,
                                on_hive_gone=scheduler.hive_gone, liveness=config.liveness)

            def finished(job: Job) -> None:
                metrics.job_finished(job.operation, job.state)

            async with trio.open_nursery() as job_nursery:
                jobs = JobRegistry(job_nursery, on_finished=finished)
                infer = InferJob(
                    nodes, hives, http, scheduler, jobs, outer,
                    on_finished=lambda req, node, end, first_token_s: metrics.observe_inference(
                        req.model, node, tokens_out=end.tokens_out, first_token_s=first_token_s,
                        tokens_per_sec=end.tokens_per_sec),
                    on_leased=metrics.observe_queue_wait,
                    stall_timeout_s=config.stall_timeout_s,
                )
                state = QueenState(
                    nodes=nodes,
                    hives=hives,
                    jobs=jobs,
                    http=http,
                    bridge=bridge,
                    scheduler=scheduler,
                    infer=infer,
                    metrics=metrics,
                    api_token=token,
                    ping_interval_s=config.ping_interval_s,
                )
                if config.handle_signals:
                    job_nursery.start_soon(_watch_signals, state.shutdown)
                port = await outer.start(_serve_http, state, config)
                url = f"http://127.0.0.1:{port}" if config.host in ("127.0.0.1", "0.0.0.0", "localhost") else f"http://{config.host}:{port}"
                narrate(ACTOR, "server_bind", f"queen-rbee listening on {url}", port=port, url=url)
                narrate(ACTOR, "queen_ready", "queen-rbee is ready for jobs")
                task_status.started(port)
                await state.shutdown.wait()
                await _drain(state, config.grace_period_s)
                narrate(ACTOR, "queen_shutdown", "queen-rbee shutting down: stopping hives",
                        cute="The queen calls it a day! 👑🌙",
                        story="The queen closed her court and sent the hives to rest.")
                job_nursery.cancel_scope.cancel()
            # Streams being read drop their job once [DONE] is written: wait for that.
            with trio.move_on_after(DRAIN_S):
                while any(job.stream_taken for job in state.jobs.list()):
                    await trio.sleep(0.02)
            with trio.CancelScope(shield=True):
                await hives.stop_all()
            outer.cancel_scope.cancel()
    finally:
        bridge.close()
    narrate(ACTOR, "queen_stopped", "queen-rbee stopped", cute="Good night from the queen! 💤",
            story="And the queen slept.")


async def _drain(state: QueenState, grace_period_s: float) -> None:
    """Refuse new jobs; give the running ones ``grace_period_s`` to finish, then say why
    the rest are cancelled (the caller cancels them)."""
    state.draining = True
    running = [job for job in state.jobs.list() if not job.finished.is_set()]
    if running:
        narrate(ACTOR, "queen_drain", f"queen-rbee stopping: waiting up to {grace_period_s:g} s for "
                f"{len(running)} running job(s) to finish (--grace-period); new jobs are refused",
                jobs=len(running), grace_period_s=grace_period_s)
        with trio.move_on_after(grace_period_s):
            for job in running:
                await job.finished.wait()
    state.jobs.stop_reason = (f"queen-rbee stopped before the job finished (its grace period of "
                              f"{grace_period_s:g} s ran out; --grace-period)")


async def _serve_http(state: QueenState, config: QueenConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    hc = hypercorn_config(config.host, config.port, graceful_timeout_s=DRAIN_S)
    app = create_app(state)

    async def started_port(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await hypercorn_serve(app, hc, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        try:
            bound = await nursery.start(started_port)
        except* OSError as group:  # the port is taken, or the address is not ours: one line
            raise bind_failed(config.host, config.port, group.exceptions[0]) from None
        task_status.started(int(bound[0].rsplit(":", 1)[1]))


def bind_failed(host: str, port: int, error: BaseException) -> BindFailedError:
    """Why the queen cannot listen, with the fix, narrated (level error) and returned."""
    while isinstance(error, BaseExceptionGroup):  # hypercorn's own nurseries wrap it
        error = error.exceptions[0]
    number = getattr(error, "errno", None)
    reason = getattr(error, "strerror", None) or str(error)
    if number == errno.EADDRINUSE:
        fix = f"port {port} is taken: stop what listens there, or pick another port with --port"
    elif number == errno.EACCES:
        fix = f"port {port} needs privileges this user lacks: pick another port with --port"
    elif number in (errno.EADDRNOTAVAIL, getattr(errno, "EAFNOSUPPORT", -1)):
        fix = f"{host} is no address of this machine: check --host"
    else:
        fix = "check --host and --port"
    message = f"cannot listen on {host}:{port} ({reason}); {fix}"
    narrate(ACTOR, "server_bind", message, level="error", port=port)
    return BindFailedError(message)


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            shutdown.set()
