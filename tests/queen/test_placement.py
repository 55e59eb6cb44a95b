"""Placement with no process: which node runs a job that names none, and why."""

from __future__ import annotations

import pytest

from rbee.errors import BackendUnavailableError, NodeUnreachableError
from rbee.queen.placement import NodeView, place

LOCAL = NodeView("localhost", running=False, backends=None, is_local=True)


def view(name: str, **fields: object) -> NodeView:
    return NodeView(name, **{"running": True, "backends": ("cpu",), **fields})  # type: ignore[arg-type]


def test_with_nothing_running_localhost_is_chosen() -> None:
    remote = NodeView("blep", running=False, backends=("cpu", "cuda"))
    choice = place([LOCAL, remote])
    assert choice.node == "localhost" and "no rbee-hive is running" in choice.reason


def test_a_loaded_model_with_a_free_slot_wins() -> None:
    views = [view("localhost", is_local=True, on_disk=True), view("blep", loaded=True, free_slots=2)]
    assert place(views).node == "blep"


def test_the_model_on_disk_beats_a_node_without_it() -> None:
    views = [view("localhost", is_local=True, on_disk=False), view("blep", on_disk=True)]
    choice = place(views)
    assert choice.node == "blep" and "disk" in choice.reason


def test_a_busy_loaded_model_beats_loading_it_from_scratch() -> None:
    views = [view("localhost", is_local=True, on_disk=False), view("blep", loaded=True, free_slots=0)]
    choice = place(views)
    assert choice.node == "blep" and "waits" in choice.reason


def test_a_running_hive_beats_one_that_would_have_to_start() -> None:
    views = [LOCAL, view("blep")]
    assert place(views).node == "blep"


def test_more_free_memory_breaks_a_tie() -> None:
    views = [view("a", memory_free_bytes=1 << 30), view("b", memory_free_bytes=8 << 30)]
    assert place(views).node == "b"


def test_a_backend_only_another_node_has_starts_that_node() -> None:
    remote = NodeView("gpu-box", running=False, backends=("cpu", "cuda"))
    choice = place([LOCAL, remote], backend="cuda")
    assert choice.node == "gpu-box" and "only node" in choice.reason


def test_no_node_with_the_backend_is_one_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="no node offers the metal backend"):
        place([LOCAL, view("blep")], backend="metal")


def test_an_unreachable_node_is_left_out_until_it_answers_again() -> None:
    lost = view("host4", loaded=True, free_slots=4, reachable=False)
    choice = place([view("localhost", is_local=True, on_disk=False), view("host1", on_disk=True), lost])
    assert choice.node == "host1" and "disk" in choice.reason
    assert place([view("host1", on_disk=True), view("host4", loaded=True, free_slots=4)]).node == "host4"


def test_when_every_node_with_the_backend_is_unreachable_the_error_says_so() -> None:
    gpu = NodeView("gpu1", running=False, backends=("cpu", "cuda"), reachable=False)
    with pytest.raises(NodeUnreachableError, match=r"every node with the cuda backend is unreachable now \(gpu1\)"):
        place([LOCAL, gpu], backend="cuda")
