"""The hives the queen started: a local child process, or ``rbee-hive daemon`` over SSH.

A hive lives as long as the queen (not the job that needed it first), so its task runs in
the queen's hive nursery. That task reads the hive's stdout (JSON-lines narration through
the codec) for the hive's whole life and hands every event to the sinks listening at the
moment: the job that is starting the hive (so its startup narration reaches that job's
stream, in order), a job that is waiting for a spawn (download progress), and otherwise the
queen's own process sink. One lock per node makes concurrent jobs share one start.

A node whose SSH connection cannot be made or is lost (keep-alives unanswered: see
``ssh.py``) goes into ``unreachable`` with the reason: placement skips it, and the queen
knocks on its SSH port until it answers; a hive that starts there clears it.

Shutdown order (``stop_all``): EOF on the hive's stdin (pipe for a child, the SSH channel
for a remote hive); the hive shuts its workers down and exits; SIGTERM/SIGKILL for a local
hive that does not, after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx
import trio

from ..client.jobs import error_from_response
from ..errors import HiveStartError, SshError, WorkerError
from ..lifetime import RBEE_SECRETS, ChildProcess, env_without
from ..narration import get_process_sink, jsonlines, narrate, outside_jobs, sse
from ..narration.events import Done, Event, NarrationEvent, WorkerChange
from .asyncio_bridge import AsyncioBridge
from .nodes import Node
from .ssh import SshHive, SshLiveness

ACTOR = "queen-rbee"
HIVE_ACTOR = "rbee-hive"
STOP_GRACE_S = 10.0


class Hive:
    """One running hive as the queen sees it: its node, HTTP URL and narration fan-out."""

    def __init__(self, node: Node, http: httpx.AsyncClient) -> None:
        self.node = node
        self.http = http
        # The per-node key the queen mints for each hive it starts (DESIGN: "per-node and
        # per-worker keys minted by the parent"); the hive gets it through --token-file.
        self.token = secrets.token_urlsafe(32)
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.url = ""  # reachable from the queen (through the SSH forward for a remote node)
        self.listeners: list[Callable[[Event], None]] = []
        self.ready = trio.Event()
        self.exited = trio.Event()
        #: What the node offers (``GET /v1/detect``), fetched once the hive is up.
        self.facts: dict[str, Any] = {}
        self.ssh: SshHive | None = None
        self.child: ChildProcess | None = None
        self._forwards: dict[int, int] = {}  # node port -> local port
        self._last_lines: list[str] = []
        #: The hive's own last error narration (why it stopped, in its words), if any.
        self.said_error: str | None = None

    def relay(self, event: Event) -> None:
        """Hand one event of the hive's stdout to whoever listens (else the queen's stdout)."""
        if isinstance(event, NarrationEvent) and event.action == "stdout":
            self.remember(event.human)
        elif isinstance(event, NarrationEvent) and event.actor == HIVE_ACTOR and event.level == "error":
            self.said_error = event.human
        if self.listeners:
            for sink in list(self.listeners):
                try:
                    sink(event)
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        elif isinstance(event, NarrationEvent):
            get_process_sink()(event)

    def remember(self, line: str) -> None:
        """Keep the last few lines of the hive's non-narration output for error messages."""
        self._last_lines = (self._last_lines + [line[:300]])[-5:]

    def listen(self, sink: Callable[[Event], None]) -> "_Listening":
        """``with hive.listen(sink):`` the hive's stdout narration also goes to ``sink``."""
        return _Listening(self, sink)

    async def reach(self, url: str) -> str:
        """A URL on the node (a worker's) as the queen can reach it."""
        if self.ssh is None:
            return url
        parts = urlsplit(url)
        port = parts.port or 80
        local = self._forwards.get(port)
        if local is None:
            local = self._forwards[port] = await self.ssh.forward(port)
        return f"http://127.0.0.1:{local}{parts.path}".rstrip("/")

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the hive's HTTP API; returns the JSON body, raises the envelope's error."""
        try:
            response = await self.http.request(method, self.url + path, headers=self.headers, **kwargs)
        except httpx.TransportError as exc:
            raise WorkerError(f"rbee-hive on node {self.node.name!r} does not answer ({exc})") from None
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json() if response.content else None

    @contextlib.asynccontextmanager
    async def open_sse(self, path: str) -> AsyncIterator[AsyncIterator[Event]]:
        """``async with hive.open_sse(path) as events:`` the typed events of one of the hive's
        SSE routes, ``Done`` included (the caller decides what its absence means).

        Raises the envelope's error when the hive does not answer 200.
        """
        async with self.http.stream("GET", self.url + path, headers=self.headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise error_from_response(response)
            events = _sse_events(response)
            try:
                yield events
            finally:
                await events.aclose()

    def failure_hint(self) -> str:
        """The hive's last lines of non-narration output, for an error message."""
        return " | ".join(self._last_lines) or "no output"


async def _sse_events(response: httpx.Response) -> AsyncIterator[Event]:
    decoder = sse.Decoder()
    async for chunk in response.aiter_raw():
        for event in decoder.feed(chunk):
            yield event


class _Listening:
    def __init__(self, hive: Hive, sink: Callable[[Event], None]) -> None:
        self.hive, self.sink = hive, sink

    def __enter__(self) -> None:
        self.hive.listeners.append(self.sink)

    def __exit__(self, *exc: object) -> None:
        self.hive.listeners.remove(self.sink)


class HiveManager:
    """Starts at most one hive per node, on demand, and stops them all at shutdown."""

    def __init__(
        self,
        nursery: trio.Nursery,
        bridge: AsyncioBridge,
        http: httpx.AsyncClient,
        run_dir: Path,
        *,
        on_worker_change: Callable[[str, WorkerChange], None] | None = None,
        on_hive_gone: Callable[[str], None] | None = None,
        liveness: SshLiveness = SshLiveness(),
    ) -> None:
        self.liveness = liveness
        self._on_worker_change = on_worker_change
        self._on_hive_gone = on_hive_gone
        self._run_dir = run_dir
        self._nursery = nursery
        self._bridge = bridge
        self._http = http
        self._hives: dict[str, Hive] = {}
        self._locks: dict[str, trio.Lock] = {}
        #: Nodes the queen cannot reach now: name -> why, in words (set when SSH to the node
        #: fails or its connection is lost; cleared when a hive there starts again).
        self.unreachable: dict[str, str] = {}

    def running(self) -> list[Hive]:
        """The hives that are up now."""
        return [h for h in self._hives.values() if h.ready.is_set() and not h.exited.is_set()]

    def get(self, name: str) -> Hive | None:
        """The running hive of node ``name``, if any."""
        hive = self._hives.get(name)
        return hive if hive is not None and not hive.exited.is_set() else None

    async def ensure(self, node: Node, sink: Callable[[Event], None] | None = None) -> Hive:
        """The node's hive, started now if needed; its startup narration goes to ``sink``."""
        lock = self._locks.setdefault(node.name, trio.Lock())
        async with lock:
            hive = self.get(node.name)
            if hive is not None:
                return hive
            hive = Hive(node, self._http)
            if sink is not None:
                hive.listeners.append(sink)
            try:
                await self._nursery.start(self._run_hive, hive)
                self._reachable_again(node.name)
                hive.facts = await hive.request("GET", "/v1/detect") or {}
                # The hive's worker news, read for its whole life: connected before any
                # job can ask this hive for a worker, so no change is missed.
                await self._nursery.start(self._read_events, hive)
            except SshError:
                reason = hive.ssh.unreachable() if hive.ssh is not None else None
                if reason is not None:
                    self._mark_unreachable(node, reason)
                raise
            finally:
                if sink is not None:
                    hive.listeners.remove(sink)
            self._hives[node.name] = hive
            return hive

    def _mark_unreachable(self, node: Node, reason: str) -> None:
        """Node ``node`` cannot be reached: placement skips it, and it is watched until
        its SSH port answers again (then used again, with no restart of the queen)."""
        first = node.name not in self.unreachable
        self.unreachable[node.name] = reason
        if first:
            with outside_jobs():  # the queen's own news, not the news of the job that found it
                narrate(ACTOR, "node_unreachable", f"Node {node.name} is unreachable: {reason}; new jobs go to "
                        "other nodes until it answers again", level="warn", node=node.name,
                        cute=f"{node.name} went quiet... the hive will fly elsewhere. 📡",
                        story=f"The queen lost sight of {node.name} and sent her jobs elsewhere.")
                self._nursery.start_soon(self._watch_return, node)

    def _reachable_again(self, name: str) -> None:
        if self.unreachable.pop(name, None) is not None:
            with outside_jobs():
                narrate(ACTOR, "node_reachable", f"Node {name} answers again: new jobs may go there", node=name,
                        cute=f"{name} is back in the meadow! 🌼", story=f"The queen saw {name} again.")

    async def _watch_return(self, node: Node) -> None:
        """Knock on the node's SSH port until it answers (or a hive starts there)."""
        interval = max(self.liveness.keepalive_interval_s, 0.5)
        while node.name in self.unreachable:
            with trio.move_on_after(max(interval * 2, 1.0)):
                try:
                    stream = await trio.open_tcp_stream(node.ssh_host or "127.0.0.1", node.ssh_port)
                except OSError:
                    pass
                else:
                    await stream.aclose()
                    self._reachable_again(node.name)
                    return
            await trio.sleep(interval)

    async def _read_events(self, hive: Hive, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the hive's ``GET /v1/events`` to the scheduler until the hive exits."""
        started = False
        try:
            while not hive.exited.is_set():
                try:
                    async with hive.open_sse("/v1/events") as events:
                        if not started:
                            started = True
                            task_status.started()
                        async for event in events:
                            if isinstance(event, Done):
                                break
                            if isinstance(event, WorkerChange) and self._on_worker_change is not None:
                                self._on_worker_change(hive.node.name, event)
                except (httpx.TransportError, WorkerError) as exc:
                    if not started:
                        raise WorkerError(f"rbee-hive on node {hive.node.name} gave no worker events ({exc})") from None
                # The stream ended: the hive is exiting (or the connection broke; reconnect).
                with trio.move_on_after(0.5):
                    await hive.exited.wait()
        finally:
            if self._on_hive_gone is not None:
                self._on_hive_gone(hive.node.name)

    async def _run_hive(self, hive: Hive, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        node = hive.node
        where = "as a local child process" if node.is_local else f"over SSH ({node.ssh_host}:{node.ssh_port})"
        narrate(ACTOR, "hive_start", f"Starting rbee-hive on node {node.name} {where}", target=node.name,
                node=node.name, cute=f"Waking the hive on {node.name}! 🏠🐝",
                story=f"The queen sent word to {node.name} to wake its hive, {where}.")
        try:
            if node.is_local:
                token_file = self._write_token(node.name, hive.token)
                argv = shlex.split(node.rbee_hive_command) + [
                    "daemon", "--port", str(node.hive_port), "--token-file", str(token_file),
                ]
                try:
                    # The hive's key is its token file: the queen's own token stays here
                    # (HF_TOKEN goes along: the hive downloads models).
                    hive.child = ChildProcess(argv, env=env_without(*RBEE_SECRETS), capture_stdout=True,
                                              stdin_pipe=True)
                except OSError as exc:
                    raise HiveStartError(
                        f"cannot run {argv[0]!r} on node {node.name} ({exc.strerror or exc});"
                        " install rbee there or set RBEE_HIVE_COMMAND to the rbee-hive command"
                    ) from None
                assert hive.child.stdout is not None
                await self._pump(hive, hive.child.stdout.receive_some, task_status)
            else:
                hive.ssh = SshHive(self._bridge, node, hive.token, self.liveness)
                await hive.ssh.start()
                # Not a nested nursery: task_status.started() must be called from this task
                # with no nursery of its own open. The drain ends at the channel's EOF.
                self._nursery.start_soon(self._drain_stderr, hive, hive.ssh.read_stderr)
                await self._pump(hive, hive.ssh.read_stdout, task_status)
        finally:
            # Said before ``exited`` is set: whoever wakes on it finds the node marked.
            lost = hive.ssh.unreachable() if hive.ssh is not None and hive.ready.is_set() else None
            if lost is not None:
                self._mark_unreachable(node, lost)
            hive.exited.set()
            with trio.CancelScope(shield=True):
                await self._stop_transport(hive)
            if node.is_local:
                # The hive read its key at start; a secret of a hive that is gone stays nowhere.
                (self._run_dir / f"hive-{node.name}.token").unlink(missing_ok=True)

    def _write_token(self, name: str, token: str) -> Path:
        """A 0600 file holding the hive's token (a command line is visible to all users)."""
        self._run_dir.mkdir(parents=True, exist_ok=True)
        path = self._run_dir / f"hive-{name}.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return path

    async def _pump(self, hive: Hive, read: Callable[[], Any], task_status: trio.TaskStatus[None]) -> None:
        decoder = jsonlines.Decoder(actor=HIVE_ACTOR)
        started = False
        while True:
            data = await read()
            events = decoder.feed(data) if data else decoder.close()
            for event in events:
                hive.relay(event)
                if not isinstance(event, NarrationEvent) or event.actor != HIVE_ACTOR:
                    continue
                if event.action == "server_bind" and not hive.url:
                    port = int(event.extra.get("port") or urlsplit(str(event.extra.get("url"))).port)
                    hive.url = await hive.reach(f"http://127.0.0.1:{port}")
                elif event.action == "hive_ready" and not started and hive.url:
                    started = True
                    hive.ready.set()
                    task_status.started()
            if not data:
                break
        if not started:
            if hive.said_error:  # it said why (a read-only RBEE_HOME there, say): that is the fix
                raise HiveStartError(f"rbee-hive on node {hive.node.name} could not start: {hive.said_error}")
            raise HiveStartError(
                f"rbee-hive on node {hive.node.name} exited before it was ready ({hive.failure_hint()});"
                f" check that `{hive.node.rbee_hive_command} daemon` runs there"
            )
        if hive.ssh is not None and hive.ssh.unreachable() is not None:
            return  # not an exit we saw: the node is gone from the network (said as node_unreachable)
        narrate(ACTOR, "hive_exit", f"rbee-hive on node {hive.node.name} has exited", node=hive.node.name,
                cute=f"The hive on {hive.node.name} is fast asleep. 💤",
                story=f"The hive on {hive.node.name} went quiet.")

    async def _drain_stderr(self, hive: Hive, read: Callable[[], Any]) -> None:
        # The remote hive's stderr: into the queen's stderr (its log) and the error hint.
        partial = b""
        while data := await read():
            sys.stderr.buffer.write(data)
            sys.stderr.flush()
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                if line.strip():
                    hive.remember(line.decode("utf-8", "replace"))

    async def _stop_transport(self, hive: Hive) -> None:
        if hive.child is not None:
            await hive.child.stop(STOP_GRACE_S)
            await hive.child.aclose()
        if hive.ssh is not None:
            try:
                await hive.ssh.close(STOP_GRACE_S)
            except (SshError, OSError, trio.BrokenResourceError):
                pass

    async def stop_all(self) -> None:
        """Shut every hive down (EOF on stdin; they stop their workers), in parallel."""
        hives = [h for h in self._hives.values() if not h.exited.is_set()]
        for hive in hives:
            narrate(ACTOR, "hive_stop", f"Stopping rbee-hive on node {hive.node.name}", node=hive.node.name,
                    cute=f"Hive on {hive.node.name}, time for bed! 🌙",
                    story=f"The queen told the hive on {hive.node.name} to rest.")
        async with trio.open_nursery() as nursery:
            for hive in hives:
                nursery.start_soon(self._stop_one, hive)

    async def _stop_one(self, hive: Hive) -> None:
        if hive.child is not None:
            hive.child.close_stdin()
        elif hive.ssh is not None:
            await hive.ssh.close(STOP_GRACE_S)
        with trio.move_on_after(STOP_GRACE_S * 2):
            await hive.exited.wait()
