"""Downloads from a local server that answers like the Hub (``HF_ENDPOINT``), through a real hive."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from rbee.narration.events import Done, Error, NarrationEvent
from tests.hive.conftest import Hive, running_hive
from tests.hive.fakehub import FakeHub

REF = "hf:rbee-test/small-GGUF"
CANONICAL = "hf:rbee-test/small-GGUF/small-Q4_K_M.gguf"


def _download(hive: Hive, model: str) -> list[Any]:
    started = hive.http.post("/v1/models/download", json={"model": model})
    assert started.status_code == 202, started.text
    return hive.sse(f"/v1/models/download/{started.json()['download_id']}/progress", seconds=60)


def _narration(events: list[Any], action: str) -> list[NarrationEvent]:
    return [e for e in events if isinstance(e, NarrationEvent) and e.action == action]


def test_download_narrates_progress_resumes_after_a_cut_and_verifies(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path, small_gguf: Path
) -> None:
    fakehub.cut_at = 0.4
    with running_hive(env=hf_env) as hive:
        events = _download(hive, REF)
        assert isinstance(events[-1], Done)
        assert not any(isinstance(e, Error) for e in events), events
        progress = _narration(events, "download_progress")
        assert len(progress) >= 3
        for e in progress:
            assert set(e.extra) >= {"bytes_done", "bytes_total", "percent", "bytes_per_sec", "eta_s"}
            assert e.extra["bytes_total"] == small_gguf.stat().st_size
        done = [e.extra["bytes_done"] for e in progress]
        assert done == sorted(done) and done[-1] == small_gguf.stat().st_size and progress[-1].extra["percent"] == 100.0
        # A few events a second at most.
        stamps = [e.ts_ms for e in progress]
        assert all(b - a >= 200 for a, b in zip(stamps, stamps[1:-1])), stamps
        # The cut: the connection dropped at 40%, the download resumed with a range from there.
        assert _narration(events, "download_retry")
        gets = fakehub.cdn_gets()
        assert len(gets) == 2 and gets[0][3] is None
        resumed_at = int(gets[1][3].removeprefix("bytes=").rstrip("-"))
        assert 0 < resumed_at <= 0.4 * small_gguf.stat().st_size
        assert _narration(events, "download_verify") and _narration(events, "download_complete")

        models = hive.http.get("/v1/models").json()["models"]
        assert [m["reference"] for m in models] == [CANONICAL]
        local = Path(models[0]["local_path"])
        assert local.read_bytes() == small_gguf.read_bytes()
        assert models[0]["sha256"] == fakehub.repos["rbee-test/small-GGUF"]["small-Q4_K_M.gguf"].sha256
        assert not local.with_name(local.name + ".part").exists()

        # Once catalogued, the same model (by any of its names) is not fetched again.
        for again in (REF, CANONICAL):
            events = _download(hive, again)
            assert "already" in _narration(events, "download_complete")[0].human
        assert len(fakehub.cdn_gets()) == 2


def test_a_wrong_sha256_is_refused_and_nothing_is_registered(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path
) -> None:
    fakehub.wrong_sha256 = True
    with running_hive(env=hf_env) as hive:
        events = _download(hive, REF)
        assert isinstance(events[-1], Done)
        errors = [e for e in events if isinstance(e, Error)]
        assert len(errors) == 1 and errors[0].code == "checksum_mismatch"
        assert "sha256 mismatch" in errors[0].message and "not registered" in errors[0].message
        assert hive.http.get("/v1/models").json()["models"] == []
        leftovers = [p for p in (rbee_home / "models").rglob("*") if p.is_file()]
        assert leftovers == []


def test_two_spawns_of_a_missing_model_download_it_once(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path
) -> None:
    with running_hive(env=hf_env) as hive:
        answers: list[httpx.Response] = []

        def spawn(model: str) -> None:
            answers.append(hive.spawn(model=model))

        threads = [threading.Thread(target=spawn, args=(m,)) for m in (REF, f"{REF}:Q4_K_M")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
        assert len(fakehub.cdn_gets()) == 1
        assert {a.json()["model_ref"] for a in answers} == {CANONICAL}
        stories = [hive.sse(f"/v1/workers/{a.json()['worker_id']}/narration", seconds=60) for a in answers]
        # One spawn started the download, the other joined it; both saw it finish.
        joined = [bool(_narration(s, "download_join")) for s in stories]
        assert sorted(joined) == [False, True]
        assert all(_narration(s, "model_ready") for s in stories)
        assert sum(len(_narration(s, "download_start")) for s in stories) >= 1
        # This small GGUF is not a model llama.cpp can run: both workers say so, exit, and
        # are deregistered (their streams ended with [DONE] above).
        for story in stories:
            assert isinstance(story[-1], Done) and _narration(story, "worker_exit")
        assert hive.workers() == []


def test_catalogued_models_need_no_hub_and_offline_mode_is_honoured(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path
) -> None:
    with running_hive(env=hf_env) as hive:
        assert isinstance(_download(hive, REF)[-1], Done)
    offline = {**hf_env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    with running_hive(env=offline) as hive:
        events = _download(hive, REF)
        assert "already" in _narration(events, "download_complete")[0].human
        refused = hive.http.post("/v1/models/download", json={"model": "hf:rbee-test/other-GGUF"})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "provision_failed" and "HF_HUB_OFFLINE" in refused.text
    assert len(fakehub.cdn_gets()) == 1


def test_bad_and_unknown_references(fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path) -> None:
    with running_hive(env=hf_env) as hive:
        bad = hive.http.post("/v1/models/download", json={"model": "ollama:llama3"})
        assert bad.status_code == 400
        assert "hf:org/repo:Q4_K_M" in bad.json()["error"]["message"]
        missing = hive.http.post("/v1/models/download", json={"model": "hf:rbee-test/nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        no_quant = hive.http.post("/v1/models/download", json={"model": f"{REF}:Q2_K"})
        assert no_quant.status_code == 404 and "small-Q8_0.gguf" in no_quant.json()["error"]["message"]
        spawn = hive.spawn(model="file:/nonexistent/model.gguf")
        assert spawn.status_code == 404 and spawn.json()["error"]["code"] == "model_not_found"


def test_an_abandoned_download_stops_and_a_later_one_resumes_its_part(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path, small_gguf: Path
) -> None:
    fakehub.bytes_per_sec = 1_000_000  # about 4 s for the whole file
    with running_hive(env=hf_env) as hive:
        # The spawning client goes away mid-download (as a cancelled job's queen does).
        try:
            httpx.post(f"{hive.url}/v1/workers/spawn", json={"model": REF}, timeout=1.5)
        except httpx.TimeoutException:
            pass
        else:
            raise AssertionError("the spawn answered before its 4 s download could have finished")
        failed = hive.proc.wait_for_action("provision_failed", 10)
        assert "cancelled" in failed["human"]
        parts = list((rbee_home / "models").rglob("*.part"))
        assert len(parts) == 1 and 0 < parts[0].stat().st_size < small_gguf.stat().st_size
        kept = parts[0].stat().st_size
        assert hive.http.get("/v1/models").json()["models"] == []

        fakehub.bytes_per_sec = None
        events = _download(hive, REF)
        assert _narration(events, "download_resume") and _narration(events, "download_complete")
        assert fakehub.cdn_gets()[-1][3] == f"bytes={kept}-"
        local = Path(hive.http.get("/v1/models").json()["models"][0]["local_path"])
        assert local.read_bytes() == small_gguf.read_bytes()


def test_a_file_in_the_hugging_face_cache_is_verified_and_used_in_place(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path
) -> None:
    import os
    import subprocess
    import sys

    fakehub.bytes_per_sec = None
    # Put the file into HF_HOME's cache with huggingface_hub itself, as `hf download` would.
    fill = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub as h; print(h.hf_hub_download('rbee-test/small-GGUF', "
         "'small-Q4_K_M.gguf'))"],
        env={**os.environ, **hf_env}, capture_output=True, text=True, timeout=60,
    )
    assert fill.returncode == 0, fill.stderr
    cached = Path(fill.stdout.strip())
    assert cached.is_file() and str(cached).startswith(hf_env["HF_HOME"])
    gets_before = len(fakehub.cdn_gets())
    with running_hive(env=hf_env) as hive:
        events = _download(hive, REF)
        assert _narration(events, "model_cache_hit") and not _narration(events, "download_start")
        model = hive.http.get("/v1/models").json()["models"][0]
        assert Path(model["local_path"]).resolve() == cached.resolve()
    assert len(fakehub.cdn_gets()) == gets_before
    assert not (rbee_home / "models" / "hf").exists()
