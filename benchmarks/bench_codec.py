"""Narration codec throughput: our SSE and JSON-lines round trips against a naive baseline.

A plain script (not a test): ``python benchmarks/bench_codec.py``. It builds one realistic
stream (mostly ``Token`` events, some narration, the started/metrics/end frame), then
measures events per second for:

- ``sse``: ``sse.encode`` of every event, then ``sse.Decoder.feed`` over 4 KiB chunks;
- ``jsonlines``: the same with ``jsonlines.encode`` / ``jsonlines.Decoder``;
- ``baseline``: the naive form of the same work on plain dicts: ``json.dumps`` per event
  joined with newlines, then the whole buffer split on newlines and ``json.loads`` per
  line (no typed events, no chunking, no SSE framing).

The ratio is codec / baseline (goal: >= 0.7). Only figures from one run compare.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rbee.narration import jsonlines, sse, wire  # noqa: E402
from rbee.narration.events import (  # noqa: E402
    DONE,
    End,
    Metrics,
    NarrationEvent,
    Started,
    Token,
)

CHUNK = 4096
ROUNDS = 5


def realistic_stream(n_tokens: int = 20_000) -> list:
    """One inference stream: a frame, many tokens, a narration every 50 tokens."""
    words = [
        "The",
        " quick",
        " brown",
        " fox",
        " jumps",
        " over",
        " the",
        " lazy",
        " dog",
        ".",
        " Über",
        " naïve",
        " 🐝",
        "\n",
        " «quoted»",
        " 42",
    ]
    events: list = [
        Started(
            job_id="job-7f3a", worker_id="worker-1", model="gemma3-270m", ts_ms=1_795_000_000_000
        ),
        NarrationEvent(
            "llm-worker-rbee",
            "inference_start",
            human="Starting inference",
            target="job-7f3a",
            job_id="job-7f3a",
            correlation_id="c-1",
            worker_id="worker-1",
            ts_ms=1_795_000_000_001,
            extra={"prompt_tokens": 12},
        ),
    ]
    for i in range(n_tokens):
        events.append(Token(words[i % len(words)], i))
        if i % 50 == 49:
            events.append(
                NarrationEvent(
                    "llm-worker-rbee",
                    "token_progress",
                    human=f"{i + 1} tokens so far",
                    target="job-7f3a",
                    job_id="job-7f3a",
                    ts_ms=1_795_000_000_100 + i,
                    extra={"tokens_out": i + 1},
                )
            )
    events += [
        Metrics(12, n_tokens, 25.1, 26.3, 450_000.0, 44.4),
        End(n_tokens, 450_000.0, 44.4, "max_tokens"),
        DONE,
    ]
    return events


def chunks(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def codec_round_trip(module, events: list) -> float:
    """Seconds for encode + incremental decode of ``events`` with ``module``."""
    start = time.perf_counter()
    data = b"".join([module.encode(e) for e in events])
    decoder = module.Decoder()
    out: list = []
    for piece in chunks(data):
        out += decoder.feed(piece)
    out += decoder.close()
    elapsed = time.perf_counter() - start
    assert out == events, "round trip changed the stream"
    return elapsed


def baseline_round_trip(dicts: list[dict]) -> float:
    """Seconds for the naive json.dumps + split + json.loads of the same stream."""
    start = time.perf_counter()
    data = "\n".join([json.dumps(d) for d in dicts]).encode("utf-8")
    out = [json.loads(line) for line in data.decode("utf-8").split("\n")]
    elapsed = time.perf_counter() - start
    assert len(out) == len(dicts)
    return elapsed


def best_of(fn, *args) -> float:
    return min(fn(*args) for _ in range(ROUNDS))


def main() -> int:
    events = realistic_stream()
    dicts = [wire.to_dict(e) for e in events]
    n = len(events)
    base = n / best_of(baseline_round_trip, dicts)
    print(
        f"stream: {n} events ({sum(type(e) is Token for e in events)} tokens), "
        f"best of {ROUNDS}, {CHUNK}-byte chunks, Python {sys.version.split()[0]}"
    )
    print(f"{'baseline (json.dumps+split+loads)':36} {base:>12,.0f} events/s")
    for name, module in (("sse", sse), ("jsonlines", jsonlines)):
        rate = n / best_of(codec_round_trip, module, events)
        print(
            f"{name + ' (encode + Decoder.feed)':36} {rate:>12,.0f} events/s"
            f"  ratio {rate / base:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
