"""``--narration story`` and ``cute``: each main event carries its story and cute texts,
and those modes show them (real keeper, queen, hive, worker, embedded model; ephemeral).

One run in ``json`` gives the events with all their texts; a run in ``story`` and one in
``cute`` (each with its own ``RBEE_HOME``, so the same events happen: provisioning, load)
must show, for every main event, its story (cute) text, not its human one. Texts hold ids,
ports and times that differ between runs, so they are compared as patterns: a word that
holds a digit matches any word.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.processes import RbeeProcess, json_objects, program
from tests.queen.support import keeper_env, wait_no_rbee_processes

pytestmark = pytest.mark.model

INFER = ["infer", "--node", "localhost", "--model", "gemma3-270m", "--prompt", "write a short story",
         "--max-tokens", "8", "--temperature", "0"]

#: The main events of an infer, by actor: each has a cute and a story text.
MAIN_EVENTS = {
    "rbee-keeper": {"job_submit", "job_complete"},
    "queen-rbee": {"queen_start", "job_create", "route_job", "hive_start", "infer_start", "infer_schedule",
                   "infer_queue", "infer_lease", "infer_worker", "infer_complete", "queen_shutdown", "hive_stop",
                   "hive_exit", "queen_stopped"},
    "rbee-hive": {"hive_start", "hive_ready", "spawn_request", "worker_spawn", "worker_ready", "worker_stop",
                  "worker_exit", "hive_shutdown", "hive_stopped"},
    "model-provisioner": {"model_assemble", "model_ready"},
    "llm-worker-rbee": {"startup", "execute_request", "tokenize", "inference_start", "inference_complete"},
    "model-loader": {"model_load"},
}
#: Folded into the keeper's summary in the modes for people (still in json).
SUMMARIZED = {("llm-worker-rbee", "inference_complete"), ("queen-rbee", "infer_complete")}


def keeper(home: Path, *args: str) -> RbeeProcess:
    proc = RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home))
    try:
        assert proc.wait(600) == 0, proc.stderr_text()
    finally:
        proc.stop()
    assert not wait_no_rbee_processes(home, 15)
    return proc


def pattern(text: str) -> re.Pattern[str]:
    """``text`` with every word that holds a digit (ids, ports, sizes, times) as a wildcard."""
    return re.compile(r"\s+".join(r"\S+" if re.search(r"\d", word) else re.escape(word) for word in text.split()))


def shown(lines: list[str], actor: str) -> list[str]:
    """The texts of ``actor``'s lines (``[actor] <emoji> text``)."""
    return [line.split(" ", 2)[2] for line in lines if line.startswith(f"[{actor}] ") and line.count(" ") >= 2]


def main_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("type") == "narration" and e.get("action") in MAIN_EVENTS.get(e["actor"], ())
            and e.get("level") == "info"]


def test_main_events_have_story_and_cute_texts_and_those_modes_show_them(tmp_path: Path) -> None:
    homes = {mode: tmp_path / mode for mode in ("json", "story", "cute")}
    for home in homes.values():
        home.mkdir()
    events = json_objects(keeper(homes["json"], *INFER, "--narration", "json").stderr_lines)
    main = main_events(events)
    seen = {(e["actor"], e["action"]) for e in main}
    missing = {(actor, action) for actor, actions in MAIN_EVENTS.items() for action in actions} - seen
    assert not missing, f"main events that did not come: {sorted(missing)}"
    for e in main:
        assert e.get("cute") and e.get("story"), f"{e['actor']} {e['action']} lacks a cute or story text: {e}"
        assert e["cute"] != e["human"] and e["story"] != e["human"], e
    # json keeps what the summary folds, for programs.
    assert {(e["actor"], e["action"]) for e in events if e.get("type") == "narration"} >= SUMMARIZED
    # The load's 10% steps are events too: the bar is the keeper's way of showing them.
    steps = [e for e in main if e["action"] == "model_load" and e.get("phase") == "progress"]
    assert [e["percent"] for e in steps] == list(range(10, 101, 10))

    for mode in ("story", "cute"):
        lines = keeper(homes[mode], *INFER, "--narration", mode).stderr_lines
        for e in main:
            if (e["actor"], e["action"]) in SUMMARIZED or e.get("phase") == "progress":
                continue  # folded into the summary; a bar (and no bar on a pipe)
            texts = shown(lines, e["actor"])
            assert any(pattern(e[mode]).fullmatch(t) for t in texts), (
                f"{mode}: no line of {e['actor']} shows the {mode} text of {e['action']} ({e[mode]!r}):\n"
                + "\n".join(lines))
            assert not any(pattern(e["human"]).fullmatch(t) for t in texts), (
                f"{mode}: {e['actor']} {e['action']} shows its human text:\n" + "\n".join(lines))


def test_a_failed_job_is_said_in_every_mode_with_its_cause(tmp_path: Path) -> None:
    """The queen's failure has cute and story texts too, and each still names the cause."""
    proc = RbeeProcess([program("rbee-keeper"), "infer", "--model", "file:/nonexistent/x.gguf", "--prompt", "hi",
                        "--narration", "json"], env=keeper_env(tmp_path))
    try:
        assert proc.wait(300) == 1, proc.stderr_text()
    finally:
        proc.stop()
    assert not wait_no_rbee_processes(tmp_path, 15)
    failed = [e for e in json_objects(proc.stderr_lines) if e.get("action") == "execute_error"]
    assert len(failed) == 1, proc.stderr_text()
    for text in ("human", "cute", "story"):
        assert "file:/nonexistent/x.gguf" in failed[0][text], failed[0]
