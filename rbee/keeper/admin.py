"""The keeper's management commands: nodes, workers, models, the persistent queen.

Each talks to the running queen, or to an ephemeral one started for the command (the
node registry lives in ``$RBEE_HOME/nodes.db``, so an ephemeral queen sees the same nodes).
Results go to stdout (one line per item, tab-separated); errors are one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any, AsyncIterator

import httpx
import trio

from ..client import QueenUnreachableError, error_from_response, open_http_client
from ..errors import RbeeError
from ..lifetime import pid_alive
from ..narration.events import Event, NarrationEvent
from .output import Output
from .queen_control import (
    EphemeralQueen,
    api_token,
    find_queen,
    is_healthy,
    queen_url_from_env,
    read_record,
    record_path,
    start_persistent,
)


@contextlib.asynccontextmanager
async def queen_session(out: Output) -> AsyncIterator[str]:
    """The URL of a running queen, or of an ephemeral one for the length of the block."""
    url = await find_queen()
    if url is not None:
        yield url
        return

    def show(event: Event) -> None:
        if isinstance(event, NarrationEvent) and event.level in ("warn", "error"):
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
        async with open_http_client(url, api_token()) as client:
            try:
                response = await client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise QueenUnreachableError(f"queen-rbee at {url} broke the connection ({exc})") from None
    if response.status_code >= 400:
        raise error_from_response(response)
    return response.json()


def _print_rows(rows: list[list[Any]]) -> None:
    for row in rows:
        print("\t".join("" if v is None else str(v) for v in row), flush=True)


async def add_node(out: Output, body: dict[str, Any]) -> int:
    """``setup add-node``: the queen tests SSH (``rbee-hive detect``) before storing it."""
    out.narrate("node_add", f"Adding node {body['name']}: testing SSH to {body['ssh_host']}:{body['ssh_port']}")
    node = await call(out, "POST", "/v1/nodes", json=body)
    detect = node.get("detect") or {}
    backends = detect.get("backends") or []
    out.narrate("node_add", f"Node {node['name']} added ({detect.get('hostname', '?')}, backends: {backends})")
    return 0


async def list_nodes(out: Output) -> int:
    """``setup list-nodes``: name, SSH target, hive command."""
    listing = await call(out, "GET", "/v1/nodes")
    rows = []
    for node in listing["nodes"]:
        target = "(local child process)" if node["ssh_host"] is None else f"{node.get('ssh_user') or ''}@{node['ssh_host']}:{node['ssh_port']}".lstrip("@")
        rows.append([node["name"], target, node["rbee_hive_command"]])
    _print_rows(rows)
    return 0


async def remove_node(out: Output, name: str) -> int:
    """``setup remove-node NAME``."""
    await call(out, "DELETE", f"/v1/nodes/{name}")
    out.narrate("node_remove", f"Node {name} removed")
    return 0


async def list_workers(out: Output, *, health: bool = False) -> int:
    """``workers list`` / ``workers health``: the queen's workers (its scheduler's records)."""
    listing = await call(out, "GET", "/v1/workers")
    workers = listing["workers"]
    if not workers:
        out.line("No workers (hives start them on demand: run `rbee-keeper infer`).")
    rows = [[w.get("node"), w.get("worker_id"), w.get("state"), w.get("model_ref"), w.get("url")] for w in workers]
    _print_rows(rows)
    if health:
        # The queen's scheduler states: spawning -> ready <-> busy (a gone worker is not listed).
        return 0 if all(w.get("state") in ("spawning", "ready", "busy") for w in workers) else 1
    return 0


PS_COLUMNS = ("NODE", "MODEL", "BACKEND", "SLOTS", "MEMORY", "UNTIL", "WORKER")
#: Between two columns: wider than one space, because cells hold spaces ("547 MiB").
PS_GAP = "   "
NO_QUEEN_NOTE = (
    "No queen-rbee is running, so no worker is loaded "
    "(`rbee-keeper queen start` keeps one, and its workers, up between commands)."
)


def human_size(size: int | float | None) -> str:
    """``547 MiB``, ``1.5 GiB`` (binary units); ``-`` when unknown (None or 0)."""
    if not size or size < 0:
        return "-"
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.0f} MiB"
    return f"{max(1, round(size / 1024))} KiB"


def _from_now(seconds: float) -> str:
    if seconds < 1:
        return "less than a second from now"
    for unit, size, about in (("day", 86400, "a day"), ("hour", 3600, "an hour"), ("minute", 60, "a minute")):
        if seconds >= size:
            count = int(seconds // size)
            return f"about {about} from now" if count == 1 else f"{count} {unit}s from now"
    count = int(seconds)
    return f"{count} second{'s' if count != 1 else ''} from now"


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
        return _from_now(float(unload_in_s))
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
    """The ``ps`` table: a header and one row per worker (by node, model, worker id),
    columns left-aligned and ``PS_GAP`` apart, no trailing spaces, no final newline.

    No ``now`` is needed: the queen answers ``unload_in_s`` relative to its answer."""
    rows = [list(PS_COLUMNS)] + [
        ps_row(w) for w in sorted(workers, key=lambda w: (str(w.get("node")), str(w.get("model") or w.get("model_ref")), str(w.get("worker_id"))))
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(PS_COLUMNS))]
    lines = [PS_GAP.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


async def ps(out: Output) -> int:
    """``ps``: the loaded workers, one row per worker, like ``ollama ps`` (stdout).

    Only a queen that already runs is asked (``RBEE_QUEEN_URL``, then the persistent
    one): an ephemeral queen started for the question would have no workers. With no
    queen running it prints ``NO_QUEEN_NOTE`` (one line, on stderr) and exits 0, as
    ``workers list`` does when there is no worker: nothing loaded is not an error. A queen
    that answers with an error, or breaks the connection, is one error line and exit 1.
    See ``ps_until`` for the UNTIL column.
    """
    url = await find_queen()
    if url is None:
        out.line(NO_QUEEN_NOTE)
        return 0
    async with open_http_client(url, api_token()) as client:
        try:
            response = await client.get("/v1/workers")
        except httpx.TransportError as exc:
            raise QueenUnreachableError(f"queen-rbee at {url} broke the connection ({exc})") from None
    if response.status_code >= 400:
        raise error_from_response(response)
    print(format_ps(response.json()["workers"]), flush=True)
    return 0


async def workers_health(out: Output) -> int:
    """``workers health``: like ``workers list``; exit 1 when a worker is in error."""
    return await list_workers(out, health=True)


async def shutdown_workers(out: Output, node: str | None, worker_id: str | None) -> int:
    """``workers shutdown [--node N] [--worker-id W]``."""
    result = await call(out, "POST", "/v1/workers/shutdown", json={"node": node, "worker_id": worker_id})
    for item in result["stopped"]:
        out.narrate("worker_shutdown", f"Worker {item['worker_id']} on {item['node']} is shutting down")
    return 0


async def list_models(out: Output, node: str) -> int:
    """``models list --node N``: the hive's model catalog."""
    listing = await call(out, "GET", f"/v1/nodes/{node}/models")
    for model in listing.get("models", []):
        if isinstance(model, dict):
            _print_rows([[model.get("reference") or model.get("ref") or model.get("model_ref"), model.get("size") or model.get("size_bytes"), model.get("local_path") or model.get("path")]])
        else:
            _print_rows([[model]])
    return 0


# -- the persistent queen -----------------------------------------------------------------


def queen_start(out: Output, port: int | None, host: str) -> int:
    """``queen start``: a detached queen; its URL and PID are recorded under RBEE_HOME."""
    record = read_record()
    if record and pid_alive(int(record.get("pid", 0))):
        out.line(f"queen-rbee already runs at {record['url']} (pid {record['pid']})")
        return 0
    if port is None:
        port = int(queen_url_from_env().rsplit(":", 1)[1])
    record = start_persistent(port, host)
    out.narrate("queen_start", f"queen-rbee runs at {record['url']} (pid {record['pid']})")
    print(json.dumps(record), flush=True)
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


async def queen_status(out: Output) -> int:
    """``queen status``: exit 0 and print URL/PID when a queen answers, else 1."""
    record = read_record()
    for url, pid in ((queen_url_from_env(), None), ((record or {}).get("url"), (record or {}).get("pid"))):
        if url and await is_healthy(url):
            print(json.dumps({"url": url, "pid": pid, "running": True}), flush=True)
            return 0
    print(json.dumps({"url": queen_url_from_env(), "running": False}), flush=True)
    return 1


def one_line(exc: RbeeError) -> str:
    """The message of an error as the keeper prints it."""
    return exc.message
