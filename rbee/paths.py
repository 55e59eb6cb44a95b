"""Where rbee keeps its state on disk, and where model files may be read from.

State: ``RBEE_HOME`` (default ``~/.rbee``). A state directory that cannot be written (a
read-only file system, a full disk, a path under a file) is a ``StateError`` whose one line
names the directory and the fix; the programs print it and exit 1, never a traceback. A
state database that SQLite cannot read (``set_aside``) is moved aside under a dated name
and started afresh by its owner, who says so.

Model directories: ``$RBEE_HOME/models``, the Hugging Face hub cache (as
``huggingface_hub`` computes it from ``HF_HUB_CACHE`` / ``HF_HOME``) and every folder
listed in ``RBEE_MODEL_DIRS`` (separated by ``os.pathsep``). A ``file:`` reference names a
file under one of them, symlinks resolved first (``confined_model_file``); anything else,
missing, unreadable or outside, gets one and the same answer, so that a caller learns
nothing about files it may not use.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .errors import ModelNotFoundError, StateError

HOME_ENV = "RBEE_HOME"
MODEL_DIRS_ENV = "RBEE_MODEL_DIRS"
#: Errors that mean "this disk is full" rather than "this place is not writable".
_FULL = (errno.ENOSPC, errno.EDQUOT)
#: SQLite's primary result codes for a file that is not (or no longer) a database.
_SQLITE_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
#: ... and for a database that cannot be opened or written, as the errno it stands for:
#: SQLITE_PERM, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
_SQLITE_STATE = {3: errno.EACCES, 8: errno.EROFS, 10: errno.EIO, 13: errno.ENOSPC, 14: errno.EACCES}


def home_path() -> Path:
    """The state directory as configured (``$RBEE_HOME`` or ``~/.rbee``), not created."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".rbee").expanduser()


def rbee_home() -> Path:
    """The state directory, created on first use; ``StateError`` when it cannot be."""
    return ensure_dir(home_path())


def models_dir() -> Path:
    """Downloaded and assembled GGUF files live here."""
    return ensure_dir(rbee_home() / "models")


def ensure_dir(path: Path) -> Path:
    """``path`` as a directory (created with its parents); ``StateError`` when it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise state_error(path, exc) from None
    return path


def check_writable(directory: Path) -> None:
    """``StateError`` unless a file can be created and written in ``directory``.

    A daemon checks its state directory once at start, so that a read-only or full
    ``RBEE_HOME`` is one line at once, not a failure in the middle of a job.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=directory)
        try:
            os.write(fd, b"rbee")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        raise state_error(directory, exc) from None


def state_error(path: Path | str, exc: OSError) -> StateError:
    """The one line for an ``OSError`` on ``path`` under the state directory: which
    directory, what the system said, and what to do."""
    home, path = home_path(), Path(path)
    if path.is_relative_to(home):
        named = f"{HOME_ENV}={home}" + ("" if path == home else f" ({path})")
    else:
        named = str(path)  # a state directory given another way (queen-rbee --home)
    if exc.errno in _FULL:
        return StateError(f"{named} is on a full disk: {exc.strerror or exc}; "
                          f"free some space there, or set {HOME_ENV} to a folder on another disk")
    return StateError(f"{named} is not writable: {exc.strerror or exc}; set {HOME_ENV} to a writable folder")


def _sqlite_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # the extended code: its low byte is the primary one
    return None if code is None else code & 0xFF


def sqlite_is_corrupt(exc: sqlite3.Error) -> bool:
    """SQLite says the file is not a database, or a damaged one (not: locked, read-only, full)."""
    return _sqlite_code(exc) in _SQLITE_CORRUPT or (
        # Raised by us (quick_check) or by a build that gives no code: the message says it.
        isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)
        and any(s in str(exc) for s in ("file is not a database", "malformed"))
    )


def sqlite_state_error(path: Path, exc: sqlite3.Error) -> StateError | None:
    """The one line for a SQLite database under the state directory that cannot be opened
    or written (read-only, full), as ``state_error`` words it; None for other errors (a
    locked database, a bug), which are not the state directory's fault."""
    code = _SQLITE_STATE.get(_sqlite_code(exc) or 0)
    if code is None:
        return None
    return state_error(path, OSError(code, str(exc)))


def set_aside(path: Path) -> Path:
    """Move a damaged database to ``<name>.corrupt-<UTC time>`` beside it, kept for
    inspection, with whatever journal files are left of it (SQLite deletes those of a file
    it could not read when its connection closes); returns where it went. ``StateError``
    if it cannot be moved."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kept = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, kept)
        # A journal of the damaged file must not be applied to the new one.
        for suffix in ("-wal", "-shm", "-journal"):
            journal = path.with_name(path.name + suffix)
            if journal.exists():
                os.replace(journal, kept.with_name(kept.name + suffix))
    except OSError as exc:
        raise state_error(path, exc) from None
    return kept


# -- model directories -----------------------------------------------------------------


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` computes it (``HF_HUB_CACHE``,
    else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants  # imported late: the keeper never needs it

    return Path(constants.HF_HUB_CACHE).expanduser()


def listed_model_dirs() -> tuple[list[Path], list[str]]:
    """The folders of ``RBEE_MODEL_DIRS`` (``~`` expanded), and the entries left out
    because they are not absolute (relative to what? a hive's working directory is its
    parent's)."""
    kept: list[Path] = []
    skipped: list[str] = []
    for entry in (os.environ.get(MODEL_DIRS_ENV) or "").split(os.pathsep):
        if not entry.strip():
            continue
        path = Path(entry).expanduser()
        if path.is_absolute():
            kept.append(path)
        else:
            skipped.append(entry)
    return kept, skipped


def model_dirs() -> list[Path]:
    """Every model directory, symlinks resolved: ``$RBEE_HOME/models``, the Hugging Face
    hub cache, then the folders of ``RBEE_MODEL_DIRS``."""
    dirs = [home_path() / "models", hf_hub_cache(), *listed_model_dirs()[0]]
    return [Path(os.path.realpath(d)) for d in dirs]


def model_not_found(reference: str) -> ModelNotFoundError:
    """The one answer for a ``file:`` reference that cannot be used, whatever the reason."""
    return ModelNotFoundError(
        f"no model {reference} on this node: a file: reference must name a readable .gguf file in a model "
        f"directory ($RBEE_HOME/models, the Hugging Face cache, or a folder listed in {MODEL_DIRS_ENV}); "
        f"if the file is there, add its folder to {MODEL_DIRS_ENV} on the node"
    )


def confined_model_file(reference: str, path: str) -> Path:
    """The real path of ``path`` (symlinks resolved) when it is a readable regular file
    under a model directory; otherwise ``model_not_found(reference)``.

    Outside, missing, a directory, a name too long, a symlink loop or out of the model
    directories, unreadable: the same answer, so that ``file:`` is no oracle for which
    files exist on the node.
    """
    try:
        real = Path(os.path.realpath(path, strict=True))
        if not any(real.is_relative_to(d) for d in model_dirs()):
            raise model_not_found(reference)
        # Opened, not only stat'ed: "readable" is what the worker will need. O_NONBLOCK:
        # a FIFO must not hang the hive; O_NOFOLLOW: nothing swapped in since realpath.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise model_not_found(reference)
        finally:
            os.close(fd)
    except (OSError, ValueError):
        raise model_not_found(reference) from None
    return real
