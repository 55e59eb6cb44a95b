"""The keeper's start: fast (nothing heavy imported for --version and --help) and quiet
(Ctrl-C from the entry module's first line on is ``Cancelled.`` and 130, never a traceback).

Both run the real console script. What a command imported is read from ``sys.modules``
in that process, once the script has ended (``runpy`` runs it as ``__main__``, as the
interpreter would). The Ctrl-C tests run it under ``python -X importtime``, which writes
one stderr line per module as its import finishes: so a test knows the moment the entry
module (``rbee.keeper.entry``) has run, its SIGINT handler with it. A Ctrl-C sent before
that moment is the interpreter's own (it lands in ``site`` or the console script's first
lines): no program can answer it. (A module imported by ``importlib.import_module``, as
main.py defers trio and admin.py, gets no line of its own, only the modules it imports
with ``import`` statements: the tests wait for those.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.keeper.terminal import PtyProgram
from tests.processes import program
from tests.queen.support import keeper_env, rbee_processes, wait_no_rbee_processes

#: What a command line that does no work must not import (each ~0.05 to 0.35 s).
HEAVY = frozenset({"trio", "httpx", "httpcore", "quart", "quart_trio", "hypercorn", "asyncssh", "cffi",
                   "_cffi_backend", "llama_cpp", "huggingface_hub"})
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)$")
#: Runs the console script (argv[1]) as the interpreter would, then writes the names in
#: ``sys.modules`` as the last stderr line.
RUNNER = """
import json, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
sys.stdout.flush()
sys.stderr.write("MODULES " + json.dumps(sorted(sys.modules)) + "\\n")
sys.exit(code)
"""


def run_keeper(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str], list[str]]:
    """The console script run with ``args``: the process, the modules it imported, its
    stderr without the module list."""
    env = {**os.environ, **keeper_env(home), "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, program("rbee-keeper"), *args],
                          capture_output=True, text=True, env=env, timeout=60)
    lines = proc.stderr.splitlines()
    assert lines and lines[-1].startswith("MODULES "), proc.stderr
    return proc, set(json.loads(lines[-1][len("MODULES "):])), lines[:-1]


def without_import_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


def test_version_imports_neither_cyclopts_nor_anything_heavy(rbee_home: Path) -> None:
    from rbee import __version__

    proc, modules, said = run_keeper(rbee_home, "--version")
    assert proc.returncode == 0, said
    assert proc.stdout == f"{__version__}\n" and said == []
    assert "rbee.keeper.entry" in modules  # the console script's module is the entry
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY | {"cyclopts", "rich", "rbee"}) == [
        "rbee", "rbee.keeper", "rbee.keeper.entry", "rbee.keeper.exit_codes"]


@pytest.mark.parametrize("args", [["--help"], ["infer", "--help"], ["models", "--help"], ["queen", "start", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_imports_nothing_heavy(rbee_home: Path, args: list[str]) -> None:
    proc, modules, said = run_keeper(rbee_home, *args)
    assert proc.returncode == 0, said
    assert proc.stdout.startswith("Usage: rbee-keeper"), proc.stdout
    assert said == []
    assert "cyclopts" in modules and "rbee.keeper.entry" in modules  # the help is cyclopts' own
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    assert list(rbee_home.iterdir()) == []  # nothing written, nothing started


class ImportWatchedKeeper(PtyProgram):
    """``rbee-keeper`` run by ``python -X importtime`` on a pseudo-terminal, its stderr read
    line by line as the imports finish."""

    def __init__(self, home: Path, *args: str) -> None:
        super().__init__([sys.executable, "-X", "importtime", program("rbee-keeper"), *args],
                         {**os.environ, **keeper_env(home), "TERM": "xterm"})

    def wait_imported(self, module: str, seconds: float = 60.0) -> None:
        """Block until ``module``'s import has finished in the keeper."""
        deadline = time.monotonic() + seconds
        with self.changed:
            while not any((m := IMPORT_LINE.match(line)) and m.group(2) == module for line in self.stderr_lines):
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"{module} never imported: {self.stderr_lines[-20:]}"
                self.changed.wait(min(left, 0.2))

    def ctrl_c(self) -> None:
        self.type("\x03")


# The moments: once the entry module has run (cyclopts' import has just begun), once
# cyclopts is in, once the commands' module is in (the command line is being parsed),
# later ones from there (trio and httpx being imported, the queen looked for), and once
# trio runs the job (run_job's module is imported first thing in it: its own Ctrl-C
# handling is about to take over) and a little later, while the ephemeral queen starts.
MOMENTS = [
    ("rbee.keeper.entry", 0.0),
    ("cyclopts", 0.0),
    ("rbee.keeper.main", 0.0),
    ("rbee.keeper.entry", 0.05),
    ("rbee.keeper.entry", 0.2),
    ("rbee.keeper.entry", 0.5),
    ("rbee.keeper.run_job", 0.0),
    ("rbee.keeper.run_job", 0.3),
]


@pytest.mark.parametrize(("module", "delay"), MOMENTS, ids=[f"{m}+{d}s" for m, d in MOMENTS])
def test_ctrl_c_from_the_entry_module_on_is_cancelled_and_130(rbee_home: Path, module: str, delay: float) -> None:
    keeper = ImportWatchedKeeper(rbee_home, "infer", "--model", "gemma3-270m", "--prompt", "hi")
    try:
        keeper.wait_imported(module)
        time.sleep(delay)
        keeper.ctrl_c()
        code = keeper.wait(30)
    finally:
        keeper.close()
    said = without_import_lines("\n".join(keeper.stderr_lines))
    assert code == 130, said
    assert "Traceback" not in "\n".join(said) and not any("KeyboardInterrupt" in line for line in said), said
    # Once: after it, at most the ephemeral queen's own shutdown lines.
    assert said.count("Cancelled.") == 1, said
    # Whatever had been started by then (an ephemeral queen, its hive) is gone too.
    assert wait_no_rbee_processes(rbee_home, 15) == [], rbee_processes(rbee_home)


def test_ctrl_c_while_a_management_command_runs_its_ephemeral_queen(rbee_home: Path) -> None:
    # setup remove-node asks a queen; with none running it starts an ephemeral one. The
    # entry module's handler leaves at once: the queen dies with the keeper (its
    # PR_SET_PDEATHSIG) and stops what it started.
    keeper = ImportWatchedKeeper(rbee_home, "setup", "remove-node", "ghost")
    try:
        keeper.wait_imported("rbee.keeper.queen_control")
        deadline = time.monotonic() + 30
        while len([p for p in rbee_processes(rbee_home) if p != keeper.proc.pid]) == 0:
            assert time.monotonic() < deadline and keeper.proc.poll() is None, keeper.stderr_lines[-5:]
            time.sleep(0.01)
        keeper.ctrl_c()
        code = keeper.wait(30)
    finally:
        keeper.close()
    said = without_import_lines("\n".join(keeper.stderr_lines))
    assert code == 130, said
    assert said[-1] == "Cancelled." and "Traceback" not in "\n".join(said), said
    assert wait_no_rbee_processes(rbee_home, 15) == [], rbee_processes(rbee_home)
