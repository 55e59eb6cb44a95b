"""The commands of `rbee-keeper`, the user's CLI (cyclopts). The console script is
``entry.py``: it handles Ctrl-C and ``--version`` before this module is imported.

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

from .. import __version__
from ..errors import InvalidRequestError, NotFoundError, RbeeError, StateError, single_cause
from .exit_codes import EXIT_CANCELLED, EXIT_JOB_FAILED, EXIT_USAGE
from .help_text import request_default, use_plain_help


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

# Plain-text help: markdown would import markdown-it (~65 ms of a --help that should take
# well under 0.3 s); so the docstrings here are plain text, no ``code`` markup. The
# version is the package's own (rbee/__init__.py), as entry.py prints it for --version.
app = cyclopts.App(
    name="rbee-keeper", help="Drive an rbee cluster from one shell.", version=__version__, help_format="plaintext",
)
queen_app = cyclopts.App(name="queen", help="Run a persistent queen-rbee.")
setup_app = cyclopts.App(name="setup", help="The node registry.")
workers_app = cyclopts.App(name="workers", help="Workers on the running hives.")
models_app = cyclopts.App(name="models", help="Models on a node.")
for sub in (queen_app, setup_app, workers_app, models_app):
    app.command(sub)


def _shown(default: str) -> cyclopts.Parameter:
    """The help's ``[default: ...]`` of an option whose absence means ``default``."""
    return cyclopts.Parameter(show_default=default)


def _request(field: str) -> cyclopts.Parameter:
    """An option left out of the request when absent: the help shows the request's default."""
    return cyclopts.Parameter(show_default=request_default(field))


#: ``--stop``: one sequence per flag, repeated for more (``--stop x --stop y``); the help
#: says ``--stop TEXT``, not cyclopts' ``STR...`` (``--stop x y`` is refused: ``y`` is
#: left over), and there is no ``--empty-stop``. A sequence may start with a hyphen.
STOP = cyclopts.Parameter(metavar="TEXT", negative="", allow_leading_hyphen=True, show_default="none")


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
    node: Annotated[str | None, _shown("the queen places the job")] = None,
    model: str,
    prompt: Annotated[str | None, cyclopts.Parameter(allow_leading_hyphen=True, show_default="stdin, if not a terminal")] = None,
    chat: bool = False,
    max_tokens: Annotated[int | None, _request("max_tokens")] = None,
    temperature: Annotated[float | None, _request("temperature")] = None,
    top_p: Annotated[float | None, _request("top_p")] = None,
    top_k: Annotated[int | None, _request("top_k")] = None,
    min_p: Annotated[float | None, _request("min_p")] = None,
    repeat_penalty: Annotated[float | None, _request("repeat_penalty")] = None,
    seed: Annotated[int | None, _shown("random")] = None,
    stop: Annotated[list[str] | None, STOP] = None,
    backend: Annotated[str | None, _shown("the node's best")] = None,
    device: Annotated[int | None, _shown("0")] = None,
    narration: NarrationMode = "human",
) -> int:
    """Generate text on a node: tokens to stdout, narration to stderr.

    Parameters
    ----------
    node
        The node to run on (``localhost``, or one added with ``setup add-node``).
    model
        Model reference: ``gemma3-270m``, ``hf:org/repo[:QUANT]``, ``file:/abs/path.gguf``
        (a file under ``$RBEE_HOME/models``, the Hugging Face cache or a folder in ``RBEE_MODEL_DIRS``).
    prompt
        The prompt text; ``-`` reads it from stdin (all of it, UTF-8), and so does leaving
        it out when stdin is not a terminal (``echo hi | rbee-keeper infer ...``).
    chat
        Wrap the prompt in the model's chat template, as one user message.
    max_tokens
        Stop after this many tokens.
    temperature
        Sampling temperature; 0 is greedy (always the most likely token).
    top_p
        Nucleus sampling: keep the most likely tokens up to this total probability.
    top_k
        Sample from the k most likely tokens; 0 is off.
    min_p
        Drop tokens less likely than this fraction of the most likely one; 0 is off.
    repeat_penalty
        Penalty for repeating recent tokens; 1.0 is off.
    seed
        Random seed, for repeatable output.
    stop
        A stop sequence: generation stops where it would appear (not printed). Repeat the
        flag for more: ``--stop "User:" --stop "###"``.
    backend
        cpu, cuda or metal.
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
    # left out: the queen applies the same defaults). Imported here: --help need not.
    from ..requests import parse_infer_request

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
    node: Annotated[str | None, _shown("the queen places each turn")] = None,
    system: Annotated[str | None, _shown("none")] = None,
    max_tokens: Annotated[int | None, _request("max_tokens")] = None,
    temperature: Annotated[float | None, _request("temperature")] = None,
    seed: Annotated[int | None, _shown("random")] = None,
    narration: Annotated[NarrationMode | None, _shown("human for the first turn, then quiet")] = None,
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
        The node to run on (``localhost``, or one added with ``setup add-node``).
    system
        A system message that opens the conversation.
    max_tokens
        Stop each answer after this many tokens.
    temperature
        Sampling temperature; 0 is greedy (always the most likely token).
    seed
        Random seed, for repeatable answers.
    narration
        How narration is shown on stderr (given: for every turn).
    """
    base: dict[str, Any] = {"operation": "infer", "model": model}
    optional = {"node": node, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    base.update({k: v for k, v in optional.items() if v is not None})
    # Refuse a bad request before anything is started: checked with a stand-in question.
    from ..requests import parse_infer_request

    probe = [{"role": "system", "content": system}] if system is not None else []
    try:
        parse_infer_request({**base, "messages": [*probe, {"role": "user", "content": "hi"}]})
    except InvalidRequestError as exc:
        return _refuse(exc.message, EXIT_USAGE)
    if cannot := _cannot_run(node):
        return _refuse(cannot, EXIT_JOB_FAILED)
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
    return _unless_a_queen_runs(missing)


def _cannot_run(node: str | None) -> str | None:
    """Why a job on ``node`` cannot run, known before anything starts: a node the registry
    lacks, or an RBEE_HOME no ephemeral queen could use (each only when no queen runs)."""
    if node is not None and (unknown := _unknown_node(node)):
        return unknown
    return _unusable_home()


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
    return _unless_a_queen_runs(problem)


def _unless_a_queen_runs(problem: str) -> str | None:
    """``problem``, unless a queen runs (it decides then). Something at RBEE_QUEEN_URL
    that is not a queen is the problem instead: its one line, naming the URL."""
    from .queen_control import find_queen

    try:
        return None if trio.run(find_queen) is not None else problem
    except RbeeError as exc:
        return exc.message


# -- queen --------------------------------------------------------------------------------


@queen_app.command(name="start")
def queen_start(
    *,
    port: Annotated[int | None, _shown("the port of RBEE_QUEEN_URL, else 8080")] = None,
    host: str = "127.0.0.1",
) -> int:
    """Start a persistent queen-rbee, detached: it outlives this shell until ``queen stop``.

    Parameters
    ----------
    port
        The port the queen listens on.
    host
        The address the queen listens on (``0.0.0.0``: every interface; then set
        ``RBEE_API_TOKEN``, as anyone who reaches the port can use the cluster).
    """
    return _run(admin.queen_start, port, host)


@queen_app.command(name="stop")
def queen_stop() -> int:
    """Stop the persistent queen-rbee (it stops its hives and their workers)."""
    return _run(admin.queen_stop)


#: --json on every listing: one JSON document on stdout instead of the table, for programs.
JSON_FLAG = cyclopts.Parameter(name="--json", negative="", help="Print one JSON document instead of the table.")


@queen_app.command(name="status")
def queen_status(*, as_json: Annotated[bool, JSON_FLAG] = False) -> int:
    """Show the queen the other commands would use: URL, PID, version, uptime (exit 0), or
    that none runs (exit 1). Anything else answering at RBEE_QUEEN_URL is an error."""
    return _run(admin.queen_status, as_json)


# -- setup --------------------------------------------------------------------------------


@setup_app.command(name="add-node")
def add_node(
    name: str,
    *,
    ssh_host: str,
    ssh_port: int = 22,
    ssh_user: Annotated[str | None, _shown("your user name")] = None,
    ssh_key: Annotated[Path | None, _shown("your SSH agent and ~/.ssh keys")] = None,
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
        SSH user.
    ssh_key
        Private key file.
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
    from ..queen.nodes import LOCALHOST, LOCALHOST_RESERVED

    if name == LOCALHOST:  # said before any queen is contacted or started
        return _refuse(LOCALHOST_RESERVED, EXIT_USAGE)
    return _run(admin.add_node, body)


@setup_app.command(name="list-nodes")
def list_nodes(*, as_json: Annotated[bool, JSON_FLAG] = False) -> int:
    """List the nodes: name, SSH target, hive command, backends, when added.

    With no queen running it reads the node registry itself and starts nothing."""
    return _run(admin.list_nodes, as_json)


@setup_app.command(name="remove-node")
def remove_node(name: str) -> int:
    """Forget a node added with setup add-node.

    Parameters
    ----------
    name
        The node's name, as ``setup list-nodes`` shows it.
    """
    return _run(admin.remove_node, name)


# -- workers ------------------------------------------------------------------------------


@workers_app.command(name="list")
def workers_list(*, as_json: Annotated[bool, JSON_FLAG] = False) -> int:
    """The loaded workers: the same as rbee-keeper ps."""
    return _run(admin.list_workers, as_json)


@workers_app.command(name="health")
def workers_health(*, as_json: Annotated[bool, JSON_FLAG] = False) -> int:
    """Like ps; exit 1 if a worker is in error."""
    return _run(admin.workers_health, as_json)


@workers_app.command(name="shutdown")
def workers_shutdown(
    *,
    node: Annotated[str | None, _shown("every node")] = None,
    worker_id: Annotated[str | None, _shown("every worker")] = None,
) -> int:
    """Shut workers down (all, one node's, or one).

    Parameters
    ----------
    node
        Only the workers on this node.
    worker_id
        Only this worker (its id, as ``ps`` shows it).
    """
    return _run(admin.shutdown_workers, node, worker_id)


@app.command(name="ps")
def ps(*, as_json: Annotated[bool, JSON_FLAG] = False) -> int:
    """Show the loaded workers, one row per worker (like `ollama ps`).

    UNTIL says when an idle worker will be unloaded; "in use" while a slot is busy,
    "Forever" when its hive never unloads. No worker, or no queen running: a note on
    stderr, exit 0 (and nothing is started).
    """
    return _run(admin.ps, as_json)


# -- the cluster at a glance, and a benchmark ---------------------------------------------


@app.command(name="status")
def status(*, as_json: Annotated[bool, JSON_FLAG] = False) -> int:
    """Show the cluster at a glance: per node whether it is reachable, whether its hive is
    up, its backends and devices, free memory, workers and models on disk.

    Asks the running queen (which asks its running hives, starting none). With no queen
    running it reads the node registry itself and starts nothing: every hive is down then,
    and whether a node is reachable is unknown.
    """
    return _run(admin.cluster_status, as_json)


def _bench_default(name: str, **settings: Any) -> cyclopts.Parameter:
    """A bench option whose absence means bench.py's default, shown in the help (bench.py
    is read only when a help page is drawn or the bench runs)."""

    def show(_absent: Any) -> str:
        from . import bench

        return str(getattr(bench, name))

    return cyclopts.Parameter(show_default=show, **settings)


@app.command(name="bench")
def bench(
    *,
    node: Annotated[str | None, _shown("localhost")] = None,
    all_nodes: Annotated[bool, cyclopts.Parameter(name="--all", negative="")] = False,
    model: Annotated[str | None, _bench_default("DEFAULT_MODEL")] = None,
    max_tokens: Annotated[int | None, _bench_default("DEFAULT_MAX_TOKENS")] = None,
    prompt: Annotated[str | None, _bench_default("DEFAULT_PROMPT", allow_leading_hyphen=True)] = None,
    as_json: Annotated[bool, JSON_FLAG] = False,
) -> int:
    """Measure time to first token and tokens per second per node, end to end (keeper ->
    queen -> hive -> worker and back), as a table.

    Nodes run one after another. Each gets a warm-up job of one token first (the first job
    on a node starts its hive and loads the model: WARM-UP shows how long that took), then
    the measured job: temperature 0, a fixed seed, no prompt cache. TTFT is submit to first
    token as this keeper sees it; TOK/S the tokens after the first over the time from first
    to last token; WORKER TTFT and WORKER TOK/S are the worker's own figures. A node that
    fails shows its error in its row (the others still run) and the exit is 1. With no
    queen running, one is started for the bench and stopped after it.

    Parameters
    ----------
    node
        The node to measure (localhost, or one added with setup add-node).
    all_nodes
        Measure every node of the registry, localhost included, one after another.
    model
        Model reference: gemma3-270m, hf:org/repo[:QUANT], file:/abs/path.gguf.
    max_tokens
        Tokens of the measured job.
    prompt
        The prompt of both jobs.
    """
    from . import bench as bench_module
    from ..queen.nodes import LOCALHOST
    from ..requests import parse_infer_request

    if node is not None and all_nodes:
        return _refuse("choose --node N or --all, not both", EXIT_USAGE)
    model = bench_module.DEFAULT_MODEL if model is None else model
    prompt = bench_module.DEFAULT_PROMPT if prompt is None else prompt
    max_tokens = bench_module.DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    try:  # a bad request is refused before anything is started or contacted
        parse_infer_request(bench_module.bench_request(node or LOCALHOST, model, prompt, max_tokens))
    except InvalidRequestError as exc:
        return _refuse(exc.message, EXIT_USAGE)
    if cannot := _cannot_run(node):
        return _refuse(cannot, EXIT_JOB_FAILED)
    return _run(bench_module.bench, node or LOCALHOST, all_nodes, model, prompt, max_tokens, as_json)


# -- models -------------------------------------------------------------------------------


@models_app.command(name="list")
def models_list(*, node: str = "localhost", as_json: Annotated[bool, JSON_FLAG] = False) -> int:
    """List the models on a node: size, sha256, when added and last used, where.

    With no queen running, localhost's catalog is read here: nothing is started.

    Parameters
    ----------
    node
        The node whose models to list.
    """
    return _run(admin.list_models, node, as_json)


@models_app.command(name="rm")
def models_rm(model: str, *, node: str = "localhost") -> int:
    """Remove a model from a node: its catalog entry, and its file when rbee downloaded
    or assembled it (a file: model's file is yours and stays). Refused while a worker
    has the model loaded (rbee-keeper workers shutdown first).

    Parameters
    ----------
    model
        The model, as models list shows it or as you asked for it (hf:org/repo, gemma3-270m ...).
    node
        The node to remove it from.
    """
    return _run(admin.remove_model, model, node)


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


# -- shell completion ---------------------------------------------------------------------


@app.command(name="completion")
def completion(shell: Literal["bash", "zsh", "fish"], *, install: bool = False) -> int:
    """Print the shell completion script of rbee-keeper (commands, options, choices).

    Load it in your shell's startup file, or let --install put it where the shell looks.

    Parameters
    ----------
    shell
        The shell to complete in.
    install
        Write it where the shell loads it from (and the line that loads it into ~/.bashrc
        or ~/.zshrc) instead of printing it.
    """
    if not install:
        sys.stdout.write(app.generate_completion(prog_name="rbee-keeper", shell=shell))
        return 0
    try:
        path = app.install_completion(shell=shell)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _refuse(f"cannot install the {shell} completion: {exc.strerror or exc}{where}; "
                       f"print it with `rbee-keeper completion {shell}` and save it where your shell reads it",
                       EXIT_JOB_FAILED)
    print(f"Installed the {shell} completion of rbee-keeper in {path}; it loads in new shells")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `rbee-keeper`; returns the process exit code."""
    tokens = sys.argv[1:] if argv is None else argv
    use_plain_help(app)
    try:
        result = app(tokens, exit_on_error=False, result_action="return_value")
    except cyclopts.CycloptsError:
        return EXIT_USAGE  # cyclopts has printed what was wrong
    except KeyboardInterrupt:  # only where entry.py's handler is not installed (a test's main())
        sys.stderr.write("Cancelled.\n")
        return EXIT_CANCELLED
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
