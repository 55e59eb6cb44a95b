"""The model catalog: which GGUF files this node holds, verified, in ``$RBEE_HOME/models.db``.

One row per model file, keyed by its canonical reference (``hf:org/repo/file.gguf``,
``file:/abs/path.gguf``, ``gemma3-270m``), with provider, file name, local path, size,
sha256, the file's mtime (ns) when it was verified, when it was downloaded and last used.
A row is only ever written for a file whose sha256 was checked: the catalog never holds a
partial or unverified file.

The trust rule: a row is trusted, and its file never hashed again, while the file has the
catalogued size and mtime (``CatalogEntry.change_on_disk``: a stat, no reading). A file
that changed either is no longer trusted: its row is dropped and the file verified again
on its next use (``Provisioner.catalogued``). A row from before schema 3 has no mtime: it
is trusted on its size, as it was then, and the mtime seen at that use is recorded
(``record_mtime``), so that later changes are seen.

``model_aliases`` maps what a user asked for (``hf:org/repo``, ``hf:org/repo:Q4_K_M``) to
the canonical reference it resolved to, so that the second spawn of ``hf:org/repo`` finds
the file without asking the Hub (and works with ``HF_HUB_OFFLINE=1``).

Schema changes are migrations, numbered by SQLite's ``PRAGMA user_version``: opening a
database runs the ones it has not seen, in one transaction each. The journal is WAL, so
readers (``rbee-hive`` and, say, a ``sqlite3`` shell) never block on a writer and never
see half a write.

A file SQLite cannot read as a database (or whose ``quick_check`` fails) is found at open:
it is moved aside as ``models.db.corrupt-<UTC time>`` and a new, empty catalog takes its
place (``set_aside`` says where the old one went; the hive then registers the model files
under ``$RBEE_HOME/models`` again, ``provision.rebuild_catalog``). A catalog that cannot be
opened or written (read-only or full ``RBEE_HOME``) is a ``StateError`` naming the fix.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..errors import StateError
from ..paths import ensure_dir, set_aside, sqlite_is_corrupt, sqlite_state_error

#: How long a connection waits for another writer's lock before failing (milliseconds).
BUSY_TIMEOUT_MS = 10_000
#: ``CatalogEntry.change_on_disk`` of a file that is not there any more.
GONE = "gone"

#: Migration N (1-based) takes the schema from user_version N-1 to N.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE models (
            reference TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            file TEXT NOT NULL,
            local_path TEXT NOT NULL,
            size INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            downloaded_at TEXT NOT NULL,
            last_used TEXT
        )""",
    ),
    (
        # v2: the Hub revision a file came from, and the aliases table (see module doc).
        "ALTER TABLE models ADD COLUMN revision TEXT",
        """CREATE TABLE model_aliases (
            alias TEXT PRIMARY KEY,
            reference TEXT NOT NULL REFERENCES models(reference) ON DELETE CASCADE
        )""",
    ),
    (
        # v3: the file's st_mtime_ns when its sha256 was verified (see the trust rule).
        "ALTER TABLE models ADD COLUMN mtime_ns INTEGER",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds (``2026-11-23T20:01:02Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One verified model file on this node."""

    reference: str
    provider: str
    file: str
    local_path: str
    size: int
    sha256: str
    downloaded_at: str
    last_used: str | None = None
    revision: str | None = None
    #: The file's ``st_mtime_ns`` when its sha256 was verified (None: a row from before schema 3).
    mtime_ns: int | None = None

    def public(self) -> dict[str, object]:
        """The JSON form of ``GET /v1/models``."""
        return asdict(self)

    def change_on_disk(self) -> str | None:
        """How the file differs from the row, in words (``GONE`` when it is not there any
        more), or None while the row can be trusted: same size, and same mtime when the row
        has one. A stat, no hashing."""
        try:
            seen = os.stat(self.local_path)
        except OSError:
            return GONE
        if seen.st_size != self.size:
            return f"its size is {seen.st_size} bytes, not {self.size}"
        if self.mtime_ns is not None and seen.st_mtime_ns != self.mtime_ns:
            return "its mtime changed"
        return None

    def file_present(self) -> bool:
        """The file is on disk as it was verified (``change_on_disk`` finds nothing)."""
        return self.change_on_disk() is None


class ModelCatalog:
    """The catalog in one SQLite file; each call opens its own short connection.

    Short connections keep it safe from any thread and from several processes at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        #: Where a damaged catalog found at open was moved, and what SQLite said of it.
        self.set_aside: Path | None = None
        self.damage = ""
        ensure_dir(self.path.parent)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not sqlite_is_corrupt(exc):
                raise
            self.damage = str(exc)
            self.set_aside = set_aside(self.path)
            self._open()

    def _open(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            # A damaged page may only show when it is read: look at every page once, at
            # open (milliseconds for a catalog's few rows), not in the middle of a spawn.
            verdict = db.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({verdict})")
            migrate(db)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            try:
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA foreign_keys=ON")
                db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
                yield db
            finally:
                db.close()
        except sqlite3.Error as exc:
            # A read-only or full RBEE_HOME, at open or at any later write: one line.
            state = sqlite_state_error(self.path, exc)
            if state is None:
                raise
            raise state from None

    def schema_version(self) -> int:
        """The ``user_version`` of the file (``SCHEMA_VERSION`` once opened here)."""
        with self._connect() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    def add(self, entry: CatalogEntry, *, aliases: tuple[str, ...] = ()) -> None:
        """Register a verified file (replacing an older row of that reference)."""
        fields = asdict(entry)
        with self._connect() as db, _transaction(db):
            db.execute(
                f"INSERT OR REPLACE INTO models ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                tuple(fields.values()),
            )
            for alias in aliases:
                if alias != entry.reference:
                    db.execute("INSERT OR REPLACE INTO model_aliases (alias, reference) VALUES (?, ?)", (alias, entry.reference))

    def get(self, reference: str) -> CatalogEntry | None:
        """The entry of a canonical reference or of an alias, if catalogued."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM models WHERE reference = ?", (reference,)).fetchone()
            if row is None:
                row = db.execute(
                    "SELECT m.* FROM models m JOIN model_aliases a ON a.reference = m.reference WHERE a.alias = ?",
                    (reference,),
                ).fetchone()
        return None if row is None else CatalogEntry(**dict(row))

    def list(self) -> list[CatalogEntry]:
        """Every catalogued model, by reference."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM models ORDER BY reference").fetchall()
        return [CatalogEntry(**dict(row)) for row in rows]

    def record_mtime(self, reference: str, mtime_ns: int) -> None:
        """Record the mtime of a row from before schema 3, trusted on its size (see the
        module's trust rule); a row that has one keeps it."""
        with self._connect() as db:
            db.execute("UPDATE models SET mtime_ns = ? WHERE reference = ? AND mtime_ns IS NULL",
                       (mtime_ns, reference))

    def touch(self, reference: str) -> None:
        """Record that a worker was started with this model now."""
        with self._connect() as db:
            db.execute("UPDATE models SET last_used = ? WHERE reference = ?", (utc_now(), reference))

    def remove(self, reference: str) -> None:
        """Forget a model (its aliases go with it); the file is left alone."""
        with self._connect() as db:
            db.execute("DELETE FROM models WHERE reference = ?", (reference,))


_ENTRY_FIELDS = tuple(f for f in CatalogEntry.__dataclass_fields__)


def _entry(row: sqlite3.Row) -> CatalogEntry:
    # A newer schema may have columns this rbee does not know: they are left out.
    return CatalogEntry(**{k: row[k] for k in row.keys() if k in _ENTRY_FIELDS})


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[sqlite3.Connection | None]:
    """A connection that only reads ``path`` (None when there is no catalog yet).

    For the keeper, which lists a node's models with no hive running: it creates nothing
    (``mode=rw`` never creates the file; closing the last connection removes the WAL
    files SQLite made for the read) and writes nothing (``query_only``), runs no
    migration and sets nothing aside. Any trouble is ``sqlite3.Error`` (the caller asks
    a hive instead, which repairs what it can)."""
    if not path.is_file():
        yield None
        return
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA query_only=ON")
        yield db
    finally:
        db.close()


def read_entries(path: Path) -> list[CatalogEntry]:
    """Every entry of the catalog at ``path``, by reference, reading only (see ``_reading``)."""
    with _reading(path) as db:
        if db is None:
            return []
        return [_entry(row) for row in db.execute("SELECT * FROM models ORDER BY reference").fetchall()]


def read_entry(path: Path, reference: str) -> CatalogEntry | None:
    """The entry of a canonical reference or of an alias, reading only (see ``_reading``)."""
    with _reading(path) as db:
        if db is None:
            return None
        row = db.execute("SELECT * FROM models WHERE reference = ?", (reference,)).fetchone()
        if row is None and db.execute("PRAGMA user_version").fetchone()[0] >= 2:
            row = db.execute("SELECT m.* FROM models m JOIN model_aliases a ON a.reference = m.reference "
                             "WHERE a.alias = ?", (reference,)).fetchone()
        return None if row is None else _entry(row)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    # BEGIN IMMEDIATE takes the write lock up front, so two writers queue on busy_timeout
    # instead of one failing halfway with "database is locked" on lock upgrade.
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def migrate(db: sqlite3.Connection, *, upto: int = SCHEMA_VERSION) -> int:
    """Run the migrations ``db`` has not seen (up to ``upto``); returns the new version."""
    with _transaction(db):
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StateError(
                f"models.db has schema version {version}, newer than this rbee-hive knows ({SCHEMA_VERSION}):"
                " a newer rbee wrote it; upgrade rbee on this node"
            )
        for number in range(version + 1, upto + 1):
            for statement in MIGRATIONS[number - 1]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        return max(version, upto)
