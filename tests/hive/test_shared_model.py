"""The embedded model used in place from a shared, read-only folder of ``RBEE_MODEL_DIRS``:
hives with their own ``RBEE_HOME`` each hash it once, catalogue its real path and load it
from there (no copy under their ``RBEE_HOME``); a later use or a later start trusts the
row while the file's size and mtime are unchanged; a touched file is verified again; a
file that only looks like the model is said once and the model assembled as usual.

The folder is read-only for real: each hive runs in its own mount namespace where the
folder is bind-mounted read-only (EROFS even for root), its workers with it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from rbee.hive.embedded import assemble_embedded, embedded_file_name, embedded_sha256, embedded_size
from rbee.narration.events import Done, NarrationEvent
from tests.hive.conftest import Hive, running_hive
from tests.worker.workers import COUNTING_PROMPT, infer

pytestmark = pytest.mark.model

#: Bind-mount the folder "$1" read-only on itself, then exec the program (the rest).
_READ_ONLY_FOLDER = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder holding the assembled embedded model, chmod 0555 (its file 0444)."""
    folder = tmp_path_factory.mktemp("shared-models")
    model = assemble_embedded(folder)
    model.chmod(0o444)
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)  # so that pytest can clean it up


def _read_only(folder: Path, argv: list[str]) -> list[str]:
    """``argv`` run with ``folder`` mounted read-only in a private mount namespace."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private", "sh", "-c", _READ_ONLY_FOLDER, "sh",
            str(folder), *argv]


@contextlib.contextmanager
def shared_hive(home: Path, folder: Path) -> Iterator[Hive]:
    """A hive with its own ``RBEE_HOME`` and ``folder`` (read-only) as its RBEE_MODEL_DIRS."""
    home.mkdir(exist_ok=True)
    with running_hive({"RBEE_HOME": str(home), "RBEE_MODEL_DIRS": str(folder)},
                      wrap=lambda argv: _read_only(folder, argv)) as hive:
        # The hive really sees the folder read-only (mountinfo: mount point, then options).
        mounts = [line.split() for line in Path(f"/proc/{hive.proc.pid}/mountinfo").read_text().splitlines()]
        assert any(m[4] == os.path.realpath(folder) and "ro" in m[5].split(",") for m in mounts)
        yield hive
    assert "Traceback" not in hive.proc.stderr_text()


def _provide(hive: Hive, model: str = "gemma3-270m") -> str:
    """``POST /v1/models/download`` to its end; the human text of its ``download_complete``."""
    started = hive.http.post("/v1/models/download", json={"model": model})
    assert started.status_code == 202, started.text
    events = hive.sse(f"/v1/models/download/{started.json()['download_id']}/progress")
    assert isinstance(events[-1], Done), events[-3:]
    (complete,) = [e for e in events if isinstance(e, NarrationEvent) and e.action == "download_complete"]
    return complete.human


def _said(hive: Hive, action: str) -> list[dict]:
    return [o for o in hive.proc.json_lines() if o.get("action") == action]


def _ggufs(home: Path) -> list[Path]:
    return sorted(p for p in home.rglob("*") if p.name.endswith((".gguf", ".gguf.part")))


def test_two_hives_load_one_read_only_copy_in_place(shared_folder: Path, tmp_path: Path) -> None:
    model = Path(os.path.realpath(shared_folder / embedded_file_name()))  # the catalog keeps the real path
    before = sorted(os.listdir(shared_folder))
    homes = [tmp_path / "home-1", tmp_path / "home-2"]
    with shared_hive(homes[0], shared_folder) as one, shared_hive(homes[1], shared_folder) as two:
        for hive, home in ((one, homes[0]), (two, homes[1])):
            resolved = hive.http.post("/v1/models/resolve", json={"model": "gemma3-270m"}).json()
            assert resolved == {"reference": "gemma3-270m", "sha256": embedded_sha256(), "size": embedded_size(),
                                "on_disk": True, "file": embedded_file_name()}
            answer = hive.spawn(ctx_size=512, parallel=1)
            assert answer.status_code == 201, answer.text
            spawned = answer.json()
            cmdline = Path(f"/proc/{spawned['pid']}/cmdline").read_bytes().split(b"\0")
            assert cmdline[cmdline.index(b"--model") + 1] == os.fsencode(model)
            hive.wait_state(spawned["worker_id"], "idle", 120)
            stream = infer(spawned["url"], {"prompt": COUNTING_PROMPT, "max_tokens": 2},
                           headers={"Authorization": f"Bearer {spawned['api_key']}"})
            assert stream.status == 200 and stream.end.tokens_out == 2, stream.raw[-500:]

            (row,) = hive.http.get("/v1/models").json()["models"]
            assert row["provider"] == "embedded" and row["local_path"] == str(model)
            assert row["sha256"] == embedded_sha256() and row["mtime_ns"] == model.stat().st_mtime_ns
            # Hashed once, in place; never assembled nor copied under this RBEE_HOME.
            (hashed,) = _said(hive, "model_hash")
            assert hashed["local_path"] == str(model) and "in place" in hashed["human"]
            assert _said(hive, "model_assemble") == [] and _ggufs(home) == []
            # A second use trusts the row: nothing is read again.
            assert "was already on this node" in _provide(hive)
            assert len(_said(hive, "model_hash")) == 1
    assert sorted(os.listdir(shared_folder)) == before and stat.S_IMODE(shared_folder.stat().st_mode) == 0o555

    # A later start with the same RBEE_HOME trusts the row as well.
    with shared_hive(homes[0], shared_folder) as again:
        assert "was already on this node" in _provide(again)
        assert _said(again, "model_hash") == [] and _said(again, "model_changed") == []
        assert _ggufs(homes[0]) == []


def test_a_touched_shared_copy_is_verified_again(shared_folder: Path, tmp_path: Path) -> None:
    model = Path(os.path.realpath(shared_folder / embedded_file_name()))
    home = tmp_path / "home"
    with shared_hive(home, shared_folder) as hive:
        assert "is downloaded and verified" in _provide(hive)
        assert len(_said(hive, "model_hash")) == 1
        seen = model.stat()
        os.utime(model, ns=(seen.st_atime_ns, seen.st_mtime_ns + 7_000_000_000))  # its bytes stay
        assert "is downloaded and verified" in _provide(hive)
        (changed,) = _said(hive, "model_changed")
        assert changed["level"] == "warn" and str(model) in changed["human"]
        assert "mtime changed" in changed["human"] and "verified again" in changed["human"]
        assert len(_said(hive, "model_hash")) == 2
        (row,) = hive.http.get("/v1/models").json()["models"]
        assert row["local_path"] == str(model) and row["mtime_ns"] == model.stat().st_mtime_ns
        assert "was already on this node" in _provide(hive)
        assert len(_said(hive, "model_hash")) == 2 and _ggufs(home) == []


def test_a_file_that_only_looks_like_the_model_is_said_once_and_not_used(rbee_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "look-alike"
    folder.mkdir()
    fake = Path(os.path.realpath(folder / embedded_file_name()))
    with open(fake, "wb") as f:
        f.truncate(embedded_size())  # the name and the size, not the bytes
    with running_hive(env={"RBEE_MODEL_DIRS": str(folder)}) as hive:
        assert "is downloaded and verified" in _provide(hive)
        (mismatch,) = _said(hive, "model_mismatch")
        assert mismatch["level"] == "warn" and mismatch["local_path"] == str(fake)
        assert "not the package's" in mismatch["human"] and "assembling the model into" in mismatch["human"]
        assert len(_said(hive, "model_assemble")) == 1
        (row,) = hive.http.get("/v1/models").json()["models"]
        assert row["local_path"] == str(rbee_home / "models" / embedded_file_name())
        assert row["sha256"] == embedded_sha256()
        # Said once: the next use takes the catalogued copy.
        assert "was already on this node" in _provide(hive)
        assert len(_said(hive, "model_mismatch")) == 1 and len(_said(hive, "model_hash")) == 1
    assert fake.stat().st_size == embedded_size() and not any(fake.read_bytes()[:4096])
