"""The catalog's trust rule, on a real SQLite file and through real hives: a verified file
whose size and mtime are unchanged is never hashed again (not at a later use, not at a
later hive start); one whose size or mtime changed loses its row (``model_changed``) and
is hashed again on its next use; a row from before schema 3 is trusted on its size and
gets its mtime recorded at that use."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from pathlib import Path

from rbee.hive.catalog import GONE, CatalogEntry, ModelCatalog, migrate, read_entries
from rbee.hive.download import sha256_of
from rbee.narration.events import Done, NarrationEvent
from tests.hive.conftest import Hive, running_hive
from tests.hive.fakehub import write_small_gguf

SECOND_NS = 1_000_000_000


def _entry(path: Path, reference: str) -> CatalogEntry:
    seen = path.stat()
    return CatalogEntry(reference=reference, provider="file", file=path.name, local_path=str(path),
                        size=seen.st_size, sha256=sha256_of(path), downloaded_at="2026-11-23T20:00:00Z",
                        mtime_ns=seen.st_mtime_ns)


def _shift_mtime(path: Path, seconds: int) -> int:
    """Move the file's mtime (its bytes stay); returns the new mtime in ns."""
    seen = path.stat()
    os.utime(path, ns=(seen.st_atime_ns, seen.st_mtime_ns + seconds * SECOND_NS))
    return path.stat().st_mtime_ns


def _provide(hive: Hive, model: str) -> str:
    """``POST /v1/models/download`` to its end; returns the human text of ``download_complete``."""
    started = hive.http.post("/v1/models/download", json={"model": model})
    assert started.status_code == 202, started.text
    events = hive.sse(f"/v1/models/download/{started.json()['download_id']}/progress")
    assert isinstance(events[-1], Done)
    (complete,) = [e for e in events if isinstance(e, NarrationEvent) and e.action == "download_complete"]
    return complete.human


def _said(hive: Hive, action: str) -> list[dict]:
    return [o for o in hive.proc.json_lines() if o.get("action") == action]


def test_a_row_is_trusted_while_its_files_size_and_mtime_are_unchanged(tmp_path: Path) -> None:
    model = write_small_gguf(tmp_path / "m.gguf", tensor_bytes=4096)
    catalog = ModelCatalog(tmp_path / "models.db")
    entry = _entry(model, f"file:{model}")
    catalog.add(entry)
    stored = catalog.get(entry.reference)
    assert stored == entry and stored.mtime_ns == model.stat().st_mtime_ns
    assert stored.change_on_disk() is None and stored.file_present()

    original = model.stat()
    _shift_mtime(model, 5)
    assert stored.change_on_disk() == "its mtime changed" and not stored.file_present()
    os.utime(model, ns=(original.st_atime_ns, original.st_mtime_ns))
    assert stored.change_on_disk() is None
    with open(model, "ab") as f:
        f.write(b"x")
    assert stored.change_on_disk() == f"its size is {entry.size + 1} bytes, not {entry.size}"
    model.unlink()
    assert stored.change_on_disk() == GONE

    # A row from before schema 3 has no mtime: trusted on its size; record_mtime fills it
    # in once, and never overwrites one that is there.
    old = dataclasses.replace(entry, reference="file:/old.gguf", mtime_ns=None)
    catalog.add(old)
    catalog.record_mtime(old.reference, 42)
    catalog.record_mtime(old.reference, 43)
    assert catalog.get(old.reference).mtime_ns == 42  # type: ignore[union-attr]


def test_an_unchanged_file_is_never_hashed_again_and_a_touched_one_is(rbee_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my-models"
    folder.mkdir()
    model = write_small_gguf(folder / "small.gguf", tensor_bytes=64 * 1024)
    reference = f"file:{model}"
    env = {"RBEE_MODEL_DIRS": str(folder)}
    with running_hive(env=env) as hive:
        assert "is downloaded and verified" in _provide(hive, reference)
        (row,) = hive.http.get("/v1/models").json()["models"]
        assert row["mtime_ns"] == model.stat().st_mtime_ns and row["size"] == model.stat().st_size
        # Used again: the row is trusted, the file is not read.
        assert "was already on this node" in _provide(hive, reference)
        assert hive.http.post("/v1/models/resolve", json={"model": reference}).json()["on_disk"] is True
        assert len(_said(hive, "model_hash")) == 1

    with running_hive(env=env) as again:  # the same RBEE_HOME: a later start trusts the row too
        assert "was already on this node" in _provide(again, reference)
        assert _said(again, "model_hash") == [] and _said(again, "model_changed") == []

        touched = _shift_mtime(model, 10)
        assert "is downloaded and verified" in _provide(again, reference)
        (changed,) = _said(again, "model_changed")
        assert changed["level"] == "warn" and str(model) in changed["human"]
        assert "mtime changed" in changed["human"] and "verified again" in changed["human"]
        (hashed,) = _said(again, "model_hash")
        assert hashed["local_path"] == str(model)
        (row,) = again.http.get("/v1/models").json()["models"]
        assert row["mtime_ns"] == touched and row["sha256"] == sha256_of(model)
        # Trusted again from now on.
        assert "was already on this node" in _provide(again, reference)
        assert len(_said(again, "model_hash")) == 1 and len(_said(again, "model_changed")) == 1
    assert "Traceback" not in hive.proc.stderr_text() + again.proc.stderr_text()


def test_a_row_from_before_schema_3_is_trusted_on_its_size_and_gets_its_mtime(rbee_home: Path,
                                                                                tmp_path: Path) -> None:
    folder = tmp_path / "my-models"
    folder.mkdir()
    model = write_small_gguf(folder / "small.gguf", tensor_bytes=64 * 1024)
    entry = _entry(model, f"file:{model}")
    db = sqlite3.connect(rbee_home / "models.db", isolation_level=None)
    assert migrate(db, upto=2) == 2
    db.execute("INSERT INTO models (reference, provider, file, local_path, size, sha256, downloaded_at) "
               "VALUES (?, ?, ?, ?, ?, ?, ?)", (entry.reference, entry.provider, entry.file, entry.local_path,
                                                entry.size, entry.sha256, entry.downloaded_at))
    db.close()
    with running_hive(env={"RBEE_MODEL_DIRS": str(folder)}) as hive:
        assert "was already on this node" in _provide(hive, entry.reference)
        assert _said(hive, "model_hash") == []
        (row,) = read_entries(rbee_home / "models.db")
        assert row.mtime_ns == model.stat().st_mtime_ns and row.sha256 == entry.sha256
