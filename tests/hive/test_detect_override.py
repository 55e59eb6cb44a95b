"""``RBEE_DETECT_OVERRIDE`` (for tests and demos): a CPU-only machine reports the backends
and devices of a GPU node, and the hive still never starts a worker on a backend its
llama.cpp build lacks. Real ``rbee-hive`` processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rbee.hive.detect import built_backends
from tests.hive.conftest import running_hive
from tests.processes import RbeeProcess, children_of, program

GIB = 1024 ** 3


def _missing_backend() -> str:
    """A backend this build lacks: cuda on a CPU-only build, metal on a CUDA one."""
    return next(b for b in ("cuda", "metal") if b not in built_backends())


def _stand_in(backend: str) -> dict[str, object]:
    """What a GPU node would report, for this CPU-only (or at least ``backend``-less) machine."""
    return {"hostname": "gpu-node-7", "backends": ["cpu", backend],
            "devices": [{"backend": backend, "index": 0, "name": "Stand-in GPU",
                         "memory_total_bytes": 24 * GIB, "memory_free_bytes": 23 * GIB}]}


def _detect(env: dict[str, str]) -> RbeeProcess:
    with RbeeProcess([program("rbee-hive"), "detect"], env=env) as proc:
        proc.wait(60)
    return proc


def test_detect_reports_what_the_override_says_and_measures_the_rest(rbee_home: Path) -> None:
    backend = _missing_backend()
    override = _stand_in(backend)
    proc = _detect({"RBEE_DETECT_OVERRIDE": json.dumps(override)})
    assert proc.proc.returncode == 0, proc.stderr_text()
    node = json.loads("\n".join(proc.stdout_lines))
    assert node["hostname"] == "gpu-node-7" and node["backends"] == ["cpu", backend]
    # CPU is always there: the override listed no CPU device, so the measured one is kept.
    cpu, gpu = node["devices"]
    assert cpu["backend"] == "cpu" and 0 < cpu["memory_free_bytes"] <= cpu["memory_total_bytes"]
    assert gpu == override["devices"][0]  # type: ignore[index]
    assert node["disk_free_bytes"] > 0 and node["rbee_version"]

    # Keys left out stay detected.
    only_name = json.loads("\n".join(_detect({"RBEE_DETECT_OVERRIDE": '{"hostname": "mac-3"}'}).stdout_lines))
    assert only_name["hostname"] == "mac-3" and only_name["backends"] == built_backends()


MALFORMED = [
    ("not json {", "is not JSON"),
    ('["cpu", "cuda"]', 'must be a JSON object, not ["cpu", "cuda"]'),
    ('{"backend": ["cuda"]}', "has unknown key(s) backend"),
    ('{"backends": "cuda"}', 'backends must be a non-empty list of distinct names from cpu, cuda, metal, not "cuda"'),
    ('{"backends": ["cpu", "tpu"]}', "backends must be a non-empty list"),
    ('{"devices": [{"backend": "cuda", "index": "0"}]}', 'devices[0].index must be an integer >= 0, not "0"'),
    ('{"devices": [{"backend": "cuda"}]}', "devices[0] lacks index"),
    ('{"devices": [{"backend": "cuda", "index": 0, "memory_free_bytes": "24G"}]}',
     'devices[0].memory_free_bytes must be a number of bytes'),
    ('{"hostname": ""}', 'hostname must be a non-empty string, not ""'),
]


@pytest.mark.parametrize(("value", "says"), MALFORMED, ids=[m[1][:24] for m in MALFORMED])
def test_a_malformed_override_is_one_line_and_exit_2(rbee_home: Path, value: str, says: str) -> None:
    proc = _detect({"RBEE_DETECT_OVERRIDE": value})
    assert proc.proc.returncode == 2, proc.stderr_text()
    assert proc.stdout_lines == [] and len(proc.stderr_lines) == 1, proc.stderr_text()
    line = proc.stderr_lines[0]
    assert line.startswith("rbee-hive: RBEE_DETECT_OVERRIDE ") and says in line, line
    assert "or unset it (it is for tests and demos only)" in line, line


def test_a_hive_with_a_malformed_override_does_not_start(rbee_home: Path) -> None:
    env = {"RBEE_DETECT_OVERRIDE": '{"backends": ["cuda"], "devices": {}}'}
    with RbeeProcess([program("rbee-hive"), "daemon", "--port", "0"], env=env) as proc:
        assert proc.wait(60) == 2, proc.stderr_text()
    assert len(proc.stderr_lines) == 1, proc.stderr_text()
    assert proc.stderr_lines[0].startswith("rbee-hive: RBEE_DETECT_OVERRIDE devices must be a list of devices, not {}")
    assert not [o for o in proc.json_lines() if o.get("action") == "server_bind"]


def test_a_backend_the_build_lacks_is_refused_at_once_and_no_worker_starts(rbee_home: Path) -> None:
    backend = _missing_backend()
    with running_hive(env={"RBEE_DETECT_OVERRIDE": json.dumps(_stand_in(backend))}) as hive:
        node = hive.http.get("/v1/detect").json()
        assert node["hostname"] == "gpu-node-7" and node["backends"] == ["cpu", backend]
        assert hive.http.get("/v1/health").json()["hostname"] == "gpu-node-7"
        ready = hive.proc.wait_for_action("hive_ready", 5)
        assert f"backends: cpu, {backend}" in ready["human"]

        asked = time.monotonic()
        answer = hive.spawn(backend=backend, device=0)
        took = time.monotonic() - asked
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "backend_unavailable"
        message = error["message"]
        for needle in ("node gpu-node-7", f"reports backend {backend} (RBEE_DETECT_OVERRIDE says so)",
                       f"llama.cpp lacks {backend}", "no worker was started", f"a llama.cpp build with {backend}",
                       "--backend cpu"):
            assert needle in message, message
        assert error["details"] == {"backend": backend, "available_backends": built_backends()}
        assert took < 2.0, f"the refusal took {took:.1f} s"

        # Nothing was started, nothing provisioned: the refusal comes before the model.
        assert children_of(hive.proc.pid) == []
        assert hive.workers() == []
        assert hive.http.get("/v1/models").json()["models"] == []
        assert list((rbee_home / "workers").glob("*.pid")) == []
        assert not [o for o in hive.proc.json_lines() if o.get("action") in ("worker_spawn", "model_assemble")]
        # A device the override does not list is the usual refusal, naming what exists.
        other = hive.spawn(backend=backend, device=1).json()["error"]
        assert other["code"] == "backend_unavailable" and f"{backend} devices: 0" in other["message"]
    assert "Traceback" not in hive.proc.stderr_text()
