"""Entry point of `llm-worker-rbee`: parse the command line, then ``serve`` (thin).

Exit codes (``rbee.worker.config``): 0 after a requested shutdown (SIGTERM, SIGINT,
``POST /v1/shutdown``), 2 for a bad command line, 3 when the ready callback never
succeeded, 4 when the backend or device is missing, 5 when the model cannot be loaded,
1 for anything else. An expected failure is one line on stderr (and narrated on stdout),
never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import cyclopts
import trio
from cyclopts import Parameter

from ..errors import BackendUnavailableError, ModelLoadError, RbeeError
from ..errors import CallbackError
from .config import (
    ACTOR,
    DEFAULT_CTX_SIZE,
    DEFAULT_PARALLEL,
    EXIT_BACKEND_UNAVAILABLE,
    EXIT_CALLBACK_FAILED,
    EXIT_INTERNAL_ERROR,
    EXIT_MODEL_LOAD_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    WorkerConfig,
)
from ..lifetime import set_parent_death_signal
from .lifecycle import install_early_exit
from .narrator import Narrator

class UsageError(ValueError):
    """A command-line value out of range (exit code 2, one line on stderr)."""


app = cyclopts.App(
    name=ACTOR,
    help="Serve one GGUF model on one device over HTTP/SSE (one rbee worker).",
    version_flags=[],
)


@app.default
def _command(
    *,
    model: Path,
    worker_id: str | None = None,
    port: int = 0,
    backend: Literal["cpu", "cuda", "metal"] = "cpu",
    device: int = 0,
    callback_url: str | None = None,
    api_key: Annotated[str | None, Parameter(env_var="RBEE_WORKER_API_KEY")] = None,
    host: str = "127.0.0.1",
    threads: int | None = None,
    ctx_size: int = DEFAULT_CTX_SIZE,
    parallel: int = DEFAULT_PARALLEL,
    model_ref: str | None = None,
) -> WorkerConfig:
    """Serve one GGUF model on one device over HTTP/SSE (one rbee worker).

    Parameters
    ----------
    model
        Path of the GGUF model file to load.
    worker_id
        This worker's id in narration and in the ready callback (default: worker-PID).
    port
        TCP port to listen on; 0 picks a free one (narrated as server_bind).
    backend
        Where to run the model; a backend this machine lacks fails at once.
    device
        Device index within the backend (ignored for cpu).
    callback_url
        URL to POST {worker_id, url, model_ref, backend, device} to once ready.
    api_key
        Bearer key required on every route but /health and /openapi.json, and sent with the callback.
        Prefer the environment variable: a command line is visible to every local user.
    host
        Address to listen on.
    threads
        CPU threads for prefill and decode (default: every CPU this process may use).
    ctx_size
        Context size in tokens of ONE stream (its prompt plus generated tokens); the KV
        cache holds ctx-size x parallel tokens.
    parallel
        Streams served at once from one copy of the model (slots; continuous batching).
    model_ref
        The model reference reported in the callback (default: file:MODELPATH).
    """
    problems = []
    if not 0 <= port <= 65535:
        problems.append(f"--port must be 0..65535, not {port}")
    if device < 0:
        problems.append(f"--device must be 0 or more, not {device}")
    if threads is not None and threads < 1:
        problems.append(f"--threads must be 1 or more, not {threads}")
    if ctx_size < 16:
        problems.append(f"--ctx-size must be 16 or more, not {ctx_size}")
    if not 1 <= parallel <= 256:
        problems.append(f"--parallel must be 1..256, not {parallel}")
    if worker_id is not None and not worker_id.strip():
        problems.append("--worker-id must not be empty")
    if problems:
        raise UsageError("; ".join(problems))
    return WorkerConfig(
        model_path=model,
        worker_id=worker_id or f"worker-{os.getpid()}",
        port=port,
        host=host,
        backend=backend,
        device=device,
        callback_url=callback_url,
        api_key=api_key or None,
        threads=threads,
        ctx_size=ctx_size,
        parallel=parallel,
        model_ref=model_ref,
    )


_EXIT_CODES: list[tuple[type[RbeeError], int]] = [
    (CallbackError, EXIT_CALLBACK_FAILED),
    (BackendUnavailableError, EXIT_BACKEND_UNAVAILABLE),
    (ModelLoadError, EXIT_MODEL_LOAD_FAILED),
]


def exit_code_for(error: RbeeError) -> int:
    """The exit code for a failure ``serve`` raised."""
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return code
    return EXIT_INTERNAL_ERROR


def run(config: WorkerConfig) -> int:
    """Serve ``config`` in this process until it is shut down; returns the exit code."""
    from .server import serve

    install_early_exit()
    set_parent_death_signal()
    say = Narrator(config.worker_id)
    try:
        trio.run(serve, config)
    except RbeeError as exc:
        code = exit_code_for(exc)
        print(f"{ACTOR}: {exc.message}", file=sys.stderr, flush=True)
        say("exiting", f"Exiting with code {code}: {exc.message}", level="error", exit_code=code)
        return code
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        say("exiting", "Interrupted during startup", exit_code=130)
        return 130
    say("exiting", "Exiting", exit_code=EXIT_OK, cute="Bye! 🐝", story="And the worker went to sleep. 💤")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run `llm-worker-rbee`; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, bound, _ = app.parse_args(argv, exit_on_error=False, print_error=False)
        config = command(*bound.args, **bound.kwargs)
    except (cyclopts.CycloptsError, UsageError) as exc:
        message = " ".join(str(exc).split())
        print(f"{ACTOR}: {message} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(config, WorkerConfig):  # --help printed the usage
        return EXIT_OK
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
