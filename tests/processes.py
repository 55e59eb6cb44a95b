"""Start the real rbee programs as processes, and make sure each one is gone afterwards.

Every test that starts a process goes through ``RbeeProcess``: the process gets its own
session (so a stray Ctrl-C in the test runner does not hit it), its stdout is read line by
line through the narration JSON-lines decoder on a thread, and ``stop()`` ends it by its
PID (SIGTERM, then SIGKILL after a grace period) and checks it is gone. Nothing here
touches a process the test did not start.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

BIN = Path(sys.executable).parent


def program(name: str) -> str:
    """Path of one of our console scripts in the interpreter's environment."""
    return str(BIN / name)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != b"Z"


def wait_gone(pids: Iterable[int], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for every pid to exit; returns the ones still alive."""
    deadline = time.monotonic() + seconds
    pids = list(pids)
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def children_of(pid: int) -> list[int]:
    """Every descendant pid of ``pid`` (read from /proc), for leak checks."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def json_objects(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The lines that are JSON objects, parsed (narration in --narration json, say)."""
    out = []
    for line in list(lines):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


class RbeeProcess:
    """One real program under test, with its stdout lines collected as they come."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdin: Any = subprocess.DEVNULL,
        cwd: str | Path | None = None,
    ) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout_lines, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, into: list[str], announce: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            into.append(line)
            if announce:
                self.lines.put(line)
        if announce:
            self.lines.put(None)

    def json_lines(self) -> list[dict[str, Any]]:
        """Every stdout line so far that is a JSON object."""
        return json_objects(self.stdout_lines)

    def wait_for_action(self, action: str, seconds: float = 60.0) -> dict[str, Any]:
        """Block until a JSON line with ``action`` appears on stdout; return it."""
        deadline = time.monotonic() + seconds
        seen = 0
        while True:
            objs = self.json_lines()
            for obj in objs[seen:]:
                if obj.get("action") == action:
                    return obj
            seen = len(objs)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.argv[0]} never narrated {action!r}; stderr: {self.stderr_text()[-2000:]}")
            if self.proc.poll() is not None and self.lines.empty():
                time.sleep(0.1)
                objs = self.json_lines()
                if not any(o.get("action") == action for o in objs[seen:]):
                    raise RuntimeError(
                        f"{self.argv[0]} exited with {self.proc.returncode} before {action!r}; "
                        f"stdout: {self.stdout_lines[-20:]}; stderr: {self.stderr_text()[-2000:]}"
                    )
            try:
                self.lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                pass

    def bound_url(self, seconds: float = 60.0) -> str:
        """The URL the program narrated in its ``server_bind`` event (it was given port 0)."""
        event = self.wait_for_action("server_bind", seconds)
        return event["url"]

    def stderr_text(self) -> str:
        return "\n".join(self.stderr_lines)

    def wait(self, seconds: float) -> int:
        """Wait for the program to exit by itself; returns its exit code."""
        code = self.proc.wait(timeout=seconds)
        for t in self._threads:
            t.join(timeout=5)
        return code

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, grace: float = 10.0) -> int | None:
        """End the program by its PID (SIGTERM, then SIGKILL) and check it is gone."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        assert not pid_alive(self.pid), f"{self.argv[0]} (pid {self.pid}) is still alive"
        return self.proc.returncode

    def __enter__(self) -> "RbeeProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
