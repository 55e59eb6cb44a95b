"""Read the metadata of a GGUF file's header (no tensors), for preflight's memory figures.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): ``GGUF``, a uint32
version, uint64 tensor and key/value counts, then the key/value pairs, little-endian.
Arrays (the tokenizer's vocabulary: hundreds of thousands of strings) are skipped, not
kept; only scalars and strings are returned.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


#: No string of a header is longer (the largest real ones, chat templates, are some KiB).
MAX_STRING_BYTES = 16 * 1024 * 1024
#: Arrays of arrays nest no deeper than this (real GGUFs have none).
MAX_ARRAY_DEPTH = 4
_CORRUPT = "the GGUF header is corrupt"


class _Reader:
    """Reads a header bounded by the file's size: a length or count that the file cannot
    hold is a ``ModelLoadError``, never a huge read, an ``OverflowError`` or a seek past the end."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def left(self) -> int:
        return self.size - self.f.tell()

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise ModelLoadError("the GGUF header ends early: the file is truncated")
        return self.f.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > MAX_STRING_BYTES:
            raise ModelLoadError(f"{_CORRUPT}: a string longer than {MAX_STRING_BYTES} bytes")
        return self.take(length).decode("utf-8", "replace")

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if depth >= MAX_ARRAY_DEPTH:
                raise ModelLoadError(f"{_CORRUPT}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
            if item_kind in _SCALARS:
                skip = struct.calcsize(_SCALARS[item_kind]) * count
                if skip > self.left():
                    raise ModelLoadError("the GGUF header ends early: the file is truncated")
                self.f.seek(skip, 1)
            else:
                for _ in range(count):
                    self.value(item_kind, depth + 1)
            return None
        raise ModelLoadError(f"{_CORRUPT}: a value of an unknown type")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header; ``ModelLoadError`` if not a GGUF.

    The messages never quote the file's bytes nor name the file: the caller names what
    the user asked for (a ``file:`` reference may be a symlink whose target is not theirs
    to learn).
    """
    try:
        with open(path, "rb") as f:
            r = _Reader(f, os.fstat(f.fileno()).st_size)
            if r.left() < 4 or r.take(4) != b"GGUF":
                raise ModelLoadError("not a GGUF file (it does not begin with the GGUF magic)")
            version = r.unpack("<I")
            if version < 2:
                raise ModelLoadError(f"GGUF version {version}; llama.cpp needs version 2 or newer")
            r.unpack("<Q")  # tensor count
            kv_count = r.unpack("<Q")
            meta: dict[str, Any] = {"gguf.version": version}
            for _ in range(kv_count):
                key = r.string()
                value = r.value(r.unpack("<I"))
                if value is not None:
                    meta[key] = value
            return meta
    except OSError as exc:
        raise ModelLoadError(f"the model file cannot be read ({exc.strerror or type(exc).__name__})") from None
    except (OverflowError, MemoryError, RecursionError, ValueError, struct.error):
        raise ModelLoadError(_CORRUPT) from None


def kv_cache_bytes(meta: dict[str, Any], ctx_size: int) -> int | None:
    """Bytes of an f16 K+V cache for ``ctx_size`` tokens, from the header; None if unknown."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    layers = meta.get(f"{arch}.block_count")
    embd = meta.get(f"{arch}.embedding_length")
    heads = meta.get(f"{arch}.attention.head_count")
    if not all(isinstance(v, int) and v > 0 for v in (layers, embd, heads)):
        return None
    heads_kv = meta.get(f"{arch}.attention.head_count_kv") or heads
    key_len = meta.get(f"{arch}.attention.key_length") or embd // heads
    value_len = meta.get(f"{arch}.attention.value_length") or embd // heads
    trained = meta.get(f"{arch}.context_length")
    tokens = min(ctx_size, trained) if isinstance(trained, int) and trained > 0 else ctx_size
    return int(layers * tokens * heads_kv * (key_len + value_len) * 2)
