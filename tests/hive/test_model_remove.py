"""``DELETE /v1/models?model=REF`` on a real hive: the catalog entry goes, and the file when
rbee put it there; 404 for a model the node lacks, 409 while a worker has it, 400 without
a reference. Each answer is checked against the hive's OpenAPI document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from rbee import openapi
from rbee.narration.events import Done, NarrationEvent
from tests.contract import Contract
from tests.hive.conftest import Hive, running_hive
from tests.hive.fakehub import FakeHub

REF = "hf:rbee-test/small-GGUF"
CANONICAL = "hf:rbee-test/small-GGUF/small-Q4_K_M.gguf"
ROUTE = "/v1/models"


def download(hive: Hive, model: str) -> None:
    started = hive.http.post("/v1/models/download", json={"model": model})
    assert started.status_code == 202, started.text
    events = hive.sse(f"/v1/models/download/{started.json()['download_id']}/progress", seconds=60)
    assert isinstance(events[-1], Done) and any(
        isinstance(e, NarrationEvent) and e.action == "download_complete" for e in events), events[-3:]


def remove(hive: Hive, contract: Contract, model: str | None, status: int) -> dict[str, Any]:
    answer = hive.http.delete(ROUTE, params={} if model is None else {"model": model})
    assert answer.status_code == status, answer.text
    contract.check("DELETE", ROUTE, answer)
    return answer.json()


def references(hive: Hive) -> list[str]:
    return [m["reference"] for m in hive.http.get("/v1/models").json()["models"]]


def test_remove_deletes_rbees_files_and_only_forgets_yours(
    fakehub: FakeHub, hf_env: dict[str, str], rbee_home: Path, small_gguf: Path
) -> None:
    with running_hive(env=hf_env) as hive:
        contract = Contract(httpx.get(hive.url + openapi.OPENAPI_PATH).json())
        download(hive, REF)
        download(hive, f"file:{small_gguf}")
        assert references(hive) == [f"file:{small_gguf}", CANONICAL]  # by reference
        downloaded = rbee_home / "models" / "hf" / "rbee-test" / "small-GGUF" / "small-Q4_K_M.gguf"
        assert downloaded.is_file()

        # By the alias it was asked for: the file rbee downloaded goes, and its empty folders.
        removed = remove(hive, contract, REF, 200)
        assert removed == {"reference": CANONICAL, "local_path": str(downloaded), "size": small_gguf.stat().st_size,
                           "file_deleted": True}
        assert not downloaded.exists() and not (rbee_home / "models" / "hf" / "rbee-test").exists()
        assert references(hive) == [f"file:{small_gguf}"]
        said = hive.proc.wait_for_action("model_removed", 10)
        assert said["target"] == CANONICAL and said["file_deleted"] is True

        # A file: model is yours: it is forgotten, its file stays.
        removed = remove(hive, contract, f"file:{small_gguf}", 200)
        assert removed["file_deleted"] is False and small_gguf.is_file()
        assert references(hive) == []

        # Gone now, never there, malformed, or not said at all.
        for model in (REF, CANONICAL, "hf:rbee-test/other-GGUF"):
            error = remove(hive, contract, model, 404)["error"]
            assert error["code"] == "model_not_found" and "models list" in error["message"]
        assert remove(hive, contract, "ollama:llama3", 400)["error"]["param"] == "model"
        missing = remove(hive, contract, None, 400)["error"]
        assert missing["param"] == "model" and "?model=" in missing["message"]
        # The download can be had again (nothing of the old one is in the way).
        download(hive, REF)
        assert downloaded.is_file() and references(hive) == [CANONICAL]


@pytest.mark.model
def test_a_model_a_worker_has_loaded_is_refused_with_409(rbee_home: Path) -> None:
    with running_hive() as hive:
        contract = Contract(httpx.get(hive.url + openapi.OPENAPI_PATH).json())
        spawned = hive.spawn()
        assert spawned.status_code == 201, spawned.text
        worker_id = spawned.json()["worker_id"]
        hive.wait_state(worker_id, "idle", 60)
        refused = remove(hive, contract, "gemma3-270m", 409)["error"]
        assert refused["code"] == "model_in_use" and worker_id in refused["message"]
        assert "workers shutdown --worker-id" in refused["message"]
        assert refused["details"] == {"workers": [worker_id]}
        assert references(hive) == ["gemma3-270m"]

        assert hive.http.post(f"/v1/workers/{worker_id}/shutdown").status_code == 200
        removed = remove(hive, contract, "gemma3-270m", 200)
        assert removed["file_deleted"] is True and not Path(removed["local_path"]).exists()
        assert references(hive) == []
