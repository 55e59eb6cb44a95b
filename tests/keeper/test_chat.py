"""``rbee-keeper chat`` on a real terminal (a pseudo-terminal), and ``infer`` with its
prompt from stdin: real queen, hive and worker processes, the real embedded model.

The tiny base model's wording is not reliable, so nothing here reads its answers' text:
what a turn carried is read from the worker's narration (``--narration json`` on stderr,
a pipe), which comes before the first token (so an interrupted turn has it too):
``execute_request`` says how many messages, ``tokenize`` how many prompt tokens; both grow
when a turn carries the ones before it, and are the same for two turns that carry the
same conversation.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.keeper.terminal import PtyProgram
from tests.processes import RbeeProcess, json_objects, program
from tests.queen.support import keeper_env, rbee_processes, wait_no_rbee_processes

pytestmark = pytest.mark.model
MODEL = "gemma3-270m"
PROMPT = ">>> "
#: Greedy, so that a turn's length does not depend on chance.
CHAT_ARGS = ["--model", MODEL, "--temperature", "0", "--narration", "json"]


class TerminalKeeper(PtyProgram):
    """``rbee-keeper`` on a pseudo-terminal (``tests/keeper/terminal.py``), its narration
    (JSON lines) on the stderr pipe."""

    def __init__(self, home: Path, queen_url: str | None, *args: str) -> None:
        super().__init__([program("rbee-keeper"), *args], {**os.environ, **keeper_env(home, queen_url), "TERM": "xterm"})

    def wait_screen(self, needle: str, after: int, seconds: float = 120.0) -> int:
        """Wait until ``needle`` is on the screen after offset ``after``; its end offset."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.changed:
                found = self.screen.find(needle, after)
                if found >= 0:
                    return found + len(needle)
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not on screen after {after}: {self.screen[after:]!r}; "
                             f"stderr: {self.stderr_text()[-3000:]}")

    def wait_answer(self, at: int, chars: int, seconds: float = 300.0) -> None:
        """Wait until ``chars`` characters of an answer are on the screen after ``at``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.changed:
                if len(self.screen[at:].strip()) >= chars:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no answer on screen after {at}: {self.screen[at:]!r}")

    def events(self) -> list[dict[str, Any]]:
        with self.changed:
            lines = list(self.stderr_lines)
        return json_objects(lines)

    def wait_event(self, kind: str, count: int, seconds: float = 300.0) -> list[dict[str, Any]]:
        """Wait until ``count`` events of ``type`` (or narration ``action``) ``kind`` have
        come; returns them all."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [e for e in self.events() if kind in (e.get("type"), e.get("action"))]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} {kind!r} events; stderr: {self.stderr_text()[-3000:]}")


@pytest.fixture
def terminal() -> Iterator[list[TerminalKeeper]]:
    """Every ``TerminalKeeper`` a test starts is ended (by its PID) when the test ends."""
    started: list[TerminalKeeper] = []
    yield started
    for keeper in started:
        keeper.close()


@pytest.fixture(scope="module")
def queen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A persistent queen for the module (its worker stays loaded between tests)."""
    home = tmp_path_factory.mktemp("rbee-home")
    proc = RbeeProcess([program("queen-rbee"), "--port", "0"], env={"RBEE_HOME": str(home)})
    try:
        yield home, proc.bound_url()
    finally:
        proc.stop()
        assert not wait_no_rbee_processes(home, 15)


def carried(keeper: TerminalKeeper, turns: int) -> list[tuple[int, int]]:
    """(messages, prompt tokens) of the first ``turns`` turns, from the worker's narration."""
    messages = [e["messages"] for e in keeper.wait_event("execute_request", turns)][:turns]
    tokens = [e["prompt_tokens"] for e in keeper.wait_event("tokenize", turns)][:turns]
    return list(zip(messages, tokens))


def say(keeper: TerminalKeeper, text: str, at: int, seconds: float = 300.0) -> int:
    """Type ``text`` at the prompt that ends at ``at``; returns where the next prompt ends."""
    keeper.type(text + "\r")
    echoed = keeper.wait_screen(text, at)
    return keeper.wait_screen("\n" + PROMPT, echoed, seconds)


# -- chat -----------------------------------------------------------------------------------


def test_two_turns_the_second_carries_the_first_then_ctrl_d_stops_everything(
    rbee_home: Path, terminal: list[TerminalKeeper]
) -> None:
    # Ephemeral mode: the chat starts a queen for the session and stops the cascade at the end.
    keeper = TerminalKeeper(rbee_home, None, "chat", *CHAT_ARGS, "--max-tokens", "12",
                            "--system", "You are a helpful assistant. Answer in one short sentence.")
    terminal.append(keeper)
    at = keeper.wait_screen(PROMPT, 0, seconds=120)
    at = say(keeper, "Hello! My name is Ada and I keep bees.", at)
    first = keeper.wait_event("end", 1)[0]
    assert first["tokens_out"] > 0, "an empty answer is not remembered"
    at = say(keeper, "What is my name?", at)
    (m1, t1), (m2, t2) = carried(keeper, 2)
    # The second turn carries the system message, the first question and its answer.
    assert (m1, m2) == (2, 4)
    assert t2 >= t1 + first["tokens_out"] + 4, (t1, t2, first)
    keeper.type("\x04")  # Ctrl-D at an empty prompt: the end
    assert keeper.wait(60) == 0, keeper.stderr_text()[-3000:]
    assert not wait_no_rbee_processes(rbee_home, 15)
    assert len([e for e in keeper.events() if e.get("action") == "job_submit"]) == 2
    assert "Traceback" not in keeper.stderr_text()


def test_ctrl_c_mid_answer_keeps_the_session_without_that_turn(
    queen: tuple[Path, str], terminal: list[TerminalKeeper]
) -> None:
    home, url = queen
    keeper = TerminalKeeper(home, url, "chat", *CHAT_ARGS, "--max-tokens", "64")
    terminal.append(keeper)
    at = keeper.wait_screen(PROMPT, 0, seconds=120)
    at = say(keeper, "Say hello.", at)  # turn 1 completes
    story = "Write a very long story about a bee called Ada, in many chapters."
    for turn in (2, 3):
        # Turns 2 and 3 ask the same; each is interrupted once its answer streams.
        keeper.type(story + "\r")
        echoed = keeper.wait_screen(story + "\r\n", at)
        keeper.wait_answer(echoed, 5)
        sent = time.monotonic()
        keeper.type("\x03")
        at = keeper.wait_screen("\n" + PROMPT, echoed, seconds=30)
        assert time.monotonic() - sent < 5, turn
    assert "^C" in keeper.screen  # the terminal's echo, then a new line and the prompt
    # Turn 2 (its question and partial answer) was forgotten: turn 3 carries exactly what
    # turn 2 carried (turn 1's question and answer, then the story request).
    (m1, _), (m2, t2), (m3, t3) = carried(keeper, 3)
    assert (m1, m2, m3) == (1, 3, 3)
    assert t3 == t2
    # The session goes on: turn 4 completes.
    at = say(keeper, "Say goodbye.", at)
    assert [e["messages"] for e in keeper.wait_event("execute_request", 4)][3] == 3
    keeper.type("/bye\r")
    assert keeper.wait(60) == 0, keeper.stderr_text()[-3000:]
    assert "Traceback" not in keeper.stderr_text()
    # Each interrupted job was cancelled on the worker: every slot is free again.
    deadline = time.monotonic() + 10
    while True:
        workers = httpx.get(f"{url}/v1/workers", timeout=10).json()["workers"]
        if workers and all(w["slots"]["busy"] == 0 for w in workers) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert workers and all(w["slots"]["busy"] == 0 for w in workers), workers


def test_ctrl_c_at_the_prompt_clears_the_line(queen: tuple[Path, str], terminal: list[TerminalKeeper]) -> None:
    home, url = queen
    keeper = TerminalKeeper(home, url, "chat", *CHAT_ARGS, "--max-tokens", "4")
    terminal.append(keeper)
    at = keeper.wait_screen(PROMPT, 0, seconds=120)
    keeper.type("this line is abandoned")
    at = keeper.wait_screen("abandoned", at)
    keeper.type("\x03")
    at = keeper.wait_screen(PROMPT, at, seconds=10)
    at = say(keeper, "Hi.", at)
    keeper.type("/bye\r")
    assert keeper.wait(60) == 0, keeper.stderr_text()[-3000:]
    # One job: "Hi." alone (nothing of the abandoned line).
    assert len([e for e in keeper.events() if e.get("action") == "job_submit"]) == 1
    started = [e for e in keeper.events() if e.get("action") == "execute_request"]
    assert len(started) == 1


def test_chat_refuses_a_bad_request_before_starting_anything(rbee_home: Path) -> None:
    proc = RbeeProcess([program("rbee-keeper"), "chat", "--model", MODEL, "--max-tokens", "0"],
                       env=keeper_env(rbee_home))
    assert proc.wait(60) == 2
    assert len(proc.stderr_lines) == 1 and "max_tokens" in proc.stderr_lines[0], proc.stderr_text()
    assert list(rbee_home.iterdir()) == [] and rbee_processes(rbee_home) == []


# -- infer with its prompt from stdin -------------------------------------------------------


def infer_with_stdin(home: Path, url: str, stdin: bytes, *args: str) -> RbeeProcess:
    proc = RbeeProcess([program("rbee-keeper"), "infer", "--model", MODEL, "--max-tokens", "8",
                        "--temperature", "0", "--narration", "json", *args],
                       env=keeper_env(home, url), stdin=subprocess.PIPE)
    assert proc.proc.stdin is not None
    proc.proc.stdin.write(stdin)
    proc.proc.stdin.close()
    return proc


def tokenized(proc: RbeeProcess) -> int:
    for line in proc.stderr_lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if obj.get("type") == "metrics":
            return obj["prompt_tokens"]
    raise AssertionError(proc.stderr_text())


def test_infer_reads_a_piped_prompt(queen: tuple[Path, str]) -> None:
    home, url = queen
    piped = infer_with_stdin(home, url, b"hello\n")
    assert piped.wait(300) == 0, piped.stderr_text()
    assert "".join(piped.stdout_lines).strip()
    dash = infer_with_stdin(home, url, b"hello\n", "--prompt", "-")
    assert dash.wait(300) == 0, dash.stderr_text()
    assert "".join(dash.stdout_lines).strip()
    given = RbeeProcess([program("rbee-keeper"), "infer", "--model", MODEL, "--max-tokens", "8", "--temperature", "0",
                         "--narration", "json", "--prompt", "hello"], env=keeper_env(home, url))
    assert given.wait(300) == 0
    # All three sent the same prompt ("hello": the newline echo added is dropped).
    assert tokenized(piped) == tokenized(dash) == tokenized(given)
    assert piped.stdout_lines == dash.stdout_lines == given.stdout_lines  # greedy


def test_infer_chat_wraps_the_prompt_in_the_chat_template(queen: tuple[Path, str]) -> None:
    home, url = queen
    plain = infer_with_stdin(home, url, b"hello")
    chat = infer_with_stdin(home, url, b"hello", "--chat")
    assert plain.wait(300) == 0 and chat.wait(300) == 0, chat.stderr_text()
    assert tokenized(chat) > tokenized(plain)  # the template's turn markers
    executed = [json.loads(line) for line in chat.stderr_lines if '"execute_request"' in line]
    assert executed and executed[0]["chat"] is True


def test_infer_without_a_prompt_on_a_terminal_exits_2(rbee_home: Path) -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.run([program("rbee-keeper"), "infer", "--model", MODEL], stdin=slave,
                              capture_output=True, env={**os.environ, **keeper_env(rbee_home)}, timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 2
    err = proc.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: no prompt: pass --prompt") and "pipe" in err[0]
    assert proc.stdout == b""
    assert list(rbee_home.iterdir()) == [] and rbee_processes(rbee_home) == []


def test_commands_off_a_terminal(rbee_home: Path) -> None:
    """The help and an unknown command, with stdin a pipe: no prompt, lines in, answers out."""
    proc = subprocess.run([program("rbee-keeper"), "chat", "--model", MODEL], input=b"/?\n/nope\n\n/bye\n",
                          capture_output=True, env={**os.environ, **keeper_env(rbee_home)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert b"/clear" in proc.stdout and b">>>" not in proc.stdout  # help; no prompt off a terminal
    assert re.search(rb"Unknown command '/nope'", proc.stderr)
    assert not wait_no_rbee_processes(rbee_home, 15)
