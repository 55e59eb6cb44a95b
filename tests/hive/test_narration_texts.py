"""The model provisioner's main download events carry cute and story texts (what
``--narration cute`` / ``story`` show), through a real hive and a local Hub."""

from __future__ import annotations

from pathlib import Path

from rbee.narration.events import Done, NarrationEvent
from tests.hive.conftest import running_hive
from tests.hive.fakehub import FakeHub

#: The provisioner's and the hive's main events of a download.
DOWNLOAD_EVENTS = ("download_start", "download_progress", "model_ready", "download_complete")


def test_download_events_have_cute_and_story_texts(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path
) -> None:
    with running_hive(env=hf_env) as hive:
        started = hive.http.post("/v1/models/download", json={"model": "hf:rbee-test/small-GGUF"})
        assert started.status_code == 202, started.text
        events = hive.sse(f"/v1/models/download/{started.json()['download_id']}/progress", seconds=60)
    assert isinstance(events[-1], Done)
    narration = [e for e in events if isinstance(e, NarrationEvent)]
    for action in DOWNLOAD_EVENTS:
        said = [e for e in narration if e.action == action]
        assert said, f"no {action} in {[e.action for e in narration]}"
        for e in said:
            assert e.cute and e.story and e.human not in (e.cute, e.story), e
            assert "small-Q4_K_M.gguf" in e.story or "rbee-test/small-GGUF" in e.story, e
