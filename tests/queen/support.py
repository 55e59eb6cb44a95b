"""Helpers for the queen, keeper and client tests: start a queen, find leftover processes."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tests.processes import RbeeProcess, pid_alive, program

#: Substrings of the command lines of our programs (console scripts run under python).
RBEE_PROGRAMS = ("queen-rbee", "rbee-hive", "llm-worker-rbee", "rbee-keeper")


def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (for ephemeral mode)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def rbee_processes(home: Path) -> list[int]:
    """PIDs of our programs whose environment has ``RBEE_HOME=home`` (this test's only)."""
    needle = f"RBEE_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if not any(p.encode() in cmdline for p in RBEE_PROGRAMS):
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (needle in environ or needle in cmdline.split(b"\0")) and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def wait_no_rbee_processes(home: Path, seconds: float) -> list[int]:
    """Wait until no program of this test's RBEE_HOME runs; returns those left."""
    deadline = time.monotonic() + seconds
    while True:
        left = rbee_processes(home)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def start_queen(home: Path, *extra: str) -> RbeeProcess:
    """A real ``queen-rbee --port 0`` with its own RBEE_HOME; read its URL with bound_url()."""
    return RbeeProcess([program("queen-rbee"), "--port", "0", *extra], env={"RBEE_HOME": str(home)})


def keeper_env(home: Path, queen_url: str | None = None) -> dict[str, str]:
    """The environment of a keeper run: its RBEE_HOME and a queen URL (dead: ephemeral)."""
    return {"RBEE_HOME": str(home), "RBEE_QUEEN_URL": queen_url or dead_url(), "PYTHONUNBUFFERED": "1"}
