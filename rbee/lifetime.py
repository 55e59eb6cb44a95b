"""Processes that die with their parent: the one place that knows PR_SET_PDEATHSIG.

Every rbee program that starts another (the keeper an ephemeral queen, the queen a local
hive, a hive its workers) starts it with ``popen_dying_with_us``: a new process group
(``process_group=0``: signals for our terminal or session never reach the child by
accident, and we can signal its whole group) with ``PR_SET_PDEATHSIG(SIGTERM)`` set between
fork and exec, so the kernel sends SIGTERM to the child when we die, even by SIGKILL. A
worker also sets its own death signal at startup (``set_parent_death_signal``), so the
guarantee holds for any parent: a hive, a test, a shell script.

Caveat of Linux's ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the child
exits, not the parent process. Trio retires idle worker threads after a few seconds
(``trio.run_process``/``to_thread`` fork from one), which would SIGTERM a healthy child. So
the fork happens synchronously on the calling thread, which must be a long-lived one (the
main/event-loop thread); it takes about a millisecond. ``ChildProcess`` then awaits the
exit through a pidfd, which Trio can wait on without a thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import IO, Callable, Sequence

import trio

PR_SET_PDEATHSIG = 1
_ON_LINUX = sys.platform.startswith("linux")
#: The bearer token of rbee's daemons: a child that rbee starts gets its own key instead
#: (a hive its ``--token-file``, a worker ``RBEE_WORKER_API_KEY``), never its parent's.
RBEE_SECRETS = ("RBEE_API_TOKEN",)
#: The Hugging Face token (both spellings huggingface_hub reads): only a hive downloads.
HF_SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def env_without(*names: str) -> dict[str, str]:
    """Our environment minus ``names``: what a child gets, without the secrets it has no use for."""
    return {key: value for key, value in os.environ.items() if key not in names}


def _prctl():  # type: ignore[no-untyped-def]
    # CDLL(None) is the already loaded process image (libc included): no library search,
    # which matters in the child between fork and exec.
    return ctypes.CDLL(None, use_errno=True).prctl


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies; False elsewhere."""
    if not _ON_LINUX:
        return False
    try:
        return _prctl()(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent_hook(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn`` that sets PR_SET_PDEATHSIG(SIGTERM) in the child (Linux only)."""
    prctl = _prctl()  # resolved before the fork: the child only calls it

    def hook() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork and prctl: then no signal would ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return hook


def popen_dying_with_us(
    argv: Sequence[str],
    *,
    stdin: int | IO[bytes] | None,
    stdout: int | IO[bytes] | None,
    stderr: int | IO[bytes] | None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, with SIGTERM when we die (see module doc).

    Call it on a long-lived thread (the Trio loop's), never from a worker thread.
    """
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        process_group=0,
        # PR_SET_PDEATHSIG is Linux-only; elsewhere the parent's shutdown path is what
        # ends its children.
        preexec_fn=die_with_parent_hook(os.getpid()) if _ON_LINUX else None,
        close_fds=True,
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reads /proc: Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class ChildProcess:
    """A child started by ``popen_dying_with_us`` whose exit Trio awaits through a pidfd.

    ``stdout`` is a Trio receive stream when asked for (``capture_stdout=True``); ``stdin``
    is a pipe that the child reads EOF from when we ``close_stdin()`` (our daemons shut
    down on that), or when we die.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        capture_stdout: bool = True,
        stdin_pipe: bool = True,
        stderr: IO[bytes] | int | None = None,
    ) -> None:
        self.argv = list(argv)
        self.proc = popen_dying_with_us(
            self.argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
        self.pid = self.proc.pid
        self.stdout: trio.lowlevel.FdStream | None = None
        if capture_stdout:
            assert self.proc.stdout is not None
            self.stdout = trio.lowlevel.FdStream(os.dup(self.proc.stdout.fileno()))
            self.proc.stdout.close()
        self._pidfd = os.pidfd_open(self.pid)

    @property
    def returncode(self) -> int | None:
        """The exit code once it exited (negative: killed by that signal), else None."""
        return self.proc.poll()

    def close_stdin(self) -> None:
        """Close our end of its stdin: our daemons take EOF there as "shut down"."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def send_signal(self, signum: int) -> None:
        """Signal it by PID if it is still ours to signal (not yet reaped)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    async def wait(self) -> int:
        """Wait for it to exit (no thread: the pidfd becomes readable at exit)."""
        while self.proc.poll() is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        return self.proc.returncode

    async def stop(self, grace_s: float = 5.0) -> int:
        """Close stdin, SIGTERM after ``grace_s``, SIGKILL after another; returns its code.

        Shielded: stopping a child is cleanup that must finish even while we are cancelled.
        """
        with trio.CancelScope(shield=True):
            self.close_stdin()
            with trio.move_on_after(grace_s):
                return await self.wait()
            self.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_s):
                return await self.wait()
            self.send_signal(signal.SIGKILL)
            return await self.wait()

    async def aclose(self) -> None:
        """Release our file descriptors (call after it exited)."""
        if self.stdout is not None:
            await self.stdout.aclose()
        self.close_stdin()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
