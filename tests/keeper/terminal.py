"""A program on a pseudo-terminal, as a person runs it: ``PtyProgram``.

The pty is its stdin, stdout and controlling terminal (so ``\\x03`` typed there is the
terminal's SIGINT, as Ctrl-C is); its stderr is a pipe, read line by line. Everything
written to the terminal is kept as ``screen``. Both readers notify ``changed`` (a
condition, also the lock of ``screen`` and ``stderr_lines``), so a test can wait for what
it expects without polling blind.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import termios
import threading

from tests.processes import pid_alive

#: Rows and columns of the terminal.
SIZE = (50, 200)


class PtyProgram:
    """``argv`` on a new pseudo-terminal (see the module doc); end it with ``close()``."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *SIZE, 0, 0))
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env,
            start_new_session=True,  # a session of its own, whose controlling terminal is the pty
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # noqa: PLW1509
        )
        os.close(slave)
        self.master = master
        self.screen = ""  # everything written to the terminal
        self.stderr_lines: list[str] = []
        self.changed = threading.Condition()
        self._threads = [threading.Thread(target=self._read_screen, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_screen(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: the other side is closed
                return
            if not data:
                return
            with self.changed:
                self.screen += data.decode("utf-8", "replace")
                self.changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self.changed:
                self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.changed.notify_all()

    def type(self, text: str) -> None:
        """Type ``text`` at the terminal (``\\x03``: Ctrl-C, ``\\x04``: Ctrl-D, ``\\r``: Enter)."""
        os.write(self.master, text.encode())

    def stderr_text(self) -> str:
        with self.changed:
            return "\n".join(self.stderr_lines)

    def wait(self, seconds: float) -> int:
        code = self.proc.wait(timeout=seconds)
        for t in self._threads:
            t.join(timeout=5)
        return code

    def close(self) -> None:
        """End it by PID if it still runs, close the terminal, check it is gone."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        os.close(self.master)
        for t in self._threads:
            t.join(timeout=5)
        assert not pid_alive(self.proc.pid)
