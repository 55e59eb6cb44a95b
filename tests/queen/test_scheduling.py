"""The queen schedules: real queen, hive and worker processes, the real embedded model.

One worker of a model serves many jobs through its slots; jobs beyond the slots wait in a
bounded queue and say where they stand; beyond the queue they are refused at once; a
queued job that goes away never reaches a worker; the right model and backend, always.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from rbee.narration import sse
from rbee.narration.events import DONE, End, Error, NarrationEvent, Started, Token
from tests.processes import RbeeProcess, program
from tests.queen.support import keeper_env, start_queen, wait_no_rbee_processes

pytestmark = pytest.mark.model
MODEL = "gemma3-270m"
#: Slots per worker in these tests (the hive's default is the same 4).
SLOTS = 4
MAX_QUEUE = 4


def keeper(home: Path, url: str, *args: str, env: dict[str, str] | None = None) -> RbeeProcess:
    return RbeeProcess([program("rbee-keeper"), *args], env={**keeper_env(home, url), **(env or {})})


def infer_args(max_tokens: int, *extra: str, model: str = MODEL) -> list[str]:
    return ["infer", "--model", model, "--prompt", "Tell me about bees.", "--max-tokens", str(max_tokens),
            "--temperature", "0", *extra]


def workers(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"]


@pytest.fixture(scope="module")
def warm_queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A persistent queen with ``--max-queue 4`` and one warm worker of 4 slots."""
    home = tmp_path_factory.mktemp("rbee-home")
    queen = RbeeProcess([program("queen-rbee"), "--port", "0", "--max-queue", str(MAX_QUEUE)],
                        env={"RBEE_HOME": str(home), "RBEE_WORKER_PARALLEL": str(SLOTS)})
    try:
        url = queen.bound_url()
        warm = keeper(home, url, *infer_args(4))
        assert warm.wait(600) == 0, warm.stderr_text()
        yield home, url
    finally:
        queen.stop()
        assert not wait_no_rbee_processes(home, 10)


def test_eight_concurrent_keepers_share_one_worker(rbee_home: Path) -> None:
    with start_queen(rbee_home) as queen:
        url = queen.bound_url()
        # No --node: the queen places the jobs (localhost, the only node).
        keepers = [keeper(rbee_home, url, *infer_args(16)) for _ in range(8)]
        for proc in keepers:
            assert proc.wait(600) == 0, proc.stderr_text()
            assert "".join(proc.stdout_lines).strip(), proc.stderr_text()
        listed = workers(url)
        assert len(listed) == 1, listed
        assert listed[0]["slots"] == {"total": SLOTS, "busy": 0}
        err = "\n".join(line for proc in keepers for line in proc.stderr_lines)
        assert err.count("asking rbee-hive to spawn one") == 1, err
        assert "Routing job to node localhost" in err
    assert not wait_no_rbee_processes(rbee_home, 10)


async def _one_task(client: httpx.AsyncClient, body: dict[str, Any], record: dict[str, Any]) -> None:
    """POST /v2/tasks and read its stream to the end, noting when things happened."""
    record["sent"] = time.monotonic()
    async with client.stream("POST", "/v2/tasks", json=body) as response:
        record["status"] = response.status_code
        record["answered"] = time.monotonic()
        record["headers"] = dict(response.headers)
        if response.status_code != 200:
            record["body"] = json.loads(await response.aread())
            return
        decoder = sse.Decoder()
        events: list[Any] = []
        async for chunk in response.aiter_raw():
            events += decoder.feed(chunk)
            if DONE in events:
                break
        record["events"] = events
        record["ended"] = time.monotonic()


def run_tasks(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [{} for _ in bodies]

    async def main() -> None:
        limits = httpx.Limits(max_connections=len(bodies) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            async with trio.open_nursery() as nursery:
                for body, record in zip(bodies, records):
                    nursery.start_soon(_one_task, client, body, record)

    trio.run(main)
    return records


def test_slots_fill_then_the_queue_then_refusals(warm_queen: tuple[Path, str]) -> None:
    _, url = warm_queen
    body = {"operation": "infer", "model": MODEL, "prompt": "Tell me a long story about bees.",
            "max_tokens": 96, "temperature": 0}
    records = run_tasks(url, [dict(body) for _ in range(16)])
    served = [r for r in records if r["status"] == 200]
    refused = [r for r in records if r["status"] != 200]
    assert len(served) == SLOTS + MAX_QUEUE and len(refused) == 16 - SLOTS - MAX_QUEUE, [r["status"] for r in records]
    first_end = min(r["ended"] for r in served)
    for r in refused:
        assert r["status"] == 503 and int(r["headers"]["retry-after"]) >= 1
        assert r["body"]["error"]["code"] == "queue_full"
        assert "--max-queue" in r["body"]["error"]["message"]
        assert r["answered"] < first_end  # at once, long before any job ends
    queued = 0
    for r in served:
        events = r["events"]
        assert events[-1] is DONE and not [e for e in events if isinstance(e, Error)], events[-5:]
        assert [e for e in events if isinstance(e, End)] and [e for e in events if isinstance(e, Token)]
        waits = [e for e in events if isinstance(e, NarrationEvent) and e.action == "infer_queue"]
        if waits:
            queued += 1
            assert waits[0].human.startswith(f"Waiting for a slot of {MODEL} on localhost: position ")
            positions = [int(e.extra["position"]) for e in waits]
            # Said again as it moves forward (slots freeing together may skip places).
            assert positions == sorted(positions, reverse=True) and len(set(positions)) == len(positions)
    assert queued == MAX_QUEUE
    # Every job ended and left its slot.
    assert [w["slots"]["busy"] for w in workers(url)] == [0]


def test_a_queued_job_that_goes_away_never_reaches_a_worker(warm_queen: tuple[Path, str]) -> None:
    _, url = warm_queen
    long = {"operation": "infer", "model": MODEL, "prompt": "Count slowly.", "max_tokens": 160, "temperature": 0}

    async def main() -> dict[str, list[Any]]:
        seen: dict[str, list[Any]] = {}
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            holders = [(await client.post("/v1/jobs", json=long)).json()["job_id"] for _ in range(SLOTS)]
            # Wait until every slot is leased.
            with trio.fail_after(120):
                while sum(w["slots"]["busy"] for w in (await client.get("/v1/workers")).json()["workers"]) < SLOTS:
                    await trio.sleep(0.05)
            # One queued job cancelled with DELETE, one whose client goes away.
            deleted = (await client.post("/v1/jobs", json=long)).json()["job_id"]
            vanished: list[Any] = []
            async with client.stream("POST", "/v2/tasks", json=long) as response:
                vanished_id = response.headers["x-rbee-job-id"]
                decoder = sse.Decoder()
                async for chunk in response.aiter_raw():
                    vanished += decoder.feed(chunk)
                    if any(isinstance(e, NarrationEvent) and e.action == "infer_queue" for e in vanished):
                        break  # leaving the block closes the connection
            assert (await client.delete(f"/v1/jobs/{deleted}")).status_code == 200
            async with client.stream("GET", f"/v1/jobs/{deleted}/stream") as response:
                decoder = sse.Decoder()
                seen[deleted] = []
                async for chunk in response.aiter_raw():
                    seen[deleted] += decoder.feed(chunk)
            seen["vanished"] = vanished
            with trio.fail_after(10):
                while vanished_id in {j["job_id"] for j in (await client.get("/v1/jobs")).json()["jobs"]
                                      if j["state"] not in ("cancelled",)}:
                    await trio.sleep(0.05)
            for job_id in holders:
                async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                    decoder = sse.Decoder()
                    seen[job_id] = []
                    async for chunk in response.aiter_raw():
                        seen[job_id] += decoder.feed(chunk)
        return seen

    seen = trio.run(main)
    for job_id, events in seen.items():
        if not job_id.startswith("job-") or job_id == list(seen)[0]:
            continue
        assert [e for e in events if isinstance(e, End)], events[-3:]  # the holders finished
    cancelled = seen[list(seen)[0]]
    assert [e.code for e in cancelled if isinstance(e, Error)] == ["cancelled"]
    for events in (cancelled, seen["vanished"]):
        actions = [e.action for e in events if isinstance(e, NarrationEvent)]
        assert "infer_queue" in actions
        assert "infer_lease" not in actions and "infer_worker" not in actions
        assert not [e for e in events if isinstance(e, (Started, Token))]
    assert [w["slots"]["busy"] for w in workers(url)] == [0]


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--model", "hf:nobody/nothing"], {"HF_HUB_OFFLINE": "1"}, "hf:nobody/nothing"),
    (["--model", "file:/no/such.gguf"], {}, "/no/such.gguf"),
    (["--model", MODEL, "--backend", "cuda", "--device", "3"], {}, "cuda"),
])
def test_never_a_substitute_for_the_model_or_backend_asked(warm_queen: tuple[Path, str], args: list[str],
                                                           env: dict[str, str], says: str) -> None:
    home, url = warm_queen
    before = [w["worker_id"] for w in workers(url)]
    proc = keeper(home, url, "infer", "--prompt", "hi", "--max-tokens", "4", *args, env=env)
    assert proc.wait(120) == 1, proc.stderr_text()
    assert not "".join(proc.stdout_lines).strip()  # no tokens of another model
    errors = [line for line in proc.stderr_lines if says in line]
    assert errors, proc.stderr_text()
    assert "Traceback" not in proc.stderr_text()
    assert [w["worker_id"] for w in workers(url)] == before


def test_metrics_parse_and_ps_shows_the_worker(warm_queen: tuple[Path, str]) -> None:
    home, url = warm_queen
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    slots = {(s.labels["node"], s.labels["model"]): s.value for s in families["rbee_worker_slots_total"].samples}
    assert slots == {("localhost", MODEL): SLOTS}
    finished = {(s.labels["operation"], s.labels["outcome"]): s.value
                for s in families["rbee_jobs_finished"].samples if s.name == "rbee_jobs_finished_total"}
    assert finished[("infer", "completed")] >= 1
    assert families["rbee_jobs_queued"].samples[0].value == 0
    ps = keeper(home, url, "ps")
    assert ps.wait(30) == 0, ps.stderr_text()
    header, *rows = ps.stdout_lines
    assert header.split()[:3] == ["NODE", "MODEL", "BACKEND"]
    assert len(rows) == 1 and rows[0].split()[:4] == ["localhost", MODEL, "cpu:0", f"0/{SLOTS}"], ps.stdout_lines
