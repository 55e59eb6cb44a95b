"""The model catalog: a real SQLite file, its migrations, aliases and concurrent readers."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from rbee.errors import StateError
from rbee.hive.catalog import SCHEMA_VERSION, CatalogEntry, ModelCatalog, migrate


def _entry(path: Path, reference: str = "hf:org/repo/m-Q4_K_M.gguf") -> CatalogEntry:
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return CatalogEntry(reference=reference, provider="hf", file=path.name, local_path=str(path), size=64,
                        sha256="a" * 64, downloaded_at="2026-11-23T20:00:00Z", revision="c" * 40)


def test_add_get_alias_touch_list(tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path / "models.db")
    assert catalog.schema_version() == SCHEMA_VERSION
    entry = _entry(tmp_path / "m-Q4_K_M.gguf")
    catalog.add(entry, aliases=("hf:org/repo", "hf:org/repo:Q4_K_M"))
    assert catalog.get(entry.reference) == entry
    assert catalog.get("hf:org/repo") == entry and catalog.get("hf:org/repo:Q4_K_M") == entry
    assert catalog.get("hf:org/other") is None
    catalog.touch(entry.reference)
    touched = catalog.get("hf:org/repo")
    assert touched is not None and touched.last_used is not None
    assert [e.reference for e in catalog.list()] == [entry.reference]
    assert touched.file_present()
    # A second process (another connection) sees the same rows; WAL is on.
    db = sqlite3.connect(tmp_path / "models.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT count(*) FROM model_aliases").fetchone()[0] == 2
    db.close()
    catalog.remove(entry.reference)
    assert catalog.get("hf:org/repo") is None and catalog.list() == []


def test_a_version_1_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "models.db"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, upto=1) == 1
    db.execute("INSERT INTO models VALUES ('gemma3-270m', 'embedded', 'g.gguf', '/x/g.gguf', 5, ?, '2026-01-01T00:00:00Z', NULL)",
               ("b" * 64,))
    db.close()
    catalog = ModelCatalog(path)
    assert catalog.schema_version() == SCHEMA_VERSION == 3
    old = catalog.get("gemma3-270m")
    assert old is not None and old.size == 5 and old.revision is None and old.mtime_ns is None
    assert not old.file_present()  # /x/g.gguf does not exist
    # Opening again changes nothing.
    assert ModelCatalog(path).schema_version() == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "models.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StateError, match="newer than this rbee-hive knows"):
        ModelCatalog(path)


def test_readers_never_see_half_a_write(tmp_path: Path) -> None:
    catalog = ModelCatalog(tmp_path / "models.db")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 64)
    stop = threading.Event()
    problems: list[str] = []
    seen: list[list[int]] = []

    # The writer starts once every reader is reading.
    readers_ready = threading.Barrier(4, timeout=30)

    def writer() -> None:
        readers_ready.wait()
        for i in range(150):
            catalog.add(CatalogEntry(reference=f"file:/m{i}.gguf", provider="file", file="m.gguf",
                                     local_path=str(model), size=64, sha256=f"{i:064x}",
                                     downloaded_at="2026-11-23T20:00:00Z"),
                        aliases=(f"alias-{i}",))
        stop.set()

    def reader() -> None:
        reader_catalog = ModelCatalog(tmp_path / "models.db")
        counts: list[int] = []
        seen.append(counts)
        first = True
        while first or not stop.is_set():
            rows = reader_catalog.list()
            counts.append(len(rows))
            if first:
                readers_ready.wait()
                first = False
            for row in rows:
                if int(row.sha256, 16) != int(row.reference[len("file:/m"):-len(".gguf")]):
                    problems.append(f"torn row {row}")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert problems == []
    # Each reader saw the catalog grow, never shrink (each write is one whole transaction).
    assert len(seen) == 3 and all(counts == sorted(counts) for counts in seen)
    assert all(counts and counts[0] == 0 for counts in seen)
    assert len(catalog.list()) == 150
    assert catalog.get("alias-149") is not None
