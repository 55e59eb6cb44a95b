"""The queen's node registry: ``$RBEE_HOME/nodes.db`` (SQLite).

One row per node: its name, how to reach it over SSH (host, port, user, key file, the
server's host key pinned when the node was added), the command that runs ``rbee-hive``
there, the hive's port (0: let the hive pick one; we learn it from its ``server_bind``),
and what ``rbee-hive detect`` reported when the node was added.

``localhost`` is built in and never stored: its hive is a child process of the queen and
needs no SSH. The database is tiny and touched only when nodes are added, removed or
listed, so the calls are synchronous (a few hundred microseconds).

A ``nodes.db`` that SQLite cannot read as a database is the queen's to repair: opened with
``set_aside_damaged=True`` it is moved aside as ``nodes.db.corrupt-<UTC time>`` and a new,
empty registry takes its place (``set_aside`` says where the old one went; the nodes must be
added again: their host keys were pinned in it). Any other reader gets a ``StateError``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import InvalidRequestError, NodeExistsError, NotFoundError, StateError
from ..paths import set_aside, sqlite_is_corrupt, sqlite_state_error
from ..requests import NODE_NAME_PATTERN

LOCALHOST = "localhost"
#: Why ``setup add-node localhost`` is refused, and what to do instead (the keeper says it
#: before contacting anything; the queen says it for any other client).
LOCALHOST_RESERVED = (
    "the name localhost is reserved for the built-in local node (the queen's own machine: "
    "--node localhost works without adding anything); give this node another name, such as its host name"
)
DEFAULT_HIVE_COMMAND = "rbee-hive"


def default_local_hive_command() -> str:
    """``rbee-hive`` beside our interpreter (a virtualenv's bin/), else on PATH."""
    sibling = Path(sys.executable).parent / "rbee-hive"
    return shlex.quote(str(sibling)) if sibling.exists() else "rbee-hive"


def local_hive_command(configured: str | None = None) -> str:
    """The command of localhost's hive: the queen's setting, else ``$RBEE_HIVE_COMMAND``,
    else ``default_local_hive_command()``."""
    return configured or os.environ.get("RBEE_HIVE_COMMAND") or default_local_hive_command()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    ssh_host TEXT NOT NULL,
    ssh_port INTEGER NOT NULL,
    ssh_user TEXT,
    ssh_key TEXT,
    host_key TEXT,
    rbee_hive_command TEXT NOT NULL,
    hive_port INTEGER NOT NULL,
    detect TEXT NOT NULL,
    added_at_ms INTEGER NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Node:
    """One node of the cluster; ``ssh_host`` is None for the built-in ``localhost``."""

    name: str
    ssh_host: str | None = None
    ssh_port: int = 22
    ssh_user: str | None = None
    ssh_key: str | None = None
    host_key: str | None = None  # OpenSSH public key line of the server, pinned at add time
    rbee_hive_command: str = DEFAULT_HIVE_COMMAND
    hive_port: int = 0
    detect: dict[str, Any] = field(default_factory=dict)
    added_at_ms: int = 0

    @property
    def is_local(self) -> bool:
        """True for the built-in node whose hive is the queen's own child."""
        return self.ssh_host is None

    def public(self) -> dict[str, Any]:
        """The JSON form shown by ``GET /v1/nodes`` (no secrets: a key *path* only)."""
        return asdict(self)


def validate_node_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Check a ``POST /v1/nodes`` body; returns the clean fields or raises 400."""
    problems = []
    name = body.get("name")
    if not isinstance(name, str) or not re.fullmatch(NODE_NAME_PATTERN, name):
        problems.append({"field": "name", "constraint": f"pattern:{NODE_NAME_PATTERN}",
                         "message": "name must be 1 to 63 letters, digits or . _ -, starting with a letter or digit"})
    elif name == LOCALHOST:
        problems.append({"field": "name", "constraint": "not localhost", "message": LOCALHOST_RESERVED})
    host = body.get("ssh_host")
    if not isinstance(host, str) or not host or host.startswith("-"):
        problems.append({"field": "ssh_host", "constraint": "required",
                         "message": "ssh_host is required: the SSH host name or address"})
    elif not _resolvable_name(host):
        problems.append({"field": "ssh_host", "constraint": "hostname",
                         "message": "ssh_host must be a host name or address: no spaces or control characters, "
                                    "labels of 1 to 63 characters"})
    port = body.get("ssh_port", 22)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        problems.append({"field": "ssh_port", "constraint": "1..65535", "message": "ssh_port must be 1 to 65535"})
    hive_port = body.get("hive_port", 0)
    if not isinstance(hive_port, int) or isinstance(hive_port, bool) or not 0 <= hive_port < 65536:
        problems.append({"field": "hive_port", "constraint": "0..65535",
                         "message": "hive_port must be 0 (the hive picks one) to 65535"})
    command = body.get("rbee_hive_command") or DEFAULT_HIVE_COMMAND
    if not isinstance(command, str):
        problems.append({"field": "rbee_hive_command", "constraint": "string",
                         "message": "rbee_hive_command must be a string (a shell command)"})
    for key in ("ssh_user", "ssh_key"):
        if body.get(key) is not None and not isinstance(body.get(key), str):
            problems.append({"field": key, "constraint": "string", "message": f"{key} must be a string"})
    user, key_file = body.get("ssh_user"), body.get("ssh_key")
    if isinstance(user, str) and not _ssh_user_name(user):
        problems.append({"field": "ssh_user", "constraint": "saslprep",
                         "message": "ssh_user has characters SSH cannot send in a user name (control characters ...)"})
    if isinstance(key_file, str) and "\0" in key_file:
        problems.append({"field": "ssh_key", "constraint": "no_nul", "message": "ssh_key is a file path (no NUL)"})
    if problems:
        # Each problem's message names its field and what to do: the summary is all of them.
        raise InvalidRequestError("invalid node: " + "; ".join(p["message"] for p in problems), details=problems)
    return {
        "name": name,
        "ssh_host": host,
        "ssh_port": port,
        "ssh_user": body.get("ssh_user") or None,
        "ssh_key": body.get("ssh_key") or None,
        "rbee_hive_command": command,
        "hive_port": hive_port,
    }


def _resolvable_name(host: str) -> bool:
    """Whether ``host`` can be looked up at all: no whitespace or control characters, and
    encodable as the resolver encodes it (IDNA: no empty label, none over 63 characters)."""
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in host):
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _ssh_user_name(user: str) -> bool:
    """Whether SSH can send ``user``: asyncssh prepares it with SASLprep (RFC 4013), which
    refuses control characters and a few other classes; the same check, before connecting."""
    from asyncssh.saslprep import saslprep  # here: asyncssh takes ~0.3 s to import, the keeper reads nodes.db

    try:
        saslprep(user)
    except ValueError:
        return False
    return True


class NodeRegistry:
    """The node table in ``nodes.db`` plus the built-in ``localhost``."""

    def __init__(self, db_path: Path, *, local_hive_command: str = DEFAULT_HIVE_COMMAND,
                 set_aside_damaged: bool = False) -> None:
        self.db_path = db_path
        self.localhost = Node(name=LOCALHOST, rbee_hive_command=local_hive_command)
        #: Where a damaged registry found at open was moved, and what SQLite said of it.
        self.set_aside: Path | None = None
        self.damage = ""
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            if not sqlite_is_corrupt(exc):
                raise sqlite_state_error(db_path, exc) or exc from None
            if not set_aside_damaged:
                raise StateError(f"{db_path} is damaged ({exc}); start queen-rbee once to set it aside "
                                 "and begin a new node registry") from None
            self.damage = str(exc)
            self.set_aside = set_aside(db_path)
            self._create()

    def _create(self) -> None:
        db = self._connect()
        try:
            with db:
                db.execute(_SCHEMA)
            # A damaged page may only show when it is read: look at every page once, now.
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({verdict})")
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path)
        db.row_factory = sqlite3.Row
        return db

    def list(self) -> list[Node]:
        """Every node, ``localhost`` first, then by name (``by_name``: host2 before host10)."""
        db = self._connect()
        try:
            rows = db.execute("SELECT * FROM nodes").fetchall()
        finally:
            db.close()
        return [self.localhost] + by_name(_row_to_node(r) for r in rows)

    def get(self, name: str) -> Node:
        """The node called ``name``; ``NotFoundError`` naming the fix when unknown."""
        if name == LOCALHOST:
            return self.localhost
        db = self._connect()
        try:
            row = db.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        finally:
            db.close()
        if row is None:
            raise NotFoundError(
                f"no node named {name!r}; add it with `rbee-keeper setup add-node {name} --ssh-host HOST`"
                " or use --node localhost"
            )
        return _row_to_node(row)

    def check_new(self, node: Node) -> None:
        """Refuse a node whose name, or SSH host and port, a stored node already has
        (``NodeExistsError``): one machine is one node, and re-adding must be said."""
        for known in self.list():
            if known.name == node.name:
                raise NodeExistsError(
                    f"node {node.name} already exists ({known.ssh_host}:{known.ssh_port}); to change it, "
                    f"`rbee-keeper setup remove-node {node.name}` first, then add it again"
                )
            if (not known.is_local and (known.ssh_host or "").lower() == (node.ssh_host or "").lower()
                    and known.ssh_port == node.ssh_port):
                raise NodeExistsError(
                    f"{node.ssh_host}:{node.ssh_port} is already node {known.name}: one machine is one node "
                    f"(use --node {known.name}, or remove it first with `rbee-keeper setup remove-node {known.name}`)"
                )

    def put(self, node: Node) -> Node:
        """Insert or replace ``node``; returns it as stored."""
        if node.is_local:
            raise InvalidRequestError("localhost is built in and cannot be stored")
        stored = Node(**{**asdict(node), "added_at_ms": node.added_at_ms or int(time.time() * 1000)})
        db = self._connect()
        try:
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        stored.name,
                        stored.ssh_host,
                        stored.ssh_port,
                        stored.ssh_user,
                        stored.ssh_key,
                        stored.host_key,
                        stored.rbee_hive_command,
                        stored.hive_port,
                        json.dumps(stored.detect),
                        stored.added_at_ms,
                    ),
                )
        finally:
            db.close()
        return stored

    def remove(self, name: str) -> None:
        """Forget node ``name``; ``NotFoundError`` when unknown."""
        if name == LOCALHOST:
            raise InvalidRequestError("localhost is built in and cannot be removed")
        db = self._connect()
        try:
            with db:
                cursor = db.execute("DELETE FROM nodes WHERE name = ?", (name,))
        finally:
            db.close()
        if cursor.rowcount == 0:
            raise NotFoundError(f"no node named {name!r} (see `rbee-keeper setup list-nodes`)")


def read_nodes(db_path: Path, *, local_hive_command: str = DEFAULT_HIVE_COMMAND) -> list[Node]:
    """``NodeRegistry.list()`` without the queen: ``localhost``, then the stored nodes,
    reading only (for the keeper's ``setup list-nodes`` with no queen running). No file
    yet: localhost alone. It creates, migrates and sets aside nothing (``mode=rw``,
    ``query_only``); a damaged file is ``sqlite3.Error`` (the queen repairs it)."""
    localhost = Node(name=LOCALHOST, rbee_hive_command=local_hive_command)
    if not db_path.is_file():
        return [localhost]
    db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=rw", uri=True)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA query_only=ON")
        tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'nodes'").fetchall()
        rows = db.execute("SELECT * FROM nodes").fetchall() if tables else []
    finally:
        db.close()
    return [localhost] + by_name(_row_to_node(r) for r in rows)


def by_name(nodes: Iterable[Node]) -> list[Node]:
    """Nodes in the order a person expects: numbers in names by value (host2 before host10)."""
    def key(node: Node) -> list[tuple[int, int | str]]:
        return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", node.name) if part]

    return sorted(nodes, key=key)


def _row_to_node(row: sqlite3.Row) -> Node:
    return Node(
        name=row["name"],
        ssh_host=row["ssh_host"],
        ssh_port=row["ssh_port"],
        ssh_user=row["ssh_user"],
        ssh_key=row["ssh_key"],
        host_key=row["host_key"],
        rbee_hive_command=row["rbee_hive_command"],
        hive_port=row["hive_port"],
        detect=json.loads(row["detect"]),
        added_at_ms=row["added_at_ms"],
    )
