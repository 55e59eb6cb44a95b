"""What the keeper's screen shows, read from a real pseudo-terminal.

The keeper's stdout and stderr are put on ptys (one shared, two different ones, or a pty
and a pipe), everything written to the terminal is collected, and a tiny terminal model
(``screen_rows``: line ends, ``\\r``, erase-line) turns it into the rows a person would see.
``Output`` is driven by a small script in a child process (its own terminal, so that its
``isatty``/``fstat`` checks are real); the end-to-end tests run the real ``rbee-keeper
infer`` with the real queen, hive, worker and embedded model.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from tests.processes import pid_alive, program
from tests.queen.support import keeper_env, wait_no_rbee_processes

#: Every component that narrates: a line's actor is one of these, at the start of its row.
ACTORS = ("rbee-keeper", "queen-rbee", "rbee-hive", "llm-worker-rbee", "model-loader", "model-provisioner")
NARRATION_PREFIX = re.compile(r"\[(" + "|".join(ACTORS) + r")\] ")
COLUMNS = 120
BAR_OF_THE_LOAD = "[model-loader] 📦 gemma-3-270m-q4_k_m.gguf ["


class Terminal:
    """A pseudo-terminal (``COLUMNS`` wide) whose slave end a child writes to; everything
    written to it is collected from the master end."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))
        self._data = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every slave end is closed
                return
            if not chunk:
                return
            self._data += chunk

    def child_started(self) -> None:
        """The child holds the slave end now; ours goes, so the master sees EIO at its exit."""
        os.close(self.slave)

    def text(self) -> str:
        """Everything written so far (after the child exited: all of it)."""
        self._reader.join(timeout=10)
        return self._data.decode("utf-8", "replace")

    def close(self) -> None:
        self._reader.join(timeout=10)
        os.close(self.master)


def screen_rows(written: str) -> list[str]:
    """The rows a terminal shows for ``written``: ``\\n`` starts a row, ``\\r`` goes back to
    column 0 (later characters overwrite), ``ESC[2K`` erases the row."""
    rows: list[str] = []
    row: list[str] = []
    col = 0
    i = 0
    while i < len(written):
        char = written[i]
        if written.startswith("\x1b[2K", i):
            row, i = [], i + 4
            continue
        if char == "\n":
            rows.append("".join(row))
            row, col = [], 0
        elif char == "\r":
            col = 0
        else:
            if col < len(row):
                row[col] = char
            else:
                row.append(char)
            col += 1
        i += 1
    if row:
        rows.append("".join(row))
    return rows


def run(argv: list[str], *, stdout: int, stderr: int, env: dict[str, str] | None = None,
        seconds: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to its end with these stdout/stderr descriptors (PIPE is read here)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=seconds)
    finally:
        if proc.poll() is None:
            proc.kill()  # only when the test already failed
            proc.wait(10)
    assert not pid_alive(proc.pid)
    return subprocess.CompletedProcess(argv, proc.returncode, out or b"", err or b"")


# -- Output, driven by a script ---------------------------------------------------------

#: An answer with narration in the middle of its line, a load bar, and the answer's end.
SCRIPT = r"""
from rbee.keeper.output import Output
from rbee.narration.events import NarrationEvent

out = Output("human")
out.token("Once upon")
out.event(NarrationEvent("llm-worker-rbee", "x", human="in the middle"))
out.token(" a time")
for percent in (50, 100):
    out.event(NarrationEvent("model-loader", "model_load", target="/m/gemma.gguf",
                             extra={"phase": "progress", "bytes_done": percent, "bytes_total": 100}))
out.token(" there was")
out.end_text()
out.narrate("job_complete", "Complete: infer")
"""


def drive_output(stdout: int, stderr: int) -> subprocess.CompletedProcess[bytes]:
    return run([sys.executable, "-c", SCRIPT], stdout=stdout, stderr=stderr)


def test_on_a_shared_terminal_narration_never_lands_in_the_answers_line() -> None:
    term = Terminal()
    try:
        done = drive_output(term.slave, term.slave)
        term.child_started()
        written = term.text()
    finally:
        term.close()
    assert done.returncode == 0, done
    rows = screen_rows(written)
    # The answer's line is ended before the narration; the answer goes on from column 0
    # (nothing re-printed); the bar is redrawn in place and its last state stays.
    assert rows == [
        "Once upon",
        "[llm-worker-rbee] 🐝 in the middle",
        " a time",
        "[model-loader] 📦 gemma.gguf [##########] 100% 0.0/0.0 MB",
        " there was",
        "[rbee-keeper] ✅ Complete: infer",
    ]
    assert written.count("\r\x1b[2K[model-loader]") == 2  # the bar, drawn twice in one row


def test_on_two_different_terminals_the_answer_stays_whole() -> None:
    answer, narration = Terminal(), Terminal()
    try:
        done = drive_output(answer.slave, narration.slave)
        answer.child_started()
        narration.child_started()
        on_answer, on_narration = answer.text(), narration.text()
    finally:
        answer.close()
        narration.close()
    assert done.returncode == 0, done
    assert screen_rows(on_answer) == ["Once upon a time there was"]
    assert "[llm-worker-rbee] 🐝 in the middle" in screen_rows(on_narration)[0]


def test_a_piped_stdout_holds_the_answer_alone() -> None:
    term = Terminal()
    try:
        done = drive_output(subprocess.PIPE, term.slave)
        term.child_started()
        rows = screen_rows(term.text())
    finally:
        term.close()
    assert done.stdout.decode() == "Once upon a time there was\n"
    assert rows[0] == "[llm-worker-rbee] 🐝 in the middle"
    assert rows[-1] == "[rbee-keeper] ✅ Complete: infer"


def test_a_piped_stderr_gets_no_bar_and_no_ansi_code() -> None:
    term = Terminal()
    try:
        done = drive_output(term.slave, subprocess.PIPE)
        term.child_started()
        rows = screen_rows(term.text())
    finally:
        term.close()
    assert done.stderr.decode() == "[llm-worker-rbee] 🐝 in the middle\n[rbee-keeper] ✅ Complete: infer\n"
    assert rows == ["Once upon a time there was"]


def test_an_answer_that_ends_its_line_gets_no_second_line_end(capsys: pytest.CaptureFixture[str]) -> None:
    from rbee.keeper.output import Output

    out = Output("human")
    out.token("one\n")
    out.end_text()
    out.token("two")
    out.end_text()
    assert capsys.readouterr().out == "one\ntwo\n"


def test_a_bar_is_cut_to_the_terminal_width() -> None:
    from rbee.keeper.output import fit

    line = "[model-loader] 📦 gemma.gguf [#####-----] 50% 126.6/253.1 MB"
    assert fit(line, 200) == line
    # An emoji takes two cells (🛏 with its emoji selector too).
    assert fit(line, 20) == "[model-loader] 📦 g"
    assert fit("[x] 🛏️ y", 7) == "[x] 🛏️"


def test_same_terminal_compares_the_devices() -> None:
    from rbee.keeper.output import same_terminal

    one, other = Terminal(), Terminal()
    read_end, write_end = os.pipe()
    try:
        shared = os.dup(one.slave)
        assert same_terminal(one.slave, shared)
        assert not same_terminal(one.slave, other.slave)
        assert not same_terminal(one.slave, write_end)
        os.close(shared)
        assert not same_terminal(one.slave, shared)  # closed: nothing to share
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        for term in (one, other):
            term.child_started()
            term.close()


# -- the real keeper ---------------------------------------------------------------------

INFER = ["infer", "--node", "localhost", "--model", "gemma3-270m", "--prompt", "write a short story",
         "--max-tokens", "20", "--temperature", "0"]


def keeper_run(home: Path, stdout: int, stderr: int) -> subprocess.CompletedProcess[bytes]:
    done = run([program("rbee-keeper"), *INFER], stdout=stdout, stderr=stderr, env=keeper_env(home), seconds=600)
    assert not wait_no_rbee_processes(home, 15)
    return done


@pytest.mark.model
def test_an_infer_on_a_terminal_draws_the_load_bar_in_place_and_says_it_once(rbee_home: Path) -> None:
    term = Terminal()
    try:
        done = keeper_run(rbee_home, term.slave, term.slave)
        term.child_started()
        written = term.text()
    finally:
        term.close()
    rows = screen_rows(written)
    assert done.returncode == 0, "\n".join(rows)
    assert "Traceback" not in written
    # Narration always starts its own row: never after the answer's text on one line.
    for row in rows:
        assert all(m.start() == 0 for m in NARRATION_PREFIX.finditer(row)), row
    # The load: the seeds' start and end lines, and one bar between them, redrawn in place
    # (one row on the screen, at 100%) although the whole load took about a second.
    start = rows.index(next(r for r in rows if r.startswith("[model-loader] 📦 Loading model from ")))
    end = rows.index(next(r for r in rows if r.startswith("[model-loader] 🛏️ Model loaded! ")))
    bars = [r for r in rows if r.startswith(BAR_OF_THE_LOAD)]
    assert len(bars) == 1 and bars[0].startswith(BAR_OF_THE_LOAD + "##########] 100% 253.1/253.1 MB"), bars
    assert start < rows.index(bars[0]) < end
    assert written.count("\r\x1b[2K" + BAR_OF_THE_LOAD) >= 2, "the bar was not redrawn in place"
    # Said once: one summary, where it ran; no `[end]`, no worker or queen "complete" line.
    summaries = [r for r in rows if "Complete: infer" in r]
    assert len(summaries) == 1, rows
    assert re.match(r"\[rbee-keeper\] ✅ Complete: infer — 20 tokens, [\d.]+ tok/s, first token after \d+ ms "
                    r"\([\d.]+ s in all\) on localhost by worker-\w+; stopped at --max-tokens$", summaries[0])
    assert not [r for r in rows if "[end]" in r or "Generated 20 tokens" in r or "Inference complete" in r]


@pytest.mark.model
def test_an_infer_with_stderr_piped_gets_lines_without_bars_or_ansi(rbee_home: Path) -> None:
    term = Terminal()
    try:
        done = keeper_run(rbee_home, term.slave, subprocess.PIPE)
        term.child_started()
        answer_rows = screen_rows(term.text())
    finally:
        term.close()
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "\x1b" not in err and "\r" not in err
    lines = err.splitlines()
    assert not [line for line in lines if "[#" in line or "[-" in line], err
    assert any(line.startswith("[model-loader] 📦 Loading model from ") for line in lines)
    assert any(line.startswith("[model-loader] 🛏️ Model loaded! ") for line in lines)
    assert len([line for line in lines if "Complete: infer" in line]) == 1
    # The terminal holds the answer alone: one row, no narration.
    assert len(answer_rows) == 1 and not NARRATION_PREFIX.search(answer_rows[0]), answer_rows
