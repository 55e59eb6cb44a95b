"""``rbee-keeper setup add-node`` when it cannot be done: one line each, naming the fix.

A real keeper, a real persistent queen and a real sshd on loopback: the same host added
twice (under its name, then under another), a key the node does not accept, a node where
the ``rbee-hive`` command is missing.
"""

from __future__ import annotations

from pathlib import Path

from tests.processes import RbeeProcess, program
from tests.queen.support import dead_url, keeper_env, wait_no_rbee_processes
from tests.sshd import keygen


def _keeper(home: Path, url: str, *args: str) -> RbeeProcess:
    return RbeeProcess([program("rbee-keeper"), *args], env=keeper_env(home, url))


def _error_line(proc: RbeeProcess) -> str:
    assert proc.wait(120) == 1, proc.stderr_text()
    errors = [line for line in proc.stderr_lines if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr_text(), proc.stderr_text()
    return errors[0]


def test_add_node_refusals_are_one_line_each(rbee_home: Path, sshd_server, tmp_path: Path) -> None:
    s = sshd_server
    url = dead_url()
    hive = f"env RBEE_HOME={rbee_home} {program('rbee-hive')}"
    base = ["--ssh-host", s.host, "--ssh-port", str(s.port), "--ssh-user", s.user]
    assert _keeper(rbee_home, url, "queen", "start").wait(60) == 0
    try:
        added = _keeper(rbee_home, url, "setup", "add-node", "blep", *base, "--ssh-key", str(s.key_path),
                        "--rbee-hive-command", hive)
        assert added.wait(120) == 0, added.stderr_text()

        again = _error_line(_keeper(rbee_home, url, "setup", "add-node", "blep", *base, "--ssh-key", str(s.key_path),
                                    "--rbee-hive-command", hive))
        assert "node blep already exists" in again and "remove-node blep" in again

        twin = _error_line(_keeper(rbee_home, url, "setup", "add-node", "blep2", *base, "--ssh-key", str(s.key_path),
                                   "--rbee-hive-command", hive))
        assert f"{s.host}:{s.port} is already node blep" in twin and "one machine is one node" in twin

        stranger = tmp_path / "stranger_ed25519"
        keygen(stranger)
        # Another name and port form for the same sshd would be refused as a twin; a key
        # check needs a host not yet known, so blep goes first.
        assert _keeper(rbee_home, url, "setup", "remove-node", "blep").wait(60) == 0
        wrong_key = _error_line(_keeper(rbee_home, url, "setup", "add-node", "blep", *base, "--ssh-key", str(stranger),
                                        "--rbee-hive-command", hive))
        assert "SSH to node 'blep'" in wrong_key and "--ssh-key" in wrong_key and "authorized_keys" in wrong_key

        missing = _error_line(_keeper(rbee_home, url, "setup", "add-node", "blep", *base, "--ssh-key", str(s.key_path),
                                      "--rbee-hive-command", "/nonexistent/rbee-hive"))
        assert "/nonexistent/rbee-hive detect" in missing and "--rbee-hive-command" in missing

        listed = _keeper(rbee_home, url, "setup", "list-nodes", "--json")
        assert listed.wait(60) == 0 and '"blep"' not in "\n".join(listed.stdout_lines)
    finally:
        assert _keeper(rbee_home, url, "queen", "stop").wait(60) == 0
    assert not wait_no_rbee_processes(rbee_home, 20)
