"""Entry point of `rbee-hive`: ``rbee-hive daemon [--port 9200]`` and ``rbee-hive detect``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cyclopts
import trio

from ..errors import RbeeError, StateError, single_cause
from .config import ACTOR, HiveConfig, idle_timeout_from_env, worker_parallel_from_env

app = cyclopts.App(name="rbee-hive", help="The rbee pool manager of one node: models, preflight, workers.",
                   version_flags=[])


@app.command
def daemon(
    *,
    host: str = "127.0.0.1",
    port: int = 9200,
    token_file: Path | None = None,
    watch_stdin: bool | None = None,
    worker_parallel: int | None = None,
    heartbeat_timeout: float = 0.0,
    replace_stale: bool = False,
) -> int:
    """Run the hive until SIGTERM, SIGINT, ``POST /v1/shutdown`` or the end of its stdin.

    Parameters
    ----------
    host
        Address to bind (127.0.0.1 unless you mean to expose it).
    port
        TCP port; 0 picks a free one (announced in the ``server_bind`` narration).
    token_file
        File holding the bearer token every route but health needs (default: $RBEE_API_TOKEN, if set).
    watch_stdin
        Shut down when standard input ends. Default: only when stdin is a pipe or socket
        (started by the queen or over SSH); /dev/null or a terminal is not watched.
    worker_parallel
        Slots (streams served at once) of a worker whose spawn request has no ``parallel``
        (default: $RBEE_WORKER_PARALLEL, else 4). Each slot holds up to the worker's ctx_size tokens.
    heartbeat_timeout
        With stdin watched: seconds without a line on stdin (the queen's heartbeat) after
        which the hive stops its workers and exits; 0: only stdin's end counts. The queen
        sets it for hives it starts over SSH.
    replace_stale
        Stop a live rbee-hive recorded in $RBEE_HOME/run/hive.pid first (left by a queen
        that lost this node). The queen sets it for hives it starts over SSH.
    """
    from .auth import load_token
    from .detect import detect_override
    from .server import serve, stdin_is_attached

    if not heartbeat_timeout >= 0:  # also refuses NaN
        print("rbee-hive: --heartbeat-timeout must be 0 (off) or more seconds", file=sys.stderr)
        return 2
    try:
        config = HiveConfig(
            host=host, port=port, api_token=load_token(token_file),
            watch_stdin=stdin_is_attached() if watch_stdin is None else watch_stdin,
            heartbeat_timeout_s=heartbeat_timeout, replace_stale=replace_stale,
            handle_signals=True, idle_timeout_s=idle_timeout_from_env(),
            worker_parallel=worker_parallel_from_env() if worker_parallel is None else worker_parallel,
        )
        detect_override()  # a malformed RBEE_DETECT_OVERRIDE stops the hive here, in one line
    except (RbeeError, ValueError) as exc:
        print(f"rbee-hive: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    try:
        trio.run(serve, config)
    except Exception as exc:
        cause = single_cause(exc)
        if not isinstance(cause, StateError):
            raise
        return _state_fault(cause)
    return 0


def _state_fault(exc: StateError) -> int:
    """A state directory that cannot be used (read-only, full): one line on stderr for a
    person, and the same as narration on stdout for the queen that reads it; exit 1."""
    from ..narration import narrate

    narrate(ACTOR, "hive_failed", exc.message, level="error")
    print(f"rbee-hive: {exc.message}", file=sys.stderr)
    return 1


@app.command
def detect() -> int:
    """Print this node's backends, devices (with memory) and free disk as JSON."""
    from .detect import detect_node

    try:
        print(json.dumps(detect_node(), indent=2))
    except StateError as exc:
        print(f"rbee-hive: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a malformed RBEE_DETECT_OVERRIDE
        print(f"rbee-hive: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `rbee-hive`; returns the process exit code (2 on bad usage)."""
    try:
        result = app(sys.argv[1:] if argv is None else argv, exit_on_error=False, result_action="return_value")
    except cyclopts.CycloptsError:
        return 2  # cyclopts has printed what is wrong
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
