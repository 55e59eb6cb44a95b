"""The pure parts of ``rbee-keeper chat`` and of ``infer``'s prompt from stdin, without
processes: the conversation, what a line means, the prompt reader, Ctrl-C by phase, and
what a turn keeps when it completes, fails or is interrupted."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from rbee.errors import InvalidRequestError, RbeeError
from rbee.keeper.conversation import HELP, PROMPT, Conversation, Entry, PromptReader, interpret, sigint_action
from rbee.keeper.main import NO_PROMPT, PromptUsageError, prompt_from_stdin, read_prompt
from rbee.keeper.run_job import _JobOutcome
from rbee.narration.events import End, Error
from rbee.requests import parse_infer_request

# -- Conversation -------------------------------------------------------------------------


def test_messages_are_system_then_the_remembered_turns_then_the_question() -> None:
    conv = Conversation("You are terse.")
    assert conv.messages() == [{"role": "system", "content": "You are terse."}]
    assert conv.messages("My name is Ada.") == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "My name is Ada."},
    ]
    assert len(conv) == 0  # asking is not remembering
    assert conv.remember("My name is Ada.", "Hello Ada.")
    assert conv.messages("What is my name?") == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    assert len(conv) == 1


def test_no_system_message_and_clear() -> None:
    for system in (None, ""):
        conv = Conversation(system)
        assert conv.messages("hi") == [{"role": "user", "content": "hi"}]
    conv = Conversation("sys")
    conv.remember("a", "b")
    conv.clear()
    assert conv.messages() == [{"role": "system", "content": "sys"}] and len(conv) == 0


def test_an_empty_answer_is_not_remembered() -> None:
    conv = Conversation()
    assert not conv.remember("hello?", "")
    assert conv.messages() == []


def test_the_messages_are_a_valid_request() -> None:
    conv = Conversation("Be brief.")
    conv.remember("one", "two")
    request = {"operation": "infer", "model": "gemma3-270m", "messages": conv.messages("three")}
    parsed = parse_infer_request(request)
    assert [m.role for m in parsed.messages] == ["system", "user", "assistant", "user"]
    assert parsed.prompt is None


# -- what a line means --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "entry"),
    [
        ("hello there", Entry("say", "hello there")),
        ("  padded  \n", Entry("say", "padded")),
        ("", Entry("blank")),
        ("   ", Entry("blank")),
        ("/bye", Entry("bye")),
        ("/BYE  ", Entry("bye")),
        ("/clear", Entry("clear")),
        ("/?", Entry("help")),
        ("/help", Entry("help")),
        ("/frobnicate now", Entry("unknown", "/frobnicate")),
    ],
)
def test_interpret(line: str, entry: Entry) -> None:
    assert interpret(line) == entry


# -- the prompt reader --------------------------------------------------------------------


class Typist:
    """Stands in for ``input()``: returns lines, or raises what a key would."""

    def __init__(self, *keys: Any) -> None:
        self.keys = list(keys)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        key = self.keys.pop(0)
        if isinstance(key, BaseException):
            raise key
        return key


def reader(*keys: Any, interactive: bool = False, history: Path | None = None) -> tuple[PromptReader, Typist, list[str]]:
    typist, written = Typist(*keys), []
    return PromptReader(interactive=interactive, history_path=history, input_fn=typist, write=written.append), typist, written


def test_reader_off_a_terminal_has_no_prompt() -> None:
    r, typist, written = reader("hi", "/bye", EOFError())
    assert [r.read(), r.read(), r.read()] == [Entry("say", "hi"), Entry("bye"), Entry("bye")]
    assert typist.prompts == ["", "", ""] and written == []


def test_reader_on_a_terminal_ctrl_c_drops_the_line_and_ctrl_d_leaves(tmp_path: Path) -> None:
    r, typist, written = reader("first", KeyboardInterrupt(), "second", EOFError(), interactive=True,
                                history=tmp_path / "history")
    entries = [r.read() for _ in range(4)]
    assert entries == [Entry("say", "first"), Entry("interrupted"), Entry("say", "second"), Entry("bye")]
    assert typist.prompts == [PROMPT] * 4 and PROMPT == ">>> "
    # Ctrl-C: the terminal shows it and a new line; Ctrl-D: a new line after the prompt.
    assert written == ["^C\n", "\n"]


def test_history_is_saved_and_read_back(tmp_path: Path) -> None:
    import readline
    path = tmp_path / "chat_history"
    r, _, _ = reader(interactive=True, history=path)
    readline.add_history("remember me")
    r.save_history()
    assert "remember me" in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    readline.clear_history()
    reader(interactive=True, history=path)  # a new session reads it back
    assert readline.get_history_item(readline.get_current_history_length()) == "remember me"
    readline.clear_history()


def test_an_unwritable_history_is_no_failure(tmp_path: Path) -> None:
    r, _, _ = reader(interactive=True, history=tmp_path / "no" / "such" / "dir" / "history")
    r.save_history()  # nothing raised


def test_help_names_the_commands() -> None:
    for word in ("/clear", "/bye", "/?", "Ctrl-C"):
        assert word in HELP


# -- Ctrl-C by phase ----------------------------------------------------------------------


def test_sigint_actions() -> None:
    assert sigint_action("reading", False) == "clear_line"
    assert sigint_action("streaming", False) == "cancel"
    assert sigint_action("streaming", True) == "exit_now"  # a second one while the first cancels
    assert sigint_action("starting", False) == "cancel"
    assert sigint_action("starting", True) == "exit_now"
    assert sigint_action("closing", False) == "exit_now"
    assert sigint_action("idle", False) == "ignore"
    assert sigint_action("idle", True) == "ignore"


# -- what a turn keeps --------------------------------------------------------------------


class FakeCall:
    """Stands in for the Trio thread: each turn "streams" ``tokens`` then ends as told."""

    def __init__(self, session: Any, tokens: list[str], ends: Any) -> None:
        self.session, self.tokens, self.ends = session, tokens, ends
        self.requests: list[dict[str, Any]] = []

    def __call__(self, phase: str, afn: Any, request: dict[str, Any], started: float) -> Any:
        assert phase == "streaming"
        self.requests.append(request)
        for t in self.tokens:
            self.session.out.token(t)
        if isinstance(self.ends, BaseException):
            raise self.ends
        if self.ends is None:
            return None
        outcome = _JobOutcome()
        outcome.tokens = len(self.tokens)
        if self.ends == "error":
            outcome.error = Error(code="internal_error", message="it broke")
        else:  # the whole answer: an `end` came (without one the keeper reports a cut stream)
            outcome.end = End(tokens_out=len(self.tokens), decode_time_ms=1.0, tokens_per_sec=1.0, stop_reason="eos")
        return outcome


@pytest.fixture
def session() -> Any:
    from rbee.keeper.chat import ChatOutput, ChatSession

    s = ChatSession({"operation": "infer", "model": "gemma3-270m", "max_tokens": 8},
                    Conversation("sys"), ChatOutput("quiet"), "quiet")
    return s


def test_a_completed_turn_is_remembered(session: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session._call = FakeCall(session, ["Hello", " Ada."], "end")
    assert session._turn("My name is Ada.")
    assert session._call.requests[0] == {
        "operation": "infer", "model": "gemma3-270m", "max_tokens": 8,
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "My name is Ada."}],
    }
    assert session.conversation.messages()[-1] == {"role": "assistant", "content": "Hello Ada."}
    assert capsys.readouterr().out == "Hello Ada.\n"


def test_an_interrupted_turn_is_forgotten_question_and_all(session: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session.conversation.remember("one", "two")
    before = session.conversation.messages()
    session._call = FakeCall(session, ["Once upon"], None)  # None: Ctrl-C cancelled it
    assert session._turn("Tell me a long story.")  # the session goes on
    assert session.conversation.messages() == before
    assert capsys.readouterr().out == "Once upon\n"  # the partial answer, then a new line
    # The next turn carries no trace of it.
    session._call = FakeCall(session, ["ok"], "end")
    session._turn("Tell me a long story.")
    assert session._call.requests[0]["messages"] == before + [{"role": "user", "content": "Tell me a long story."}]


def test_a_failed_turn_is_forgotten_and_said(session: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session._call = FakeCall(session, ["half"], RbeeError("prompt (4000 tokens) + max_tokens (256) exceeds the context (4096)"))
    session.conversation.remember("one", "two")
    assert session._turn("three")
    assert len(session.conversation) == 1
    captured = capsys.readouterr()
    assert captured.out == "half\n"
    assert "Error: prompt (4000 tokens)" in captured.err and "/clear" in captured.err
    session._call = FakeCall(session, ["x"], "error")  # the stream's error event (shown as it came)
    assert session._turn("four") and len(session.conversation) == 1


# -- infer's prompt from stdin ------------------------------------------------------------


class Stdin(io.TextIOWrapper):
    def __init__(self, data: bytes, tty: bool) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_prompt_from_stdin_when() -> None:
    assert prompt_from_stdin("-", Stdin(b"", tty=True))  # asked for: read even a terminal
    assert prompt_from_stdin(None, Stdin(b"", tty=False))  # piped
    assert not prompt_from_stdin("hello", Stdin(b"", tty=False))  # --prompt wins
    for stdin in (Stdin(b"", tty=True), None):
        with pytest.raises(PromptUsageError) as exc:
            prompt_from_stdin(None, stdin)
        assert str(exc.value) == NO_PROMPT and "--prompt" in NO_PROMPT


def test_read_prompt() -> None:
    assert read_prompt(Stdin(b"hello\n", tty=False)) == "hello"
    assert read_prompt(Stdin("två rader\nbee 🐝\n\r\n".encode(), tty=False)) == "två rader\nbee 🐝"
    assert read_prompt(Stdin(b"  keep inner and leading blanks \n", tty=False)) == "  keep inner and leading blanks "
    assert read_prompt(Stdin(b"", tty=False)) == ""
    with pytest.raises(PromptUsageError, match="not UTF-8"):
        read_prompt(Stdin(b"caf\xe9\n", tty=False))


def test_an_empty_stdin_is_an_empty_prompt() -> None:
    with pytest.raises(InvalidRequestError, match="prompt must not be empty"):
        parse_infer_request({"model": "gemma3-270m", "prompt": read_prompt(Stdin(b"\n", tty=False))})
