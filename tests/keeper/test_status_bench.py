"""``rbee-keeper status`` and ``rbee-keeper bench`` as the real program prints them.

Real processes throughout: the keeper CLI, a queen (persistent, or the bench's ephemeral
one), hives, workers with the embedded model, and a real sshd for a second node. A node
whose SSH port nobody listens on stands for a node that is down.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rbee import openapi
from rbee.keeper.admin import STATUS_COLUMNS, STATUS_MODEL_COLUMNS, STATUS_NO_QUEEN_NOTE, STATUS_WORKER_COLUMNS
from rbee.keeper.bench import COLUMNS as BENCH_COLUMNS
from rbee.queen.nodes import Node, NodeRegistry
from tests.contract import Contract
from tests.processes import RbeeProcess, program
from tests.queen.support import dead_url, keeper_env, rbee_processes, wait_no_rbee_processes
from tests.sshd import free_port

GIB = 1 << 30
FAR_DETECT = {"hostname": "far", "backends": ["cpu", "cuda"], "devices": [
    {"backend": "cpu", "index": 0, "name": "EPYC", "memory_total_bytes": 64 * GIB, "memory_free_bytes": 60 * GIB},
    {"backend": "cuda", "index": 0, "name": "RTX 4090", "memory_total_bytes": 24 * GIB, "memory_free_bytes": None}]}


def keeper(home: Path, *args: str, queen_url: str | None = None, code: int = 0, seconds: float = 300) -> RbeeProcess:
    """One keeper command run to its end, with the exit code expected; never a traceback."""
    proc = RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home, queen_url))
    assert proc.wait(seconds) == code, (args, proc.stdout_lines, proc.stderr_text())
    assert "Traceback" not in proc.stderr_text()
    return proc


def tables(proc: RbeeProcess, *headers: tuple[str, ...]) -> list[list[list[str]]]:
    """The tables on stdout (blank lines between them), each cut at its header's columns."""
    blocks = "\n".join(proc.stdout_lines).split("\n\n")
    assert len(blocks) == len(headers), proc.stdout_lines
    found = []
    for block, columns in zip(blocks, headers):
        header, *lines = block.splitlines()
        starts = [header.index(name) for name in columns]
        assert header.split()[0] == columns[0].split()[0], header
        found.append([[line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for line in lines])
    return found


def status_document(proc: RbeeProcess) -> dict:
    """``status --json``'s document, checked against the queen's OpenAPI schema of it."""
    document = json.loads("\n".join(proc.stdout_lines))
    contract = Contract(json.loads(json.dumps(openapi.document(openapi.QUEEN))))
    errors = [e.message for e in contract.validator({"$ref": "#/components/schemas/ClusterStatus"})
              .iter_errors(document)]
    assert errors == [], document
    return document


def add_down_node(home: Path) -> None:
    """Node "gone": its SSH port refuses every connection."""
    NodeRegistry(home / "nodes.db").put(Node(name="gone", ssh_host="127.0.0.1", ssh_port=free_port(),
                                             detect=FAR_DETECT))


def test_status_and_bench_with_no_queen_start_nothing(rbee_home: Path) -> None:
    add_down_node(rbee_home)
    before = sorted(p.name for p in rbee_home.iterdir())
    status = keeper(rbee_home, "status")
    assert status.stderr_lines == [STATUS_NO_QUEEN_NOTE]
    [nodes] = tables(status, STATUS_COLUMNS)
    assert nodes == [["localhost", "unknown", "no", "-", "-", "0", "0"],
                     ["gone", "unknown", "no", "cpu, cuda:0 RTX 4090 24.0 GiB", "60.0 GiB", "0", "-"]]
    document = status_document(keeper(rbee_home, "status", "--json"))
    assert [(n["name"], n["hive_up"], n["reachable"], n["facts_from"], n["models"]) for n in document["nodes"]] == \
        [("localhost", False, None, None, []), ("gone", False, None, "registry", None)]

    unknown = keeper(rbee_home, "bench", "--node", "nowhere", code=1)
    assert unknown.stdout_lines == [] and len(unknown.stderr_lines) == 1
    assert unknown.stderr_lines[0].startswith("Error: no node named 'nowhere'; add it with")
    both = keeper(rbee_home, "bench", "--node", "gone", "--all", code=2)
    assert both.stderr_lines == ["Error: choose --node N or --all, not both"]
    assert rbee_processes(rbee_home) == []  # no queen, no hive
    assert sorted(p.name for p in rbee_home.iterdir()) == before  # nothing written


@pytest.mark.model
def test_status_and_bench_on_a_persistent_queen(rbee_home: Path) -> None:
    add_down_node(rbee_home)
    url = dead_url()
    keeper(rbee_home, "queen", "start", queen_url=url, seconds=120)
    try:
        [nodes] = tables(keeper(rbee_home, "status", queen_url=url), STATUS_COLUMNS)
        assert [row[:3] for row in nodes] == [["localhost", "unknown", "no"], ["gone", "unknown", "no"]]

        bench = keeper(rbee_home, "bench", "--node", "localhost", "--max-tokens", "16", queen_url=url)
        [[row]] = tables(bench, BENCH_COLUMNS)
        assert row[0] == "localhost" and 1 < int(row[1]) <= 16
        ttft, rate = float(row[2].removesuffix(" ms")), float(row[3])
        assert ttft > 0 and rate > 0
        assert float(row[4].removesuffix(" ms")) > 0 and float(row[5]) > 0  # the worker's own figures
        assert row[6].endswith(" s")
        said = "\n".join(bench.stderr_lines)
        assert "warm-up job" in said and "measuring 16 tokens" in said

        nodes, workers, models = tables(keeper(rbee_home, "status", queen_url=url),
                                        STATUS_COLUMNS, STATUS_WORKER_COLUMNS, STATUS_MODEL_COLUMNS)
        assert nodes[0][:4] == ["localhost", "yes", "yes", "cpu"] and nodes[0][5:] == ["1", "1"]
        assert nodes[0][4].endswith("GiB")  # free memory, from its hive's facts
        assert [w[0] for w in workers] == ["localhost"] and workers[0][1].startswith("worker-")
        assert workers[0][2:] == ["gemma3-270m", "0/4", "ready"]
        assert models == [["localhost", "gemma3-270m", "241 MiB"]]

        down = keeper(rbee_home, "bench", "--node", "gone", queen_url=url, code=1)
        # One node: its error is one line (after the line saying its warm-up job began).
        assert down.stdout_lines == [] and down.stderr_lines[-1].startswith("Error: ")
        assert "--ssh-port" in down.stderr_lines[-1] and len(down.stderr_lines) == 2
        document = status_document(keeper(rbee_home, "status", "--json", queen_url=url))
        local, gone = document["nodes"]
        assert (local["name"], local["reachable"], local["hive_up"], local["facts_from"]) == \
            ("localhost", True, True, "hive")
        assert [w["model"] for w in local["workers"]] == ["gemma3-270m"]
        assert [m["reference"] for m in local["models"]] == ["gemma3-270m"]
        # The failed SSH connection made it unreachable, with the reason the queen has.
        assert (gone["reachable"], gone["hive_up"], gone["models"]) == (False, False, None)
        assert "gone" in gone["unreachable_reason"]

        unknown = keeper(rbee_home, "bench", "--node", "nowhere", queen_url=url, code=1)
        assert unknown.stdout_lines == [] and len(unknown.stderr_lines) == 1
        assert unknown.stderr_lines[0].startswith("Error: no node named 'nowhere'")
    finally:
        keeper(rbee_home, "queen", "stop", queen_url=url, seconds=120)
    assert wait_no_rbee_processes(rbee_home, 15) == []


@pytest.mark.model
@pytest.mark.sshd
def test_bench_all_over_localhost_an_ssh_node_and_a_node_that_is_down(rbee_home: Path, sshd_server) -> None:
    s = sshd_server
    # PATH differs under sshd: the node's hive command is absolute and carries RBEE_HOME.
    keeper(rbee_home, "setup", "add-node", "blep", "--ssh-host", s.host, "--ssh-port", str(s.port),
           "--ssh-user", s.user, "--ssh-key", str(s.key_path),
           "--rbee-hive-command", f"env RBEE_HOME={rbee_home} {program('rbee-hive')}", seconds=120)
    add_down_node(rbee_home)
    bench = keeper(rbee_home, "bench", "--all", "--max-tokens", "8", code=1, seconds=600)
    [rows] = tables(bench, (*BENCH_COLUMNS, "ERROR"))
    assert [r[0] for r in rows] == ["localhost", "blep", "gone"]  # the registry's order, one after another
    for row in rows[:2]:
        assert float(row[2].removesuffix(" ms")) > 0 and float(row[3]) > 0 and row[7] == "", row
    assert rows[2][1:7] == ["-"] * 6 and "gone" in rows[2][7]
    # The ephemeral queen (and with it every hive and worker) is gone with the bench.
    assert any("starting one until this command ends" in line for line in bench.stderr_lines)
    assert wait_no_rbee_processes(rbee_home, 20) == []
