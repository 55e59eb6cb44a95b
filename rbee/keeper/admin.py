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
    """``workers list`` / ``workers health``: the workers of every running hive."""
    listing = await call(out, "GET", "/v1/workers")
    workers = listing["workers"]
    if not workers:
        out.line("No workers (hives start them on demand: run `rbee-keeper infer`).")
    rows = [[w.get("node"), w.get("worker_id"), w.get("state"), w.get("model_ref"), w.get("url")] for w in workers]
    _print_rows(rows)
    if health:
        return 0 if all(w.get("state") in ("idle", "busy", "loading") for w in workers) else 1
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
    listing = await call(out, "GET", "/v1/models", params={"node": node})
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


def queen_stop(out: Output) -> int:
    """``queen stop``: SIGTERM the recorded queen (it stops its hives), wait until gone."""
    record = read_record()
    if not record or not pid_alive(int(record.get("pid", 0))):
        record_path().unlink(missing_ok=True)
        out.line("No persistent queen-rbee is running.")
        return 0
    pid = int(record["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
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
