"""Child processes that die with their parent: how the queen starts a local hive and the
keeper an ephemeral queen.

Why not ``trio.lowlevel.open_process``: it forks from a worker thread, and Linux's
``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process.
Trio retires idle worker threads after a few seconds, which would SIGTERM a healthy child.
So the fork happens here, synchronously on the calling (main) thread; it takes about a
millisecond. Exit is awaited through a pidfd, which Trio can wait on without a thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import IO, Sequence

import trio

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildProcess:
    """A program started in its own process group with PR_SET_PDEATHSIG(SIGTERM).

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
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            process_group=0,
            preexec_fn=_die_with_parent,
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
