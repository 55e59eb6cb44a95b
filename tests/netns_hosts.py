"""A test bed of real hosts on one machine: network namespaces joined by a bridge, each with
its own address and its own sshd (``NetnsCluster``, and the ``netns_cluster`` fixture).

Every host is a network namespace ``rbee-<tag>-<i>`` with ``lo`` up and one veth whose peer
is a port of the bridge ``rb<tag>`` in the root namespace; the bridge holds ``.1`` of a /24
picked in 10.0.0.0/8 that no interface or route of the machine touches, the hosts ``.2``
onwards. In each namespace ``sshd -D -e`` listens on the host's address, port 22, with a
host key of its own; one user key (the bed's) is authorized everywhere. So the queen
reaches each host as it would a machine of a real cluster (its own IP, SSH, a hive started
over SSH), and ``cut(host)`` takes the host off the network without a word (its bridge port
goes down: packets vanish, no RST, no ICMP from the host), as a pulled cable does.

All hosts run the same installed rbee (the ``bin`` folder of this interpreter): a host's
``rbee_hive_command`` sets its own ``RBEE_HOME`` and the bed's shared, read-only models
folder (``RBEE_MODEL_DIRS``, the embedded model assembled once) in front of ``rbee-hive``.

Every name the bed makes carries its run tag (6 random hex digits), and the tag is recorded
with the PID of the process that owns it under ``/run/rbee-netns`` before anything is made:
``teardown()`` and ``sweep_stale()`` touch only the names of their own tags (a sweep: only
tags whose owner is dead), never anything else of the machine. It needs root and iproute2
(``ip netns``, veth, bridge); without them it fails with one line saying why and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.processes import RbeeProcess, pid_alive, wait_gone
from tests.sshd import SSHD, ensure_sshd_installed, keygen, sshd_config

#: Where each run records its tag and owner (tmpfs: gone at reboot, with the namespaces).
REGISTRY = Path("/run/rbee-netns")
SSH_PORT = 22
#: The most hosts one /24 holds (.1 is the bridge, .255 the broadcast).
MAX_HOSTS = 253
#: How long an sshd may take to listen, and processes to exit after SIGTERM / SIGKILL.
SSHD_START_S = 20.0
TERM_GRACE_S = 5.0
KILL_GRACE_S = 5.0

TAG_PATTERN = "[0-9a-f]{6}"


class NetnsUnavailable(RuntimeError):
    """The machine cannot hold the bed (no root, no ``ip``, no namespaces, no sshd): the
    message is one line with the cause and the fix."""


def namespace_name(tag: str, index: int) -> str:
    return f"rbee-{tag}-{index}"


def bridge_name(tag: str) -> str:
    return f"rb{tag}"


def bridge_port_name(tag: str, index: int) -> str:
    """The bridge side of host ``index``'s veth (interface names are at most 15 bytes)."""
    return f"rv{tag}-{index}"


def host_side_name(tag: str, index: int) -> str:
    return f"rn{tag}-{index}"


def ip_command() -> str:
    """The absolute path of iproute2's ``ip`` (``NetnsUnavailable`` when there is none or
    when we are not root)."""
    if os.geteuid() != 0:
        raise NetnsUnavailable(
            f"the netns test bed needs root (it creates network namespaces, veth pairs and a bridge;"
            f" running as uid {os.geteuid()}); run it as root (sudo -E ...)"
        )
    # sbin is not on every PATH (sudo, a login shell of a plain user): look there too.
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which("ip", path=search)
    if found is None and shutil.which("apt-get"):
        # A fresh Debian machine may lack it: install it as the sshd fixture installs sshd.
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "iproute2"],
                       env=env, capture_output=True, check=False)
        found = shutil.which("ip", path=search)
    if found is None:
        raise NetnsUnavailable(
            "the netns test bed needs iproute2's `ip` command, which is not installed;"
            " install it (apt-get install iproute2)"
        )
    return found


def _run_ip(ip: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([ip, *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (with the PID, it names one process for good)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    """One bed at a time picks its subnet and writes or sweeps records (a second run on the
    machine must not pick the same /24, nor sweep a tag being created)."""
    REGISTRY.mkdir(mode=0o700, exist_ok=True)
    with open(REGISTRY / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _networks_in_use(ip: str) -> list[ipaddress.IPv4Network]:
    """Every IPv4 address and prefix that the machine's addresses and routes mention (all
    tables): a candidate /24 overlapping any of them is not taken."""
    text = _run_ip(ip, "-4", "-o", "addr", "show").stdout + _run_ip(ip, "-4", "route", "show", "table", "all").stdout
    found = []
    for match in re.finditer(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?)(?![\d.])", text):
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network(match.group(1), strict=False))
    return found


def _free_subnet(ip: str) -> ipaddress.IPv4Network:
    used = _networks_in_use(ip)
    rng = random.SystemRandom()
    for _ in range(500):
        candidate = ipaddress.IPv4Network(f"10.{rng.randrange(1, 255)}.{rng.randrange(0, 256)}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsUnavailable(
        "no free /24 in 10.0.0.0/8 for the netns test bed (the machine's addresses or routes cover"
        " it); remove the route that covers 10.0.0.0/8 or run the bed on another machine"
    )


def _tags_of(ip: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Our namespaces and links now, by tag: ({tag: [netns]}, {tag: [bridge, veths]})."""
    namespaces: dict[str, list[str]] = {}
    for line in _run_ip(ip, "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if m := re.fullmatch(rf"rbee-({TAG_PATTERN})-\d+", name):
            namespaces.setdefault(m.group(1), []).append(name)
    links: dict[str, list[str]] = {}
    for line in _run_ip(ip, "-o", "link", "show").stdout.splitlines():
        fields = line.split(":", 2)
        if len(fields) < 2:
            continue
        name = fields[1].strip().split("@")[0]
        if m := re.fullmatch(rf"rb({TAG_PATTERN})|rv({TAG_PATTERN})-\d+", name):
            links.setdefault(m.group(1) or m.group(2), []).append(name)
    return namespaces, links


def _namespace_pids(ip: str, namespace: str) -> list[int]:
    """The live processes in ``namespace`` (``ip netns pids``)."""
    done = _run_ip(ip, "netns", "pids", namespace, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit() and pid_alive(int(p))]


def _kill_all(ip: str, namespaces: list[str], extra: list[int]) -> list[int]:
    """SIGTERM, then SIGKILL, every process in ``namespaces`` and the ``extra`` PIDs; returns
    the ones still alive after both (none, unless something is stuck in the kernel)."""

    def alive() -> list[int]:
        pids = {p for ns in namespaces for p in _namespace_pids(ip, ns)}
        pids.update(p for p in extra if pid_alive(p))
        return sorted(pids)

    for signum, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        pids = alive()
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        wait_gone(pids, grace)
    return alive()


def _remove_tree(path: Path) -> None:
    """Remove a bed's folder, the read-only models folder in it too."""
    if not path.exists():
        return
    for folder, dirs, _files in os.walk(path):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(folder, d), 0o755)
    shutil.rmtree(path, ignore_errors=True)


def _remove_tag(ip: str, tag: str, namespaces: list[str], links: list[str], extra_pids: list[int]) -> list[str]:
    """Kill the processes of one tag's namespaces and delete its namespaces and links;
    returns what could not be removed, in words."""
    problems = []
    left = _kill_all(ip, namespaces, extra_pids)
    if left:
        problems.append(f"processes still alive after SIGKILL: {left}")
    for ns in namespaces:
        done = _run_ip(ip, "netns", "delete", ns, check=False)
        if done.returncode != 0 and "No such file" not in done.stderr:
            problems.append(f"netns {ns}: {done.stderr.strip()}")
    # Deleting a namespace deletes its veth pair with it; the bridge goes by itself.
    for link in links:
        done = _run_ip(ip, "link", "delete", link, check=False)
        if done.returncode != 0 and "Cannot find device" not in done.stderr:
            problems.append(f"link {link}: {done.stderr.strip()}")
    return problems


def sweep_stale() -> list[str]:
    """Remove what crashed runs of this module left: the namespaces, links, processes and
    folder of every tag whose recorded owner process is dead. A tag with a live owner, and
    any name without a record of ours, is left alone. Returns the tags swept."""
    ip = ip_command()
    swept = []
    with _registry_lock():
        namespaces, links = _tags_of(ip)
        for record_path in sorted(REGISTRY.glob("*.json")):
            try:
                record = json.loads(record_path.read_text())
                tag, pid, start = str(record["tag"]), int(record["pid"]), record["start"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a record of ours: not ours to act on
            if not re.fullmatch(TAG_PATTERN, tag) or record_path.stem != tag:
                continue
            if pid_alive(pid) and _start_time(pid) == start:
                continue  # its run is still going
            problems = _remove_tag(ip, tag, namespaces.get(tag, []), links.get(tag, []), [])
            root = Path(str(record.get("root", "")))
            if root.is_absolute() and (root / f".rbee-netns-{tag}").is_file():
                _remove_tree(root)
            if problems:
                print(f"netns bed: could not sweep run {tag}: {'; '.join(problems)}", file=sys.stderr)
                continue
            record_path.unlink(missing_ok=True)
            swept.append(tag)
    return swept


@dataclass(frozen=True)
class Host:
    """One host of the bed: how to reach it, and what runs rbee there."""

    name: str  # host1, host2 ...
    namespace: str
    address: str  # its own IPv4 address on the bridge's /24
    ssh_port: int
    user: str
    key_path: Path  # the bed's user key (authorized on every host)
    home: Path  # HOME of its SSH sessions
    rbee_home: Path  # its own RBEE_HOME (HOME/.rbee)
    #: For ``rbee-keeper setup add-node --rbee-hive-command``: its environment, then rbee-hive.
    rbee_hive_command: str
    host_public_key: str  # "ssh-ed25519 AAAA..." of its sshd
    bridge_port: str  # the bridge side of its veth (``cut`` sets it down)


class NetnsCluster:
    """N hosts in network namespaces on one bridge; see the module doc.

    ``NetnsCluster.create(n, root_dir)`` builds it (and tears down what it made if that
    fails); ``teardown()`` removes it all and may be called any number of times; ``with
    NetnsCluster.create(...) as bed:`` does both.
    """

    def __init__(self, root_dir: Path) -> None:
        self.ip = ip_command()
        self.tag = secrets.token_hex(3)
        #: Everything on disk: removed by ``teardown``.
        self.root = Path(root_dir).resolve() / f"rbee-netns-{self.tag}"
        self.bridge = bridge_name(self.tag)
        self.hosts: list[Host] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge_address = ""
        self.models_dir = self.root / "models"
        self.key_path = self.root / "ssh" / "user_ed25519"
        #: The host key of every host, for ``ssh -o UserKnownHostsFile=``.
        self.known_hosts = self.root / "ssh" / "known_hosts"
        self.user = getpass.getuser()
        self._namespaces: list[str] = []
        self._sshd: dict[str, RbeeProcess] = {}
        self._record = REGISTRY / f"{self.tag}.json"
        self._torn_down = False

    # -- building -----------------------------------------------------------------------

    @classmethod
    def create(cls, n: int, root_dir: Path) -> "NetnsCluster":
        """Sweep stale runs, then build ``n`` hosts under ``root_dir`` (see the module doc)."""
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"a bed holds 1 to {MAX_HOSTS} hosts, not {n}")
        sweep_stale()
        try:
            ensure_sshd_installed()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise NetnsUnavailable(
                f"the netns test bed needs sshd ({SSHD}) and could not install it ({exc});"
                " install openssh-server (apt-get install openssh-server)"
            ) from None
        bed = cls(root_dir)
        try:
            bed._build(n)
        except BaseException:
            bed.teardown()
            raise
        return bed

    def _build(self, n: int) -> None:
        self.root.mkdir(parents=True)
        (self.root / f".rbee-netns-{self.tag}").write_text(f"{os.getpid()}\n")  # sweep_stale's proof
        with _registry_lock():
            # Recorded before any name exists: a crash from here on is swept next time.
            self._record.write_text(json.dumps(
                {"tag": self.tag, "pid": os.getpid(), "start": _start_time(os.getpid()), "root": str(self.root)}
            ))
            self.subnet = _free_subnet(self.ip)
            self._make_bridge()
        self._make_keys()
        addresses = list(self.subnet.hosts())[1:]
        bin_dir = Path(sys.executable).parent  # the same installed rbee on every host
        for index in range(1, n + 1):
            self._make_host(index, str(addresses[index - 1]), bin_dir)
        # ssh writes port 22 as the bare address, any other as [address]:port.
        self.known_hosts.write_text("".join(
            f"{h.address if h.ssh_port == 22 else f'[{h.address}]:{h.ssh_port}'} {h.host_public_key}\n"
            for h in self.hosts
        ))
        self._make_models()
        for host in self.hosts:  # started together, waited for together
            self._start_sshd(host)
        for host in self.hosts:
            self._wait_sshd(host)

    def _make_bridge(self) -> None:
        assert self.subnet is not None
        self.bridge_address = str(next(self.subnet.hosts()))
        try:
            # forward_delay 0: a port that comes back up (``restore``) forwards at once.
            _run_ip(self.ip, "link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
        except RuntimeError as exc:
            raise NetnsUnavailable(f"cannot create a bridge ({exc}); the bed needs the kernel's bridge"
                                   " support and CAP_NET_ADMIN: run it as root on a host or a privileged container") from None
        _run_ip(self.ip, "addr", "add", f"{self.bridge_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run_ip(self.ip, "link", "set", self.bridge, "up")

    def _make_keys(self) -> None:
        (self.root / "ssh").mkdir()
        keygen(self.key_path)
        shutil.copy(self.key_path.with_suffix(".pub"), self.root / "ssh" / "authorized_keys")

    def _make_host(self, index: int, address: str, bin_dir: Path) -> None:
        assert self.subnet is not None
        name, ns = f"host{index}", namespace_name(self.tag, index)
        port, inside = bridge_port_name(self.tag, index), host_side_name(self.tag, index)
        try:
            _run_ip(self.ip, "netns", "add", ns)
        except RuntimeError as exc:
            raise NetnsUnavailable(f"cannot create a network namespace ({exc}); the bed needs CAP_SYS_ADMIN"
                                   " and CAP_NET_ADMIN: run it as root on a host or a privileged container") from None
        self._namespaces.append(ns)
        _run_ip(self.ip, "link", "add", port, "type", "veth", "peer", "name", inside, "netns", ns)
        _run_ip(self.ip, "link", "set", port, "master", self.bridge)
        _run_ip(self.ip, "link", "set", port, "up")
        _run_ip(self.ip, "-n", ns, "link", "set", "lo", "up")
        _run_ip(self.ip, "-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inside)
        _run_ip(self.ip, "-n", ns, "link", "set", inside, "up")

        folder = self.root / name
        home = folder / "home"
        rbee_home = home / ".rbee"
        rbee_home.mkdir(parents=True)
        host_key = folder / "host_ed25519"
        keygen(host_key)
        config = folder / "sshd_config"
        config.write_text(sshd_config(address=address, port=SSH_PORT, host_key=host_key, pid_file="none",
                                      authorized_keys=self.root / "ssh" / "authorized_keys", home=home))
        command = shlex.join([
            "env", f"RBEE_HOME={rbee_home}", f"RBEE_MODEL_DIRS={self.models_dir}", str(bin_dir / "rbee-hive"),
        ])
        public = host_key.with_suffix(".pub").read_text().split()
        self.hosts.append(Host(
            name=name, namespace=ns, address=address, ssh_port=SSH_PORT, user=self.user, key_path=self.key_path,
            home=home, rbee_home=rbee_home, rbee_hive_command=command, host_public_key=f"{public[0]} {public[1]}",
            bridge_port=port,
        ))

    def _make_models(self) -> None:
        from rbee.hive.embedded import assemble_embedded

        self.models_dir.mkdir()
        assemble_embedded(self.models_dir)
        self.models_dir.chmod(0o555)  # shared by every hive, written by none

    def _start_sshd(self, host: Host) -> None:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
        config = self.root / host.name / "sshd_config"
        self._sshd[host.name] = RbeeProcess([self.ip, "netns", "exec", host.namespace, SSHD, "-D", "-e", "-f", str(config)])

    def _wait_sshd(self, host: Host) -> None:
        """Until the host's sshd answers on its address, from the root namespace."""
        proc = self._sshd[host.name]
        deadline = time.monotonic() + SSHD_START_S
        while time.monotonic() < deadline:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"sshd of {host.name} exited with {proc.proc.returncode}: {proc.stderr_text()[-2000:]}")
            with socket.socket() as s:
                s.settimeout(1.0)
                if s.connect_ex((host.address, host.ssh_port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"sshd of {host.name} never listened on {host.address}:{host.ssh_port}:"
                           f" {proc.stderr_text()[-2000:]}")

    # -- using --------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        """The host called ``name`` (host1 ...)."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def cut(self, host: Host) -> None:
        """Take the host off the network without a word: its bridge port goes down, so what
        is sent to it vanishes (no RST, no ICMP from it) and it sends nothing out."""
        _run_ip(self.ip, "link", "set", host.bridge_port, "down")

    def restore(self, host: Host) -> None:
        """Put a cut host back on the network."""
        _run_ip(self.ip, "link", "set", host.bridge_port, "up")

    def pids(self, host: Host) -> list[int]:
        """The live processes in the host's namespace (its sshd, sessions, hive, workers)."""
        return _namespace_pids(self.ip, host.namespace)

    def ssh_argv(self, host: Host, *options: str) -> list[str]:
        """``ssh`` to the host as the bed's user, with the bed's key and known hosts; append
        the remote command."""
        return [
            "ssh", "-i", str(host.key_path), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            *options, "-p", str(host.ssh_port), f"{host.user}@{host.address}",
        ]

    # -- tearing down -------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything of this run: every process in its namespaces and its sshds
        (SIGTERM, then SIGKILL), the namespaces, veths and bridge, its folder and record.
        Idempotent; ``AssertionError`` naming what is left if something would not go."""
        if self._torn_down:
            return
        sshd_pids = [p.pid for p in self._sshd.values()]
        namespaces, links = _tags_of(self.ip)
        # Ours by tag, plus those made so far (a listing can lag behind a failed create).
        ours = sorted(set(namespaces.get(self.tag, [])) | set(self._namespaces))
        problems = _remove_tag(self.ip, self.tag, ours, links.get(self.tag, []), sshd_pids)
        for proc in self._sshd.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(timeout=KILL_GRACE_S)  # reaped: no zombie of ours
            for thread in proc._threads:
                thread.join(timeout=5)
        namespaces, links = _tags_of(self.ip)
        if namespaces.get(self.tag) or links.get(self.tag):
            problems.append(f"still there: {namespaces.get(self.tag, []) + links.get(self.tag, [])}")
        _remove_tree(self.root)
        if self.root.exists():
            problems.append(f"folder {self.root} could not be removed")
        if problems:
            raise AssertionError(f"netns bed {self.tag} left things behind: {'; '.join(problems)}")
        self._record.unlink(missing_ok=True)
        self._torn_down = True

    def __enter__(self) -> "NetnsCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


@pytest.fixture
def netns_cluster(tmp_path: Path) -> Iterator[Callable[[int], NetnsCluster]]:
    """A factory of beds: ``bed = netns_cluster(4)``; every bed is torn down at the end.

    A machine that cannot hold one (no root, no ``ip``) fails the test with the reason: the
    bed is what the test is about, so it never skips.
    """
    beds: list[NetnsCluster] = []

    def make(n: int) -> NetnsCluster:
        try:
            bed = NetnsCluster.create(n, tmp_path / f"bed{len(beds) + 1}")
        except NetnsUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)
        beds.append(bed)
        return bed

    yield make
    failures = []
    for bed in reversed(beds):
        try:
            bed.teardown()
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "; ".join(failures)
