"""A real sshd on 127.0.0.1 for the SSH paths: ``sshd_server`` fixture.

It installs ``openssh-server`` with apt-get when ``sshd`` is missing (tests run as root on
Debian), makes host and user keys (ed25519) in a temporary directory, writes a config that
listens on a free loopback port and accepts only that user key, runs ``sshd -D -e`` in the
foreground, and at the end stops it by PID and checks it is gone (its sessions too).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.processes import RbeeProcess, children_of, wait_gone

SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class SshdServer:
    """How to reach the test sshd."""

    host: str
    port: int
    user: str
    key_path: Path  # the user's private key (its public half is authorized)
    host_public_key: str  # OpenSSH line of the server's host key
    known_hosts: Path  # a known_hosts file naming that key for [host]:port
    pid: int
    home: Path  # HOME of the sessions (a temporary directory, not the user's real one)


POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def ensure_sshd_installed() -> None:
    """Install openssh-server through apt-get when sshd is not there yet.

    Without a ``policy-rc.d`` the package's postinst would start a system sshd on port 22
    that no test stops; a temporary one answering 101 ("action forbidden") prevents that,
    and is removed after the install (an existing one is left as it is).
    """
    if Path(SSHD).exists():
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    ours = not POLICY_RC_D.exists()
    if ours:
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"],
            check=True,
            env=env,
            capture_output=True,
        )
    finally:
        if ours:
            POLICY_RC_D.unlink(missing_ok=True)


def sshd_config(*, address: str, port: int, host_key: Path, pid_file: Path | str, authorized_keys: Path,
                home: Path, accept_env: tuple[str, ...] = ()) -> str:
    """An ``sshd_config`` for a test sshd: one host key, public-key login only with the
    keys of ``authorized_keys`` (root included), no PAM, sessions with HOME=``home``, TCP
    forwarding on (the queen forwards to the hive's port), errors only in the log."""
    return "\n".join([
        f"ListenAddress {address}",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        *(f"AcceptEnv {name}" for name in accept_env),
        f"SetEnv HOME={home}",
        "AllowTcpForwarding yes",
        "LogLevel ERROR",
        "",
    ])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    """A new ed25519 key pair without a passphrase at ``path`` (and ``path``.pub)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _wait_port(port: int, proc: RbeeProcess, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.proc.returncode}: {proc.stderr_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"sshd never listened on port {port}: {proc.stderr_text()[-2000:]}")


@pytest.fixture
def sshd_server(tmp_path: Path) -> Iterator[SshdServer]:
    """A private sshd on 127.0.0.1:<free port>; stopped (sessions included) afterwards."""
    ensure_sshd_installed()
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
    root = tmp_path / "sshd"
    root.mkdir()
    home = root / "home"  # the remote user's HOME: what the queen leaves on a node lands here
    home.mkdir()
    host_key, user_key = root / "host_ed25519", root / "user_ed25519"
    keygen(host_key)
    keygen(user_key)
    authorized = root / "authorized_keys"
    shutil.copy(user_key.with_suffix(".pub"), authorized)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(sshd_config(address="127.0.0.1", port=port, host_key=host_key, pid_file=root / "sshd.pid",
                                  authorized_keys=authorized, home=home, accept_env=("RBEE_HOME",)))
    host_public = host_key.with_suffix(".pub").read_text().split()
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
    proc = RbeeProcess([SSHD, "-D", "-e", "-f", str(config)])
    try:
        _wait_port(port, proc)
        yield SshdServer(
            host="127.0.0.1",
            port=port,
            user=getpass.getuser(),
            key_path=user_key,
            host_public_key=f"{host_public[0]} {host_public[1]}",
            known_hosts=known_hosts,
            pid=proc.pid,
            home=home,
        )
    finally:
        sessions = children_of(proc.pid)
        proc.stop()
        # sshd's per-connection processes end with their connections; check none is left.
        assert not wait_gone(sessions, 10.0), f"sshd sessions still alive: {sessions}"
