"""Worker processes at the OS level: start them so they die with the hive, record and sweep them.

Start: ``rbee.lifetime.popen_dying_with_us`` (own process group, PR_SET_PDEATHSIG(SIGTERM)),
on the hive's main thread (the Trio loop's), which lives as long as the hive: the death
signal fires when the *thread* that forked the child exits (see ``rbee.lifetime``).

PID files (``$RBEE_HOME/workers/<worker_id>.pid``, JSON ``{pid, worker_id, hive_pid}``)
outlive a hive that crashed in a way the death signal did not cover (a worker that ignored
SIGTERM). A hive starting sweeps them: a file whose hive is gone and whose PID is still an
``llm-worker-rbee`` with that worker id on its command line gets SIGTERM, then SIGKILL. A
PID that now belongs to another program is left alone. Every file of a gone hive is removed,
whatever its worker's fate (already gone, ended now, someone else's PID), and so are files
that cannot be read and the temporary file of a write that a crash interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from ..lifetime import pid_alive as _alive
from ..lifetime import popen_dying_with_us

WORKER_PROGRAM = "llm-worker-rbee"
#: How long a stale worker gets between SIGTERM and SIGKILL at sweep time.
SWEEP_GRACE_S = 3.0
#: A temporary PID file older than this was left by a crash, not by a write under way.
TMP_STALE_S = 10.0


def start_child(argv: Sequence[str], *, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, dying with us; stdout/stderr are pipes."""
    return popen_dying_with_us(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def pid_file(directory: Path, worker_id: str) -> Path:
    """Where the PID of ``worker_id`` is recorded."""
    return directory / f"{worker_id}.pid"


def _tmp_file(directory: Path, worker_id: str) -> Path:
    return directory / f".{worker_id}.pid.tmp"


def write_pid_file(directory: Path, worker_id: str, pid: int) -> None:
    """Record a running worker (written atomically: a sweep never reads half a file)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_file(directory, worker_id)
    tmp.write_text(json.dumps({"pid": pid, "worker_id": worker_id, "hive_pid": os.getpid()}))
    os.replace(tmp, pid_file(directory, worker_id))


def remove_pid_file(directory: Path, worker_id: str) -> None:
    """Forget a worker that exited."""
    pid_file(directory, worker_id).unlink(missing_ok=True)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_our_worker(pid: int, worker_id: str) -> bool:
    """PID ``pid`` runs ``llm-worker-rbee`` with ``worker_id`` on its command line."""
    argv = _cmdline(pid)
    return any(Path(a).name == WORKER_PROGRAM or a.endswith(WORKER_PROGRAM) for a in argv[:3]) and worker_id in argv


def is_hive(pid: int) -> bool:
    """PID ``pid`` is a running ``rbee-hive``."""
    return _alive(pid) and any("rbee-hive" in a for a in _cmdline(pid)[:3])


def _terminate(pid: int, grace_s: float, still_ours: Callable[[], bool]) -> bool:
    """SIGTERM ``pid``, wait up to ``grace_s`` for it to go, then SIGKILL it if it is still
    there and ``still_ours()`` (its PID not reused meanwhile); True when it had to be killed.
    ``ProcessLookupError`` when it was gone before the SIGTERM."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid) and still_ours():
        os.kill(pid, signal.SIGKILL)
        return True
    return False


def sweep_stale_workers(directory: Path) -> list[tuple[str, int, str]]:
    """End the workers recorded by hives that are gone; returns (worker_id, pid, outcome)."""
    swept: list[tuple[str, int, str]] = []
    if not directory.is_dir():
        return swept
    for tmp in directory.glob(".*.pid.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > TMP_STALE_S:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
    for path in sorted(directory.glob("*.pid")):
        try:
            record = json.loads(path.read_text())
            pid, worker_id, hive_pid = int(record["pid"]), str(record["worker_id"]), int(record.get("hive_pid", 0))
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if hive_pid != os.getpid() and is_hive(hive_pid):
            continue  # another live hive shares this RBEE_HOME: its workers are not stale
        if not _alive(pid) or not is_our_worker(pid, worker_id):
            outcome = "already gone" if not _alive(pid) else "not an llm-worker-rbee any more: left alone"
            swept.append((worker_id, pid, outcome))
            path.unlink(missing_ok=True)
            continue
        killed = _terminate(pid, SWEEP_GRACE_S, lambda: is_our_worker(pid, worker_id))
        swept.append((worker_id, pid, "killed" if killed else "terminated"))
        path.unlink(missing_ok=True)
    return swept


#: How long a stale hive gets to stop its workers after SIGTERM before SIGKILL.
STALE_HIVE_GRACE_S = 10.0


def hive_pid_file(run_dir: Path) -> Path:
    """``$RBEE_HOME/run/hive.pid``: the hive that runs on this RBEE_HOME now (JSON)."""
    return run_dir / "hive.pid"


def record_hive(run_dir: Path) -> None:
    """Write this process as the hive of ``run_dir`` (atomically: a reader never sees half)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = hive_pid_file(run_dir)
    tmp = path.with_name(f".hive.pid.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "started_at": time.time()}))
    os.replace(tmp, path)


def forget_hive(run_dir: Path) -> None:
    """Remove the hive record if it is still ours (a newer hive may have replaced it)."""
    path = hive_pid_file(run_dir)
    try:
        if int(json.loads(path.read_text())["pid"]) == os.getpid():
            path.unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass


def stop_stale_hive(run_dir: Path, grace_s: float = STALE_HIVE_GRACE_S) -> tuple[int, str] | None:
    """End the live ``rbee-hive`` recorded in ``run_dir`` (not us); returns (pid, outcome).

    It is a hive whose queen lost the node (its link went down): it has not yet noticed
    that its heartbeat stopped. SIGTERM lets it stop its workers; SIGKILL after
    ``grace_s`` (its workers then die of their parent-death signal). None when no live
    hive is recorded. A recorded PID that now runs something else is left alone.
    """
    try:
        pid = int(json.loads(hive_pid_file(run_dir).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or not is_hive(pid):
        return None
    try:
        killed = _terminate(pid, grace_s, lambda: is_hive(pid))
    except ProcessLookupError:
        return pid, "already gone"
    return pid, "killed" if killed else "stopped with its workers"
