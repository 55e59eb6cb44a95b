"""Find a queen, or start one: ephemeral (a child for one command) or persistent.

Lookup order: ``RBEE_QUEEN_URL`` (default ``http://127.0.0.1:8080``) if a queen answers
``/health`` there (``"service": "queen-rbee"``; anything else answering is an error naming
the URL, ``probe``); else the persistent queen recorded in ``$RBEE_HOME/queen.json`` by
``rbee-keeper queen start`` if it is alive; else none, and the command starts an
ephemeral queen (``queen-rbee --port 0`` as our child, in its own process group, dying
with us through PR_SET_PDEATHSIG) and shuts it down (with its hives and workers) at the end.

The ephemeral queen's stdout is its narration (JSON lines): we render it on stderr, which
is how the user sees the queen start and, at the end, the cascade shut down. Its stderr
goes to ``$RBEE_HOME/logs/queen.log`` so that library noise never mixes with narration.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import httpx
import trio

from ..errors import NotAQueenError, QueenStartError
from ..http_client import async_client
from ..lifetime import ChildProcess, pid_alive
from ..narration import jsonlines
from ..narration.events import Event, NarrationEvent
from ..paths import ensure_dir, home_path, rbee_home, state_error

DEFAULT_QUEEN_URL = "http://127.0.0.1:8080"
HEALTH_PROBE_S = 1.0
QUEEN_START_S = 60.0
QUEEN_STOP_S = 20.0


def queen_url_from_env() -> str:
    """``RBEE_QUEEN_URL`` or the default."""
    return (os.environ.get("RBEE_QUEEN_URL") or DEFAULT_QUEEN_URL).rstrip("/")


def api_token() -> str | None:
    """The bearer token for the queen (``RBEE_API_TOKEN``), if any."""
    return os.environ.get("RBEE_API_TOKEN") or None


def queen_program() -> str:
    """``queen-rbee`` beside our interpreter (a virtualenv's bin/), else on PATH."""
    sibling = Path(sys.executable).parent / "queen-rbee"
    return str(sibling) if sibling.exists() else "queen-rbee"


def record_path() -> Path:
    """Where ``queen start`` records the persistent queen (URL and PID)."""
    return home_path() / "queen.json"


def log_path() -> Path:
    """The queen's stderr log (its folder created); ``StateError`` when it cannot be."""
    return ensure_dir(rbee_home() / "logs") / "queen.log"


def open_log(mode: str) -> BinaryIO:
    """The queen's log, opened to be written; ``StateError`` naming the fix when it cannot be."""
    path = log_path()
    try:
        return open(path, mode)  # the caller closes it
    except OSError as exc:
        raise state_error(path, exc) from None


def read_record() -> dict | None:
    """The recorded persistent queen, or None."""
    try:
        return json.loads(record_path().read_text())
    except (OSError, ValueError):
        return None


#: The ``service`` of a queen's ``/health``: what tells it from any other server.
QUEEN_SERVICE = "queen-rbee"


async def probe(url: str) -> dict[str, Any] | None:
    """The ``/health`` of the queen at ``url`` (``{status, service, version, pid,
    uptime_s, jobs, hives}``), or None when nothing answers there within
    ``HEALTH_PROBE_S``. ``NotAQueenError`` naming the URL when something answers that is
    not queen-rbee (another web server on the port: its HTML is never shown)."""
    with trio.move_on_after(HEALTH_PROBE_S):
        try:
            async with async_client(url) as client:
                response = await client.get(f"{url}/health")
        except httpx.TransportError:
            return None
        try:
            health = response.json()
        except ValueError:
            health = None
        if response.status_code == 200 and isinstance(health, dict) and health.get("service") == QUEEN_SERVICE:
            return health
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        raise NotAQueenError(
            f"{url} is not queen-rbee: GET /health answered {response.status_code} ({kind}) without "
            f'"service": "{QUEEN_SERVICE}"; point RBEE_QUEEN_URL at your queen (unset: {DEFAULT_QUEEN_URL}), '
            "or stop what listens there")
    return None


async def is_healthy(url: str) -> bool:
    """True if a queen answers ``GET /health`` at ``url`` quickly (anything else: False)."""
    try:
        return await probe(url) is not None
    except NotAQueenError:
        return False


async def find_queen() -> str | None:
    """The URL of a running queen, or None (see the module doc for the order).

    Something at ``RBEE_QUEEN_URL`` that is not a queen is ``NotAQueenError``: the user
    pointed us there (or left the default port to another server), and a job must not go
    to it, nor a second queen start beside it unsaid. A recorded queen whose URL now
    answers otherwise is a stale record, and skipped."""
    url = queen_url_from_env()
    if await probe(url) is not None:
        return url
    record = read_record()
    if record and pid_alive(int(record.get("pid", 0))) and await is_healthy(record["url"]):
        return str(record["url"])
    return None


def ephemeral_notice() -> str:
    """The one line that says an ephemeral queen is being started, and why."""
    return (f"No queen-rbee at {queen_url_from_env()}: starting one until this command ends "
            "(ephemeral; `rbee-keeper queen start` keeps one running)")


class EphemeralQueen:
    """A queen we started for one command; ``shutdown()`` ends it and its cascade."""

    def __init__(self, child: ChildProcess, url: str, show: "_Switch") -> None:
        self.child = child
        self.url = url
        self._show = show

    def mute(self, muted: bool) -> None:
        """While a job streams, the queen's own stdout only repeats what the job's stream
        carries (hives narrate on stdout *and* into the request): hide it meanwhile."""
        self._show.muted = muted

    @classmethod
    async def start(cls, nursery: trio.Nursery, show: Callable[[Event], None]) -> "EphemeralQueen":
        """Start ``queen-rbee --port 0``; relay its narration to ``show`` (for its life).

        The first thing ``show`` gets is the keeper's own line saying so (``ephemeral_notice``)."""
        show(NarrationEvent(
            actor="rbee-keeper", action="queen_ephemeral", target=queen_url_from_env(), human=ephemeral_notice(),
            cute="No queen in the hive yet, so one is hatching just for this command! 👑",
            story=f"Nobody answered at {queen_url_from_env()}, so the keeper woke a queen of its own, "
                  "to reign only until this command is done.",
            ts_ms=time.time_ns() // 1_000_000))
        with open_log("ab") as log:
            log_start = log.tell()
            child = ChildProcess([queen_program(), "--port", "0"], capture_stdout=True, stdin_pipe=True, stderr=log)
        switch = _Switch(show)
        url = await nursery.start(_relay_queen_stdout, child, switch, log_start)
        return cls(child, url, switch)

    def terminate(self) -> None:
        """SIGTERM: the queen cancels its jobs and stops its hives, which stop their workers."""
        self.child.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (a second Ctrl-C): its hives still get SIGTERM through PR_SET_PDEATHSIG."""
        self.child.send_signal(signal.SIGKILL)

    async def shutdown(self) -> int:
        """Graceful stop: SIGTERM, wait (bounded), SIGKILL if it hangs."""
        with trio.CancelScope(shield=True):
            self.terminate()
            with trio.move_on_after(QUEEN_STOP_S):
                return await self.child.wait()
            self.kill()
            return await self.child.wait()


class _Switch:
    """A ``show`` callable that can be muted."""

    def __init__(self, show: Callable[[Event], None]) -> None:
        self.show = show
        self.muted = False

    def __call__(self, event: Event) -> None:
        if not self.muted:
            self.show(event)


async def _relay_queen_stdout(
    child: ChildProcess, show: Callable[[Event], None], log_start: int = 0, *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    assert child.stdout is not None
    decoder = jsonlines.Decoder(actor="queen-rbee")
    url = None
    said: str | None = None  # the queen's own last error line, if it gave one
    with trio.move_on_after(QUEEN_START_S) as start_scope:
        while url is None:
            data = await child.stdout.receive_some()
            for event in decoder.feed(data) if data else decoder.close():
                show(event)
                if isinstance(event, NarrationEvent) and event.actor == "queen-rbee":
                    if event.level == "error":
                        said = event.human
                    elif event.action == "server_bind":
                        url = str(event.extra.get("url"))
            if not data:
                break
    if url is None:
        child.send_signal(signal.SIGKILL)
        if start_scope.cancelled_caught:
            raise QueenStartError(f"queen-rbee did not start within {QUEEN_START_S:.0f} s; see {log_path()}")
        code = await child.wait()
        cause = said or start_failure(log_path(), log_start) or f"it exited with {code}"
        raise QueenStartError(f"queen-rbee did not start: {cause} (log: {log_path()})")
    task_status.started(url)
    while True:
        data = await child.stdout.receive_some()
        for event in decoder.feed(data) if data else decoder.close():
            show(event)
        if not data:
            return


def start_failure(log: Path, start: int = 0) -> str | None:
    """Why a queen that exited before it listened did so, from its log (from byte
    ``start``): its own one-line error (``queen-rbee: ...`` on stderr, or an error
    narration), else the last line of a traceback; None when the log says nothing."""
    try:
        with open(log, "rb") as f:
            f.seek(start)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("queen-rbee: "):
            return line.removeprefix("queen-rbee: ").strip()
    for line in reversed(lines):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("level") == "error" and isinstance(obj.get("human"), str):
            return obj["human"]
    last = [line.strip() for line in lines if line.strip() and not line.startswith(("{", " ", "|", "+"))]
    return last[-1] if last else None


def port_taken(host: str, port: int) -> bool:
    """Something listens on ``host:port`` already (bound as the queen binds: SO_REUSEADDR,
    so a port in TIME_WAIT is free). A pre-check, for the one-line answer; the queen's own
    bind still decides."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False  # the queen says what is wrong with the host
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def start_persistent(port: int, host: str = "127.0.0.1") -> dict:
    """Start a detached queen (its own session, outliving us); record and return URL/PID.

    A port already taken is refused before anything starts, naming the port and
    ``--port``; any other failure is the queen's own one line (``start_failure``)."""
    if port and port_taken(host, port):
        raise QueenStartError(
            f"port {port} on {host} is taken by another program; stop it, or start the queen on another port "
            f"with `rbee-keeper queen start --port N` (and set RBEE_QUEEN_URL=http://{host}:N for the other commands)")
    log = log_path()
    with open_log("wb") as out:
        proc = subprocess.Popen(
            [queen_program(), "--host", host, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + QUEEN_START_S
    while time.monotonic() < deadline:
        for line in log.read_bytes().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("action") == "server_bind":
                record = {"url": obj["url"], "pid": proc.pid}
                try:
                    record_path().write_text(json.dumps(record))
                except OSError as exc:
                    proc.kill()  # unrecorded, nobody could stop it later
                    proc.wait()
                    raise state_error(record_path(), exc) from None
                return record
        if proc.poll() is not None:
            cause = start_failure(log) or f"it exited with {proc.returncode}"
            raise QueenStartError(f"queen-rbee did not start: {cause} (log: {log})")
        time.sleep(0.05)
    proc.kill()
    raise QueenStartError(f"queen-rbee did not start within {QUEEN_START_S:.0f} s; see {log}")
