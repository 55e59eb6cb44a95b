"""The queen under a burst of concurrent jobs: completions, queue wait, relay latency.

Do all jobs complete, how long do they queue, how fast does the queen relay the worker's
events?

    python benchmarks/bench_queen.py [--jobs 200] [--max-tokens 16] [--parallel 8] [--queen-url URL]

It starts a persistent ``queen-rbee --port 0 --max-queue 256`` with a temporary
``RBEE_HOME`` and ``RBEE_WORKER_PARALLEL=8`` in its environment (the hive it starts reads it:
8 slots per worker), warms one worker with a first job of the embedded ``gemma3-270m``, then
fires ``--jobs`` jobs of ``--max-tokens`` tokens at once through ``POST /v2/tasks`` (one-shot:
the answer is the job's SSE), from one Trio client (httpx, a connection for every job).
With ``--queen-url`` it runs against a queen that already runs and starts nothing (slots
and queue limit are then whatever that queen has).

Per job it records:

- the HTTP status: not 200 is counted, and 5xx apart (the goal: all complete, none 5xx);
  a stream that ends in an ``error`` event is counted by its code;
- **queue wait**: from sending the request to the first ``narration`` whose action is
  ``infer_lease`` (the queen narrates it when the job gets its worker slot); when a job
  has none, to its ``started`` event (the worker's first, sent once the slot is held:
  that adds one relay hop to the wait). How many jobs used which is printed, and beside
  it the queen's own figure (``queue_wait_ms`` of ``infer_lease``: from the job's start
  on the queen to its lease, without the HTTP round trip);
- **relay latency**: for every event stamped with a wall-clock ``ts_ms`` by the worker —
  the ``started`` event and the worker's own narration (actor ``llm-worker-rbee``) from
  ``started`` on — the client's wall time when it decoded the event
  (``time.time_ns() / 1e6``) minus ``ts_ms``. The worker's startup narration that the
  queen replays while a worker loads is left out (it is old by design). Both clocks are
  this machine's; against a remote queen whose workers run on other machines the figure
  includes their clock offset;
- tokens and the time to the first token (from sending the request).

It prints: jobs, completed, non-200, 5xx, wall time (first request to last stream end),
aggregate tok/s (all tokens / wall time), queue wait p50/p99, relay latency p50/p99, time
to first token p50/p99, and whether the goal ``relay p99 <= 20 ms`` is met. Percentiles
interpolate linearly between the closest ranks. The client is one Python process: at 200
streams its own event loop is part of what the relay latency measures.

Cleanup: ``POST /v1/shutdown``, then SIGTERM by PID if the queen is still there after
``--stop-seconds``, SIGKILL after as long again; then any process left whose environment
holds the benchmark's ``RBEE_HOME`` (a hive, a worker) is named, killed by PID, and the
run exits 1.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from llama_tools import STORY_OPENINGS, exit_with, narrated_bind_url
from rbee.http_client import async_client
from rbee.narration import sse
from rbee.narration.events import Done, Error, NarrationEvent, Started, Token

BIN = Path(sys.executable).parent
MODEL = "gemma3-270m"
WORKER_ACTOR = "llm-worker-rbee"
LEASE_ACTION = "infer_lease"
RELAY_GOAL_MS = 20.0
#: How long the queen may take to bind its port.
START_SECONDS = 60
PROMPTS = STORY_OPENINGS


@dataclass
class JobResult:
    """What the client saw of one job."""

    sent: float = 0.0  # perf_counter when the request went out
    status: int | None = None  # None: no HTTP answer at all (transport error, timeout)
    failure: str = ""  # transport error, timeout, error event code, non-200 body
    done: bool = False  # [DONE] read
    error_code: str | None = None
    tokens: int = 0
    lease_s: float | None = None  # sent -> first infer_lease narration
    queen_wait_ms: float | None = None  # the queen's own figure, in that narration (queue_wait_ms)
    started_s: float | None = None  # sent -> the worker's started event
    first_token_s: float | None = None
    ended: float = 0.0  # perf_counter when the stream ended
    relay_ms: list[float] = field(default_factory=list)
    #: Of those, the ``started`` event's: each stream's first write, which the worker sends
    #: at once (later events wait up to its 20 ms write coalescing, part of relay_ms).
    relay_started_ms: list[float] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and self.error_code is None

    @property
    def queue_wait_s(self) -> float | None:
        return self.lease_s if self.lease_s is not None else self.started_s


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the closest ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def wall_ms() -> float:
    return time.time_ns() / 1e6


def job_request(i: int, max_tokens: int) -> dict:
    return {"operation": "infer", "node": "localhost", "model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": max_tokens, "temperature": 0.0, "seed": 1}


async def run_job(client: httpx.AsyncClient, request: dict, result: JobResult, limit_s: float) -> None:
    """One job through ``POST /v2/tasks``: fills ``result`` as its events arrive."""
    with trio.move_on_after(limit_s) as scope:
        result.sent = time.perf_counter()
        try:
            async with client.stream("POST", "/v2/tasks", json=request) as response:
                result.status = response.status_code
                if response.status_code != 200:
                    body = await response.aread()
                    result.failure = f"HTTP {response.status_code}: {body[:160].decode('utf-8', 'replace')}"
                    return
                decoder = sse.Decoder()
                inference = False  # from the worker's started event on
                async for chunk in response.aiter_raw():
                    for event in decoder.feed(chunk):
                        now = time.perf_counter()
                        kind = type(event)
                        if kind is Token:
                            result.tokens += 1
                            if result.first_token_s is None:
                                result.first_token_s = now - result.sent
                        elif kind is NarrationEvent:
                            if event.action == LEASE_ACTION and result.lease_s is None:
                                result.lease_s = now - result.sent
                                reported = event.extra.get("queue_wait_ms")
                                if isinstance(reported, (int, float)) and not isinstance(reported, bool):
                                    result.queen_wait_ms = float(reported)
                            if inference and event.actor == WORKER_ACTOR and event.ts_ms is not None:
                                result.relay_ms.append(wall_ms() - event.ts_ms)
                        elif kind is Started:
                            inference = True
                            if result.started_s is None:
                                result.started_s = now - result.sent
                            if event.ts_ms is not None:
                                result.relay_ms.append(wall_ms() - event.ts_ms)
                                result.relay_started_ms.append(result.relay_ms[-1])
                        elif kind is Error:
                            result.error_code = event.code
                            result.failure = f"{event.code}: {event.message}"
                        elif kind is Done:
                            result.done = True
                if not result.done and not result.failure:
                    result.failure = "the stream ended without [DONE]"
        except httpx.TransportError as exc:
            result.failure = f"{type(exc).__name__}: {exc or 'no detail'}"
        finally:
            result.ended = time.perf_counter()
    if scope.cancelled_caught:
        result.failure = f"no end within {limit_s:.0f} s"


def token_headers() -> dict[str, str]:
    token = os.environ.get("RBEE_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


async def benchmark(url: str, args: argparse.Namespace) -> tuple[JobResult, list[JobResult], float]:
    """The warm-up job, then the burst; returns (warm-up, burst results, burst wall seconds)."""
    limits = httpx.Limits(max_connections=args.jobs + 8, max_keepalive_connections=args.jobs + 8)
    async with async_client(url, base_url=url, headers=token_headers(), limits=limits) as client:
        warm = JobResult()
        await run_job(client, job_request(0, args.max_tokens), warm, args.job_timeout)
        if not warm.completed:
            raise SystemExit(f"the warm-up job failed ({warm.failure or warm.status}); nothing measured")
        results = [JobResult() for _ in range(args.jobs)]
        go = trio.Event()

        async def one(i: int) -> None:
            await go.wait()
            await run_job(client, job_request(i + 1, args.max_tokens), results[i], args.job_timeout)

        async with trio.open_nursery() as nursery:
            for i in range(args.jobs):
                nursery.start_soon(one, i)
            await trio.sleep(0)  # every task is parked on `go`
            start = time.perf_counter()
            go.set()
        end = max((r.ended for r in results), default=start)
        return warm, results, end - start


# -- the queen we start -------------------------------------------------------------------


def processes_of_home(home: Path) -> list[int]:
    """PIDs of processes whose environment holds ``RBEE_HOME=home`` (ours: the home is new)."""
    needle = f"RBEE_HOME={home}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != "Z":
            found.append(int(entry))
    return found


class Queen:
    """``queen-rbee --port 0`` with its own RBEE_HOME; its stderr goes to a log file."""

    def __init__(self, tmp: Path, parallel: int, max_queue: int) -> None:
        self.home = tmp / "home"
        self.home.mkdir()
        self.log = tmp / "queen.log"
        env = {**os.environ, "RBEE_HOME": str(self.home), "RBEE_WORKER_PARALLEL": str(parallel)}
        self.argv = [str(BIN / "queen-rbee"), "--port", "0", "--max-queue", str(max_queue)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                         env=env, start_new_session=True)
        url = narrated_bind_url(self.proc, START_SECONDS)
        if url is None:
            try:  # its stdout closed: it is exiting, or it hangs without a port
                code: int | None = self.proc.wait(2)
            except subprocess.TimeoutExpired:
                code = None
            self.stop(10)
            why = f"exited with {code}" if code is not None else f"did not bind a port within {START_SECONDS} s"
            raise SystemExit(f"queen-rbee {why}; its stderr ends with:\n" + self.log_tail())
        self.url = url

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, seconds: float) -> str:
        """Graceful stop, then SIGTERM, then SIGKILL by PID; returns how it stopped."""
        if self.proc.poll() is not None:
            return f"had exited by itself ({self.proc.returncode})"
        forced = []
        steps: tuple[signal.Signals | None, ...] = (signal.SIGTERM, signal.SIGKILL)
        if self.proc.poll() is None and getattr(self, "url", None):
            try:
                httpx.post(f"{self.url}/v1/shutdown", headers=token_headers(), timeout=5)
                steps = (None, *steps)
            except httpx.HTTPError:
                pass
        for signum in steps:
            if signum is not None and self.proc.poll() is None:
                forced.append(signal.Signals(signum).name)
                os.kill(self.proc.pid, signum)
            try:
                self.proc.wait(seconds)
                break
            except subprocess.TimeoutExpired:
                continue
        how = "by POST /v1/shutdown" if steps[0] is None and not forced else "by " + " then ".join(forced or ["SIGTERM"])
        return how if self.proc.poll() is not None else how + ", and it is still running"

    def leftovers(self, seconds: float) -> list[int]:
        """Processes of this RBEE_HOME still alive after ``seconds``: killed by PID, returned."""
        deadline = time.monotonic() + seconds
        left = processes_of_home(self.home)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = processes_of_home(self.home)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


# -- the report ---------------------------------------------------------------------------


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def report(args: argparse.Namespace, setup: str, warm: JobResult, results: list[JobResult], wall_s: float) -> bool:
    """Print the figures; True when the goals are met (all complete, none 5xx, relay p99)."""
    completed = [r for r in results if r.completed]
    non_200 = [r for r in results if r.status is not None and r.status != 200]
    server_errors = [r for r in non_200 if r.status >= 500]
    no_answer = [r for r in results if r.status is None]
    stream_errors: dict[str, int] = {}
    for r in results:
        if r.status == 200 and not r.completed:
            code = r.error_code or r.failure or "?"
            stream_errors[code] = stream_errors.get(code, 0) + 1
    tokens = sum(r.tokens for r in results)
    waits = [r.queue_wait_s * 1000 for r in results if r.queue_wait_s is not None]
    queen_waits = [r.queen_wait_ms for r in results if r.queen_wait_ms is not None]
    by_lease = sum(1 for r in results if r.lease_s is not None)
    by_started = sum(1 for r in results if r.lease_s is None and r.started_s is not None)
    relay = [v for r in results for v in r.relay_ms]
    relay_started = [v for r in results for v in r.relay_started_ms]
    ttft = [r.first_token_s * 1000 for r in results if r.first_token_s is not None]
    relay_p99 = percentile(relay, 99)
    relay_met = bool(relay) and relay_p99 <= RELAY_GOAL_MS

    print(f"bench_queen: {args.jobs} concurrent jobs of {MODEL}, {args.max_tokens} max tokens, greedy; {setup}")
    print(f"warm-up job (cold: hive start, worker spawn, model load): first token after "
          f"{ms((warm.first_token_s or math.nan) * 1000)} ms, {warm.tokens} tokens")
    rows = [
        ("jobs", f"{len(results)}"),
        ("completed", f"{len(completed)}"),
        ("non-200", f"{len(non_200)}"),
        ("5xx", f"{len(server_errors)}"),
        ("no HTTP answer", f"{len(no_answer)}"),
        ("failed in the stream", ", ".join(f"{k} x{v}" for k, v in sorted(stream_errors.items())) or "0"),
        ("wall time", f"{wall_s:.2f} s"),
        ("tokens", f"{tokens}"),
        ("aggregate tok/s", f"{tokens / wall_s:.1f}" if wall_s > 0 else "n/a"),
        ("queue wait p50 / p99", f"{ms(percentile(waits, 50))} / {ms(percentile(waits, 99))} ms"
                                 f"  ({by_lease} from {LEASE_ACTION}, {by_started} from started)"),
        ("  as the queen reports it", f"{ms(percentile(queen_waits, 50))} / {ms(percentile(queen_waits, 99))} ms"
                                      f"  (queue_wait_ms of {LEASE_ACTION}, {len(queen_waits)} jobs)"),
        ("relay latency p50 / p99", f"{ms(percentile(relay, 50))} / {ms(relay_p99)} ms  ({len(relay)} stamped events)"),
        ("  of started events", f"{ms(percentile(relay_started, 50))} / {ms(percentile(relay_started, 99))} ms"
                               f"  ({len(relay_started)}: each stream's first write, not coalesced)"),
        ("first token p50 / p99", f"{ms(percentile(ttft, 50))} / {ms(percentile(ttft, 99))} ms"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    examples = [r.failure for r in results if r.failure][:3]
    for failure in examples:
        print(f"  e.g. {failure}")
    all_complete = len(completed) == len(results) and not server_errors
    print(f"goal: all complete, none 5xx: {'met' if all_complete else 'NOT met'}")
    print(f"goal: relay p99 <= {RELAY_GOAL_MS:.0f} ms: {'met' if relay_met else 'NOT met'}")
    print(f"load average after the run: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores; other work skews every figure)")
    return all_complete and relay_met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="concurrent jobs in the burst")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every job")
    parser.add_argument("--parallel", type=int, default=8, help="slots per worker (RBEE_WORKER_PARALLEL of the queen we start)")
    parser.add_argument("--max-queue", type=int, default=256, help="--max-queue of the queen we start")
    parser.add_argument("--job-timeout", type=float, default=600.0, help="seconds after which one job counts as failed")
    parser.add_argument("--stop-seconds", type=float, default=20.0, help="grace for each step of stopping the queen")
    parser.add_argument("--queen-url", help="run against this queen (already running); start nothing")
    args = parser.parse_args()
    if args.jobs < 1 or args.max_tokens < 1:
        parser.error("--jobs and --max-tokens must be at least 1")

    if args.queen_url:
        url = args.queen_url.rstrip("/")
        warm, results, wall_s = trio.run(benchmark, url, args)
        ok = report(args, f"queen at {url} (its own slots and queue limit)", warm, results, wall_s)
        return 0 if ok else 1

    # A SIGTERM ends the run like Ctrl-C: through the finally below, which stops the queen.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="rbee-bench-queen-") as tmp:
        queen = Queen(Path(tmp), args.parallel, args.max_queue)
        measured = None
        try:
            measured = trio.run(benchmark, queen.url, args)
        finally:
            stopped = queen.stop(args.stop_seconds)
            left = queen.leftovers(10)
            if measured is None:
                print("queen-rbee's stderr ends with:\n" + queen.log_tail(), file=sys.stderr)
        setup = f"{args.parallel} slots per worker, queue limit {args.max_queue}, a queen of our own"
        ok = report(args, setup, *measured)
        print(f"cleanup: queen-rbee stopped {stopped}; "
              + (f"left behind and killed: pids {left}" if left else "no process left behind"))
        return 0 if ok and not left else 1


if __name__ == "__main__":
    exit_with(main, on_interrupt="the queen it started is stopped")
