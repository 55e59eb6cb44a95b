"""The hive and its state on disk going wrong: one line naming the file and the fix, never
a traceback. A damaged ``models.db`` is set aside and the catalog rebuilt (the hive runs
on); a read-only or full ``RBEE_HOME`` stops it with exit 1; a model file that vanished is
named; PID files of workers that are gone do not outlive the next start; a worker gets
neither the hive's token nor the Hugging Face token.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from rbee.hive.download import sha256_of
from tests.hive.conftest import running_hive
from tests.hive.fakehub import write_small_gguf
from tests.processes import RbeeProcess, program
from tests.state_dirs import full_home, home_under_a_file, read_only_home

#: Above the default pid_max: no process has it.
DEAD_PID = 2 ** 22 + 4242


def _one_line_exit_1(proc: RbeeProcess, *needles: str) -> str:
    assert proc.wait(60) == 1, proc.stderr_text()
    assert len(proc.stderr_lines) == 1, proc.stderr_text()
    line = proc.stderr_lines[0]
    assert "Traceback" not in line and all(n in line for n in needles), line
    return line


def test_a_damaged_catalog_is_set_aside_and_rebuilt_from_the_model_files(rbee_home: Path, tmp_path: Path) -> None:
    (rbee_home / "models.db").write_bytes(b"this is not a SQLite database\n" * 200)
    downloaded = rbee_home / "models" / "hf" / "rbee-test" / "small-GGUF" / "small-Q4_K_M.gguf"
    downloaded.parent.mkdir(parents=True)
    write_small_gguf(downloaded, tensor_bytes=64 * 1024)
    (downloaded.parent / "other.gguf.part").write_bytes(b"half a download")  # never registered
    with running_hive() as hive:
        said = {o["action"]: o for o in hive.proc.json_lines() if o.get("action", "").startswith("catalog_")}
        damaged = said["catalog_damaged"]
        assert damaged["level"] == "warn" and "models.db could not be read" in damaged["human"]
        kept = Path(damaged["target"])
        assert kept.parent == rbee_home and kept.name.startswith("models.db.corrupt-") and kept.name in damaged["human"]
        assert kept.read_bytes().startswith(b"this is not a SQLite database")
        assert "hf:rbee-test/small-GGUF/small-Q4_K_M.gguf" in said["catalog_rebuilt"]["human"]
        models = hive.http.get("/v1/models").json()["models"]
        assert [(m["reference"], m["provider"], m["sha256"], m["local_path"]) for m in models] == [
            ("hf:rbee-test/small-GGUF/small-Q4_K_M.gguf", "hf", sha256_of(downloaded), str(downloaded))]
        assert hive.http.get("/v1/health").status_code == 200  # the hive runs on
    assert "Traceback" not in hive.proc.stderr_text()


@pytest.mark.parametrize("how", ["read-only", "full", "under-a-file"])
def test_an_unwritable_home_stops_the_hive_with_one_line(rbee_home: Path, tmp_path: Path, how: str) -> None:
    argv = [program("rbee-hive"), "daemon", "--port", "0"]
    env = {"RBEE_HOME": str(rbee_home)}
    if how == "read-only":
        argv = read_only_home(argv)
    elif how == "full":
        argv = full_home(argv)
    else:
        env["RBEE_HOME"] = str(home_under_a_file(tmp_path))
    with RbeeProcess(argv, env=env) as proc:
        line = _one_line_exit_1(proc, f"RBEE_HOME={env['RBEE_HOME']}", "set RBEE_HOME to")
        assert ("full disk" in line) == (how == "full"), line
        # The queen reads the hive's stdout: the same words reach it as narration.
        failed = [o for o in proc.json_lines() if o.get("action") == "hive_failed"]
        assert [o["human"] for o in failed] == [line.removeprefix("rbee-hive: ")]
        assert not [o for o in proc.json_lines() if o.get("action") == "server_bind"]


def test_a_model_file_that_vanished_is_named_and_its_entry_dropped(rbee_home: Path, tmp_path: Path) -> None:
    models = tmp_path / "my-models"
    models.mkdir()
    model = write_small_gguf(models / "small.gguf", tensor_bytes=64 * 1024)
    reference = f"file:{model}"
    with running_hive(env={"RBEE_MODEL_DIRS": str(models)}) as hive:
        started = hive.http.post("/v1/models/download", json={"model": reference})
        assert started.status_code == 202, started.text
        progress = hive.sse(f"/v1/models/download/{started.json()['download_id']}/progress")
        assert "download_complete" in [getattr(e, "action", None) for e in progress]
        assert [m["reference"] for m in hive.http.get("/v1/models").json()["models"]] == [reference]

        model.unlink()
        answer = hive.spawn(model=reference)
        assert answer.status_code == 404, answer.text
        message = answer.json()["error"]["message"]
        assert reference in message and "is gone from this node" in message and "put the file back" in message
        assert hive.http.get("/v1/models").json()["models"] == []  # the entry is dropped
        # From now on it is a file: like any other that is not there.
        again = hive.http.post("/v1/models/resolve", json={"model": reference})
        assert again.status_code == 404 and "RBEE_MODEL_DIRS" in again.json()["error"]["message"], again.text
        vanished = [o for o in hive.proc.json_lines() if o.get("action") == "model_vanished"]
        assert len(vanished) == 1 and str(model) in vanished[0]["human"]
    assert "Traceback" not in hive.proc.stderr_text()


def test_pid_files_of_workers_that_are_gone_do_not_outlive_the_next_start(rbee_home: Path) -> None:
    # What a SIGKILLed hive leaves: records of its workers (gone with it), a record whose
    # PID now runs another program, a half-written record, the temporary file of a write.
    pid_dir = rbee_home / "workers"
    pid_dir.mkdir()
    dead_hive = DEAD_PID + 1
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        for worker_id, pid in (("worker-gone1", DEAD_PID), ("worker-gone2", DEAD_PID + 2),
                               ("worker-other", bystander.pid)):
            (pid_dir / f"{worker_id}.pid").write_text(json.dumps({"pid": pid, "worker_id": worker_id,
                                                                  "hive_pid": dead_hive}))
        (pid_dir / "worker-torn.pid").write_text('{"pid": 12')
        tmp = pid_dir / ".worker-crash.pid.tmp"
        tmp.write_text('{"pid": 1')
        long_ago = time.time() - 3600
        os.utime(tmp, (long_ago, long_ago))
        with running_hive() as hive:
            assert sorted(os.listdir(pid_dir)) == []
            swept = {o["worker_id"]: o["outcome"] for o in hive.proc.json_lines() if o.get("action") == "stale_worker"}
            assert swept == {"worker-gone1": "already gone", "worker-gone2": "already gone",
                             "worker-other": "not an llm-worker-rbee any more: left alone"}
        assert bystander.poll() is None, "the sweep ended a process that is not a worker"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.model
def test_a_worker_gets_neither_the_hives_token_nor_the_hugging_face_token(rbee_home: Path) -> None:
    env = {"RBEE_API_TOKEN": "hive-token-not-for-workers", "HF_TOKEN": "hf_not_for_workers",
           "HUGGING_FACE_HUB_TOKEN": "hf_not_for_workers_either"}
    with running_hive(env=env) as hive:
        hive.http.headers["Authorization"] = f"Bearer {env['RBEE_API_TOKEN']}"
        spawned = hive.spawn()
        assert spawned.status_code == 201, spawned.text
        environ = dict(entry.split(b"=", 1) for entry in
                       Path(f"/proc/{spawned.json()['pid']}/environ").read_bytes().split(b"\0") if b"=" in entry)
        assert not {b"RBEE_API_TOKEN", b"HF_TOKEN", b"HUGGING_FACE_HUB_TOKEN"} & set(environ)
        assert environ[b"RBEE_WORKER_API_KEY"].decode() == spawned.json()["api_key"]
        hive.http.post(f"/v1/workers/{spawned.json()['worker_id']}/shutdown")

