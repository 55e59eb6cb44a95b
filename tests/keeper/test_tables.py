"""How the keeper's listings look: the one table renderer, human ages, and the tables of
``models list`` and ``setup list-nodes`` (pure functions; the commands are in test_listings.py)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

from rbee.keeper.admin import MODEL_COLUMNS, NODE_COLUMNS, format_models, format_nodes
from rbee.keeper.tables import ago, ago_iso, format_table, human_size, short_path, span

NOW = datetime(2026, 11, 23, 20, 0, 0, tzinfo=timezone.utc)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def cells(line: str, header: str, columns: tuple[str, ...]) -> list[str]:
    """Cut ``line`` at the start offsets of the header's columns."""
    starts = [header.index(name) for name in columns]
    return [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]


def test_a_table_aligns_its_columns_with_no_trailing_spaces() -> None:
    table = format_table([["a", "1 KiB", "x"], ["longer name", "547 MiB", ""]], ("NAME", "SIZE", "NOTE"))
    assert table.splitlines() == [
        "NAME          SIZE      NOTE",
        "a             1 KiB     x",
        "longer name   547 MiB",
    ]
    # Without headers: KEY   value lines.
    assert format_table([["URL", "http://x"], ["PID", "12"]]) == "URL   http://x\nPID   12"
    assert format_table([], ("ONLY", "HEADER")) == "ONLY   HEADER"


def test_spans_and_ages_read_as_people_say_them() -> None:
    assert span(0.2) == "less than a second"
    assert span(1.5) == "1 second" and span(59.9) == "59 seconds"
    assert span(60) == "about a minute" and span(180) == "3 minutes"
    assert span(3600) == "about an hour" and span(3 * 3600 + 5) == "3 hours"
    assert span(86400) == "about a day" and span(3 * 86400) == "3 days"
    assert ago(180) == "3 minutes ago"
    assert ago(0.3) == "just now" and ago(-5) == "just now"  # another clock, a little ahead
    assert ago_iso(iso(NOW - timedelta(minutes=3)), NOW) == "3 minutes ago"
    assert ago_iso(None, NOW) == "never" and ago_iso("", NOW, never="-") == "-"
    assert ago_iso("not a time", NOW) == "not a time"


def test_short_paths_and_sizes() -> None:
    home = os.path.expanduser("~")
    assert short_path(f"{home}/.rbee/models/m.gguf") == "~/.rbee/models/m.gguf"
    assert short_path("/srv/models/m.gguf") == "/srv/models/m.gguf"
    assert short_path(None) == "-"
    assert human_size(253_113_024) == "241 MiB" and human_size(None) == "-"


def test_the_models_table() -> None:
    models = [
        {"reference": "hf:org/repo/model-Q4_K_M.gguf", "size": int(1.5 * (1 << 30)), "sha256": "ab" * 32,
         "downloaded_at": iso(NOW - timedelta(days=2)), "last_used": iso(NOW - timedelta(minutes=3)),
         "local_path": "/srv/rbee/models/hf/org/repo/model-Q4_K_M.gguf"},
        {"reference": "gemma3-270m", "size": 253_113_024, "sha256": "a5fd3b62230aa5ec" + "0" * 48,
         "downloaded_at": iso(NOW - timedelta(hours=1)), "last_used": None,
         "local_path": "/srv/rbee/models/gemma-3-270m-q4_k_m.gguf"},
    ]
    header, *rows = format_models(models, NOW).splitlines()
    assert header.split("   ")[0] == "MODEL" and all(name in header for name in MODEL_COLUMNS)
    # By reference; human sizes, a short sha256, ages, "never" for a model no worker used yet.
    assert cells(rows[0], header, MODEL_COLUMNS) == [
        "gemma3-270m", "241 MiB", "a5fd3b62230a", "about an hour ago", "never",
        "/srv/rbee/models/gemma-3-270m-q4_k_m.gguf"]
    assert cells(rows[1], header, MODEL_COLUMNS) == [
        "hf:org/repo/model-Q4_K_M.gguf", "1.5 GiB", "abababababab", "2 days ago", "3 minutes ago",
        "/srv/rbee/models/hf/org/repo/model-Q4_K_M.gguf"]


def test_the_nodes_table() -> None:
    now_ms = int(NOW.timestamp() * 1000)
    nodes = [
        {"name": "localhost", "ssh_host": None, "ssh_port": 22, "ssh_user": None, "rbee_hive_command": "rbee-hive",
         "detect": {}, "added_at_ms": 0},
        {"name": "mac", "ssh_host": "mac.lan", "ssh_port": 2222, "ssh_user": "ada",
         "rbee_hive_command": "/opt/rbee/bin/rbee-hive", "detect": {"backends": ["cpu", "metal"]},
         "added_at_ms": now_ms - 2 * 3600 * 1000},
    ]
    header, local, mac = format_nodes(nodes, now_ms).splitlines()
    assert cells(local, header, NODE_COLUMNS) == ["localhost", "- (local)", "rbee-hive", "-", "built in"]
    assert cells(mac, header, NODE_COLUMNS) == ["mac", "ada@mac.lan:2222", "/opt/rbee/bin/rbee-hive", "cpu, metal",
                                                "2 hours ago"]
