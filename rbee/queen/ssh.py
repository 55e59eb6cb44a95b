"""Drive a node over SSH with asyncssh: probe it (``rbee-hive detect``), run its hive.

Everything asyncssh does runs on the ``AsyncioBridge`` loop; the functions prefixed
``_aio_`` are asyncio coroutines and only ever run there. The Trio-facing API is
``probe_node()`` and ``SshHive``.

Host keys: the first successful ``add-node`` pins the server's host key in ``nodes.db``
(trust on first use, as ``ssh`` does with ``known_hosts``); every later connection accepts
only that key. When a node has no pinned key yet, the user's ``~/.ssh/known_hosts`` is not
consulted: adding the node *is* the moment of trust.

The hive's HTTP port: the hive binds 127.0.0.1 on its node, so nothing but the node itself
reaches it. The queen asks asyncssh for a local port forward (``forward_local_port``) from
127.0.0.1:<free port> on the queen's machine to 127.0.0.1:<hive port> on the node, and
talks HTTP to that. Closing the SSH connection closes the forward and the hive's stdin,
and the hive shuts itself (and its workers) down on that EOF.

A node that drops off the network sends no EOF and no reset: both sides would wait for
minutes (TCP's retransmissions, sshd's idea of a live session). So each side watches the
other (``SshLiveness``): the queen sends SSH keep-alives and gives the connection up after
``keepalive_count`` unanswered ones (the node's jobs then fail naming it, and the node is
marked unreachable); the queen also writes a heartbeat line to the hive's stdin, and a hive
that hears none for its ``--heartbeat-timeout`` stops its workers and exits. A hive that a
lost queen left behind is stopped by the next hive started there (``--replace-stale``).
"""

from __future__ import annotations

import asyncio
import json
import shlex
from dataclasses import dataclass
from typing import Any

import asyncssh

from ..errors import NodeUnreachableError, SshError
from .asyncio_bridge import AsyncioBridge
from .nodes import Node


@dataclass(frozen=True)
class SshLiveness:
    """How the queen and a remote hive notice that the other is gone (see the module doc).

    Defaults: a lost node is given up after about ``interval x (count + 1)`` = 4 s of
    silence; its hive stops itself after 10 s without a heartbeat.
    """

    #: Seconds of silence from the node before the queen sends an SSH keep-alive.
    keepalive_interval_s: float = 1.0
    #: Unanswered keep-alives after which the connection (and the node's jobs) is given up.
    keepalive_count: int = 3
    #: Seconds an SSH connection (TCP and handshake) may take before the node is unreachable.
    connect_timeout_s: float = 10.0
    #: How often the queen writes a heartbeat line to a remote hive's stdin.
    heartbeat_interval_s: float = 1.0
    #: Seconds without a heartbeat after which a remote hive stops its workers and exits.
    hive_heartbeat_timeout_s: float = 10.0

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty: fine), one phrase each."""
        found = []
        if not self.keepalive_interval_s > 0:
            found.append("--ssh-keepalive-interval must be above 0 seconds")
        if self.keepalive_count < 1:
            found.append("--ssh-keepalive-count must be 1 or more")
        if not self.connect_timeout_s > 0:
            found.append("--ssh-connect-timeout must be above 0 seconds")
        if not self.hive_heartbeat_timeout_s > self.heartbeat_interval_s:
            found.append(f"--hive-heartbeat-timeout must be above the heartbeat interval ({self.heartbeat_interval_s:g} s)")
        return found


class _Watched(asyncssh.SSHClient):
    """Keeps why the connection ended (None: closed by us or cleanly)."""

    def __init__(self) -> None:
        self.lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


def _connect_options(node: Node, liveness: SshLiveness) -> dict[str, Any]:
    options: dict[str, Any] = {
        "port": node.ssh_port,
        "keepalive_interval": liveness.keepalive_interval_s,
        "keepalive_count_max": liveness.keepalive_count,
        "connect_timeout": liveness.connect_timeout_s,
    }
    if node.ssh_user:
        options["username"] = node.ssh_user
    if node.ssh_key:
        options["client_keys"] = [node.ssh_key]
    # Pinned host key, or (adding the node) trust on first use.
    options["known_hosts"] = ([asyncssh.import_public_key(node.host_key)], [], []) if node.host_key else None
    # None of the queen's environment travels to a node (its RBEE_API_TOKEN, HF_TOKEN),
    # whatever SendEnv the user's ~/.ssh/config lists: the hive has its own key, and a
    # node's own settings are its login's.
    options["send_env"] = None
    return options


def _describe(node: Node) -> str:
    user = f"{node.ssh_user}@" if node.ssh_user else ""
    return f"{user}{node.ssh_host}:{node.ssh_port}"


def ssh_error(node: Node, exc: BaseException, *, cls: type[SshError] = SshError) -> SshError:
    """One line naming what failed and what to check."""
    if isinstance(exc, asyncssh.PermissionDenied):
        hint = "check --ssh-user and --ssh-key (the key must be in the node's authorized_keys)"
    elif isinstance(exc, asyncssh.HostKeyNotVerifiable):
        hint = "the node's host key changed since it was added; remove and add the node again if that is expected"
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        exc = TimeoutError("no answer (connection timed out)")
        hint = "is the node switched on and on the network? check --ssh-host and --ssh-port"
    elif isinstance(exc, (ConnectionRefusedError, OSError)):
        hint = "check --ssh-host and --ssh-port, and that sshd runs there"
    else:
        hint = "check the node's SSH settings"
    return cls(f"SSH to node {node.name!r} ({_describe(node)}) failed: {exc or type(exc).__name__}; {hint}")


def _is_network_failure(exc: BaseException) -> bool:
    """The node did not answer or the path to it broke (not: it refused our login)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, OSError, asyncssh.ConnectionLost)):
        return True
    return False


async def _aio_probe(node: Node, liveness: SshLiveness) -> tuple[dict[str, Any], str]:
    async with asyncssh.connect(node.ssh_host, **_connect_options(node, liveness)) as conn:
        command = f"{node.rbee_hive_command} detect"
        result = await conn.run(command, check=False)
        if result.exit_status != 0:
            stderr = str(result.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
            raise NodeUnreachableError(
                f"`{command}` failed on node {node.name!r} (exit {result.exit_status}): {stderr[0]};"
                " is rbee installed there? set --rbee-hive-command to its full path"
            )
        try:
            detect = json.loads(str(result.stdout))
        except ValueError:
            raise NodeUnreachableError(
                f"`{command}` on node {node.name!r} did not print JSON; check --rbee-hive-command"
            ) from None
        key = conn.get_server_host_key()
        host_key = key.export_public_key("openssh").decode().strip() if key else ""
        return detect, host_key


async def probe_node(bridge: AsyncioBridge, node: Node,
                     liveness: SshLiveness = SshLiveness()) -> tuple[dict[str, Any], str]:
    """Connect, run ``<rbee-hive command> detect``; returns (detect JSON, host key line).

    Raises ``NodeUnreachableError`` (422) naming cause and fix when any step fails.
    """
    try:
        return await bridge.run(_aio_probe, node, liveness)
    except NodeUnreachableError:
        raise
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
        raise ssh_error(node, exc, cls=NodeUnreachableError) from None


class SshHive:
    """A hive running on a node under one SSH connection (``rbee-hive daemon`` there).

    ``read_stdout()`` gives the hive's stdout bytes (JSON-lines narration); ``forward()``
    opens the local port forward to its HTTP port; ``close()`` ends the SSH connection,
    which gives the hive EOF on stdin: it shuts down with its workers.
    """

    def __init__(self, bridge: AsyncioBridge, node: Node, token: str, liveness: SshLiveness = SshLiveness()) -> None:
        self.bridge = bridge
        self.node = node
        self.liveness = liveness
        self._token = token
        self._client: _Watched | None = None
        self._unreachable: str | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._process: asyncssh.SSHClientProcess | None = None
        self._listener: asyncssh.SSHListener | None = None

    async def start(self) -> None:
        """Connect and start ``<rbee-hive command> daemon --port <hive port> --token-file F``.

        The hive's token is minted by the queen for this session. It travels on the
        channel's stdin, never on a command line (which every user of the node can read):
        the remote shell reads one line into a 0600 file (in a subshell, so the hive keeps
        the usual umask), then ``exec``s the hive, whose
        stdin is then the same channel (its EOF means "the queen is gone"). This needs a
        POSIX shell as the login shell on the node (sh, bash, zsh, dash).
        """
        try:
            await self.bridge.run(self._aio_start)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            error = ssh_error(self.node, exc)
            if _is_network_failure(exc):
                self._unreachable = error.message
            raise error from None

    def unreachable(self) -> str | None:
        """Why the node cannot be reached, when that is what went wrong: the connection
        could not be made (no answer, refused) or broke (keep-alives unanswered, a reset).
        None while it stands, after a close on purpose, or for a login that was refused
        (the node answered: its settings are wrong, not the network)."""
        if self._unreachable is not None:
            return self._unreachable
        exc = self._client.lost if self._client is not None else None
        if exc is None:
            return None
        return f"SSH connection to node {self.node.name!r} ({_describe(self.node)}) lost: {str(exc) or type(exc).__name__}"

    async def _aio_start(self) -> None:
        def watched() -> _Watched:
            self._client = _Watched()
            return self._client

        self._conn = await asyncssh.connect(self.node.ssh_host, client_factory=watched,
                                            **_connect_options(self.node, self.liveness))
        token_file = f"~/.rbee/hive-{self.node.name}.token"  # ~ expands in the remote shell
        command = (
            f"(umask 077 && mkdir -p ~/.rbee && IFS= read -r t && printf '%s\\n' \"$t\" > {token_file}) && "
            f"exec {self.node.rbee_hive_command} daemon --port {int(self.node.hive_port)} --token-file {token_file}"
            f" --heartbeat-timeout {self.liveness.hive_heartbeat_timeout_s:g} --replace-stale"
        )
        # encoding=None: bytes, fed to the JSON-lines decoder (which handles split UTF-8).
        # stderr stays separate (library noise is not narration); read_stderr() drains it.
        self._process = await self._conn.create_process(command, encoding=None)
        # `read` takes one byte at a time from a pipe, so nothing after this line is lost.
        self._process.stdin.write(self._token.encode() + b"\n")
        self._heartbeat = asyncio.ensure_future(self._aio_heartbeat())

    async def _aio_heartbeat(self) -> None:
        """A line on the hive's stdin every interval: the hive's proof that we are here."""
        assert self._process is not None
        while True:
            await asyncio.sleep(self.liveness.heartbeat_interval_s)
            try:
                self._process.stdin.write(b"\n")
            except (OSError, asyncssh.Error, BrokenPipeError):
                return

    async def read_stdout(self) -> bytes:
        """The next bytes of the hive's stdout; ``b""`` at EOF."""
        assert self._process is not None
        try:
            return await self.bridge.run(self._process.stdout.read, 65536)
        except (OSError, asyncssh.Error):
            return b""

    async def read_stderr(self) -> bytes:
        """The next bytes of the hive's stderr; ``b""`` at EOF (must be drained)."""
        assert self._process is not None
        try:
            return await self.bridge.run(self._process.stderr.read, 65536)
        except (OSError, asyncssh.Error):
            return b""

    async def forward(self, remote_port: int) -> int:
        """Forward a free local port to 127.0.0.1:``remote_port`` on the node; returns it."""
        try:
            return await self.bridge.run(self._aio_forward, remote_port)
        except (OSError, asyncssh.Error) as exc:
            raise ssh_error(self.node, exc) from None

    async def _aio_forward(self, remote_port: int) -> int:
        assert self._conn is not None
        self._listener = await self._conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", remote_port)
        return self._listener.get_port()

    async def close(self, grace_s: float = 10.0) -> None:
        """EOF to the hive's stdin, wait up to ``grace_s`` for it to exit, then close the
        connection (sshd then closes whatever is left of the session)."""
        await self.bridge.run(self._aio_close, grace_s)

    async def _aio_close(self, grace_s: float) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._process is not None:
            try:
                self._process.stdin.write_eof()
                # The hive shuts its workers down on EOF; let it finish while the forward
                # and the channel still stand, so that its last narration reaches us.
                await asyncio.wait_for(self._process.wait_closed(), grace_s)
            except (OSError, asyncssh.Error, asyncio.TimeoutError):
                pass
        if self._listener is not None:
            self._listener.close()
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()


def quote_command(argv: list[str]) -> str:
    """A shell command line for ``argv`` (for ``--rbee-hive-command`` values)."""
    return " ".join(shlex.quote(a) for a in argv)
