"""Cutting decoded text into lines: the part both incremental decoders (SSE, JSON lines) share."""

from __future__ import annotations


class LineSplitter:
    """Cuts text arriving in pieces into complete lines (without their LF).

    The unfinished last line is kept as a list of pieces, because a long line arriving in
    many chunks would make repeated str concatenation quadratic.
    """

    def __init__(self) -> None:
        self._partial: list[str] = []

    def split(self, text: str) -> list[str]:
        """The lines that ``text`` completes; its unfinished end is kept for later."""
        if "\n" not in text:
            if text:
                self._partial.append(text)
            return []
        if self._partial:
            self._partial.append(text)
            text = "".join(self._partial)
            self._partial.clear()
        lines = text.split("\n")
        last = lines.pop()
        if last:
            self._partial.append(last)
        return lines

    def take_rest(self) -> str:
        """The unfinished line so far (empty if none), forgotten here."""
        rest = "".join(self._partial)
        self._partial.clear()
        return rest
