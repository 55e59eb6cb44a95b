"""The keeper's management commands: nodes, workers, models, the persistent queen.

Each talks to the running queen, or to an ephemeral one started for the command (the
node registry lives in ``$RBEE_HOME/nodes.db``, so an ephemeral queen sees the same nodes).
Listings never start anything just to say there is nothing: with no queen running,
``ps`` and ``workers list`` know there are no workers, and ``models list`` (localhost) and
``setup list-nodes`` read ``models.db`` and ``nodes.db`` themselves, without writing, and
so does ``status`` (the cluster at a glance: every hive down then).

What they print: a listing is an aligned table on stdout (``tables.format_table``), or
with ``--json`` one JSON document (the queen's own answer: ``{"workers": [...]}``,
``{"node", "models": [...]}``, ``{"nodes": [...]}``); an empty listing prints nothing on
stdout and one line on stderr saying so. A command that matches nothing (``workers
shutdown --node N`` with no worker there, ``models rm`` of a model the node lacks) says
so and exits 1. Errors are one line on stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import httpx
import trio

from ..client import QueenUnreachableError, error_from_response, open_http_client
from ..errors import ModelNotFoundError, NotFoundError, RbeeError
from ..hive.catalog import read_entries, read_entry
from ..lifetime import pid_alive
from ..narration.events import Event, NarrationEvent
from ..paths import home_path
from ..queen.nodes import LOCALHOST, read_nodes, local_hive_command
from ..queen.status import offline_status
from ..requests import parse_reference
from .output import Output
from .queen_control import (
    EphemeralQueen,
    api_token,
    find_queen,
    is_healthy,
    probe,
    queen_url_from_env,
    read_record,
    record_path,
    start_persistent,
)
from .tables import ago, ago_iso, format_table, from_now, human_size, json_document, short_path, span

__all__ = ["human_size"]  # ps's tests import it from here, where it was first


@contextlib.asynccontextmanager
async def queen_session(out: Output) -> AsyncIterator[str]:
    """The URL of a running queen, or of an ephemeral one for the length of the block."""
    url = await find_queen()
    if url is not None:
        yield url
        return

    def show(event: Event) -> None:
        # The keeper's own line that it starts a queen, and the queen's troubles.
        if isinstance(event, NarrationEvent) and (event.actor == "rbee-keeper" or event.level in ("warn", "error")):
            out.event(event)

    async with trio.open_nursery() as nursery:
        queen = await EphemeralQueen.start(nursery, show)
        try:
            yield queen.url
        finally:
            await queen.shutdown()
            nursery.cancel_scope.cancel()


async def call(out: Output, method: str, path: str, **kwargs: Any) -> Any:
    """One JSON call to the queen; raises the envelope's ``RbeeError``."""
    async with queen_session(out) as url:
        return await ask(url, method, path, **kwargs)


async def ask(url: str, method: str, path: str, **kwargs: Any) -> Any:
    """One JSON call to the queen at ``url``; raises the envelope's ``RbeeError``."""
    async with open_http_client(url, api_token()) as client:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise QueenUnreachableError(f"queen-rbee at {url} broke the connection ({exc})") from None
    if response.status_code >= 400:
        raise error_from_response(response)
    return response.json()


def show_listing(out: Output, document: dict[str, Any], table: str | None, empty: str, as_json: bool) -> None:
    """A listing on stdout: ``document`` as JSON, else ``table``; with no table (nothing
    listed) the ``empty`` line on stderr instead (stdout stays empty for pipes)."""
    if as_json:
        print(json_document(document), flush=True)
    elif table is None:
        out.line(empty)
    else:
        print(table, flush=True)


async def add_node(out: Output, body: dict[str, Any]) -> int:
    """``setup add-node``: the queen tests SSH (``rbee-hive detect``) before storing it."""
    out.narrate("node_add", f"Adding node {body['name']}: testing SSH to {body['ssh_host']}:{body['ssh_port']}")
    node = await call(out, "POST", "/v1/nodes", json=body)
    detect = node.get("detect") or {}
    backends = detect.get("backends") or []
    out.narrate("node_add", f"Node {node['name']} added ({detect.get('hostname', '?')}, backends: {backends})")
    return 0


NODE_COLUMNS = ("NODE", "SSH", "HIVE COMMAND", "BACKENDS", "ADDED")
NO_NODES_NOTE = "No nodes added: `rbee-keeper setup add-node NAME --ssh-host HOST` adds one."


def node_row(node: dict[str, Any], now_ms: int) -> list[str]:
    """One node's cells, in ``NODE_COLUMNS`` order."""
    if node.get("ssh_host") is None:
        ssh, added = "- (local)", "built in"
    else:
        user = f"{node['ssh_user']}@" if node.get("ssh_user") else ""
        ssh = f"{user}{node['ssh_host']}:{node.get('ssh_port', 22)}"
        added = ago((now_ms - int(node.get("added_at_ms") or now_ms)) / 1000)
    backends = (node.get("detect") or {}).get("backends") or []
    return [str(node["name"]), ssh, str(node.get("rbee_hive_command") or "-"), ", ".join(backends) or "-", added]


def format_nodes(nodes: list[dict[str, Any]], now_ms: int | None = None) -> str:
    """The ``setup list-nodes`` table (localhost first, as the registry lists them)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return format_table([node_row(n, now_ms) for n in nodes], NODE_COLUMNS)


async def list_nodes(out: Output, as_json: bool = False) -> int:
    """``setup list-nodes``: the node registry (the queen's, else ``nodes.db`` read here)."""
    url = await find_queen()
    listing = None
    if url is None:
        try:
            listing = {"nodes": [n.public() for n in read_nodes(home_path() / "nodes.db",
                                                                 local_hive_command=local_hive_command())]}
        except (sqlite3.Error, OSError):
            listing = None  # damaged or unreadable: the queen sets it aside and says so
    if listing is None:
        listing = await call(out, "GET", "/v1/nodes")
    nodes = listing["nodes"]
    show_listing(out, listing, format_nodes(nodes), "", as_json)
    if not as_json and all(n.get("ssh_host") is None for n in nodes):
        out.line(NO_NODES_NOTE)
    return 0


async def remove_node(out: Output, name: str) -> int:
    """``setup remove-node NAME``."""
    await call(out, "DELETE", f"/v1/nodes/{name}")
    out.narrate("node_remove", f"Node {name} removed")
    return 0


PS_COLUMNS = ("NODE", "MODEL", "BACKEND", "SLOTS", "MEMORY", "UNTIL", "WORKER")
NO_WORKERS_NOTE = "No workers running (hives start them on demand: `rbee-keeper infer` loads one)."
NO_QUEEN_NOTE = (
    "No workers running: no queen-rbee runs "
    "(`rbee-keeper queen start` keeps one, and its workers, up between commands)."
)
#: The queen's scheduler states of a worker that is fine (a gone worker is not listed).
HEALTHY_STATES = ("spawning", "ready", "busy")


def _slots(worker: dict[str, Any]) -> tuple[int | None, int | None]:
    """(busy, total) of a worker's slots; None when the listing does not say."""
    slots = worker.get("slots")
    if isinstance(slots, dict):
        return slots.get("busy"), slots.get("total")
    if isinstance(slots, int) and not isinstance(slots, bool):
        return None, slots  # an older queen: the number of slots only
    return None, None


def ps_until(worker: dict[str, Any]) -> str:
    """The UNTIL cell: when the hive will unload this worker if it stays idle.

    The rule, first match wins:
    - ``starting`` while the worker is spawning or loading (its slots are not open yet);
    - ``stopping`` while it shuts down (or is gone, between two listings);
    - ``in use`` while any slot is busy (or the worker says busy/full): the idle timer
      only runs once every slot is idle;
    - ``unload_in_s`` as ollama words it: ``4 minutes from now``, ``about a minute from
      now``, ``30 seconds from now``, ``less than a second from now``;
    - ``Forever`` when ``unload_in_s`` is null on an idle worker: its hive never unloads
      (``RBEE_WORKER_IDLE_TIMEOUT`` 0 or less).
    """
    state = worker.get("state")
    if state in ("spawning", "loading", "starting"):
        return "starting"
    if state in ("stopping", "stopped", "gone"):
        return "stopping"
    busy, _ = _slots(worker)
    if (busy or 0) > 0 or state in ("busy", "full"):
        return "in use"
    unload_in_s = worker.get("unload_in_s")
    if isinstance(unload_in_s, (int, float)) and not isinstance(unload_in_s, bool):
        return from_now(float(unload_in_s))
    return "Forever"


def ps_row(worker: dict[str, Any]) -> list[str]:
    """One worker's cells, in ``PS_COLUMNS`` order."""
    backend = str(worker.get("backend") or "-")
    if worker.get("device") is not None and backend != "-":
        backend = f"{backend}:{worker['device']}"
    busy, total = _slots(worker)
    slots = "-" if total is None else f"{busy if busy is not None else '?'}/{total}"
    model = worker.get("model") or worker.get("model_ref") or "-"
    return [
        str(worker.get("node") or "-"), str(model), backend, slots,
        human_size(worker.get("memory_bytes")), ps_until(worker), str(worker.get("worker_id") or "-"),
    ]


def format_ps(workers: list[dict[str, Any]]) -> str:
    """The ``ps`` table: a header and one row per worker (by node, model, worker id).

    No ``now`` is needed: the queen answers ``unload_in_s`` relative to its answer."""
    order = sorted(workers, key=lambda w: (str(w.get("node")), str(w.get("model") or w.get("model_ref")),
                                           str(w.get("worker_id"))))
    return format_table([ps_row(w) for w in order], PS_COLUMNS)


async def ps(out: Output, as_json: bool = False, *, health: bool = False) -> int:
    """``ps`` (and its alias ``workers list``): the loaded workers, one row per worker,
    like ``ollama ps``; ``--json``: the queen's ``{"workers": [...]}``.

    Only a queen that already runs is asked (``RBEE_QUEEN_URL``, then the persistent
    one): an ephemeral queen started for the question would have no workers. With no
    queen, or no worker, one line on stderr says so and the exit is 0: nothing loaded is
    not an error. A queen that answers with an error, or breaks the connection, is one
    error line and exit 1. ``health`` (``workers health``): exit 1 when a worker is in a
    state that is not fine. See ``ps_until`` for the UNTIL column.
    """
    url = await find_queen()
    workers = [] if url is None else (await ask(url, "GET", "/v1/workers"))["workers"]
    show_listing(out, {"workers": workers}, format_ps(workers) if workers else None,
                 NO_QUEEN_NOTE if url is None else NO_WORKERS_NOTE, as_json)
    if health and not all(w.get("state") in HEALTHY_STATES for w in workers):
        return 1
    return 0


async def list_workers(out: Output, as_json: bool = False) -> int:
    """``workers list``: ``ps`` under its older name (the same output)."""
    return await ps(out, as_json)


async def workers_health(out: Output, as_json: bool = False) -> int:
    """``workers health``: ``ps``; exit 1 when a worker is in a state that is not fine."""
    return await ps(out, as_json, health=True)


async def shutdown_workers(out: Output, node: str | None, worker_id: str | None) -> int:
    """``workers shutdown [--node N] [--worker-id W]``: exit 1 with one line when nothing
    matched (no such node, no worker there, no queen running at all)."""
    url = await find_queen()
    if url is None:
        if node is not None and node != LOCALHOST:
            unknown = _unknown_stored_node(node)
            if unknown is not None:
                raise NotFoundError(unknown)
        where = f" on node {node}" if node else ""
        raise NotFoundError(f"no workers running{where}: no queen-rbee runs, so there is nothing to shut down")
    result = await ask(url, "POST", "/v1/workers/shutdown", json={"node": node, "worker_id": worker_id})
    stopped = result["stopped"]
    if not stopped:
        where = f" on node {node}" if node else ""
        raise NotFoundError(f"no workers running{where}: nothing to shut down (`rbee-keeper ps` lists the workers)")
    for item in stopped:
        out.narrate("worker_shutdown", f"Worker {item['worker_id']} on {item['node']} is shutting down")
    return 0


def _unknown_stored_node(name: str) -> str | None:
    """Why ``name`` is no node, from ``nodes.db`` read here (None: it is one, or the
    registry cannot be read and nobody can say)."""
    try:
        names = [n.name for n in read_nodes(home_path() / "nodes.db")]
    except (sqlite3.Error, OSError):
        return None
    if name in names:
        return None
    return (f"no node named {name!r}; add it with `rbee-keeper setup add-node {name} --ssh-host HOST`"
            " or use --node localhost")


MODEL_COLUMNS = ("MODEL", "SIZE", "SHA256", "ADDED", "LAST USED", "PATH")


def model_row(entry: dict[str, Any], now: datetime) -> list[str]:
    """One catalog entry's cells, in ``MODEL_COLUMNS`` order."""
    sha = str(entry.get("sha256") or "")
    return [
        str(entry.get("reference") or "-"), human_size(entry.get("size")), sha[:12] or "-",
        ago_iso(entry.get("downloaded_at"), now, never="-"), ago_iso(entry.get("last_used"), now),
        short_path(entry.get("local_path")),
    ]


def format_models(models: list[dict[str, Any]], now: datetime | None = None) -> str:
    """The ``models list`` table, by reference."""
    now = now or datetime.now(timezone.utc)
    order = sorted(models, key=lambda m: str(m.get("reference")))
    return format_table([model_row(m, now) for m in order], MODEL_COLUMNS)


def no_models_note(node: str) -> str:
    """What ``models list`` says of a node without models."""
    return (f"No models on {node} (`rbee-keeper models download gemma3-270m --node {node}` adds one; "
            "`infer` fetches a model on first use too).")


def _local_catalog() -> list[dict[str, Any]] | None:
    """localhost's catalog read here (no queen, no hive); None when it cannot be read."""
    try:
        return [e.public() for e in read_entries(home_path() / "models.db")]
    except (sqlite3.Error, OSError):
        return None  # damaged or unreadable: a hive sets it aside, rebuilds it and says so


async def list_models(out: Output, node: str, as_json: bool = False) -> int:
    """``models list --node N``: the node's catalog; ``--json``: ``{"node", "models"}``.

    With no queen running, localhost's catalog is read here (``models.db``, without
    writing): a listing starts no queen and no hive (about 2.7 s before, on 2 cores)."""
    listing = None
    if await find_queen() is None:
        if node == LOCALHOST:
            models = _local_catalog()
            listing = None if models is None else {"node": LOCALHOST, "models": models}
        elif (unknown := _unknown_stored_node(node)) is not None:
            raise NotFoundError(unknown)  # said from nodes.db: no queen started to say it
    if listing is None:
        listing = await call(out, "GET", f"/v1/nodes/{node}/models")
    models = [m for m in listing.get("models", []) if isinstance(m, dict)]
    show_listing(out, {"node": listing.get("node", node), "models": models},
                 format_models(models) if models else None, no_models_note(node), as_json)
    return 0


async def remove_model(out: Output, model: str, node: str) -> int:
    """``models rm REF --node N``: the node's hive forgets the model and deletes its file
    when rbee put it there (``DELETE /v1/nodes/{node}/models?model=REF``); 404 and 409 are
    one error line, exit 1. With no queen running, a model localhost's catalog lacks is
    said at once, starting nothing."""
    if await find_queen() is None:
        if node == LOCALHOST:
            reference = parse_reference(model).reference  # a malformed one is refused here
            try:
                present = read_entry(home_path() / "models.db", reference) is not None
            except (sqlite3.Error, OSError):
                present = True  # the hive will know
            if not present:
                raise ModelNotFoundError(f"no model {reference} on {node} (`rbee-keeper models list` lists them)")
        elif (unknown := _unknown_stored_node(node)) is not None:
            raise NotFoundError(unknown)
    answer = await call(out, "DELETE", f"/v1/nodes/{node}/models", params={"model": model})
    where = short_path(answer.get("local_path"))
    if answer.get("file_deleted"):
        done = f"its file {where} is deleted ({human_size(answer.get('size'))} freed)"
    else:
        done = f"its file {where} is not rbee's and stays"
    out.narrate("model_remove", f"Removed {answer.get('reference', model)} from {node}: {done}",
                target=str(answer.get("reference", model)), node=node)
    return 0


# -- the cluster at a glance ----------------------------------------------------------------

STATUS_COLUMNS = ("NODE", "REACHABLE", "HIVE UP", "DEVICES", "FREE MEMORY", "WORKERS", "MODELS")
STATUS_WORKER_COLUMNS = ("NODE", "WORKER", "MODEL", "SLOTS", "STATE")
STATUS_MODEL_COLUMNS = ("NODE", "MODEL", "SIZE")
STATUS_NO_QUEEN_NOTE = (
    "No queen-rbee runs, so no hive is up and nobody knows which nodes are reachable "
    "(`rbee-keeper queen start` keeps a queen, its hives and workers up between commands)."
)


def device_cell(device: dict[str, Any]) -> str:
    """``cpu``, or a GPU as ``cuda:0 RTX 4090 24.0 GiB (20.1 GiB free)``."""
    backend = str(device.get("backend") or "?")
    if backend == "cpu":
        return "cpu"
    name = f"{backend}:{device.get('index', 0)} {device.get('name') or ''}".rstrip()
    total, free = device.get("memory_total_bytes"), device.get("memory_free_bytes")
    if total:
        name += f" {human_size(total)}"
    if free:
        name += f" ({human_size(free)} free)"
    return name


def status_row(node: dict[str, Any]) -> list[str]:
    """One node's cells, in ``STATUS_COLUMNS`` order."""
    reachable = node.get("reachable")
    if reachable is True:
        reach = "yes"
    elif reachable is False:
        reach = f"no: {node.get('unreachable_reason') or 'unknown why'}"
    else:
        reach = "unknown"
    devices = [device_cell(d) for d in node.get("devices") or []]
    # A backend the node lists without a device of its own (metal) is still shown.
    devices += [b for b in node.get("backends") or [] if not any(c.split(":")[0] == b for c in devices)]
    models = node.get("models")
    return [
        str(node.get("name")), reach, "yes" if node.get("hive_up") else "no", ", ".join(devices) or "-",
        human_size(node.get("memory_free_bytes")), str(len(node.get("workers") or [])),
        "-" if models is None else str(len(models)),
    ]


def format_status(nodes: list[dict[str, Any]]) -> str:
    """The ``status`` tables: the nodes; then their workers and their models on disk
    (each only when there is one), a blank line between two tables."""
    tables = [format_table([status_row(n) for n in nodes], STATUS_COLUMNS)]
    workers = [[str(n.get("name")), str(w.get("worker_id") or "-"), str(w.get("model") or w.get("model_ref") or "-"),
                ps_row(w)[3], str(w.get("state") or "-")]
               for n in nodes for w in n.get("workers") or []]
    if workers:
        tables.append(format_table(workers, STATUS_WORKER_COLUMNS))
    models = [[str(n.get("name")), str(m.get("reference") or "-"), human_size(m.get("size"))]
              for n in nodes for m in sorted(n.get("models") or [], key=lambda m: str(m.get("reference")))]
    if models:
        tables.append(format_table(models, STATUS_MODEL_COLUMNS))
    return "\n\n".join(tables)


async def cluster_status(out: Output, as_json: bool = False) -> int:
    """``status``: every node at a glance (the queen's ``GET /v1/status``); ``--json``: that
    document, ``{"nodes": [...]}``.

    With no queen running nothing is started: the nodes come from ``nodes.db`` and
    localhost's models from ``models.db`` (both read here, as ``setup list-nodes`` and
    ``models list`` do), every hive down, reachability unknown, and a note on stderr says
    so. Only a damaged ``nodes.db`` makes it start a queen (which sets it aside)."""
    document = None
    if await find_queen() is None:
        try:
            nodes = read_nodes(home_path() / "nodes.db", local_hive_command=local_hive_command())
        except (sqlite3.Error, OSError):
            nodes = None  # damaged or unreadable: the queen sets it aside and says so
        if nodes is not None:
            document = offline_status(nodes, _local_catalog())
            out.line(STATUS_NO_QUEEN_NOTE)
    if document is None:
        document = await call(out, "GET", "/v1/status")
    show_listing(out, document, format_status(document["nodes"]), "", as_json)
    return 0


# -- the persistent queen -----------------------------------------------------------------


async def queen_start(out: Output, port: int | None, host: str) -> int:
    """``queen start``: a detached queen; its URL and PID are recorded under RBEE_HOME.

    A queen that already answers (the recorded one, or one at the URL) is said, exit 0;
    a port taken by anything else is one line naming the port and ``--port``, exit 1."""
    record = read_record()
    if record and pid_alive(int(record.get("pid", 0))):
        out.line(f"queen-rbee already runs at {record['url']} (pid {record['pid']})")
        return 0
    if port is None:
        port = int(queen_url_from_env().rsplit(":", 1)[1])
    shown = "127.0.0.1" if host in ("0.0.0.0", "localhost") else host
    try:
        running = await probe(f"http://{shown}:{port}")
    except RbeeError:
        running = None  # something else is there: start_persistent names the port
    if running is not None:
        out.line(f"queen-rbee already runs at http://{shown}:{port} (pid {running.get('pid')}, not started by "
                 "`rbee-keeper queen start`: `queen stop` cannot stop it)")
        return 0
    record = await trio.to_thread.run_sync(start_persistent, port, host)
    out.narrate("queen_start", f"queen-rbee runs at {record['url']} (pid {record['pid']})")
    return 0


#: How long ``queen stop`` waits for a draining queen (its default grace period + margin).
QUEEN_DRAIN_WAIT_S = 60.0


def queen_stop(out: Output) -> int:
    """``queen stop``: SIGTERM the recorded queen (it stops its hives), wait until gone."""
    record = read_record()
    if not record or not pid_alive(int(record.get("pid", 0))):
        record_path().unlink(missing_ok=True)
        out.line("No persistent queen-rbee is running.")
        return 0
    pid = int(record["pid"])
    os.kill(pid, signal.SIGTERM)
    # SIGTERM drains: running jobs get the queen's --grace-period (30 s by default) to
    # finish before it stops its hives; only a queen that outlives that is killed.
    out.narrate("queen_stop", f"Stopping queen-rbee (pid {pid}): running jobs may finish first")
    deadline = time.monotonic() + QUEEN_DRAIN_WAIT_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    record_path().unlink(missing_ok=True)
    out.narrate("queen_stop", f"queen-rbee (pid {pid}) stopped")
    return 0


async def queen_status(out: Output, as_json: bool = False) -> int:
    """``queen status``: the queen alone (the one the other commands would use), as
    ``KEY   value`` lines, or ``--json``; exit 0 when one runs, else 1.

    Something at ``RBEE_QUEEN_URL`` that is not a queen is an error naming the URL."""
    url = queen_url_from_env()
    health = await probe(url)
    record = read_record()
    if health is None and record and pid_alive(int(record.get("pid", 0))) and await is_healthy(record["url"]):
        url = str(record["url"])
        health = await probe(url)
    if health is None:
        if as_json:
            print(json_document({"running": False, "url": url}), flush=True)
        else:
            print(f"queen-rbee is not running (nothing answers at {url}; `rbee-keeper queen start` starts one)",
                  flush=True)
        return 1
    recorded = bool(record and record.get("url") == url and record.get("pid") == health.get("pid"))
    document = {
        "running": True, "url": url, "pid": health.get("pid"), "version": health.get("version"),
        "uptime_s": health.get("uptime_s"), "jobs": health.get("jobs"), "hives": health.get("hives", []),
        "recorded": recorded,
    }
    if as_json:
        print(json_document(document), flush=True)
        return 0
    started = ("started by `rbee-keeper queen start`: `queen stop` stops it" if recorded
               else "not started by `rbee-keeper queen start`: `queen stop` cannot stop it")
    uptime = health.get("uptime_s")
    rows = [
        ["STATUS", "running"],
        ["URL", url],
        ["PID", f"{health.get('pid')} ({started})"],
        ["VERSION", str(health.get("version"))],
        ["UPTIME", span(float(uptime)) if isinstance(uptime, (int, float)) else "-"],
        ["JOBS", str(health.get("jobs", "-"))],
        ["HIVES", ", ".join(health.get("hives") or []) or "none running"],
    ]
    print(format_table(rows), flush=True)
    return 0


def one_line(exc: RbeeError) -> str:
    """The message of an error as the keeper prints it."""
    return exc.message
