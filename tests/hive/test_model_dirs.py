"""``file:`` references stay in the model directories, and no answer echoes a file's bytes.

The model directories are ``$RBEE_HOME/models``, the Hugging Face cache and the folders of
``RBEE_MODEL_DIRS``. Outside, missing, a name too long, a directory, a FIFO, a symlink out
of them: one answer (404 ``model_not_found``) that says nothing of the target. A file that
starts like a GGUF and then is garbage is a 422 ``model_load_failed``, never a 500.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import httpx
import pytest

from rbee.errors import ModelLoadError, ModelNotFoundError
from rbee.hive.gguf_header import read_gguf_metadata
from rbee.paths import confined_model_file, listed_model_dirs, model_dirs
from tests.hive.conftest import running_hive
from tests.hive.fakehub import write_small_gguf

#: What a file outside the model directories holds; no answer may carry any of it.
SECRET = b"root:$6$saltsalt$notarealhash:19000:0:99999:7:::\n"


def _gguf_then(garbage: bytes) -> bytes:
    """A GGUF v3 header that promises one key/value, then ``garbage`` where it should be."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + garbage


#: Headers with a valid magic and nonsense after it, each once an OverflowError or a huge read.
GARBAGE = {
    "huge-string": _gguf_then(struct.pack("<Q", 2**63 + 5) + b"x" * 64),
    "string-past-the-end": _gguf_then(struct.pack("<Q", 10_000) + b"k" * 64),
    "huge-array": _gguf_then(struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 10, 2**62)),
    "unknown-type": _gguf_then(struct.pack("<Q", 1) + b"k" + struct.pack("<I", 4_000_000_000)),
    "nested-arrays": _gguf_then(struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9)
                                + struct.pack("<IQ", 9, 1) * 10 + b"\0" * 64),
    "no-magic": SECRET * 4,
}


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(a model directory listed in RBEE_MODEL_DIRS, a folder outside every model directory)."""
    models, outside = tmp_path / "my-models", tmp_path / "elsewhere"
    models.mkdir()
    outside.mkdir()
    monkeypatch.setenv("RBEE_HOME", str(tmp_path / "rbee-home"))
    monkeypatch.setenv("RBEE_MODEL_DIRS", os.pathsep.join([str(models), "relative/dir", ""]))
    return models, outside


def _refusal(reference: str, path: str) -> str:
    with pytest.raises(ModelNotFoundError) as caught:
        confined_model_file(reference, path)
    return caught.value.message.replace(reference, "REF")


def test_the_model_directories(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    models, _ = dirs
    found = model_dirs()
    assert found[0] == tmp_path / "rbee-home" / "models" and found[-1] == models
    assert len(found) == 3  # + the Hugging Face cache; the relative entry is left out
    assert listed_model_dirs() == ([models], ["relative/dir"])


def test_only_files_under_the_model_directories_resolve_and_every_refusal_is_the_same(
        dirs: tuple[Path, Path]) -> None:
    models, outside = dirs
    inside = write_small_gguf(models / "m.gguf", tensor_bytes=64)
    assert confined_model_file("file:x", str(inside)) == inside
    (models / "link.gguf").symlink_to(inside)
    assert confined_model_file("file:x", str(models / "link.gguf")) == inside  # resolved, inside

    secret = outside / "shadow"
    secret.write_bytes(SECRET)
    (outside / "real.gguf").write_bytes(b"GGUF" + SECRET)
    (models / "escape.gguf").symlink_to(secret)
    (models / "loop.gguf").symlink_to(models / "loop.gguf")
    (models / "dir.gguf").mkdir()
    os.mkfifo(models / "fifo.gguf")  # opening it must not hang the hive
    cases = {
        "outside, existing": outside / "real.gguf",
        "outside, missing": outside / "none.gguf",
        "inside, missing": models / "none.gguf",
        "symlink out": models / "escape.gguf",
        "symlink loop": models / "loop.gguf",
        "a directory": models / "dir.gguf",
        "a FIFO": models / "fifo.gguf",
        "over NAME_MAX": models / ("n" * 300 + ".gguf"),
        "over PATH_MAX": models / "/".join(["d" * 200] * 30) / "m.gguf",
        "with ..": models / ".." / "elsewhere" / "real.gguf",
    }
    answers = {why: _refusal(f"file:{path}", str(path)) for why, path in cases.items()}
    assert len(set(answers.values())) == 1, answers
    answer = next(iter(answers.values()))
    assert "RBEE_MODEL_DIRS" in answer and "REF" in answer
    assert str(outside) not in answer and "shadow" not in answer and "root:" not in answer


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_gguf_with_garbage_after_its_magic_is_a_model_load_error_without_its_bytes(
        tmp_path: Path, kind: str) -> None:
    bad = tmp_path / f"{kind}.gguf"
    bad.write_bytes(GARBAGE[kind])
    with pytest.raises(ModelLoadError) as caught:
        read_gguf_metadata(bad)
    message = caught.value.message
    assert "root" not in message and "salt" not in message and str(bad) not in message
    assert "GGUF" in message


def test_the_hive_answers_file_references_only_from_its_model_directories(tmp_path: Path, rbee_home: Path) -> None:
    models, outside = tmp_path / "my-models", tmp_path / "elsewhere"
    models.mkdir()
    outside.mkdir()
    good = write_small_gguf(models / "small.gguf", tensor_bytes=4096)
    (outside / "shadow").write_bytes(SECRET)
    (outside / "outside.gguf").write_bytes(good.read_bytes())
    (models / "shadow.gguf").symlink_to(outside / "shadow")
    (models / "garbage.gguf").write_bytes(GARBAGE["huge-string"])
    env = {"RBEE_MODEL_DIRS": str(models), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    with running_hive(env=env) as hive:
        def ask(route: str, path: str) -> httpx.Response:
            body = {"model": f"file:{path}"}
            return hive.http.post("/v1/workers/spawn" if route == "spawn" else "/v1/models/resolve", json=body)

        resolved = ask("resolve", str(good))
        assert resolved.status_code == 200, resolved.text
        assert resolved.json()["on_disk"] is True and resolved.json()["size"] == good.stat().st_size

        refusals = []
        for route in ("resolve", "spawn"):
            for path in (outside / "outside.gguf", outside / "missing.gguf", models / "shadow.gguf",
                         models / ("n" * 300 + ".gguf")):
                answer = ask(route, str(path))
                assert answer.status_code == 404, answer.text
                error = answer.json()["error"]
                assert error["code"] == "model_not_found"
                refusals.append(error["message"].replace(str(path), "PATH"))
                assert "root:" not in answer.text and "salt" not in answer.text
                if path.name == "shadow.gguf":
                    assert str(outside) not in answer.text  # the target is not echoed
        assert len(set(refusals)) == 1, refusals

        for route in ("resolve", "spawn"):
            garbage = ask(route, str(models / "garbage.gguf"))
            assert garbage.status_code == 422, garbage.text
            assert garbage.json()["error"]["code"] == "model_load_failed"
            assert "corrupt" in garbage.json()["error"]["message"]
        assert hive.workers() == []  # no worker was started for any of them
        assert "Traceback" not in hive.proc.stderr_text()
        assert [a for a in (o.get("action") for o in hive.proc.json_lines()) if a == "model_dirs"] == ["model_dirs"]
