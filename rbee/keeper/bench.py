"""``rbee-keeper bench``: time to first token and tokens per second, per node, end to end.

What is measured is the whole path a user's job takes: this keeper's own job client
(``rbee.client``) -> the queen -> the node's hive -> its worker, and the stream back. Per
node, one after another (so that one node's run does not slow another's down):

1. a **warm-up** job of one token: the first job on a node starts its hive and loads the
   model into a worker (seconds), which is not what a benchmark of generation should
   average in. Its whole time, submit to end, is reported as ``WARM-UP``: the cold start
   when nothing ran, about one job's overhead when the worker was loaded already;
2. the **measured** job: ``--max-tokens`` tokens, temperature 0, a fixed seed, prompt
   caching off (the warm-up's prompt must not make this prefill cheaper). ``TTFT`` is
   submit to the first token event as this keeper receives it; ``TOK/S`` is the tokens
   after the first over the time from the first to the last one (the decode rate: the
   first token's wait is TTFT's), as seen here. The worker's own figures come beside them
   when its stream carries them: its time to first token (``metrics``) and its decode
   rate (``end``).

A node that fails shows its error in its row and the others still run; the exit is then 1
(with one node only, the error is one line instead of a table). With no queen running, an
ephemeral one is started for the bench and stopped after it, as ``infer`` does.

Only light imports at the top: ``main.py`` reads the defaults here for ``--help``, which
must not pay for trio and httpx; the commands import them when they run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..requests import EMBEDDED_ALIAS
from .tables import format_table

if TYPE_CHECKING:
    from .output import Output

#: What the bench asks for unless told otherwise.
DEFAULT_MODEL = EMBEDDED_ALIAS
DEFAULT_PROMPT = "Write a short story about a bee who finds a garden."
DEFAULT_MAX_TOKENS = 64
#: Greedy decoding and a fixed seed: the same tokens every run, on every node.
SEED = 42
#: The warm-up job generates this much: enough to load everything on the way.
WARMUP_TOKENS = 1
#: One job may take this long (a warm-up may download and load a model): a node that
#: never answers fails its row rather than holding up the others for ever.
JOB_TIMEOUT_S = 600.0

COLUMNS = ("NODE", "TOKENS", "TTFT", "TOK/S", "WORKER TTFT", "WORKER TOK/S", "WARM-UP")


def bench_request(node: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The measured job's request (the warm-up's is the same with ``WARMUP_TOKENS``)."""
    return {"operation": "infer", "node": node, "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "seed": SEED, "cache_prompt": False}


@dataclass
class Measurement:
    """One job as this keeper saw it, times in seconds from its submission."""

    tokens: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    elapsed_s: float = 0.0
    worker_ttft_ms: float | None = None
    worker_tokens_per_sec: float | None = None
    stop_reason: str | None = None

    @property
    def tokens_per_sec(self) -> float | None:
        """The decode rate seen here: tokens after the first over first-to-last token."""
        if self.tokens < 2 or self.first_token_s is None or self.last_token_s is None:
            return None
        span = self.last_token_s - self.first_token_s
        return (self.tokens - 1) / span if span > 0 else None


@dataclass
class BenchResult:
    """One node's row: its figures, or why it has none."""

    node: str
    error: str | None = None
    warmup_s: float | None = None
    tokens: int = 0
    ttft_ms: float | None = None
    tokens_per_sec: float | None = None
    worker_ttft_ms: float | None = None
    worker_tokens_per_sec: float | None = None
    stop_reason: str | None = None

    @classmethod
    def of(cls, node: str, warmup: Measurement, run: Measurement) -> "BenchResult":
        """The row of a node whose warm-up and measured jobs both ran."""
        rate = run.tokens_per_sec
        return cls(
            node=node, warmup_s=round(warmup.elapsed_s, 3), tokens=run.tokens,
            ttft_ms=None if run.first_token_s is None else round(run.first_token_s * 1000, 1),
            tokens_per_sec=None if rate is None else round(rate, 2),
            worker_ttft_ms=None if run.worker_ttft_ms is None else round(run.worker_ttft_ms, 1),
            worker_tokens_per_sec=None if run.worker_tokens_per_sec is None else round(run.worker_tokens_per_sec, 2),
            stop_reason=run.stop_reason,
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def bench_row(result: BenchResult) -> list[str]:
    """One node's cells, in ``COLUMNS`` order (then its error, if it failed)."""
    if result.error is not None:
        return [result.node, *["-"] * (len(COLUMNS) - 1), result.error]
    warmup = "-" if result.warmup_s is None else f"{result.warmup_s:.2f} s"
    return [result.node, str(result.tokens), _ms(result.ttft_ms), _rate(result.tokens_per_sec),
            _ms(result.worker_ttft_ms), _rate(result.worker_tokens_per_sec), warmup]


def format_bench(results: list[BenchResult]) -> str:
    """The bench table: one row per node, in the order they ran; an ``ERROR`` column only
    when a node failed."""
    failed = any(r.error is not None for r in results)
    return format_table([bench_row(r) for r in results], COLUMNS + (("ERROR",) if failed else ()))


async def measure(url: str, request: dict[str, Any], on_accepted: Callable[[], None] = lambda: None) -> Measurement:
    """Run one job through the queen at ``url`` and time it; raises the job's error.

    ``on_accepted`` is called once the queen took the job (a job it refuses, for an
    unknown node say, is its one error line and nothing else)."""
    import trio

    from ..client import open_job_stream
    from ..errors import JobError, error_for_code
    from ..narration.events import End, Error, Metrics, Token
    from .queen_control import api_token

    seen = Measurement()
    end: End | None = None
    started = time.perf_counter()
    with trio.fail_after(JOB_TIMEOUT_S):
        async with open_job_stream(url, request, token=api_token()) as job:
            on_accepted()
            async for event in job:
                kind = type(event)
                if kind is Token:
                    now = time.perf_counter() - started
                    if seen.first_token_s is None:
                        seen.first_token_s = now
                    seen.last_token_s = now
                    seen.tokens += 1
                elif kind is Metrics:
                    seen.worker_ttft_ms = event.time_to_first_token_ms or None
                elif kind is End:
                    end = event
                elif kind is Error:
                    raise error_for_code(event.code, event.message)
    seen.elapsed_s = time.perf_counter() - started
    if end is None:
        raise JobError(f"the answer stopped after {seen.tokens} tokens without an end (the stream was cut)")
    seen.stop_reason = end.stop_reason
    seen.worker_tokens_per_sec = end.tokens_per_sec or None
    return seen


async def bench_node(out: "Output", url: str, node: str, model: str, prompt: str, max_tokens: int) -> BenchResult:
    """Warm up, then measure, one node; a failure is its row's error."""
    import trio

    from ..errors import RbeeError, single_cause

    request = bench_request(node, model, prompt, max_tokens)
    try:
        warmup = await measure(url, {**request, "max_tokens": WARMUP_TOKENS}, lambda: out.narrate(
            "bench_warmup", f"Bench on {node}: a warm-up job of {model} (starts its hive and loads the model "
            "if needed)", node=node, target=model))
        run = await measure(url, request, lambda: out.narrate(
            "bench_run", f"Bench on {node}: measuring {max_tokens} tokens (warm-up took {warmup.elapsed_s:.2f} s)",
            node=node, target=model))
    except trio.TooSlowError:
        return BenchResult(node, error=f"no answer from node {node} within {JOB_TIMEOUT_S:.0f} s")
    except Exception as exc:
        cause = single_cause(exc)
        if not isinstance(cause, RbeeError):
            raise
        return BenchResult(node, error=cause.message)
    return BenchResult.of(node, warmup, run)


async def bench(out: "Output", node: str, every_node: bool, model: str, prompt: str, max_tokens: int,
                as_json: bool) -> int:
    """``rbee-keeper bench``: every node asked for, one after another, on the running queen
    (an ephemeral one if none runs); the table (or ``--json``) on stdout; exit 1 if any
    node failed."""
    from .admin import ask, queen_session
    from .tables import json_document

    async with queen_session(out) as url:
        if every_node:
            nodes = [n["name"] for n in (await ask(url, "GET", "/v1/nodes"))["nodes"]]
        else:
            nodes = [node]
        results = [await bench_node(out, url, name, model, prompt, max_tokens) for name in nodes]
    failed = [r for r in results if r.error is not None]
    if as_json:
        print(json_document({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                             "seed": SEED, "results": [asdict(r) for r in results]}), flush=True)
    elif len(results) == 1 and failed:
        out.error(failed[0].error or "")
    else:
        print(format_bench(results), flush=True)
    return 1 if failed else 0
