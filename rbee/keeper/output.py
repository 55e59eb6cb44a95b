"""What the keeper prints: generated text on stdout, everything else on stderr.

Narration goes through the codec's ``NarrationRenderer`` (``[actor] <emoji> human``).

The screen's rules (docs/keeper.md, "The screen"):

- **The answer's line is the answer's.** The keeper knows whether stdout and stderr are
  the same terminal (both TTYs of the same device: ``same_terminal``) and whether the last
  byte of the answer ended a line. When they share a terminal and a narration line comes
  while the answer is mid-line, the answer's line is ended first (a newline on stdout), the
  narration gets a line of its own, and the answer goes on from column 0 of the next line:
  nothing is re-printed, as llama-cli does. On a pipe, stdout holds the answer alone and
  whole, whatever comes on stderr.
- **Progress bars only on a terminal.** A download, model load or prompt progress line is
  drawn on stderr and redrawn in place (``\\r`` + erase line), one bar per thing, cut to the
  terminal's width; the next other line (or token, on a shared terminal) first ends the
  bar's line, so its last state stays. When stderr is not a terminal the bars are left out
  and only the start and end lines say what happened: no ANSI code ever goes to a pipe.
- **Say it once.** An infer ends with one keeper summary line (tokens, tok/s, first token,
  where it ran); the worker's and the queen's own "complete" lines say the same and are
  folded into it in the human, cute and story modes (``--narration json`` keeps every
  event: programs read them).
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata

from ..narration import NarrationRenderer
from ..narration.events import Event, NarrationEvent
from ..narration.render import QUEEN_ACTOR, WORKER_ACTOR

ACTOR = "rbee-keeper"

#: Narration that repeats the facts of the keeper's summary line (tokens, tok/s): left out
#: at info level in the modes for people, because the summary says it.
SUMMARIZED = frozenset({(WORKER_ACTOR, "inference_complete"), (QUEEN_ACTOR, "infer_complete")})
#: The modes for people (``json`` is for programs, ``quiet`` shows errors only).
PEOPLE_MODES = ("human", "cute", "story")
#: Go to column 0 and erase the line: how a bar is redrawn in place.
REDRAW = "\r\x1b[2K"


def same_terminal(fd_a: int = 1, fd_b: int = 2) -> bool:
    """True when both file descriptors are terminals and the same one (same device node).

    Two TTYs are not necessarily one screen (``2>/dev/pts/7``); the device says.
    """
    try:
        if not (os.isatty(fd_a) and os.isatty(fd_b)):
            return False
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:  # a closed descriptor: nothing to share
        return False
    return (a.st_rdev, a.st_ino, a.st_dev) == (b.st_rdev, b.st_ino, b.st_dev)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _columns() -> int:
    """Width of the terminal on stderr (80 when it cannot say)."""
    try:
        return os.get_terminal_size(2).columns
    except OSError:
        return 80


def _cell_width(char: str) -> int:
    if char == "\ufe0f":  # the emoji selector: the character before it is drawn two cells wide (🛏️)
        return 1
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def fit(line: str, columns: int) -> str:
    """``line`` cut to fewer than ``columns`` cells: a bar that wraps cannot be redrawn in
    place (``\\r`` goes back to the start of the last row only)."""
    width = 0
    for i, char in enumerate(line):
        width += _cell_width(char)
        if width >= columns:
            return line[:i]
    return line


class Output:
    """The keeper's two output streams."""

    def __init__(self, mode: str = "human") -> None:
        self.mode = mode
        self.renderer = NarrationRenderer(mode)
        #: stderr is a terminal: bars are drawn (and redrawn in place).
        self.tty = _stderr_is_tty()
        #: stdout and stderr are the same terminal: narration must not land in the answer's line.
        self.shared = same_terminal()
        self._bar_open = False  # a bar is on stderr without its line end
        self._midline = False  # the answer's last byte did not end a line
        self.tokens_printed = 0

    def set_mode(self, mode: str) -> None:
        """Show narration in ``mode`` from now on (``chat`` goes quiet after its first turn)."""
        self.mode = mode
        self.renderer = NarrationRenderer(mode)

    def event(self, event: Event) -> None:
        """Render one non-token event on stderr (if the mode shows it)."""
        if self._folded(event):
            return
        line = self.renderer.render(event)
        if line is None:
            return
        if self.renderer.draws_bar(event):
            if not self.tty:
                return  # a pipe gets the start and end lines, never a bar
            self._break_text()
            sys.stderr.write(REDRAW + fit(line, _columns()))
            self._bar_open = True
        else:
            self._break_text()
            self._end_bar()
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def narrate(self, action: str, human: str, *, target: str = "", level: str = "info",
                cute: str | None = None, story: str | None = None, node: str | None = None,
                worker_id: str | None = None, **extra: object) -> None:
        """The keeper's own narration (rendered like everyone else's)."""
        self.event(
            NarrationEvent(
                actor=ACTOR, action=action, human=human, target=target, level=level, cute=cute, story=story,
                node=node, worker_id=worker_id, ts_ms=time.time_ns() // 1_000_000,
                extra=extra,  # type: ignore[arg-type]
            )
        )

    def token(self, text: str) -> None:
        """One piece of generated text to stdout, flushed at once."""
        if not text:
            return
        if self.shared:
            self._end_bar()  # the answer starts below the bar, not on it
        sys.stdout.write(text)
        sys.stdout.flush()
        self.tokens_printed += 1
        self._midline = not text.endswith("\n")

    def end_text(self) -> None:
        """End the answer's last line (only if it is not ended); the next text starts afresh."""
        if self._midline:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self.tokens_printed = 0
        self._midline = False

    def new_line(self) -> None:
        """End the line on stdout whatever it holds (after a Ctrl-C, which the terminal
        echoes as ``^C`` where the cursor was); the next text starts afresh."""
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.tokens_printed = 0
        self._midline = False

    def line(self, text: str) -> None:
        """A plain line on stderr (``Cancelled.``, notes), shown in every mode."""
        self._break_text()
        self._end_bar()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def error(self, message: str) -> None:
        """One error line on stderr: cause and fix, no traceback."""
        self.line(f"Error: {message}")

    def _folded(self, event: Event) -> bool:
        return (
            self.mode in PEOPLE_MODES
            and type(event) is NarrationEvent
            and event.level == "info"
            and (event.actor, event.action) in SUMMARIZED
        )

    def _break_text(self) -> None:
        """On a shared terminal, end the answer's line before anything else is written."""
        if self._midline and self.shared:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._midline = False

    def _end_bar(self) -> None:
        if self._bar_open:
            sys.stderr.write("\n")
            self._bar_open = False
