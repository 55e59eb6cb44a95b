"""A cluster of four real hosts on one machine, and one of them cut off in the middle of a job.

The hosts are network namespaces on a bridge, each with its own address and sshd
(``tests/netns_hosts.py``); the queen, keepers, hives and workers are the real programs,
the model the real embedded one. Each host is added over SSH with ``rbee-keeper setup
add-node``, gets a job, and one host's link goes down while its job streams: that job fails
naming the node within 15 s, the others finish, the node shows as unreachable and new jobs
go elsewhere; the cut-off hive stops its workers when the queen's heartbeat stops; the node
is used again once it is back, with no restart of the queen; nothing is left anywhere.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.netns_hosts import NetnsCluster, netns_cluster  # noqa: F401  (the fixture)
from tests.processes import RbeeProcess, pid_alive, program, wait_gone
from tests.queen.support import keeper_env, start_queen, wait_no_rbee_processes

#: Short liveness settings so the test is quick (the defaults are 1 s x 3 and 10 s).
QUEEN_FLAGS = ("--ssh-keepalive-interval", "1", "--ssh-keepalive-count", "2", "--hive-heartbeat-timeout", "4")
RBEE_PROGRAMS = ("rbee-hive", "llm-worker-rbee")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def rbee_on(bed: NetnsCluster, host) -> list[int]:  # type: ignore[no-untyped-def]
    """The hive and worker processes running on ``host`` now."""
    return [p for p in bed.pids(host) if any(name in _cmdline(p) for name in RBEE_PROGRAMS)]


def keeper(home: Path, url: str, *args: str) -> RbeeProcess:
    return RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home, url))


def infer(home: Path, url: str, node: str | None, max_tokens: int) -> RbeeProcess:
    where = ("--node", node) if node else ()
    return keeper(home, url, "infer", *where, "--model", "gemma3-270m", "--prompt", "Tell me about bees.",
                  "--max-tokens", str(max_tokens), "--temperature", "0")


def add_node(home: Path, url: str, host) -> RbeeProcess:  # type: ignore[no-untyped-def]
    return keeper(home, url, "setup", "add-node", host.name, "--ssh-host", host.address, "--ssh-port",
                  str(host.ssh_port), "--ssh-user", host.user, "--ssh-key", str(host.key_path),
                  "--rbee-hive-command", host.rbee_hive_command)


def wait_for(predicate, seconds: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {seconds} s")


def actions(queen: RbeeProcess, action: str) -> list[dict]:
    return [o for o in queen.json_lines() if o.get("action") == action]


def test_four_hosts_one_cut_off_mid_job(rbee_home: Path, netns_cluster) -> None:  # noqa: F811
    bed = netns_cluster(4)
    hosts = bed.hosts
    queen = start_queen(rbee_home, *QUEEN_FLAGS)
    try:
        url = queen.bound_url()
        with ThreadPoolExecutor(len(hosts)) as pool:
            adds = list(pool.map(lambda h: add_node(rbee_home, url, h), hosts))
        for add in adds:
            assert add.wait(120) == 0, add.stderr_text()
        nodes = httpx.get(f"{url}/v1/nodes").json()["nodes"]
        assert sorted(n["name"] for n in nodes) == ["host1", "host2", "host3", "host4", "localhost"]

        # A job to each host at once; host4's is long, and its link goes down mid-stream.
        victim = bed.host("host4")
        jobs = {h.name: infer(rbee_home, url, h.name, 400 if h is victim else 12) for h in hosts}

        def streaming_on_victim() -> bool:
            workers = httpx.get(f"{url}/v1/workers").json()["workers"]
            return any(w["node"] == victim.name and w["slots"]["busy"] for w in workers)

        wait_for(streaming_on_victim, 240, "a job streaming on host4")
        time.sleep(1.0)  # tokens flow
        victim_rbee = rbee_on(bed, victim)
        assert len(victim_rbee) >= 2, "host4 should run a hive and a worker"
        # The queen started the hive to stop on a silent queen, and to end a stale hive first.
        hive_lines = [_cmdline(p) for p in victim_rbee if "rbee-hive" in _cmdline(p)]
        assert hive_lines and all("--heartbeat-timeout 4 --replace-stale" in c for c in hive_lines), hive_lines
        bed.cut(victim)
        cut_at = time.monotonic()

        assert jobs[victim.name].wait(60) == 1
        failed_after = time.monotonic() - cut_at
        assert failed_after < 15, f"the job on the cut-off node ended only after {failed_after:.1f} s"
        failure = [line for line in jobs[victim.name].stderr_lines if "Failed: infer" in line]
        assert len(failure) == 1 and "node host4 became unreachable" in failure[0], jobs[victim.name].stderr_text()
        for name, job in jobs.items():
            if name != victim.name:
                assert job.wait(240) == 0, (name, job.stderr_text())
                assert "".join(job.stdout_lines).strip(), name

        # The queen marks it unreachable and says why; placement leaves it out.
        said = actions(queen, "node_unreachable")
        assert [o["node"] for o in said] == ["host4"] and "keepalive" in said[0]["human"]
        elsewhere = keeper(rbee_home, url, "infer", "--model", "gemma3-270m", "--prompt", "hi", "--max-tokens", "4",
                           "--temperature", "0")
        assert elsewhere.wait(120) == 0, elsewhere.stderr_text()
        routed = [line for line in elsewhere.stderr_lines if "Routing job to node" in line]
        assert routed and "host4" not in routed[0], elsewhere.stderr_text()

        # The cut-off side does not live on: no heartbeat, so the hive stops its workers.
        assert wait_gone(victim_rbee, 4 + 15) == [], [(_cmdline(p), p) for p in victim_rbee if pid_alive(p)]

        # Back on the network: the queen sees it answer and uses it again.
        bed.restore(victim)
        wait_for(lambda: actions(queen, "node_reachable"), 30, "the queen seeing host4 again")
        again = infer(rbee_home, url, victim.name, 4)
        assert again.wait(240) == 0, again.stderr_text()
        status = httpx.get(f"{url}/v1/status").json()
        row = next(n for n in status["nodes"] if n["name"] == "host4")
        assert row["hive_up"] is True and row["reachable"] is True, json.dumps(row)
    finally:
        queen.stop(grace=60)
    # The queen's shutdown stopped every hive over SSH; nothing of ours runs anywhere.
    for host in hosts:
        assert wait_gone(rbee_on(bed, host), 20) == [], host.name
    assert not wait_no_rbee_processes(rbee_home, 20)
