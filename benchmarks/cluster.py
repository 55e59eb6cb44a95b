"""A cluster of N real hosts on one machine, driven through the real CLI: how fast nodes
join, hives come up, the queen decides, a lost host is noticed.

The hosts are the netns test bed (``tests/netns_hosts.py``, docs/cluster.md): a network
namespace each, with its own address, its own sshd and its own ``RBEE_HOME``, all running
the installed ``rbee-hive``. A persistent queen (``rbee-keeper queen start``) on loopback
drives them over SSH, as it would machines on a LAN. Each figure is one labelled line;
the summary at the end compares them with their goals:

1. ``add-node``: every host added with ``rbee-keeper setup add-node`` (a small pool in
   parallel): the time for all, and per node p50/max;
2. ``hives up``: one short ``infer`` job per node, all submitted at once by one client
   (``rbee.client``, in this process); from submit until each node's ``hive_ready`` reached
   it in the job's stream: all up (goal <= 10 s), and until every job was done;
3. ``scheduling``: the queen's decision alone, in this process with synthetic records
   (16 nodes x 4 workers): node views + ``place()`` + ``Scheduler.try_lease``, p50/p99
   (goal <= 5 ms);
4. ``lost host``: a host cut off (its link down, no RST) while a long job streams from it:
   from the cut until that job's keeper exits with an error naming the node (goal <= 5 s;
   60 s at most);
5. ``bench``: the output of ``rbee-keeper bench --all --max-tokens 32``.

Then ``rbee-keeper queen stop`` and the bed's teardown, always, and a check that no
process of the run is left. Exit 0 when every goal is met and nothing is left, else 1.
It needs root, iproute2 and openssh-server (the bed's); run it on a quiet machine with
cores and memory for N workers (each loads the 270M model: ~0.8 GiB).

    python benchmarks/cluster.py --hosts 16 [--pool 4] [--decisions 5000]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The bed lives with the tests: the repository root goes on the path before importing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from tests.netns_hosts import Host, NetnsCluster, NetnsUnavailable  # noqa: E402
from benchmarks.chaos import Keeper  # noqa: E402
from tests.processes import json_objects, wait_gone  # noqa: E402
from tests.queen.support import rbee_processes  # noqa: E402

BIN = Path(sys.executable).parent
MODEL = "gemma3-270m"
HIVES_UP_GOAL_S = 10.0
DECISION_GOAL_MS = 5.0
LOST_HOST_GOAL_S = 5.0
#: A lost host not noticed within this long is reported as not noticed.
LOST_HOST_LIMIT_S = 60.0
#: Limits of one step (a hung program is ended by PID and reported, not waited for).
ADD_NODE_LIMIT_S = 120.0
JOBS_LIMIT_S = 300.0
FIRST_TOKEN_LIMIT_S = 180.0
BENCH_LIMIT_S = 600.0
LONG_PROMPT = "Write a long story about a bee who travels around the world, with many chapters."


def keeper(*args: str) -> list[str]:
    return [str(BIN / "rbee-keeper"), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ratio(value: float | None, goal: float) -> str:
    """``0.82x goal: met`` / ``1.30x goal: MISSED``; a figure never measured is missed."""
    if value is None:
        return "not measured: MISSED"
    return f"{value / goal:.2f}x goal: {'met' if value <= goal else 'MISSED'}"


def failure_line(run: Keeper) -> str:
    """What a keeper said about its failure, the last of: an error event of its
    ``--narration json``, a ``Failed: ...`` or ``Error: ...`` line; else its last line."""
    said = []
    for line in run.stderr_lines:
        if line.startswith("{"):
            said += [str(e.get("human", "")) for e in json_objects([line]) if e.get("level") == "error"]
        elif line.startswith(("Failed:", "Error:")):
            said.append(line)
    return said[-1] if said else (run.stderr_lines[-1] if run.stderr_lines else "")


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """Run one keeper command to its end: (exit code, stdout+stderr, seconds)."""
    started = time.monotonic()
    try:
        done = subprocess.run(keeper(*args), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(no answer within {timeout:.0f} s)", time.monotonic() - started
    return done.returncode, (done.stdout + done.stderr).strip(), time.monotonic() - started


# --- the steps ------------------------------------------------------------------------------


@dataclass
class Figures:
    """What the run measured (None: not measured); ``notes`` are shown with the summary."""

    hosts: int
    add_all_s: float | None = None
    add_p50_s: float | None = None
    add_max_s: float | None = None
    nodes_added: list[str] = field(default_factory=list)
    hives_up_s: float | None = None
    jobs_done_s: float | None = None
    decision_p50_ms: float | None = None
    decision_p99_ms: float | None = None
    lost_host_s: float | None = None
    bench: str = "not run"
    leftovers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def add_nodes(bed: NetnsCluster, env: dict[str, str], pool: int, figures: Figures) -> None:
    def add(host: Host) -> tuple[Host, int, str, float]:
        code, said, seconds = run_cli([
            "setup", "add-node", host.name, "--ssh-host", host.address, "--ssh-port", str(host.ssh_port),
            "--ssh-user", host.user, "--ssh-key", str(host.key_path), "--rbee-hive-command", host.rbee_hive_command,
        ], env, ADD_NODE_LIMIT_S)
        return host, code, said, seconds

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=pool) as executor:
        results = list(executor.map(add, bed.hosts))
    figures.add_all_s = time.monotonic() - started
    times = [seconds for _, code, _, seconds in results if code == 0]
    figures.nodes_added = [host.name for host, code, _, _ in results if code == 0]
    for host, code, said, _ in results:
        if code != 0:
            print(f"  add-node {host.name} failed (exit {code}): {said.splitlines()[-1] if said else ''}")
    if times:
        figures.add_p50_s, figures.add_max_s = statistics.median(times), max(times)
    print(f"1. add-node: {len(times)}/{len(results)} nodes added in {figures.add_all_s:.2f} s "
          f"(pool of {pool}; per node p50 {figures.add_p50_s or 0:.2f} s, max {figures.add_max_s or 0:.2f} s)",
          flush=True)


def hives_up(nodes: list[str], env: dict[str, str], figures: Figures) -> None:
    """One short job per node, all at once, from one client (``rbee.client``, as another
    Trio program drives rbee): when each node's ``hive_ready`` reached us, and when each
    job ended. One process rather than N keepers: on a small machine N interpreters
    starting at once (about 0.45 s of CPU each) would be what is measured, not the cluster."""
    import trio

    from rbee.client.jobs import open_job_stream
    from rbee.narration.events import End, Error, NarrationEvent

    ready: dict[str, float] = {}
    done: dict[str, float] = {}
    failed: dict[str, str] = {}

    async def one(name: str, submitted: float) -> None:
        request = {"operation": "infer", "node": name, "model": MODEL, "prompt": "hi", "max_tokens": 4,
                   "temperature": 0.0}
        try:
            async with open_job_stream(env["RBEE_QUEEN_URL"], request) as events:
                async for event in events:
                    if isinstance(event, NarrationEvent) and event.action == "hive_ready" and name not in ready:
                        ready[name] = time.monotonic() - submitted
                    elif isinstance(event, Error):
                        failed[name] = event.message
                    elif isinstance(event, End):
                        done[name] = time.monotonic() - submitted
        except Exception as exc:  # noqa: BLE001 - a node's failure is its line, the others go on
            failed[name] = str(getattr(exc, "message", exc))

    async def all_at_once() -> None:
        submitted = time.monotonic()
        with trio.move_on_after(JOBS_LIMIT_S):
            async with trio.open_nursery() as nursery:
                for name in nodes:
                    nursery.start_soon(one, name, submitted)

    trio.run(all_at_once)
    for name in nodes:
        if name in failed or name not in done:
            print(f"  infer on {name}: {failed.get(name, 'no end within the limit')}")
        elif name not in ready:
            print(f"  infer on {name}: no hive_ready in its narration (its hive was already up?)")
    ready_s, done_s = list(ready.values()), [done[n] for n in nodes if n in done and n not in failed]
    if len(ready_s) == len(nodes):
        figures.hives_up_s = max(ready_s)
    if len(done_s) == len(nodes):
        figures.jobs_done_s = max(done_s)
    up = f"{max(ready_s):.2f} s (p50 {statistics.median(ready_s):.2f} s)" if ready_s else "-"
    print(f"2. hives up: {len(ready_s)}/{len(nodes)} hives ready, the last {up} after submit (one client, "
          f"{len(nodes)} jobs at once); {ratio(figures.hives_up_s, HIVES_UP_GOAL_S)}", flush=True)
    finished = f"{max(done_s):.2f} s (p50 {statistics.median(done_s):.2f} s)" if done_s else "-"
    print(f"2. jobs done: {len(done_s)}/{len(nodes)} jobs ended whole, the last {finished} after submit", flush=True)


def time_scheduling(nodes: int, workers_per_node: int, decisions: int, seed: int) -> list[float]:
    """Milliseconds of each decision: the node views the queen builds from its records (as
    ``InferJobs._node_views`` does, without its I/O), ``place()``, ``try_lease()``.

    Every node has ``workers_per_node`` ready workers, one per model, 4 slots each; each
    decision asks for a random model; the oldest leases are released so that about half
    the slots stay busy (the queen's steady state under load, not an idle cluster)."""
    import trio

    from rbee.queen.placement import NodeView, place
    from rbee.queen.scheduler import READY, ModelIdentity, Scheduler, Want, WorkerRecord

    slots_per_worker = 4
    rng = random.Random(seed)
    names = [f"node{i}" for i in range(1, nodes + 1)]
    models = [ModelIdentity(f"hf:bench/model-{m}:Q4_K_M", f"{m:064x}") for m in range(workers_per_node)]
    memory = {name: rng.randrange(8, 64) << 30 for name in names}

    async def run() -> list[float]:
        scheduler = Scheduler()
        for name in names:
            for m, model in enumerate(models):
                scheduler.upsert(WorkerRecord(
                    worker_id=f"worker-{name}-{m}", node=name, model=model, backend="cpu", device=0,
                    slots_total=slots_per_worker, state=READY, url=f"http://127.0.0.1:{9000 + m}",
                    memory_bytes=800 << 20,
                ))
        held: deque[Any] = deque()
        busy_limit = nodes * workers_per_node * slots_per_worker // 2
        times = []
        for i in range(decisions):
            model = rng.choice(models)
            started = time.perf_counter()
            views = []
            for name in names:
                loaded = [w for w in scheduler.workers.values() if w.node == name and w.model.matches(model)]
                views.append(NodeView(
                    name=name, running=True, backends=("cpu",), free_slots=sum(w.free_slots for w in loaded),
                    loaded=bool(loaded), on_disk=None if loaded else True, memory_free_bytes=memory[name],
                ))
            choice = place(views)
            slot = scheduler.try_lease(f"job-{i}", Want(model, choice.node, "cpu", 0))
            times.append((time.perf_counter() - started) * 1000)
            if slot is None:
                raise AssertionError(f"decision {i}: {choice.node} had no free slot for {model.reference}")
            held.append(slot)
            while len(held) > busy_limit:
                scheduler.release(held.popleft())
        return times

    return trio.run(run)


def scheduling(decisions: int, figures: Figures, seed: int) -> None:
    nodes, workers = 16, 4
    times = time_scheduling(nodes, workers, decisions, seed)
    figures.decision_p50_ms, figures.decision_p99_ms = statistics.median(times), percentile(times, 99)
    print(f"3. scheduling: place()+lease p50 {figures.decision_p50_ms:.3f} ms, p99 {figures.decision_p99_ms:.3f} ms"
          f" over {decisions} decisions ({nodes} nodes x {workers} workers = {nodes * workers} records);"
          f" p99 {ratio(figures.decision_p99_ms, DECISION_GOAL_MS)}", flush=True)


def lost_host(bed: NetnsCluster, host: Host, env: dict[str, str], figures: Figures) -> None:
    run = Keeper(keeper("infer", "--node", host.name, "--model", MODEL, "--prompt", LONG_PROMPT,
                           "--max-tokens", "400", "--temperature", "0", "--narration", "json"), env)
    try:
        deadline = time.monotonic() + FIRST_TOKEN_LIMIT_S
        while run.first_stdout_at is None and run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if run.first_stdout_at is None:
            code = run.wait(1.0)
            print(f"4. lost host: not measured: the job on {host.name} never streamed"
                  f" (exit {code}): {failure_line(run)}", flush=True)
            return
        bed.cut(host)
        cut_at = time.monotonic()
        code = run.wait(LOST_HOST_LIMIT_S)
        if code is None:
            print(f"4. lost host: {host.name} cut while its job streamed; its keeper had not exited"
                  f" {LOST_HOST_LIMIT_S:.0f} s later; {ratio(None, LOST_HOST_GOAL_S)}", flush=True)
            return
        seconds = (run.exited_at or time.monotonic()) - cut_at
        said = failure_line(run)
        if code == 0:
            print(f"4. lost host: not measured: the job on {host.name} ended whole {seconds:.2f} s after"
                  " the cut (the answer was done before the cut took effect)", flush=True)
            return
        named = host.name in said
        if named:
            figures.lost_host_s = seconds
        else:
            figures.notes.append(f"the lost-host error does not name {host.name}: {said}")
        print(f"4. lost host: {host.name} cut while its job streamed; keeper exit {code} after {seconds:.2f} s,"
              f" {'naming' if named else 'NOT naming'} the node: {said!r}; {ratio(figures.lost_host_s, LOST_HOST_GOAL_S)}",
              flush=True)
    finally:
        run.stop()
        bed.restore(host)


def bench(env: dict[str, str], figures: Figures) -> None:
    code, said, seconds = run_cli(["bench", "--all", "--max-tokens", "32"], env, BENCH_LIMIT_S)
    if code == 2 and 'Unknown command "bench"' in said:  # cyclopts' words (a usage error)
        figures.bench = "not available: rbee-keeper has no `bench` command yet"
        print("5. bench: rbee-keeper has no `bench` command yet (exit 2: Unknown command \"bench\")", flush=True)
        return
    figures.bench = f"exit {code} in {seconds:.1f} s"
    print(f"5. bench: `rbee-keeper bench --all --max-tokens 32`: exit {code} in {seconds:.1f} s; its output:", flush=True)
    for line in said.splitlines():
        print(f"   {line}")


# --- what is left ---------------------------------------------------------------------------


def summary(figures: Figures) -> bool:
    def s(value: float | None, unit: str = "s") -> str:
        return "-" if value is None else f"{value:.2f} {unit}" if unit == "s" else f"{value:.3f} {unit}"

    rows = [
        ("add all nodes", s(figures.add_all_s), f"per node p50 {s(figures.add_p50_s)}, max {s(figures.add_max_s)}"),
        ("all hives up", s(figures.hives_up_s), f"goal <= {HIVES_UP_GOAL_S:.0f} s: {ratio(figures.hives_up_s, HIVES_UP_GOAL_S)}"),
        ("all jobs done", s(figures.jobs_done_s), ""),
        ("scheduling p50", s(figures.decision_p50_ms, "ms"), ""),
        ("scheduling p99", s(figures.decision_p99_ms, "ms"),
         f"goal <= {DECISION_GOAL_MS:.0f} ms: {ratio(figures.decision_p99_ms, DECISION_GOAL_MS)}"),
        ("lost host noticed", s(figures.lost_host_s), f"goal <= {LOST_HOST_GOAL_S:.0f} s: {ratio(figures.lost_host_s, LOST_HOST_GOAL_S)}"),
        ("bench --all", figures.bench, ""),
        ("left behind", ", ".join(figures.leftovers) or "nothing", ""),
    ]
    print(f"\n== summary: {figures.hosts} hosts ==")
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}   {value:<{vwidth}}   {note}".rstrip())
    for note in figures.notes:
        print(f"note: {note}")
    met = (
        figures.hives_up_s is not None and figures.hives_up_s <= HIVES_UP_GOAL_S
        and figures.decision_p99_ms is not None and figures.decision_p99_ms <= DECISION_GOAL_MS
        and figures.lost_host_s is not None and figures.lost_host_s <= LOST_HOST_GOAL_S
    )
    return met and not figures.leftovers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=16, help="hosts of the bed (default 16)")
    parser.add_argument("--pool", type=int, default=4, help="add-node commands at once (default 4)")
    parser.add_argument("--decisions", type=int, default=5000, help="scheduling decisions timed (default 5000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic scheduling load")
    args = parser.parse_args(argv)

    figures = Figures(hosts=args.hosts)
    workdir = Path(tempfile.mkdtemp(prefix="rbee-cluster-"))
    try:
        started = time.monotonic()
        bed = NetnsCluster.create(args.hosts, workdir)
    except NetnsUnavailable as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise SystemExit(f"cluster.py: {exc}") from None
    print(f"bed: {args.hosts} hosts on {bed.subnet} (bridge {bed.bridge}, run {bed.tag}) in"
          f" {time.monotonic() - started:.2f} s", flush=True)
    home = bed.root / "keeper"
    home.mkdir()
    env = dict(os.environ, RBEE_HOME=str(home), RBEE_QUEEN_URL=f"http://127.0.0.1:{free_port()}",
               PYTHONUNBUFFERED="1")
    queen_started = False
    try:
        code, said, _ = run_cli(["queen", "start"], env, 60.0)
        if code != 0:
            raise SystemExit(f"cluster.py: rbee-keeper queen start failed (exit {code}): {said}")
        queen_started = True
        add_nodes(bed, env, args.pool, figures)
        if figures.nodes_added:
            hives_up(figures.nodes_added, env, figures)
        scheduling(args.decisions, figures, args.seed)
        if figures.nodes_added:
            lost_host(bed, bed.host(figures.nodes_added[-1]), env, figures)
        bench(env, figures)
    finally:
        if queen_started:
            code, said, _ = run_cli(["queen", "stop"], env, 60.0)
            if code != 0:
                figures.notes.append(f"queen stop: exit {code}: {said}")
        left = rbee_processes(home)
        if left:
            figures.leftovers.append(f"processes of the keeper's RBEE_HOME {left}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                    os.kill(pid, signal.SIGKILL)
            wait_gone(left, 5.0)
        in_bed = {h.name: bed.pids(h) for h in bed.hosts}
        # The queen stopped its hives over SSH: only each host's sshd should be left there.
        for name, pids in in_bed.items():
            if len(pids) > 1:
                figures.notes.append(f"{name}: {len(pids)} processes after queen stop (sshd and {len(pids) - 1} more)")
        try:
            bed.teardown()
        except AssertionError as exc:
            figures.leftovers.append(str(exc))
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if summary(figures) else 1


if __name__ == "__main__":
    sys.exit(main())
