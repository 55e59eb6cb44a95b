"""What ``rbee-keeper --help`` shows: the commands' docstrings as plain text, and the
defaults of the options that an absent value leaves to the request.

Why plain text: cyclopts' markdown help imports markdown-it and rich's markdown renderer,
~65 ms of a ``--help`` that should take well under 0.3 s. Its plain-text format keeps the
docstring's line breaks as they are in the source, so ``plain_help`` first joins the lines
of each paragraph (the terminal wraps them) and drops the ``code`` markup.

No heavy imports here: ``main.py`` uses this module at import time.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable


def plain_help(doc: str) -> str:
    """A numpy-style docstring with each paragraph, and each parameter's description, on
    one line, without the backticks of ``code`` markup. Section headers, their underlines
    and the parameter names stay on lines of their own, so cyclopts still reads them."""
    lines: list[str] = []
    in_section = False  # after a "Parameters" / "----------" header: names at the margin
    for line in inspect.cleandoc(doc).replace("`", "").splitlines():
        text = line.strip()
        if _underline(text):
            in_section = True
            lines.append(line.rstrip())
            continue
        previous = lines[-1] if lines else ""
        continues = (
            text
            and previous.strip()
            and not _underline(previous.strip())
            and _indent(line) == _indent(previous)
            and not (in_section and _indent(line) == 0)
        )
        if continues:
            lines[-1] = f"{previous} {text}"
        else:
            lines.append(line.rstrip())
    return "\n".join(lines)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _underline(text: str) -> bool:
    return bool(text) and set(text) == {"-"}


def use_plain_help(app: Any) -> None:
    """Give every command of ``app`` (and of its sub-apps) its docstring as ``plain_help``.

    Called once, before the command line is parsed, so that it also covers commands
    registered after this module's import. Only our own functions are touched (cyclopts'
    ``--help`` and ``--version`` are bound methods of its own)."""
    seen: set[int] = set()
    todo = [app]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        command = current.default_command
        if inspect.isfunction(command) and command.__module__.startswith("rbee.") and command.__doc__:
            command.__doc__ = plain_help(command.__doc__)
        for name in current:
            if not name.startswith("-"):
                todo.append(current[name])


def request_default(field: str) -> Callable[[Any], str]:
    """A cyclopts ``show_default`` for an option that is left out of the request when
    absent: the request's own default (``rbee.requests``, where every default is written),
    read only when a help page is drawn."""

    def show(_absent: Any) -> str:
        from ..requests import DEFAULT_SAMPLING

        return str(getattr(DEFAULT_SAMPLING, field))

    return show
