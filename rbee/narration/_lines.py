"""Cutting decoded text into lines: the part both incremental decoders (SSE, JSON lines) share."""

from __future__ import annotations

from ..errors import NarrationError

#: The longest line a decoder keeps waiting for the end of (in characters). A peer that
#: never sends a newline must not grow our memory without bound; 64 Mi leaves room for
#: any real event (the property tests use 1 MiB fields).
MAX_LINE_CHARS = 64 * 1024 * 1024


class LineSplitter:
    """Cuts text arriving in pieces into complete lines (without their LF).

    The unfinished last line is kept as a list of pieces, because a long line arriving in
    many chunks would make repeated str concatenation quadratic.

    A line longer than ``max_line_chars`` either raises ``NarrationError`` (``cut=False``:
    SSE, where half an event is worse than none) or is handed out in pieces of that size
    (``cut=True``: a child's stdout, where nothing it prints may be lost).
    """

    def __init__(self, *, max_line_chars: int = MAX_LINE_CHARS, cut: bool = False) -> None:
        self._partial: list[str] = []
        self._partial_len = 0
        self._max = max_line_chars
        self._cut = cut

    def split(self, text: str) -> list[str]:
        """The lines that ``text`` completes; its unfinished end is kept for later."""
        if "\n" not in text:
            if text:
                self._partial.append(text)
                self._partial_len += len(text)
                if self._partial_len > self._max:
                    return self._overflow()
            return []
        if self._partial:
            self._partial.append(text)
            text = "".join(self._partial)
            self._partial.clear()
            self._partial_len = 0
        lines = text.split("\n")
        last = lines.pop()
        if last:
            self._partial.append(last)
            self._partial_len = len(last)
        too_long = self._partial_len > self._max or (
            len(text) > self._max and any(len(line) > self._max for line in lines))
        if too_long:
            return self._cut_lines(lines) if self._cut else self._raise()
        return lines

    def _overflow(self) -> list[str]:
        if not self._cut:
            return self._raise()
        return self._cut_lines([])

    def _cut_lines(self, lines: list[str]) -> list[str]:
        # Long complete lines are cut into pieces; a long unfinished end is handed out in
        # whole pieces and only its remainder is kept.
        out: list[str] = []
        for line in lines:
            if len(line) <= self._max:
                out.append(line)
            else:
                out.extend(line[i:i + self._max] for i in range(0, len(line), self._max))
        rest = self.take_rest()
        whole = len(rest) - len(rest) % self._max
        out.extend(rest[i:i + self._max] for i in range(0, whole, self._max))
        if rest[whole:]:
            self._partial.append(rest[whole:])
            self._partial_len = len(rest) - whole
        return out

    def _raise(self) -> list[str]:
        self._partial.clear()
        self._partial_len = 0
        raise NarrationError(
            f"a line of the stream is longer than {self._max} characters: the peer is not "
            "speaking SSE or JSON lines (or never ends its lines)"
        )

    def take_rest(self) -> str:
        """The unfinished line so far (empty if none), forgotten here."""
        rest = "".join(self._partial)
        self._partial.clear()
        self._partial_len = 0
        return rest
