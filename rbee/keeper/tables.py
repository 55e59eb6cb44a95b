"""How the keeper's listings look to people: aligned tables, human sizes and ages.

Every listing command (``ps``, ``models list``, ``setup list-nodes``, ``queen status``)
prints through ``format_table``: a header row in capitals, columns left-aligned and
``GAP`` apart (wider than one space, because cells hold spaces: ``547 MiB``), no trailing
spaces. ``--json`` prints the same listing as a JSON document instead (``json_document``).

Pure functions, no I/O and no heavy imports: the keeper may print a listing without
starting anything.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any, Sequence

#: Between two columns.
GAP = "   "


def format_table(rows: Sequence[Sequence[str]], headers: Sequence[str] | None = None) -> str:
    """``rows`` (and ``headers`` above them) as aligned columns; no final newline.

    Without ``headers`` it is a list of ``KEY   value`` lines (``queen status``)."""
    lines = ([list(headers)] if headers else []) + [[str(cell) for cell in row] for row in rows]
    if not lines:
        return ""
    columns = max(len(line) for line in lines)
    widths = [max(len(line[i]) if i < len(line) else 0 for line in lines) for i in range(columns)]
    return "\n".join(GAP.join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def json_document(document: Any) -> str:
    """A listing as programs read it: one JSON document, keys in a stable order."""
    return json.dumps(document, indent=2, sort_keys=True)


def human_size(size: int | float | None) -> str:
    """``547 MiB``, ``1.5 GiB`` (binary units); ``-`` when unknown (None or 0)."""
    if not size or size < 0:
        return "-"
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f} GiB"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.0f} MiB"
    return f"{max(1, round(size / 1024))} KiB"


def span(seconds: float) -> str:
    """A length of time as people say it: ``3 minutes``, ``about an hour``, ``1 second``,
    ``less than a second`` (whole units, rounded down)."""
    if seconds < 1:
        return "less than a second"
    for unit, size, about in (("day", 86400, "a day"), ("hour", 3600, "an hour"), ("minute", 60, "a minute")):
        if seconds >= size:
            count = int(seconds // size)
            return f"about {about}" if count == 1 else f"{count} {unit}s"
    count = int(seconds)
    return f"{count} second{'s' if count != 1 else ''}"


def from_now(seconds: float) -> str:
    """``4 minutes from now`` (``ps``'s UNTIL)."""
    return f"{span(seconds)} from now"


def ago(seconds: float) -> str:
    """``3 minutes ago``; a time a little in the future (another clock) is ``just now``."""
    return "just now" if seconds < 1 else f"{span(seconds)} ago"


def ago_iso(timestamp: str | None, now: datetime | None = None, *, never: str = "never") -> str:
    """The age of an ISO 8601 UTC time (``2026-11-23T20:01:02Z``, the catalog's), or
    ``never`` when there is none; an unreadable one is shown as it is."""
    if not timestamp:
        return never
    try:
        when = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return ago(((now or datetime.now(timezone.utc)) - when).total_seconds())


def short_path(path: str | None) -> str:
    """A path with the user's home folder as ``~`` (tables are read, not pasted)."""
    if not path:
        return "-"
    home = os.path.expanduser("~")
    if home not in ("", "/") and (path == home or path.startswith(home + os.sep)):
        return "~" + path[len(home):]
    return path
