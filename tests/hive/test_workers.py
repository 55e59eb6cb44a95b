"""The hive with real workers and the real embedded model: spawn, narration, death, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rbee.narration.events import Done, NarrationEvent
from tests.hive.conftest import running_hive
from tests.processes import RbeeProcess, children_of, pid_alive, program, wait_gone

pytestmark = pytest.mark.model


def _actions(events: list) -> list[str]:
    return [e.action for e in events if isinstance(e, NarrationEvent)]


def test_spawn_embedded_model_on_cpu(rbee_home: Path) -> None:
    with running_hive() as hive:
        answer = hive.spawn(backend="cpu", device=0)
        assert answer.status_code == 201, answer.text
        spawned = answer.json()
        assert spawned["state"] == "loading"
        assert spawned["url"].startswith("http://127.0.0.1:")
        assert spawned["api_key"] and spawned["model_ref"] == "gemma3-270m"
        assert spawned["slots"] == {"total": 4, "busy": 0}  # the hive's default --worker-parallel
        cmdline = Path(f"/proc/{spawned['pid']}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--parallel") + 1] == b"4"
        worker_id = spawned["worker_id"]
        assert (rbee_home / "workers" / f"{worker_id}.pid").is_file()

        # The narration stream, from the spawn on, until the hive says the worker is ready.
        events = hive.sse(f"/v1/workers/{worker_id}/narration",
                          until=lambda e: isinstance(e, NarrationEvent) and e.action == "worker_ready")
        actions = _actions(events)
        order = ["spawn_request", "model_assemble", "model_ready", "memory_plan", "worker_spawn", "startup",
                 "server_bind", "model_load", "worker_ready"]
        positions = [actions.index(a) for a in order]
        assert positions == sorted(positions), actions
        plan = next(e for e in events if isinstance(e, NarrationEvent) and e.action == "memory_plan")
        assert plan.extra["parallel"] == 4 and "context of 4 slots x 4096 tokens" in plan.human
        worker_events = [e for e in events if isinstance(e, NarrationEvent) and e.actor == "llm-worker-rbee"]
        assert worker_events and all(e.worker_id == worker_id for e in worker_events)

        listed = hive.wait_state(worker_id, "idle", 30)
        assert listed["pid"] == spawned["pid"] and listed["model_ref"] == "gemma3-270m"
        assert listed["slots"] == {"total": 4, "busy": 0}
        models = hive.http.get("/v1/models").json()["models"]
        assert [m["reference"] for m in models] == ["gemma3-270m"]
        model = models[0]
        assert model["provider"] == "embedded" and model["size"] == 253_113_024
        assert model["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
        assert Path(model["local_path"]).is_file() and not Path(model["local_path"] + ".part").exists()

        # A second spawn of the same model provisions nothing.
        second = hive.spawn().json()
        events2 = hive.sse(f"/v1/workers/{second['worker_id']}/narration",
                           until=lambda e: isinstance(e, NarrationEvent) and e.action == "worker_ready")
        assert "model_assemble" not in _actions(events2) and "download_start" not in _actions(events2)
        assert hive.http.get("/v1/models").json()["models"][0]["downloaded_at"] == model["downloaded_at"]
        assert {w["worker_id"] for w in hive.workers()} == {worker_id, second["worker_id"]}

        # Asking one worker to stop: it exits, its stream ends with [DONE], it is gone.
        stopped = hive.http.post(f"/v1/workers/{worker_id}/shutdown")
        assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
        tail = hive.sse(f"/v1/workers/{worker_id}/narration")
        assert isinstance(tail[-1], Done) and "worker_exit" in _actions(tail)
        assert not pid_alive(spawned["pid"])
        assert [w["worker_id"] for w in hive.workers()] == [second["worker_id"]]
        assert not (rbee_home / "workers" / f"{worker_id}.pid").exists()


def test_sigkill_of_a_worker_deregisters_it_within_two_seconds(rbee_home: Path) -> None:
    with running_hive() as hive:
        spawned = hive.spawn().json()
        hive.wait_state(spawned["worker_id"], "idle", 60)
        os.kill(spawned["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        while any(w["worker_id"] == spawned["worker_id"] for w in hive.workers()):
            assert time.monotonic() - killed_at < 2.0, "the dead worker is still listed after 2 s"
            time.sleep(0.05)
        exit_line = hive.proc.wait_for_action("worker_exit", 5)
        assert exit_line["worker_id"] == spawned["worker_id"] and exit_line["exit_code"] == -9
        assert "killed by signal 9" in exit_line["human"]
        tail = hive.sse(f"/v1/workers/{spawned['worker_id']}/narration", seconds=10)
        assert isinstance(tail[-1], Done)


def test_cuda_on_a_cpu_node_is_a_4xx_naming_the_backends(rbee_home: Path) -> None:
    with running_hive() as hive:
        answer = hive.spawn(backend="cuda")
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "backend_unavailable"
        assert "cuda" in error["message"] and "it has: cpu" in error["message"]
        assert error["details"]["available_backends"] == ["cpu"]
        assert hive.spawn(device=3).status_code == 400
        assert hive.workers() == []
        # Nothing was provisioned either: preflight runs before any download.
        assert hive.http.get("/v1/models").json()["models"] == []


def test_not_enough_memory_is_a_4xx_with_the_numbers(rbee_home: Path) -> None:
    limit = 300 * 1024 * 1024
    with running_hive(env={"RBEE_MEMORY_LIMIT_BYTES": str(limit)}) as hive:
        answer = hive.spawn(parallel=1)
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert error["code"] == "preflight_failed"
        message = error["message"]
        assert "needs 0.6 GiB" in message and "node has 0.3 GiB free" in message, message
        assert "context of 1 slot x 4096 tokens" in message
        assert "RBEE_MEMORY_LIMIT_BYTES" in message
        assert error["details"]["free_bytes"] == limit
        assert error["details"]["needs_bytes"] > limit
        # The default 4 slots: the KV cache holds 4 x 4096 tokens, four times the figure.
        four = hive.spawn().json()["error"]
        assert four["details"]["parallel"] == 4 and four["details"]["kv_cache_tokens"] == 4 * 4096
        one_kv = error["details"]["kv_cache_bytes"]
        assert four["details"]["kv_cache_bytes"] == 4 * one_kv
        assert four["details"]["needs_bytes"] == error["details"]["needs_bytes"] + 3 * one_kv
        assert "context of 4 slots x 4096 tokens" in four["message"]
        assert hive.workers() == []


def test_sigkill_of_the_hive_takes_its_workers_within_two_seconds(rbee_home: Path) -> None:
    proc = RbeeProcess([program("rbee-hive"), "daemon", "--port", "0"])
    workers: list[int] = []
    try:
        import httpx

        url = proc.bound_url()
        spawned = httpx.post(f"{url}/v1/workers/spawn", json={"model": "gemma3-270m"}, timeout=120).json()
        workers = [spawned["pid"]]
        assert children_of(proc.pid) == workers
        os.kill(proc.pid, signal.SIGKILL)
        assert wait_gone(workers, 2.0) == [], "a worker outlived its SIGKILLed hive by 2 s"
    finally:
        proc.stop()
        assert wait_gone(workers, 10) == []


def test_end_of_stdin_shuts_the_hive_down_cleanly(rbee_home: Path) -> None:
    proc = RbeeProcess([program("rbee-hive"), "daemon", "--port", "0"], stdin=subprocess.PIPE)
    pids: list[int] = []
    try:
        import httpx

        url = proc.bound_url()
        spawned = httpx.post(f"{url}/v1/workers/spawn", json={"model": "gemma3-270m"}, timeout=120).json()
        pids = [spawned["pid"]]
        assert proc.proc.stdin is not None
        proc.proc.stdin.close()
        assert proc.wait(30) == 0, proc.stderr_text()[-2000:]
        actions = [o.get("action") for o in proc.json_lines()]
        assert actions.index("stdin_closed") < actions.index("worker_exit") < actions.index("hive_stopped")
        assert wait_gone(pids, 1) == []
        assert list((rbee_home / "workers").glob("*.pid")) == []
    finally:
        proc.stop()
        assert wait_gone(pids, 10) == []


def test_a_stale_worker_recorded_under_rbee_home_is_swept_at_start(rbee_home: Path, embedded_model: Path,
                                                                     tmp_path: Path) -> None:
    # A worker whose hive died without taking it along: started here by hand, recorded as
    # a crashed hive would have recorded it. And a PID file pointing at another program.
    stale = RbeeProcess([program("llm-worker-rbee"), "--model", str(embedded_model), "--worker-id", "worker-stale1"])
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stale.wait_for_action("server_bind", 60)
        pid_dir = rbee_home / "workers"
        pid_dir.mkdir()
        dead_hive = 2 ** 22 + 12345  # above the default pid_max: no such process
        (pid_dir / "worker-stale1.pid").write_text(json.dumps({"pid": stale.pid, "worker_id": "worker-stale1",
                                                               "hive_pid": dead_hive}))
        (pid_dir / "worker-other.pid").write_text(json.dumps({"pid": bystander.pid, "worker_id": "worker-other",
                                                              "hive_pid": dead_hive}))
        with running_hive() as hive:
            swept = [o for o in hive.proc.json_lines() if o.get("action") == "stale_worker"]
            assert {o["worker_id"]: o["outcome"] for o in swept} == {
                "worker-stale1": "terminated", "worker-other": "not an llm-worker-rbee any more: left alone"}
            assert wait_gone([stale.pid], 5) == []
            assert bystander.poll() is None, "the sweep killed a process that is not a worker"
            assert list(pid_dir.glob("*.pid")) == []
    finally:
        stale.stop()
        bystander.kill()
        bystander.wait()


def test_serve_in_process_cancelled_from_outside_leaves_no_worker(rbee_home: Path) -> None:
    import httpx
    import trio

    from rbee.hive.config import HiveConfig
    from rbee.hive.server import serve

    async def run() -> int:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve, HiveConfig(port=0, idle_timeout_s=0))
                url = f"http://127.0.0.1:{port}"
                async with httpx.AsyncClient(timeout=60) as http:
                    spawned = (await http.post(f"{url}/v1/workers/spawn", json={"model": "gemma3-270m"})).json()
                    while (await http.get(f"{url}/v1/workers")).json()["workers"][0]["state"] != "idle":
                        await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
        return int(spawned["pid"])

    pid = trio.run(run)
    assert wait_gone([pid], 2) == []
    assert list((rbee_home / "workers").glob("*.pid")) == []
