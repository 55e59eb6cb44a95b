"""The pure parts of ``rbee-keeper chat``: the conversation, what a typed line means, the
prompt reader (readline's editing and history), and what Ctrl-C does when.

No Trio and no I/O beyond the terminal and the history file, so that each part is tested
without processes (tests/keeper/test_conversation.py); ``chat.py`` runs the session.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

#: The prompt shown on a terminal before each line the user types.
PROMPT = ">>> "
#: Lines kept in the history file.
HISTORY_LENGTH = 1000

HELP = """\
Available commands:
  /clear    Forget the conversation (the --system message stays)
  /bye      Leave (Ctrl-D too)
  /?        This help
Ctrl-C while an answer streams stops it: that question and its partial answer are forgotten.
Ctrl-C at the prompt clears the line."""


# -- the conversation ---------------------------------------------------------------------


class Conversation:
    """The messages of a chat: an optional system message, then question/answer pairs.

    A turn is remembered only once its answer is complete (``remember``): a question whose
    answer was interrupted or failed is forgotten with it, so that the next turn never
    carries a question left unanswered (the model would answer it first).
    """

    def __init__(self, system: str | None = None) -> None:
        self.system = system or None
        self._turns: list[tuple[str, str]] = []

    def __len__(self) -> int:
        """How many question/answer pairs are remembered."""
        return len(self._turns)

    def messages(self, question: str | None = None) -> list[dict[str, str]]:
        """The messages to send: system, the remembered turns, then ``question`` (if any)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for asked, answered in self._turns:
            out.append({"role": "user", "content": asked})
            out.append({"role": "assistant", "content": answered})
        if question is not None:
            out.append({"role": "user", "content": question})
        return out

    def remember(self, question: str, answer: str) -> bool:
        """Keep a completed turn; False (nothing kept) for an empty answer, which a chat
        template may refuse and which would leave ``question`` unanswered."""
        if not answer:
            return False
        self._turns.append((question, answer))
        return True

    def clear(self) -> None:
        """Forget every turn (the system message stays)."""
        self._turns.clear()


# -- what a line means --------------------------------------------------------------------

EntryKind = Literal["say", "blank", "bye", "clear", "help", "unknown", "interrupted"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One thing the user did at the prompt: ``say`` (``text`` is a user message), a
    command (``bye``, ``clear``, ``help``; ``unknown`` with the word in ``text``), a
    ``blank`` line, or Ctrl-C (``interrupted``). End of input (Ctrl-D) is ``bye``."""

    kind: EntryKind
    text: str = ""


_COMMANDS: dict[str, EntryKind] = {"/bye": "bye", "/clear": "clear", "/?": "help", "/help": "help"}


def interpret(line: str) -> Entry:
    """What a typed line means: a command when it starts with ``/``, else a user message
    (surrounding blanks dropped)."""
    text = line.strip()
    if not text:
        return Entry("blank")
    if text.startswith("/"):
        word = text.split()[0]
        kind = _COMMANDS.get(word.lower())
        return Entry(kind) if kind else Entry("unknown", word)
    return Entry("say", text)


# -- reading lines ------------------------------------------------------------------------


class PromptReader:
    """Reads what the user types, one ``Entry`` per line.

    On a terminal it prints ``>>> `` and edits the line with the stdlib ``readline``
    (arrows, Ctrl-R, the history of earlier sessions in ``history_path``). Ctrl-C at the
    prompt (a ``KeyboardInterrupt`` out of ``input()``) abandons the line; Ctrl-D (EOF)
    is ``bye``. Off a terminal (a pipe) there is no prompt and no history: one line, one
    entry.

    ``input_fn`` and ``write`` are ``input`` and stdout's ``write`` unless a test says.
    """

    def __init__(
        self,
        *,
        interactive: bool,
        history_path: Path | None = None,
        input_fn: Callable[[str], str] = input,
        write: Callable[[str], object] | None = None,
    ) -> None:
        self.interactive = interactive
        self.history_path = history_path if interactive else None
        self._input = input_fn
        self._write = write or _write_stdout
        self._readline = _load_readline(self.history_path) if interactive else None

    def read(self) -> Entry:
        """The next entry (blocks until the user ends a line, presses Ctrl-C or Ctrl-D)."""
        try:
            line = self._input(PROMPT if self.interactive else "")
        except KeyboardInterrupt:
            self._write("^C\n" if self.interactive else "\n")
            return Entry("interrupted")
        except EOFError:
            if self.interactive:
                self._write("\n")  # Ctrl-D leaves the cursor after the prompt
            return Entry("bye")
        return interpret(line)

    def save_history(self) -> None:
        """Write the history file (bounded to ``HISTORY_LENGTH`` lines, mode 0600); errors
        ignored: a history that cannot be written is no reason to fail a chat."""
        if self._readline is None or self.history_path is None:
            return
        try:
            self._readline.write_history_file(str(self.history_path))
            os.chmod(self.history_path, 0o600)  # what you typed is yours, as a shell's history
        except OSError:
            pass


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _load_readline(history_path: Path | None):  # type: ignore[no-untyped-def]
    """Importing ``readline`` is what gives ``input()`` line editing; None where the
    platform has none. The history file is read when it exists."""
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LENGTH)
    # No completion in a chat: Tab inserts a tab instead of listing file names.
    readline.parse_and_bind("tab: tab-insert")
    if history_path is not None:
        try:
            readline.clear_history()
            readline.read_history_file(str(history_path))
        except OSError:
            pass  # no history yet
    return readline


# -- what Ctrl-C does ---------------------------------------------------------------------

Phase = Literal["starting", "reading", "streaming", "idle", "closing"]
SigintAction = Literal["clear_line", "cancel", "exit_now", "ignore"]


def sigint_action(phase: Phase, interrupting: bool) -> SigintAction:
    """What a Ctrl-C does in ``phase`` (``interrupting``: an earlier Ctrl-C is still
    stopping what it stopped).

    - at the prompt: clear the line (``input()`` raises ``KeyboardInterrupt``);
    - while an answer streams, or the queen starts: cancel that (the job is cancelled at
      every hop); a second one before that is done ends the chat at once, as a second
      Ctrl-C does for ``infer`` (SIGKILL to an ephemeral queen, exit 130);
    - while the chat ends (the cascade shutting down): end at once;
    - between these (the moments between a line and its job): nothing.
    """
    if phase == "reading":
        return "clear_line"
    if phase in ("streaming", "starting"):
        return "exit_now" if interrupting else "cancel"
    if phase == "closing":
        return "exit_now"
    return "ignore"
