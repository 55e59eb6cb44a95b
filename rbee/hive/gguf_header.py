"""Read the metadata of a GGUF file's header (no tensors), for preflight's memory figures.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): ``GGUF``, a uint32
version, uint64 tensor and key/value counts, then the key/value pairs, little-endian.
Arrays (the tokenizer's vocabulary: hundreds of thousands of strings) are skipped, not
kept; only scalars and strings are returned.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelLoadError("the GGUF header ends early: the file is truncated")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _SCALARS:
                self.f.seek(struct.calcsize(_SCALARS[item_kind]) * count, 1)
            else:
                for _ in range(count):
                    self.value(item_kind)
            return None
        raise ModelLoadError(f"unknown GGUF value type {kind}")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF header; ``ModelLoadError`` if not a GGUF."""
    try:
        with open(path, "rb") as f:
            r = _Reader(f)
            if r.take(4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file (no GGUF magic)")
            version = r.unpack("<I")
            if version < 2:
                raise ModelLoadError(f"{path} is GGUF version {version}; llama.cpp needs version 2 or newer")
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
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from None


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
