"""Entry point of `rbee-keeper`, the user's CLI (cyclopts).

Exit codes: 0 ok, 1 the job (or command) failed, 2 bad usage, 130 Ctrl-C.
Every error is one line on stderr naming the cause and the fix, never a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import cyclopts

from ..errors import InvalidRequestError, NotFoundError, RbeeError, StateError, single_cause
from ..requests import parse_infer_request
from .exit_codes import EXIT_CANCELLED, EXIT_JOB_FAILED, EXIT_USAGE


class _Deferred:
    """A module imported when first used: trio, httpx and the narration renderer take
    ~0.35 s to import, and a command line refused before any work must answer at once."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


trio = _Deferred("trio")
admin = _Deferred("rbee.keeper.admin")


def Output(mode: str = "human") -> Any:  # noqa: N802 (stands for the class, imported late)
    """The keeper's output streams, ``output.Output``."""
    from .output import Output as _Output

    return _Output(mode)


async def run_job(request: dict[str, Any], out: Any) -> int:
    """``run_job.run_job``: run ``request`` to the end on a queen."""
    from .run_job import run_job as _run_job

    return await _run_job(request, out)


NarrationMode = Literal["human", "cute", "story", "json", "quiet"]

app = cyclopts.App(name="rbee-keeper", help="Drive an rbee cluster from one shell.")
queen_app = cyclopts.App(name="queen", help="Run a persistent queen-rbee.")
setup_app = cyclopts.App(name="setup", help="The node registry.")
workers_app = cyclopts.App(name="workers", help="Workers on the running hives.")
models_app = cyclopts.App(name="models", help="Models on a node.")
for sub in (queen_app, setup_app, workers_app, models_app):
    app.command(sub)


def _run(fn: Callable[..., Any], *args: Any, mode: str = "human") -> int:
    out = Output(mode)
    try:
        if inspect.iscoroutinefunction(fn):
            return trio.run(fn, out, *args)
        return fn(out, *args)
    except Exception as exc:
        # A nursery's group of one is its cause: the user reads that, never the group.
        cause = single_cause(exc)
        if isinstance(cause, RbeeError):
            out.error(admin.one_line(cause))
        elif isinstance(cause, OSError):
            out.error(f"{cause.strerror or cause}: {getattr(cause, 'filename', '') or ''}".rstrip(": "))
        else:
            raise
        return EXIT_JOB_FAILED


@app.command
def infer(
    *,
    node: str | None = None,
    model: str,
    prompt: Annotated[str | None, cyclopts.Parameter(allow_leading_hyphen=True)] = None,
    chat: bool = False,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repeat_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    backend: str | None = None,
    device: int | None = None,
    narration: NarrationMode = "human",
) -> int:
    """Generate text on a node: tokens to stdout, narration to stderr.

    Parameters
    ----------
    node
        The node to run on (``localhost``, or one added with ``setup add-node``);
        absent: the queen places the job.
    model
        Model reference: ``gemma3-270m``, ``hf:org/repo[:QUANT]``, ``file:/abs/path.gguf``
        (a file under ``$RBEE_HOME/models``, the Hugging Face cache or a folder in ``RBEE_MODEL_DIRS``).
    prompt
        The prompt text; ``-`` reads it from stdin (all of it, UTF-8). Absent: read from
        stdin when stdin is not a terminal (``echo hi | rbee-keeper infer ...``).
    chat
        Wrap the prompt in the model's chat template, as one user message.
    max_tokens
        Stop after this many tokens (absent: the request default, docs/requests.md).
    temperature
        Sampling temperature (0 = greedy).
    top_p
        Nucleus sampling threshold.
    top_k
        Sample from the k most likely tokens.
    min_p
        Minimum probability relative to the most likely token.
    repeat_penalty
        Penalty for repeated tokens.
    seed
        Random seed, for repeatable output.
    stop
        Stop sequences.
    backend
        cpu, cuda or metal (default: the node's best).
    device
        Device index for the backend.
    narration
        How narration is shown on stderr.
    """
    try:
        from_stdin = prompt_from_stdin(prompt, sys.stdin)
    except PromptUsageError as exc:
        return _refuse(str(exc), EXIT_USAGE)
    # A prompt from stdin is read once the rest of the command line passed (a typo is
    # refused before anyone types or pipes a long prompt); a stand-in meanwhile.
    request: dict[str, Any] = {"operation": "infer", "model": model, "prompt": "stdin" if from_stdin else prompt}
    if chat:
        request["chat"] = True
    optional = {
        "node": node, "max_tokens": max_tokens,
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
        "repeat_penalty": repeat_penalty, "seed": seed, "stop": stop, "backend": backend, "device": device,
    }
    request.update({k: v for k, v in optional.items() if v is not None})
    # Refuse a bad request before anything is started or contacted (absent fields are
    # left out: the queen applies the same defaults).
    try:
        parse_infer_request(request)
    except InvalidRequestError as exc:
        return _refuse(exc.message, EXIT_USAGE)
    if node is not None and (unknown := _unknown_node(node)):
        return _refuse(unknown, EXIT_JOB_FAILED)
    if from_stdin:
        try:
            request["prompt"] = read_prompt(sys.stdin)
            parse_infer_request(request)  # an empty stdin is an empty prompt
        except PromptUsageError as exc:
            return _refuse(str(exc), EXIT_USAGE)
        except InvalidRequestError as exc:
            return _refuse(exc.message, EXIT_USAGE)
    if unusable := _unusable_home():
        return _refuse(unusable, EXIT_JOB_FAILED)
    return trio.run(run_job, request, Output(narration))


@app.command(name="chat")
def chat(
    *,
    model: str,
    node: str | None = None,
    system: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    narration: NarrationMode | None = None,
) -> int:
    """Chat with a model, turn after turn (like `ollama run`): answers to stdout.

    Type a line at ">>> ": the whole conversation goes to the model, its answer streams
    back and is remembered. Ctrl-C stops an answer (that question is forgotten too) or
    clears the line; /clear forgets the conversation; Ctrl-D or /bye leaves. Narration
    goes to stderr: the first turn shows what it takes (queen, model load), later ones
    only errors unless --narration is given.

    Parameters
    ----------
    model
        Model reference: ``gemma3-270m``, ``hf:org/repo[:QUANT]``, ``file:/abs/path.gguf``
        (a file under ``$RBEE_HOME/models``, the Hugging Face cache or a folder in ``RBEE_MODEL_DIRS``).
    node
        The node to run on; absent: the queen places each turn.
    system
        A system message that opens the conversation.
    max_tokens
        Stop each answer after this many tokens (absent: the request default).
    temperature
        Sampling temperature (0 = greedy).
    seed
        Random seed, for repeatable answers.
    narration
        How narration is shown on stderr (absent: human for the first turn, then quiet).
    """
    base: dict[str, Any] = {"operation": "infer", "model": model}
    optional = {"node": node, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    base.update({k: v for k, v in optional.items() if v is not None})
    # Refuse a bad request before anything is started: checked with a stand-in question.
    probe = [{"role": "system", "content": system}] if system is not None else []
    try:
        parse_infer_request({**base, "messages": [*probe, {"role": "user", "content": "hi"}]})
    except InvalidRequestError as exc:
        return _refuse(exc.message, EXIT_USAGE)
    if node is not None and (unknown := _unknown_node(node)):
        return _refuse(unknown, EXIT_JOB_FAILED)
    if unusable := _unusable_home():
        return _refuse(unusable, EXIT_JOB_FAILED)
    from .chat import run_chat

    return run_chat(base, system, narration)


class PromptUsageError(Exception):
    """No prompt to be had (a usage error: exit 2); the message says what to do."""


#: What ``infer`` says when it has no prompt and stdin is a terminal.
NO_PROMPT = "no prompt: pass --prompt TEXT, or pipe one into stdin (--prompt - reads stdin)"


def prompt_from_stdin(prompt: str | None, stdin: Any) -> bool:
    """Whether ``infer``'s prompt is to be read from stdin: for ``--prompt -``, or with no
    ``--prompt`` when stdin is not a terminal. ``PromptUsageError`` with no ``--prompt``
    and stdin a terminal (or closed): we do not wait for a prompt nobody was asked for."""
    if prompt == "-":
        return True
    if prompt is not None:
        return False
    if stdin is None or stdin.isatty():
        raise PromptUsageError(NO_PROMPT)
    return True


def read_prompt(stdin: Any) -> str:
    """All of stdin as UTF-8 text, trailing newlines dropped as the shell's ``$(...)``
    drops them (``echo hi |`` sends ``hi``); ``PromptUsageError`` if it is not UTF-8."""
    if stdin is None:
        raise PromptUsageError(NO_PROMPT)
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read()
    if isinstance(data, str):
        return data.rstrip("\r\n")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise PromptUsageError(f"the prompt on stdin is not UTF-8 text (byte {exc.start}); pipe UTF-8") from None


def _refuse(message: str, code: int) -> int:
    """One error line on stderr, as ``Output.error`` writes it (without importing it)."""
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    return code


def _unknown_node(name: str) -> str | None:
    """Why ``--node name`` cannot run, when no queen runs and the node registry on disk
    does not know it (the ephemeral queen would read the same registry); else None.

    A running queen has its own registry (maybe on another machine): it decides.
    """
    import sqlite3

    from ..paths import rbee_home
    from ..queen.nodes import LOCALHOST, NodeRegistry

    if name == LOCALHOST:
        return None  # built in
    try:
        NodeRegistry(rbee_home() / "nodes.db").get(name)
        return None
    except NotFoundError as exc:
        missing = exc.message
    except (OSError, sqlite3.Error, StateError):
        return None  # an unreadable registry, or none to be had: the queen (or _unusable_home) says so
    from .queen_control import find_queen

    return None if trio.run(find_queen) is not None else missing


def _unusable_home() -> str | None:
    """Why no ephemeral queen could run here (``RBEE_HOME`` cannot be written: read-only,
    full, not a folder) when no queen runs to take the job; else None. Asked before
    anything starts, so that the answer is one line rather than a failed job."""
    from ..paths import check_writable, rbee_home

    try:
        check_writable(rbee_home())
        return None
    except StateError as exc:
        problem = exc.message
    from .queen_control import find_queen

    return None if trio.run(find_queen) is not None else problem


# -- queen --------------------------------------------------------------------------------


@queen_app.command(name="start")
def queen_start(*, port: int | None = None, host: str = "127.0.0.1") -> int:
    """Start a persistent queen-rbee (default port: the one of RBEE_QUEEN_URL, 8080)."""
    return _run(admin.queen_start, port, host)


@queen_app.command(name="stop")
def queen_stop() -> int:
    """Stop the persistent queen-rbee (it stops its hives and their workers)."""
    return _run(admin.queen_stop)


@queen_app.command(name="status")
def queen_status() -> int:
    """Print whether a queen-rbee answers (exit 0) or not (exit 1)."""
    return _run(admin.queen_status)


# -- setup --------------------------------------------------------------------------------


@setup_app.command(name="add-node")
def add_node(
    name: str,
    *,
    ssh_host: str,
    ssh_port: int = 22,
    ssh_user: str | None = None,
    ssh_key: Path | None = None,
    rbee_hive_command: str = "rbee-hive",
    hive_port: int = 0,
) -> int:
    """Add a node reached over SSH; the queen tests it first (`rbee-hive detect` there).

    Parameters
    ----------
    name
        The node's name (used with ``--node``).
    ssh_host
        Host name or address for SSH.
    ssh_port
        SSH port.
    ssh_user
        SSH user (default: yours).
    ssh_key
        Private key file (default: your agent and ~/.ssh keys).
    rbee_hive_command
        The command that runs rbee-hive on the node (a full path, possibly after ``env VAR=...``).
    hive_port
        Port for the hive on the node (0: it picks one).
    """
    body = {
        "name": name, "ssh_host": ssh_host, "ssh_port": ssh_port, "ssh_user": ssh_user,
        "ssh_key": str(ssh_key.expanduser().resolve()) if ssh_key else None,
        "rbee_hive_command": rbee_hive_command, "hive_port": hive_port,
    }
    return _run(admin.add_node, body)


@setup_app.command(name="list-nodes")
def list_nodes() -> int:
    """List the nodes (name, SSH target, hive command)."""
    return _run(admin.list_nodes)


@setup_app.command(name="remove-node")
def remove_node(name: str) -> int:
    """Forget a node."""
    return _run(admin.remove_node, name)


# -- workers ------------------------------------------------------------------------------


@workers_app.command(name="list")
def workers_list() -> int:
    """List the workers of every running hive."""
    return _run(admin.list_workers)


@workers_app.command(name="health")
def workers_health() -> int:
    """Like list; exit 1 if a worker is in error."""
    return _run(admin.workers_health)


@workers_app.command(name="shutdown")
def workers_shutdown(*, node: str | None = None, worker_id: str | None = None) -> int:
    """Shut workers down (all, one node's, or one)."""
    return _run(admin.shutdown_workers, node, worker_id)


@app.command(name="ps")
def ps() -> int:
    """Show the loaded workers, one row per worker (like `ollama ps`).

    UNTIL says when an idle worker will be unloaded; "in use" while a slot is busy,
    "Forever" when its hive never unloads. With no queen running: a note, exit 0.
    """
    return _run(admin.ps)


# -- models -------------------------------------------------------------------------------


@models_app.command(name="list")
def models_list(*, node: str = "localhost") -> int:
    """List the models on a node."""
    return _run(admin.list_models, node)


@models_app.command(name="download")
def models_download(model: str, *, node: str = "localhost", narration: NarrationMode = "human") -> int:
    """Download a model onto a node (with a progress bar).

    Parameters
    ----------
    model
        Model reference (``hf:org/repo[:QUANT]``, ``gemma3-270m`` ...).
    node
        The node to download onto.
    narration
        How narration is shown on stderr.
    """
    return trio.run(run_job, {"operation": "download", "node": node, "model": model}, Output(narration))


def main(argv: list[str] | None = None) -> int:
    """Run `rbee-keeper`; returns the process exit code."""
    tokens = sys.argv[1:] if argv is None else argv
    try:
        result = app(tokens, exit_on_error=False, result_action="return_value")
    except cyclopts.CycloptsError:
        return EXIT_USAGE  # cyclopts has printed what was wrong
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
