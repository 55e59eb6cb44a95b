"""Run a real program with its ``RBEE_HOME`` read-only or full, in its own mount namespace.

Tests run as root, and root writes through ``chmod a-w``: a read-only folder must come from
the file system itself. ``unshare --mount`` gives the program a private mount namespace in
which ``RBEE_HOME`` is bind-mounted read-only (EROFS), or a 64 KiB tmpfs filled to the brim
(ENOSPC), then ``exec``s it, so its PID is the one the test started and stops. The mounts
live and die with that process: nothing is mounted where the test runner or anyone else
sees it, and nothing is left to clean up. As root ``unshare --mount`` is enough; another
user gets the same through a user namespace (``--user --map-root-user``).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Mount RBEE_HOME read-only, then exec the program ("$@").
_READ_ONLY = 'mount --bind "$RBEE_HOME" "$RBEE_HOME" && mount -o remount,bind,ro "$RBEE_HOME" && exec "$@"'
#: Mount a small tmpfs on RBEE_HOME and fill it (dd stops at ENOSPC), then exec the program.
_FULL = ('mount -t tmpfs -o size=64k tmpfs "$RBEE_HOME" && '
         '{ dd if=/dev/zero of="$RBEE_HOME/fill" bs=4k 2>/dev/null; true; } && exec "$@"')


def _unshare() -> list[str]:
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--mount", "--propagation", "private"]


def read_only_home(argv: list[str]) -> list[str]:
    """``argv`` run with ``$RBEE_HOME`` (from its environment) mounted read-only."""
    return [*_unshare(), "sh", "-c", _READ_ONLY, "sh", *argv]


def full_home(argv: list[str]) -> list[str]:
    """``argv`` run with ``$RBEE_HOME`` on a full file system (its own files hidden)."""
    return [*_unshare(), "sh", "-c", _FULL, "sh", *argv]


def home_under_a_file(tmp_path: Path) -> Path:
    """An ``RBEE_HOME`` that cannot exist (its parent is a file: ENOTDIR), no mount needed."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    return blocker / "rbee-home"
