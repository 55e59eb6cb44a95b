"""The node registry in a real SQLite file, and SSH probing against a real sshd."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from rbee.errors import InvalidRequestError, NodeExistsError, NotFoundError, StateError
from rbee.queen.asyncio_bridge import AsyncioBridge
from rbee.queen.nodes import LOCALHOST, Node, NodeRegistry, read_nodes, validate_node_fields
from rbee.errors import NodeUnreachableError
from rbee.queen.ssh import probe_node


def test_localhost_is_built_in_and_first(tmp_path: Path) -> None:
    registry = NodeRegistry(tmp_path / "nodes.db", local_hive_command="/opt/bin/rbee-hive")
    nodes = registry.list()
    assert [n.name for n in nodes] == [LOCALHOST]
    assert nodes[0].is_local and nodes[0].rbee_hive_command == "/opt/bin/rbee-hive"
    with pytest.raises(InvalidRequestError):
        registry.remove(LOCALHOST)


def test_put_get_list_remove_survive_reopening(tmp_path: Path) -> None:
    db = tmp_path / "nodes.db"
    registry = NodeRegistry(db)
    stored = registry.put(
        Node(name="mac", ssh_host="mac.lan", ssh_port=2222, ssh_user="vince", ssh_key="/k", host_key="ssh-ed25519 AAAA",
             rbee_hive_command="env RBEE_HOME=/x /opt/rbee-hive", detect={"hostname": "mac", "backends": ["metal", "cpu"]})
    )
    assert stored.added_at_ms > 0
    again = NodeRegistry(db)  # a new queen on the same RBEE_HOME sees it
    mac = again.get("mac")
    assert mac == stored
    assert not mac.is_local and mac.detect["backends"] == ["metal", "cpu"]
    assert [n.name for n in again.list()] == [LOCALHOST, "mac"]
    again.remove("mac")
    with pytest.raises(NotFoundError, match="setup add-node mac"):
        again.get("mac")
    with pytest.raises(NotFoundError):
        again.remove("mac")


def test_nodes_are_listed_as_a_person_counts_and_a_host_or_name_is_taken_once(tmp_path: Path) -> None:
    registry = NodeRegistry(tmp_path / "nodes.db")
    for i in (10, 2, 1):
        registry.put(Node(name=f"host{i}", ssh_host=f"10.0.0.{i}", rbee_hive_command="rbee-hive"))
    assert [n.name for n in registry.list()] == [LOCALHOST, "host1", "host2", "host10"]
    assert [n.name for n in read_nodes(tmp_path / "nodes.db")] == [LOCALHOST, "host1", "host2", "host10"]
    with pytest.raises(NodeExistsError, match="node host2 already exists .*remove-node host2"):
        registry.check_new(Node(name="host2", ssh_host="10.0.0.99"))
    with pytest.raises(NodeExistsError, match="10.0.0.2:22 is already node host2: one machine is one node"):
        registry.check_new(Node(name="twin", ssh_host="10.0.0.2"))
    registry.check_new(Node(name="twin", ssh_host="10.0.0.2", ssh_port=2222))  # another sshd: another node


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ssh_host": "h"}, "name"),
        ({"name": "localhost", "ssh_host": "h"}, "name"),
        ({"name": "bad name!", "ssh_host": "h"}, "name"),
        ({"name": "n"}, "ssh_host"),
        ({"name": "n", "ssh_host": "-oProxyCommand=x"}, "ssh_host"),
        ({"name": "n", "ssh_host": "h", "ssh_port": 70000}, "ssh_port"),
        ({"name": "n", "ssh_host": "h", "hive_port": -1}, "hive_port"),
    ],
)
def test_invalid_node_bodies_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_node_fields(body)
    assert field in [d["field"] for d in info.value.details]


@pytest.mark.sshd
def test_probe_pins_the_host_key_and_refuses_a_wrong_one_or_a_wrong_user(sshd_server) -> None:
    s = sshd_server
    # A stand-in for `rbee-hive detect` that prints JSON: this test is about SSH itself.
    fake_detect = """printf '{"hostname":"n1","backends":["cpu"]}' #"""
    node = Node(name="n1", ssh_host=s.host, ssh_port=s.port, ssh_user=s.user, ssh_key=str(s.key_path),
                rbee_hive_command=fake_detect)

    async def main() -> None:
        bridge = AsyncioBridge()
        try:
            with trio.fail_after(30):
                detect, host_key = await probe_node(bridge, node)
                assert detect == {"hostname": "n1", "backends": ["cpu"]}
                assert host_key == s.host_public_key
                pinned = Node(**{**node.public(), "host_key": host_key})
                assert (await probe_node(bridge, pinned))[0]["hostname"] == "n1"
                impostor_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOmBlTfdXFqjJ1JqV8xqJRbbjKJ8WZxU9Jm5e7GRfNTZ"
                with pytest.raises(NodeUnreachableError, match="host key"):
                    await probe_node(bridge, Node(**{**node.public(), "host_key": impostor_key}))
                with pytest.raises(NodeUnreachableError, match="--ssh-user and --ssh-key"):
                    await probe_node(bridge, Node(**{**node.public(), "ssh_user": "nobody"}))
                with pytest.raises(NodeUnreachableError, match="--rbee-hive-command"):
                    await probe_node(bridge, Node(**{**node.public(), "rbee_hive_command": "/nonexistent/rbee-hive"}))
        finally:
            bridge.close()

    trio.run(main)


def test_a_damaged_registry_is_set_aside_by_the_queen_and_refused_to_anyone_else(tmp_path: Path) -> None:
    db = tmp_path / "nodes.db"
    NodeRegistry(db).put(Node(name="mac", ssh_host="mac.lan"))
    damaged = b"SQLite format 3\0" + b"\xff" * 4000  # a header, then nothing a database holds
    db.write_bytes(damaged)
    with pytest.raises(StateError, match="nodes.db is damaged") as caught:
        NodeRegistry(db)  # the keeper reading it: it moves nothing
    assert "start queen-rbee" in caught.value.message and db.read_bytes() == damaged
    registry = NodeRegistry(db, set_aside_damaged=True)  # the queen
    assert registry.set_aside is not None and registry.set_aside.name.startswith("nodes.db.corrupt-")
    assert registry.set_aside.read_bytes() == damaged and registry.damage
    assert [n.name for n in registry.list()] == [LOCALHOST]
    registry.put(Node(name="mac", ssh_host="mac.lan"))  # the new registry takes nodes again
    assert NodeRegistry(db).get("mac").ssh_host == "mac.lan"
