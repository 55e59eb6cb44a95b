"""``rbee-keeper ps``: the table (a pure function), and the command with no queen running."""

from __future__ import annotations

from pathlib import Path

from rbee.keeper.admin import NO_QUEEN_NOTE, PS_COLUMNS, format_ps, human_size, ps_until
from tests.processes import RbeeProcess, program
from tests.queen.support import keeper_env, rbee_processes

MIB = 1 << 20
GIB = 1 << 30


def worker(**fields: object) -> dict:
    base = {
        "worker_id": "worker-1a2b3c4d", "node": "localhost", "model": "gemma3-270m", "backend": "cpu", "device": 0,
        "state": "ready", "slots": {"total": 4, "busy": 0}, "memory_bytes": 573741824,
        "unload_in_s": 287.5, "url": "http://127.0.0.1:40123",
    }
    base.update(fields)
    return base


def columns_of(line: str, header: str) -> list[str]:
    """Cut ``line`` at the start offsets of the header's columns."""
    starts = [header.index(name) for name in PS_COLUMNS]
    ends = starts[1:] + [None]
    return [line[a:b].strip() for a, b in zip(starts, ends)]


def test_empty_is_just_the_header() -> None:
    assert format_ps([]) == "NODE   MODEL   BACKEND   SLOTS   MEMORY   UNTIL   WORKER"


def test_one_row_like_ollama_ps() -> None:
    table = format_ps([worker(slots={"total": 4, "busy": 1}, unload_in_s=None)])
    header, row = table.splitlines()
    assert columns_of(row, header) == ["localhost", "gemma3-270m", "cpu:0", "1/4", "547 MiB", "in use", "worker-1a2b3c4d"]
    idle = format_ps([worker()]).splitlines()
    assert columns_of(idle[1], idle[0])[5] == "4 minutes from now"


def test_columns_align_whatever_the_widths() -> None:
    workers = [
        worker(),
        worker(worker_id="worker-ffff0000", node="a-much-longer-node-name", model="hf:org/repo:Q8_0", backend="cuda",
               device=1, slots={"total": 16, "busy": 12}, memory_bytes=int(7.5 * GIB), unload_in_s=None, state="busy"),
        worker(worker_id="worker-00000001", node="mac", backend="metal", device=0, state="spawning",
               slots={"total": 8, "busy": 0}, memory_bytes=0, unload_in_s=None),
    ]
    lines = format_ps(workers).splitlines()
    assert len(lines) == 4
    header = lines[0]
    starts = [header.index(name) for name in PS_COLUMNS]
    for line in lines[1:]:
        assert line == line.rstrip()
        for start in starts[1:]:
            # Every cell starts at its header's column, after at least two blanks.
            assert line[start - 2:start] == "  " and line[start] != " "
    cells = [columns_of(line, header) for line in lines[1:]]
    # Sorted by node, then model, then worker id.
    assert [c[0] for c in cells] == ["a-much-longer-node-name", "localhost", "mac"]
    assert cells[0] == ["a-much-longer-node-name", "hf:org/repo:Q8_0", "cuda:1", "12/16", "7.5 GiB", "in use", "worker-ffff0000"]
    assert cells[2] == ["mac", "gemma3-270m", "metal:0", "0/8", "-", "starting", "worker-00000001"]


def test_human_sizes() -> None:
    assert human_size(573741824) == "547 MiB"
    assert human_size(MIB) == "1 MiB"
    assert human_size(1023 * MIB) == "1023 MiB"
    assert human_size(GIB) == "1.0 GiB"
    assert human_size(int(1.5 * GIB)) == "1.5 GiB"
    assert human_size(40 * GIB) == "40.0 GiB"
    assert human_size(300 * 1024) == "300 KiB"
    assert human_size(1) == "1 KiB"
    assert human_size(0) == "-" and human_size(None) == "-"


def test_until_wording() -> None:
    assert ps_until(worker(unload_in_s=287.5)) == "4 minutes from now"
    assert ps_until(worker(unload_in_s=60.0)) == "about a minute from now"
    assert ps_until(worker(unload_in_s=119.9)) == "about a minute from now"
    assert ps_until(worker(unload_in_s=120)) == "2 minutes from now"
    assert ps_until(worker(unload_in_s=59.9)) == "59 seconds from now"
    assert ps_until(worker(unload_in_s=1.2)) == "1 second from now"
    assert ps_until(worker(unload_in_s=0.4)) == "less than a second from now"
    assert ps_until(worker(unload_in_s=0)) == "less than a second from now"
    assert ps_until(worker(unload_in_s=3600)) == "about an hour from now"
    assert ps_until(worker(unload_in_s=3 * 3600 + 5)) == "3 hours from now"
    assert ps_until(worker(unload_in_s=2 * 86400)) == "2 days from now"
    # Null: a busy slot says "in use"; an idle worker on a hive that never unloads, "Forever".
    assert ps_until(worker(unload_in_s=None, slots={"total": 4, "busy": 1}, state="busy")) == "in use"
    assert ps_until(worker(unload_in_s=None)) == "Forever"
    # A busy slot wins over a stale countdown; a worker starting up has no countdown yet.
    assert ps_until(worker(unload_in_s=12.0, slots={"total": 4, "busy": 2})) == "in use"
    assert ps_until(worker(state="spawning", unload_in_s=None, slots={"total": 4, "busy": 0})) == "starting"


def test_an_older_listing_still_prints() -> None:
    # The queen before /v1/workers carried slots {total, busy} and memory_bytes.
    old = {"worker_id": "worker-9", "node": "localhost", "model_ref": "gemma3-270m", "backend": "cpu", "device": None,
           "state": "idle", "slots": 4, "url": "http://127.0.0.1:1"}
    header, row = format_ps([old]).splitlines()
    assert columns_of(row, header) == ["localhost", "gemma3-270m", "cpu", "?/4", "-", "Forever", "worker-9"]


def test_no_queen_running_is_a_note_and_exit_0(rbee_home: Path) -> None:
    proc = RbeeProcess([program("rbee-keeper"), "ps"], env=keeper_env(rbee_home))
    assert proc.wait(60) == 0, proc.stderr_text()
    assert proc.stdout_lines == []
    assert proc.stderr_text().strip() == NO_QUEEN_NOTE
    assert rbee_processes(rbee_home) == []  # it started no queen


def test_ps_help() -> None:
    proc = RbeeProcess([program("rbee-keeper"), "ps", "--help"], env={})
    assert proc.wait(60) == 0
    assert "rbee-keeper ps" in "\n".join(proc.stdout_lines)
