"""A Hugging Face Hub that cannot be reached (no network, no DNS, a wrong ``HF_ENDPOINT``)
is one line naming every way out, not ``[Errno -2] Name or service not known``."""

from __future__ import annotations

import socket
from pathlib import Path

from rbee.hive.download import cannot_connect, unreachable_message
from tests.hive.conftest import running_hive
from tests.queen.support import dead_url

REF = "hf:rbee-test/small-GGUF"
WAYS_OUT = ("set HF_ENDPOINT", "HF_HUB_OFFLINE=1", "gemma3-270m", "file:/abs/path.gguf", "RBEE_MODEL_DIRS",
            "rbee-keeper models list")


def test_a_hub_that_cannot_be_reached_is_one_line_naming_every_way_out(rbee_home: Path, tmp_path: Path) -> None:
    hub = dead_url()
    env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf-home"), "RBEE_HOME": str(rbee_home)}
    with running_hive(env=env) as hive:
        download = hive.http.post("/v1/models/download", json={"model": REF})
        spawn = hive.spawn(model=REF)
    for answer in (download, spawn):
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "provision_failed"
        message = error["message"]
        assert message.startswith(f"cannot reach the Hugging Face Hub at {hub} for {REF} (")
        assert "\n" not in message
        for needle in WAYS_OUT:
            assert needle in message, needle


class ConnectError(Exception):
    """Named as httpx's and httpx2's."""


class ConnectionError(OSError):  # noqa: A001 - named as requests' (an OSError, not the builtin)
    """Named as requests'."""


class HTTPStatusError(Exception):
    """An answer that came: not a connection failure."""


def test_connection_failures_are_known_by_name_and_through_their_causes() -> None:
    assert cannot_connect(ConnectError("[Errno -2] Name or service not known"))
    assert cannot_connect(ConnectionError("Max retries exceeded"))
    assert cannot_connect(socket.gaierror(-2, "Name or service not known"))
    assert cannot_connect(ConnectionRefusedError(111, "Connection refused"))
    try:
        try:
            raise ConnectError("refused")
        except ConnectError as exc:
            raise RuntimeError("the Hub call failed") from exc
    except RuntimeError as wrapped:
        assert cannot_connect(wrapped)
    assert not cannot_connect(HTTPStatusError("500 Internal Server Error"))
    assert not cannot_connect(ValueError("bad JSON"))


def test_the_message_keeps_the_cause_even_when_it_has_no_text() -> None:
    assert "(ConnectError)" in unreachable_message(REF, ConnectError())
