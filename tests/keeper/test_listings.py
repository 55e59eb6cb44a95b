"""The keeper's listings as the real program prints them, knowing who answers at the
queen's URL, and commands that match nothing.

No queen runs in these tests unless one says so: the listings then start nothing and
write nothing under RBEE_HOME (``models list`` and ``setup list-nodes`` read
``models.db`` and ``nodes.db`` themselves). Anything but a queen answering at
``RBEE_QUEEN_URL`` is one error line naming the URL; ``queen start`` on a taken port
names the port and ``--port``.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from rbee.hive.catalog import CatalogEntry, ModelCatalog
from rbee.keeper.admin import (
    MODEL_COLUMNS,
    NO_NODES_NOTE,
    NO_QUEEN_NOTE,
    NODE_COLUMNS,
    no_models_note,
)
from rbee.keeper.tables import short_path
from rbee.queen.nodes import Node, NodeRegistry
from tests.hive.fakehub import write_small_gguf
from tests.processes import RbeeProcess, program
from tests.queen.support import dead_url, keeper_env, rbee_processes, wait_no_rbee_processes


def keeper(home: Path, *args: str, queen_url: str | None = None) -> RbeeProcess:
    return RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home, queen_url))


def run(home: Path, *args: str, queen_url: str | None = None, code: int = 0) -> RbeeProcess:
    """One keeper command, to its end, with the exit code expected; never a traceback."""
    proc = keeper(home, *args, queen_url=queen_url)
    assert proc.wait(120) == code, (args, proc.stdout_lines, proc.stderr_text())
    assert "Traceback" not in proc.stderr_text()
    return proc


def table(proc: RbeeProcess, columns: tuple[str, ...]) -> list[list[str]]:
    """The rows of the table on ``proc``'s stdout, cut at its header's column starts."""
    header, *lines = proc.stdout_lines
    starts = [header.index(name) for name in columns]
    assert header.split()[0] == columns[0].split()[0], header
    return [[line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for line in lines]


def files_under(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*"))


def test_listings_with_no_queen_start_nothing_write_nothing_and_say_when_empty(rbee_home: Path) -> None:
    models = run(rbee_home, "models", "list")
    assert models.stdout_lines == [] and models.stderr_lines == [no_models_note("localhost")]
    assert "No models on localhost" in models.stderr_lines[0]
    assert json.loads("\n".join(run(rbee_home, "models", "list", "--json").stdout_lines)) == \
        {"node": "localhost", "models": []}

    nodes = run(rbee_home, "setup", "list-nodes")
    assert [row[:2] for row in table(nodes, NODE_COLUMNS)] == [["localhost", "- (local)"]]
    assert nodes.stderr_lines == [NO_NODES_NOTE]
    listed = json.loads("\n".join(run(rbee_home, "setup", "list-nodes", "--json").stdout_lines))
    assert [n["name"] for n in listed["nodes"]] == ["localhost"] and listed["nodes"][0]["ssh_host"] is None

    for alias in (("ps",), ("workers", "list")):
        workers = run(rbee_home, *alias)
        assert workers.stdout_lines == [] and workers.stderr_lines == [NO_QUEEN_NOTE]
        assert json.loads("\n".join(run(rbee_home, *alias, "--json").stdout_lines)) == {"workers": []}

    url = dead_url()
    status = run(rbee_home, "queen", "status", queen_url=url, code=1)
    assert status.stdout_lines == [f"queen-rbee is not running (nothing answers at {url}; "
                                   "`rbee-keeper queen start` starts one)"]
    assert json.loads("\n".join(run(rbee_home, "queen", "status", "--json", queen_url=url, code=1).stdout_lines)) \
        == {"running": False, "url": url}

    # Nothing was started (an ephemeral queen would have left logs/queen.log), nothing written.
    assert files_under(rbee_home) == []
    assert rbee_processes(rbee_home) == []


def test_the_catalog_and_the_node_registry_are_read_without_a_queen(rbee_home: Path) -> None:
    now = datetime.now(timezone.utc)
    (rbee_home / "models").mkdir()
    model_file = write_small_gguf(rbee_home / "models" / "small-Q4_K_M.gguf")
    catalog = ModelCatalog(rbee_home / "models.db")
    entry = CatalogEntry(
        reference="hf:rbee-test/small-GGUF/small-Q4_K_M.gguf", provider="hf", file="small-Q4_K_M.gguf",
        local_path=str(model_file), size=model_file.stat().st_size, sha256="0123456789ab" + "f" * 52,
        downloaded_at=(now - timedelta(minutes=3, seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    catalog.add(entry, aliases=("hf:rbee-test/small-GGUF",))
    NodeRegistry(rbee_home / "nodes.db").put(Node(name="mac", ssh_host="mac.lan", ssh_port=2222, ssh_user="ada",
                                                  added_at_ms=int((time.time() - 7300) * 1000)))
    before = files_under(rbee_home)

    started = time.monotonic()
    models = run(rbee_home, "models", "list")
    took = time.monotonic() - started
    assert table(models, MODEL_COLUMNS) == [[entry.reference, "4 MiB", "0123456789ab", "3 minutes ago", "never",
                                             short_path(str(model_file))]]
    assert models.stderr_lines == []
    as_json = json.loads("\n".join(run(rbee_home, "models", "list", "--json").stdout_lines))
    assert as_json == {"node": "localhost", "models": [entry.public()]}

    nodes = run(rbee_home, "setup", "list-nodes")
    rows = table(nodes, NODE_COLUMNS)
    assert [r[0] for r in rows] == ["localhost", "mac"]
    assert rows[1][1] == "ada@mac.lan:2222" and rows[1][4] == "2 hours ago"
    assert nodes.stderr_lines == []  # a node was added: no note

    # Read only: the same files as before (no WAL files left, no logs), and no process.
    assert files_under(rbee_home) == before
    assert rbee_processes(rbee_home) == []
    print(f"models list with no queen: {took:.2f} s")  # 2.7 s when it started a queen and a hive


class NotAQueen(http.server.BaseHTTPRequestHandler):
    """Any other web server: 200 and HTML on every path."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = b"<!doctype html><html><body><h1>My dashboard</h1></body></html>\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_a_queen() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAQueen)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("args", [
    ("queen", "status"), ("ps",), ("models", "list"), ("setup", "list-nodes"),
    ("infer", "--model", "gemma3-270m", "--prompt", "hi", "--max-tokens", "2"),
], ids=["queen-status", "ps", "models-list", "list-nodes", "infer"])
def test_a_server_that_is_not_a_queen_is_one_error_naming_the_url(rbee_home: Path, not_a_queen: str,
                                                                   args: tuple[str, ...]) -> None:
    proc = run(rbee_home, *args, queen_url=not_a_queen, code=1)
    assert proc.stdout_lines == []
    assert len(proc.stderr_lines) == 1, proc.stderr_text()
    line = proc.stderr_lines[0]
    assert f"{not_a_queen} is not queen-rbee" in line and "RBEE_QUEEN_URL" in line, line
    assert "<html" not in line and "dashboard" not in line
    assert rbee_processes(rbee_home) == []  # no ephemeral queen beside it either


def test_queen_start_on_a_taken_port_names_the_port_and_the_fix(rbee_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = run(rbee_home, "queen", "start", "--port", str(port), code=1)
        assert len(start.stderr_lines) == 1, start.stderr_text()
        line = start.stderr_lines[0]
        assert line.startswith(f"Error: port {port} on 127.0.0.1 is taken") and "queen start --port" in line, line
        assert not (rbee_home / "queen.json").exists()
        # The queen itself, when it loses the race for the port: one line, no traceback.
        queen = RbeeProcess([program("queen-rbee"), "--port", str(port)], env={"RBEE_HOME": str(rbee_home)})
        assert queen.wait(60) == 1
        assert queen.stderr_lines == [f"queen-rbee: cannot listen on 127.0.0.1:{port} (Address already in use); "
                                      f"port {port} is taken: stop what listens there, or pick another port with "
                                      "--port"]
    assert rbee_processes(rbee_home) == []


def test_commands_that_match_nothing_say_so_and_exit_1_starting_nothing(rbee_home: Path) -> None:
    for args in (("workers", "shutdown", "--node", "no-such-node"), ("models", "list", "--node", "no-such-node"),
                 ("models", "rm", "gemma3-270m", "--node", "no-such-node")):
        unknown = run(rbee_home, *args, code=1)
        assert len(unknown.stderr_lines) == 1, unknown.stderr_text()
        assert "no node named 'no-such-node'" in unknown.stderr_lines[0]
        assert "setup add-node no-such-node" in unknown.stderr_lines[0]
    nothing = run(rbee_home, "workers", "shutdown", code=1)
    assert nothing.stderr_lines == ["Error: no workers running: no queen-rbee runs, so there is nothing to shut down"]
    absent = run(rbee_home, "models", "rm", "gemma3-270m", code=1)
    assert absent.stderr_lines == ["Error: no model gemma3-270m on localhost (`rbee-keeper models list` lists them)"]
    assert files_under(rbee_home) == [] and rbee_processes(rbee_home) == []


def test_a_queen_with_a_node_registry_lists_it_and_refuses_unknown_nodes(rbee_home: Path) -> None:
    url = dead_url()
    run(rbee_home, "queen", "start", queen_url=url)
    try:
        record = json.loads((rbee_home / "queen.json").read_text())
        status = run(rbee_home, "queen", "status", queen_url=url)
        fields = dict(line.split(None, 1) for line in status.stdout_lines)
        assert fields["STATUS"] == "running" and fields["URL"] == url and fields["HIVES"] == "none running"
        assert fields["PID"].startswith(f"{record['pid']} (started by `rbee-keeper queen start`")
        document = json.loads("\n".join(run(rbee_home, "queen", "status", "--json", queen_url=url).stdout_lines))
        from rbee import __version__

        assert document["version"] == __version__ and document["pid"] == record["pid"]
        assert document["running"] is True and document["recorded"] is True and document["uptime_s"] >= 0
        again = run(rbee_home, "queen", "start", queen_url=url)
        assert "already runs" in again.stderr_text()

        unknown = run(rbee_home, "workers", "shutdown", "--node", "no-such-node", queen_url=url, code=1)
        assert "no node named 'no-such-node'" in unknown.stderr_text() and "setup add-node" in unknown.stderr_text()
        nodes = run(rbee_home, "setup", "list-nodes", queen_url=url)
        assert [row[0] for row in table(nodes, NODE_COLUMNS)] == ["localhost"]
    finally:
        run(rbee_home, "queen", "stop", queen_url=url)
    assert not wait_no_rbee_processes(rbee_home, 15)
