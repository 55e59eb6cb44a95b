"""``rbee-keeper infer`` when state on disk goes wrong: one line naming the cause and the
fix, exit 1, no traceback, and nothing started.

A read-only, full or impossible ``RBEE_HOME`` (no queen runs, so the keeper would start
one there); a ``file:`` model catalogued on the node whose file then vanished.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hive.fakehub import write_small_gguf
from tests.processes import RbeeProcess, program
from tests.queen.support import keeper_env, rbee_processes, wait_no_rbee_processes
from tests.state_dirs import full_home, home_under_a_file, read_only_home

INFER = [program("rbee-keeper"), "infer", "--model", "gemma3-270m", "--prompt", "hi", "--max-tokens", "2"]


@pytest.mark.parametrize("how", ["read-only", "full", "under-a-file"])
def test_an_unwritable_home_is_one_line_and_starts_nothing(rbee_home: Path, tmp_path: Path, how: str) -> None:
    home = home_under_a_file(tmp_path) if how == "under-a-file" else rbee_home
    argv = {"read-only": read_only_home, "full": full_home}.get(how, lambda a: a)(INFER)
    with RbeeProcess(argv, env=keeper_env(home)) as proc:
        assert proc.wait(60) == 1, proc.stderr_text()
        assert len(proc.stderr_lines) == 1, proc.stderr_text()
        line = proc.stderr_lines[0]
        assert line.startswith(f"Error: RBEE_HOME={home} ") and "set RBEE_HOME to" in line, line
        assert ("full disk" in line) == (how == "full"), line
        assert proc.stdout_lines == []
    assert rbee_processes(home) == []
    if how == "read-only":
        assert list(rbee_home.iterdir()) == []  # the keeper wrote nothing there (nor could it)


def test_a_catalogued_model_whose_file_vanished_is_named_in_one_line(rbee_home: Path, tmp_path: Path) -> None:
    models = tmp_path / "my-models"
    models.mkdir()
    model = write_small_gguf(models / "small.gguf", tensor_bytes=64 * 1024)
    env = {**keeper_env(rbee_home), "RBEE_MODEL_DIRS": str(models)}
    reference = f"file:{model}"
    with RbeeProcess([program("rbee-keeper"), "models", "download", reference], env=env) as download:
        assert download.wait(120) == 0, download.stderr_text()
    model.unlink()
    with RbeeProcess([*INFER[:3], reference, *INFER[4:]], env=env) as infer:
        assert infer.wait(120) == 1, infer.stderr_text()
        failed = [line for line in infer.stderr_lines if "Failed: infer — " in line]
        assert len(failed) == 1, infer.stderr_text()
        assert f"the model file of {reference} is gone from this node" in failed[0]
        assert "put the file back" in failed[0] and "rbee-keeper models list" in failed[0]
        assert "Traceback" not in infer.stderr_text() and infer.stdout_lines == []
    assert not wait_no_rbee_processes(rbee_home, 10)
