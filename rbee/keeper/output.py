"""What the keeper prints: generated text on stdout, everything else on stderr.

Narration goes through the codec's ``NarrationRenderer`` (``[actor] <emoji> human``,
progress bars for downloads and model loads). Progress lines redraw in place with ``\\r``
when stderr is a terminal, and are printed one per line otherwise (logs, tests).

When stdout and stderr are both terminals (the same screen, in practice), a narration
line that comes while generated text is mid-line first ends that line on stdout, so that
it never reads as the text's continuation (and ``end_text`` then adds no empty line).
"""

from __future__ import annotations

import sys
import time

from ..narration import NarrationRenderer
from ..narration.events import Event, Loading, NarrationEvent

ACTOR = "rbee-keeper"


def _is_progress(event: Event) -> bool:
    if isinstance(event, Loading):
        return True
    return isinstance(event, NarrationEvent) and (
        "bytes_total" in event.extra or "layers_total" in event.extra
    )


class Output:
    """The keeper's two output streams."""

    def __init__(self, mode: str = "human") -> None:
        self.mode = mode
        self.renderer = NarrationRenderer(mode)
        self.tty = sys.stderr.isatty()
        self._shared_tty = self.tty and sys.stdout.isatty()
        self._progress_open = False
        self._midline = False  # the generated text on stdout ends mid-line
        self.tokens_printed = 0

    def set_mode(self, mode: str) -> None:
        """Show narration in ``mode`` from now on (``chat`` goes quiet after its first turn)."""
        self.mode = mode
        self.renderer = NarrationRenderer(mode)

    def event(self, event: Event) -> None:
        """Render one non-token event on stderr (if the mode shows it)."""
        line = self.renderer.render(event)
        if line is None:
            return
        self._break_text()
        if self.tty and _is_progress(event):
            sys.stderr.write("\r\x1b[2K" + line)
            self._progress_open = True
        else:
            self._end_progress()
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def narrate(self, action: str, human: str, *, target: str = "", level: str = "info", **extra: object) -> None:
        """The keeper's own narration (rendered like everyone else's)."""
        self.event(
            NarrationEvent(
                actor=ACTOR, action=action, human=human, target=target, level=level,
                ts_ms=time.time_ns() // 1_000_000, extra=extra,  # type: ignore[arg-type]
            )
        )

    def token(self, text: str) -> None:
        """One piece of generated text to stdout, flushed at once."""
        self._end_progress()
        sys.stdout.write(text)
        sys.stdout.flush()
        self.tokens_printed += 1
        if text:
            self._midline = not text.endswith("\n")

    def end_text(self) -> None:
        """Finish the generated text with a newline (if any text was printed and the line
        is not already ended); the next text starts afresh."""
        if self.tokens_printed and (self._midline or not self._shared_tty):
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
        """A plain line on stderr (summary, ``Cancelled.``), shown in every mode but json."""
        self._break_text()
        self._end_progress()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def error(self, message: str) -> None:
        """One error line on stderr: cause and fix, no traceback."""
        self._break_text()
        self._end_progress()
        sys.stderr.write(f"Error: {message}\n")
        sys.stderr.flush()

    def _break_text(self) -> None:
        if self._midline and self._shared_tty:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._midline = False

    def _end_progress(self) -> None:
        if self._progress_open:
            sys.stderr.write("\n")
            self._progress_open = False
