"""The netns test bed itself: two real hosts, each with its own address and sshd running the
installed rbee-hive; a cut host goes silent and comes back; teardown leaves nothing; without
root it says so."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.netns_hosts import NetnsCluster, NetnsUnavailable, netns_cluster  # noqa: F401 (the fixture)
from tests.processes import pid_alive


def _ssh(bed: NetnsCluster, host, command: str, *options: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([*bed.ssh_argv(host, *options), command], capture_output=True, text=True, timeout=timeout)


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_two_hosts_answer_go_silent_when_cut_and_leave_nothing(netns_cluster) -> None:  # noqa: F811
    bed = netns_cluster(2)
    first, second = bed.hosts
    assert (first.name, second.name) == ("host1", "host2")
    assert first.address != second.address and first.namespace != second.namespace
    assert all(ipaddress.ip_address(h.address) in bed.subnet for h in bed.hosts)

    # The real sshd of each host runs the real installed rbee-hive, in that host's namespace.
    for host in bed.hosts:
        done = _ssh(bed, host, f"{host.rbee_hive_command} detect")
        assert done.returncode == 0, done.stderr
        facts = json.loads(done.stdout)
        assert "cpu" in facts["backends"]
        sshd_pids = bed.pids(host)
        assert sshd_pids, f"nothing runs in {host.namespace}"
    # A session sees the host's own address, not the other's (it is a namespace of its own).
    addresses = _ssh(bed, first, "ip -4 -o addr show").stdout
    assert first.address in addresses and second.address not in addresses

    # Cut: the host stops answering (a timeout, not a refusal); the other one still answers.
    bed.cut(first)
    started = time.monotonic()
    cut = _ssh(bed, first, "true", "-o", "ConnectTimeout=2")
    assert cut.returncode == 255, cut.stderr
    assert "timed out" in cut.stderr or "No route to host" in cut.stderr, cut.stderr
    assert time.monotonic() - started < 10
    assert _ssh(bed, second, "true").returncode == 0
    bed.restore(first)
    back = _ssh(bed, first, "true", "-o", "ConnectTimeout=5")
    assert back.returncode == 0, back.stderr

    # Teardown removes every process, namespace, link and file of the run; a second one is a no-op.
    pids = [p for h in bed.hosts for p in bed.pids(h)]
    bed.teardown()
    bed.teardown()
    assert not [p for p in pids if pid_alive(p)]
    assert f"rbee-{bed.tag}-" not in _ip("netns", "list")
    links = _ip("-o", "link", "show")
    assert f"rb{bed.tag}" not in links and f"rv{bed.tag}" not in links
    assert not bed.root.exists()


def test_without_root_the_bed_says_so_and_how_to_fix_it(tmp_path: Path) -> None:
    # The same code with this process's effective user set to nobody for the call (the real
    # uid stays root, so it can be set back). Not a subprocess as nobody: the tox
    # environment's folder is root's alone, so such a process could not import anything.
    os.seteuid(65534)
    try:
        with pytest.raises(NetnsUnavailable) as refused:
            NetnsCluster.create(2, tmp_path)
    finally:
        os.seteuid(0)
    said = str(refused.value)
    assert said.startswith("the netns test bed needs root") and "run it as root" in said
    assert "\n" not in said and not list(tmp_path.iterdir())
