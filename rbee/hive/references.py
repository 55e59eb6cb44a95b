"""Model references: the strings a user types to name a model, parsed into ``ModelRef``.

Accepted forms (DESIGN.md, State on disk):

- ``hf:org/repo``: a Hugging Face repository; the hive picks its GGUF by quantisation,
  Q4_K_M first, then Q5_K_M, Q8_0, F16;
- ``hf:org/repo:Q4_K_M``: the GGUF of that quantisation in the repository;
- ``hf:org/repo/file.gguf`` (or ``hf:org/repo/sub/dir/file.gguf``): exactly that file;
- ``file:/abs/path.gguf``: a GGUF already on this node (absolute path);
- ``gemma3-270m``: the built-in alias, the embedded Gemma-3 270M Q4_K_M.

Anything else is an ``InvalidRequestError`` whose message lists these forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidRequestError

#: The alias of the embedded default model.
EMBEDDED_ALIAS = "gemma3-270m"

#: Quantisations in the order ``hf:org/repo`` prefers them.
PREFERRED_QUANTS = ("Q4_K_M", "Q5_K_M", "Q8_0", "F16")

ACCEPTED_FORMS = (
    "hf:org/repo, hf:org/repo:Q4_K_M, hf:org/repo/file.gguf, file:/abs/path.gguf, " + EMBEDDED_ALIAS
)

# Hub repository names: letters, digits, '-', '_', '.'; neither part starts with '.' or '-'.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = re.compile(rf"^({_NAME})/({_NAME})$")
_QUANT = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One parsed model reference.

    ``provider`` is ``hf``, ``file`` or ``embedded``. For ``hf``: ``repo`` is ``org/repo``,
    and at most one of ``quant`` and ``filename`` is set. For ``file``: ``path``.
    ``reference`` is the canonical string (the catalogue key).
    """

    reference: str
    provider: str
    repo: str | None = None
    quant: str | None = None
    filename: str | None = None
    path: str | None = None


def _invalid(raw: object, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"invalid model reference {raw!r}: {why}; accepted forms: {ACCEPTED_FORMS}",
        details=[{"field": "model", "constraint": ACCEPTED_FORMS, "message": why}],
    )


def parse_reference(raw: object) -> ModelRef:
    """Parse a model reference; ``InvalidRequestError`` naming the accepted forms if bad."""
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid(raw, "a model reference is a non-empty string")
    text = raw.strip()
    if text == EMBEDDED_ALIAS:
        return ModelRef(reference=EMBEDDED_ALIAS, provider="embedded")
    if text.startswith("file:"):
        return _parse_file(raw, text[len("file:") :])
    if text.startswith("hf:"):
        return _parse_hf(raw, text[len("hf:") :])
    raise _invalid(raw, "unknown provider or alias")


def _parse_file(raw: str, path: str) -> ModelRef:
    if not path.startswith("/"):
        raise _invalid(raw, "a file: reference needs an absolute path")
    if "\0" in path or "/../" in path + "/":
        raise _invalid(raw, "a file: path may not contain NUL or '..'")
    if not path.lower().endswith(".gguf"):
        raise _invalid(raw, "a file: reference names a .gguf file")
    return ModelRef(reference=f"file:{path}", provider="file", path=path)


def _parse_hf(raw: str, rest: str) -> ModelRef:
    quant = None
    if ":" in rest:
        rest, quant = rest.rsplit(":", 1)
        if not _QUANT.match(quant):
            raise _invalid(raw, f"{quant!r} is not a quantisation name like Q4_K_M")
        quant = quant.upper()
    parts = rest.split("/")
    if len(parts) < 2 or not _REPO.match("/".join(parts[:2])):
        raise _invalid(raw, "an hf: reference starts with org/repo")
    repo = "/".join(parts[:2])
    if len(parts) == 2:
        if quant:
            return ModelRef(reference=f"hf:{repo}:{quant}", provider="hf", repo=repo, quant=quant)
        return ModelRef(reference=f"hf:{repo}", provider="hf", repo=repo)
    if quant:
        raise _invalid(raw, "name either a quantisation or a file, not both")
    filename = "/".join(parts[2:])
    if any(p in ("", ".", "..") for p in parts[2:]):
        raise _invalid(raw, "the file part of an hf: reference is a plain relative path")
    if not filename.lower().endswith(".gguf"):
        raise _invalid(raw, "the file of an hf: reference is a .gguf file")
    return ModelRef(reference=f"hf:{repo}/{filename}", provider="hf", repo=repo, filename=filename)


def quant_of(filename: str) -> str | None:
    """The quantisation named in a GGUF file name (``...-Q4_K_M.gguf`` -> ``Q4_K_M``)."""
    stem = filename.rsplit("/", 1)[-1]
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    match = re.search(r"(?:^|[-_.])((?:IQ|Q)\d[A-Z0-9_]*|F16|BF16|F32)$", stem, re.IGNORECASE)
    return match.group(1).upper() if match else None


def pick_gguf(filenames: list[str], quant: str | None) -> str | None:
    """The GGUF a repository reference means: that ``quant``, else the preferred order.

    Split GGUFs (``-00001-of-00003.gguf``) are not picked: a worker loads one file.
    """
    ggufs = [f for f in filenames if f.lower().endswith(".gguf") and not re.search(r"-\d{5}-of-\d{5}\.gguf$", f)]
    by_quant: dict[str, list[str]] = {}
    for name in ggufs:
        q = quant_of(name)
        if q:
            by_quant.setdefault(q, []).append(name)
    for wanted in ([quant] if quant else list(PREFERRED_QUANTS)):
        if wanted in by_quant:
            return sorted(by_quant[wanted], key=len)[0]
    return None
