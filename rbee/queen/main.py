"""Entry point of `queen-rbee`: ``queen-rbee [--host 127.0.0.1] [--port 8080]``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cyclopts
import trio

from ..errors import BindFailedError, StateError, single_cause
from .scheduler import DEFAULT_MAX_QUEUE, DEFAULT_MAX_WORKERS_PER_MODEL
from .ssh import SshLiveness
from .server import DEFAULT_GRACE_PERIOD_S, DEFAULT_STALL_TIMEOUT_S, QueenConfig, serve

app = cyclopts.App(name="queen-rbee", help="The rbee orchestrator: node registry, jobs, scheduling.")


@app.default
def run(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    home: Path | None = None,
    ping_interval: float = 15.0,
    max_queue: int | None = None,
    max_workers_per_model: int = DEFAULT_MAX_WORKERS_PER_MODEL,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
    grace_period: float = DEFAULT_GRACE_PERIOD_S,
    ssh_keepalive_interval: float = SshLiveness.keepalive_interval_s,
    ssh_keepalive_count: int = SshLiveness.keepalive_count,
    ssh_connect_timeout: float = SshLiveness.connect_timeout_s,
    hive_heartbeat_timeout: float = SshLiveness.hive_heartbeat_timeout_s,
) -> int:
    """Run the queen until SIGTERM, SIGINT or ``POST /v1/shutdown``.

    Parameters
    ----------
    host
        Address to bind (127.0.0.1 unless you mean to expose it).
    port
        TCP port; 0 picks a free one (announced in the ``server_bind`` narration).
    home
        State directory (default: $RBEE_HOME or ~/.rbee).
    ping_interval
        Seconds of quiet after which a job stream gets a keep-alive ``: ping``.
    max_queue
        Jobs of one model that may wait for a worker slot; more are refused at once with
        503 and Retry-After (default: $RBEE_MAX_QUEUE, else 64).
    max_workers_per_model
        Workers of one model (per node, backend and device) the queen may start; jobs
        beyond their slots wait in the queue.
    stall_timeout
        Seconds a running job's worker may send nothing (no token, no prefill progress)
        before the job fails and the worker is killed. Queue waits, downloads and model
        loads are not counted.
    grace_period
        At shutdown (SIGTERM, ``rbee-keeper queen stop``, ``POST /v1/shutdown``), seconds
        running jobs get to finish before they are cancelled; new jobs are refused at once.
    ssh_keepalive_interval
        Seconds of silence from a node before the queen sends an SSH keep-alive.
    ssh_keepalive_count
        Unanswered keep-alives after which a node is given up: its jobs fail naming it, it
        shows as unreachable, and new jobs go elsewhere until it answers again.
    ssh_connect_timeout
        Seconds an SSH connection to a node may take before the node counts as unreachable.
    hive_heartbeat_timeout
        Seconds a hive started over SSH waits for the queen's heartbeat before it stops its
        workers and exits (a node cut off the network gets no other sign).
    """
    if max_queue is None:
        raw = os.environ.get("RBEE_MAX_QUEUE", "")
        try:
            max_queue = int(raw) if raw.strip() else DEFAULT_MAX_QUEUE
        except ValueError:
            print(f"queen-rbee: RBEE_MAX_QUEUE must be a whole number, not {raw!r}", file=sys.stderr)
            return 2
    if max_queue < 0 or max_workers_per_model < 1:
        print("queen-rbee: --max-queue must be 0 or more and --max-workers-per-model 1 or more", file=sys.stderr)
        return 2
    if not (stall_timeout > 0 and grace_period >= 0):  # also refuses NaN
        print("queen-rbee: --stall-timeout must be above 0 and --grace-period 0 or more", file=sys.stderr)
        return 2
    liveness = SshLiveness(keepalive_interval_s=ssh_keepalive_interval, keepalive_count=ssh_keepalive_count,
                           connect_timeout_s=ssh_connect_timeout, hive_heartbeat_timeout_s=hive_heartbeat_timeout)
    for problem in liveness.problems():
        print(f"queen-rbee: {problem}", file=sys.stderr)
        return 2
    config = QueenConfig(host=host, port=port, home=home, ping_interval_s=ping_interval, handle_signals=True,
                         max_queue=max_queue, max_workers_per_model=max_workers_per_model,
                         stall_timeout_s=stall_timeout, grace_period_s=grace_period, liveness=liveness)
    try:
        trio.run(serve, config)
    except Exception as exc:
        cause = single_cause(exc)
        if not isinstance(cause, (StateError, BindFailedError)):
            raise
        # A read-only or full RBEE_HOME, a port taken: one line naming it and the fix, exit 1.
        print(f"queen-rbee: {cause.message}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `queen-rbee`; returns the process exit code (2 on bad usage)."""
    try:
        result = app(sys.argv[1:] if argv is None else argv, exit_on_error=False, result_action="return_value")
    except cyclopts.CycloptsError:
        return 2
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
