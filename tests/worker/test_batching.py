"""Many streams on one worker (continuous batching), on a real `llm-worker-rbee`.

Every assertion counts events and states; waits are bounded generously, never timed
tightly: 2 cores run the worker and the test side by side. Under batching llama.cpp is
not batch-invariant (llama-server's greedy outputs change with the batch too), so no
test here compares text with a single-stream run: isolation is asserted instead, with
counting prompts that each continue their own numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import trio

from rbee.hive.gguf_header import kv_cache_bytes, read_gguf_metadata
from rbee.narration import DONE, sse
from rbee.worker.engine import DEFAULT_CHUNK
from tests.processes import RbeeProcess, wait_gone
from tests.worker.workers import CTX_SIZE, HTTP_TIMEOUT, running_worker, start_worker, wait_ready

pytestmark = pytest.mark.model

SLOTS = 8
#: Where each counting prompt starts; the prompt holds six numbers.
STARTS = [11, 23, 37, 48, 52, 66, 74, 85]


def counting(start: int) -> str:
    return ", ".join(str(n) for n in range(start, start + 6)) + ","


def greedy(prompt: str, max_tokens: int, job_id: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "job_id": job_id, **extra}


@pytest.fixture(scope="module")
def worker(embedded_model: Path) -> Iterator[tuple[RbeeProcess, str]]:
    with running_worker(embedded_model, "--parallel", str(SLOTS), worker_id="w-batch") as running:
        yield running


class Reader:
    """One SSE stream read in a Trio task: every event, with the time it arrived."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.events: list[Any] = []
        self.stamps: list[float] = []
        self.first_token = trio.Event()
        self.tokens_seen = 0
        self.closed = trio.Event()

    @property
    def tokens(self) -> list[Any]:
        return [e for e in self.events if e.type == "token"]

    def of_type(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]

    @property
    def end(self) -> Any:
        (end,) = self.of_type("end")
        return end

    async def run(self, client: httpx.AsyncClient, url: str, body: dict[str, Any],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        decoder = sse.Decoder()
        try:
            async with client.stream("POST", f"{url}/v1/inference", json=body) as response:
                self.status = response.status_code
                task_status.started()
                async for chunk in response.aiter_bytes():
                    now = trio.current_time()
                    for event in decoder.feed(chunk):
                        self.events.append(event)
                        self.stamps.append(now)
                        if event.type == "token":
                            self.tokens_seen += 1
                            self.first_token.set()
        finally:
            self.closed.set()

    def tokens_between(self, start: float, end: float) -> int:
        return sum(1 for e, t in zip(self.events, self.stamps) if e.type == "token" and start <= t <= end)


async def _ready(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    return (await client.get(f"{url}/v1/ready")).json()


def _check_complete(reader: Reader) -> None:
    """started, tokens with consecutive i, metrics, end, [DONE], in that order."""
    kinds = [e.type for e in reader.events if e.type not in ("narration", "prefill")]
    n = len(reader.tokens)
    assert kinds == ["started"] + ["token"] * n + ["metrics", "end", "done"], kinds
    assert reader.events[-1] is DONE
    assert [t.i for t in reader.tokens] == list(range(n))
    assert reader.end.tokens_out == n


def test_eight_concurrent_streams_each_continue_their_own_prompt(worker) -> None:
    _, url = worker

    async def main() -> list[Reader]:
        readers = [Reader() for _ in STARTS]
        with trio.fail_after(180):
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                async with trio.open_nursery() as nursery:
                    for start, reader in zip(STARTS, readers):
                        nursery.start_soon(reader.run, client, url, greedy(counting(start), 10, f"count-{start}"))
                    # All eight at once: the worker is full while they run.
                    with trio.move_on_after(60):
                        while not all(r.first_token.is_set() for r in readers):
                            await trio.sleep(0.01)
                    states = {(await _ready(client, url))["state"]}
                assert (await _ready(client, url))["slots"] == {"total": SLOTS, "busy": 0}
        assert states <= {"full", "busy", "idle"}
        return readers

    readers = trio.run(main)
    for start, reader in zip(STARTS, readers):
        assert reader.status == 200
        _check_complete(reader)
        assert reader.events[0].job_id == f"count-{start}"
        assert all(n.job_id == f"count-{start}" for n in reader.of_type("narration"))
        text = "".join(t.t for t in reader.tokens)
        assert text.startswith(f" {start + 6}, {start + 7}"), (start, text)


def test_cancelling_one_of_eight_frees_its_slot_and_touches_no_other(worker) -> None:
    _, url = worker

    async def main() -> tuple[list[Reader], Reader, float, dict[str, Any], bool]:
        readers = [Reader() for _ in STARTS]
        fresh = Reader()
        with trio.fail_after(300):
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                async with trio.open_nursery() as nursery:
                    for start, reader in zip(STARTS, readers):
                        nursery.start_soon(reader.run, client, url, greedy(counting(start), 150, f"long-{start}"))
                    while not all(r.tokens_seen >= 3 for r in readers):
                        await trio.sleep(0.01)
                    assert (await _ready(client, url))["state"] == "full"
                    victim = readers[3]
                    cancelled_at = trio.current_time()
                    response = await client.delete(f"{url}/v1/inference/long-{STARTS[3]}")
                    assert response.json() == {"job_id": f"long-{STARTS[3]}", "cancelled": True}
                    # Its slot is free within 2 s.
                    while True:
                        body = await _ready(client, url)
                        if body["slots"]["busy"] < SLOTS:
                            break
                        await trio.sleep(0.01)
                    freed_after = trio.current_time() - cancelled_at
                    await victim.closed.wait()
                    # A new request on the freed slot gets its first token while the others run.
                    nursery.start_soon(fresh.run, client, url, greedy(counting(5), 4, "fresh"))
                    await fresh.first_token.wait()
                    others_running = not any(r.closed.is_set() for i, r in enumerate(readers) if i != 3)
        return readers, fresh, freed_after, body, others_running

    readers, fresh, freed_after, body, others_running = trio.run(main)
    assert freed_after < 2.0
    assert body["slots"] == {"total": SLOTS, "busy": SLOTS - 1}
    assert others_running
    victim = readers[3]
    _check_complete(victim)
    assert victim.end.stop_reason == "cancelled" and victim.end.tokens_out < 150
    for i, reader in enumerate(readers):
        if i != 3:
            _check_complete(reader)
            assert reader.end.stop_reason != "cancelled"
    _check_complete(fresh)
    assert fresh.end.tokens_out == 4


def test_running_streams_keep_flowing_while_a_long_prompt_is_prefilled(embedded_model: Path) -> None:
    with running_worker(embedded_model, "--parallel", "5", worker_id="w-long", ctx_size=4096) as (_, url):
        long_prompt = "The history of the world is long and full of stories. " * 270  # ~3,000 tokens
        n_prompt = 0

        async def main() -> tuple[list[Reader], Reader, float, float]:
            running = [Reader() for _ in range(4)]
            long = Reader()
            with trio.fail_after(300):
                async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                    async with trio.open_nursery() as nursery:
                        for k, reader in enumerate(running):
                            nursery.start_soon(reader.run, client, url,
                                               greedy(counting(STARTS[k]), 400, f"run-{k}"))
                        while not all(r.tokens_seen >= 2 for r in running):
                            await trio.sleep(0.01)
                        sent = trio.current_time()
                        nursery.start_soon(long.run, client, url, greedy(long_prompt, 2, "long-prompt"))
                        await long.first_token.wait()
                        first = trio.current_time()
                        for reader in running:
                            await client.delete(f"{url}/v1/inference/{reader.events[0].job_id}")
            return running, long, sent, first

        running, long, sent, first = trio.run(main)
        _check_complete(long)
        n_prompt = long.of_type("metrics")[0].prompt_tokens
        assert 2500 < n_prompt < 3500
        chunks = math.ceil(n_prompt / DEFAULT_CHUNK)
        # A `prefill` event per chunk but the last, counting up to the prompt's size.
        prefill = long.of_type("prefill")
        assert [p.tokens_done for p in prefill] == [DEFAULT_CHUNK * k for k in range(1, chunks)]
        assert all(p.tokens_total == n_prompt for p in prefill)
        for reader in running:
            assert reader.tokens_between(sent, first) >= chunks - 1, (reader.tokens_between(sent, first), chunks)
            _check_complete(reader)


def test_a_shared_prefix_is_reused_unless_the_request_says_no(worker) -> None:
    _, url = worker
    prefix = "Notes from the garden. " * 40

    def metrics(body: dict[str, Any]) -> Any:
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            with client.stream("POST", f"{url}/v1/inference", json=body) as response:
                decoder, events = sse.Decoder(), []
                for chunk in response.iter_bytes():
                    events += decoder.feed(chunk)
        (m,) = [e for e in events if e.type == "metrics"]
        (end,) = [e for e in events if e.type == "end"]
        assert end.prompt_tokens_cached == m.prompt_tokens_cached
        return m

    cold = metrics(greedy(prefix + "Tomatoes", 2, "turn-1", cache_prompt=False))
    assert cold.prompt_tokens_cached == 0
    warm = metrics(greedy(prefix + "Tomatoes and beans", 2, "turn-2"))
    assert cold.prompt_tokens - 3 <= warm.prompt_tokens_cached < warm.prompt_tokens
    # The very same prompt again: everything but its last token comes from the cache.
    same = metrics(greedy(prefix + "Tomatoes and beans", 2, "turn-3"))
    assert same.prompt_tokens_cached == same.prompt_tokens - 1
    off = metrics(greedy(prefix + "Tomatoes and beans", 2, "turn-4", cache_prompt=False))
    assert off.prompt_tokens_cached == 0
    # A prompt that shares only its first token (the BOS) with that cache takes another
    # slot: the conversation it would evict is still whole afterwards.
    other = metrics(greedy("Apples, pears and plums", 2, "turn-5"))
    assert other.prompt_tokens_cached <= 1
    again = metrics(greedy(prefix + "Tomatoes and beans", 2, "turn-6"))
    assert again.prompt_tokens_cached == again.prompt_tokens - 1


def test_one_copy_of_the_weights_for_eight_streams(worker, embedded_model: Path) -> None:
    proc, url = worker

    def rss() -> int:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    async def run_streams(n: int) -> int:
        readers = [Reader() for _ in range(n)]
        peak = 0
        with trio.fail_after(180):
            async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                async with trio.open_nursery() as nursery:
                    for k, reader in enumerate(readers):
                        nursery.start_soon(reader.run, client, url, greedy(counting(STARTS[k]), 40, f"rss-{n}-{k}"))
                    while not all(r.closed.is_set() for r in readers):
                        peak = max(peak, rss())
                        await trio.sleep(0.05)
        for reader in readers:
            _check_complete(reader)
        return peak

    one = trio.run(run_streams, 1)
    eight = trio.run(run_streams, SLOTS)
    kv = kv_cache_bytes(read_gguf_metadata(embedded_model), CTX_SIZE * SLOTS)
    assert kv is not None and kv > 0
    assert eight <= one + kv, (one, eight, kv)


def test_shutdown_mid_batch_ends_every_stream_and_exits_cleanly(embedded_model: Path) -> None:
    proc = start_worker(embedded_model, "--parallel", "4", worker_id="w-shutdown")
    try:
        url = proc.bound_url()
        assert wait_ready(url)["ready"]

        async def main() -> list[Reader]:
            readers = [Reader() for _ in range(4)]
            with trio.fail_after(120):
                async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:
                    async with trio.open_nursery() as nursery:
                        for k, reader in enumerate(readers):
                            nursery.start_soon(reader.run, client, url, greedy(counting(STARTS[k]), 400, f"sd-{k}"))
                        while not all(r.tokens_seen >= 2 for r in readers):
                            await trio.sleep(0.01)
                        await client.post(f"{url}/v1/shutdown")
            return readers

        readers = trio.run(main)
        for reader in readers:
            assert reader.events[-1] is DONE
            last = reader.events[-2]
            assert (last.type, getattr(last, "stop_reason", None)) == ("end", "cancelled") or \
                (last.type, getattr(last, "code", None)) == ("error", "shutting_down")
        assert proc.wait(30) == 0
    finally:
        proc.stop()
    assert wait_gone([proc.pid], 5.0) == []
