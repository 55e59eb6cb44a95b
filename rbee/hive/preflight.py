"""Preflight: can this node take this model? Checked before any download or spawn.

Three questions, each answered with the numbers when the answer is no:

- **backend and device**: the requested backend is one this node has (``rbee-hive
  detect``) and the device index exists. ``cuda`` on a node without CUDA is a 400 naming
  the node's backends, never a silent CPU fallback.
- **disk**: the models directory has room for what is left to download.
- **memory**: RAM (VRAM for ``cuda``) for the weights, the KV cache and the runtime. A
  worker serves ``parallel`` streams at once (its slots), each up to ``ctx_size`` tokens,
  so its KV cache holds ``ctx_size x parallel`` tokens. The KV bytes per token come from
  the GGUF header when the file is on disk (layers x kv heads x (key + value length) x 2
  bytes, f16; a slot's tokens capped at the trained context); before a download they are
  a rough ``FALLBACK_KV_BYTES_PER_TOKEN``, and the check runs again with the header before
  the worker starts.

Free memory is the kernel's ``MemAvailable``. ``RBEE_MEMORY_LIMIT_BYTES`` caps what the
hive plans with (to share a node, or to simulate a small one in tests): free is then at
most the limit minus what the hive's running workers were planned to use.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import BackendUnavailableError, PreflightError

MIB = 1024 * 1024
GIB = 1024 * MIB
#: The interpreter, llama.cpp's libraries and its compute buffers, beside weights and KV.
RUNTIME_OVERHEAD_BYTES = 256 * MIB
#: KV cache per token when the GGUF header is not at hand yet (a 7B GQA model at f16).
FALLBACK_KV_BYTES_PER_TOKEN = 128 * 1024
#: Room kept free on the models disk beyond the file itself.
DISK_MARGIN_BYTES = 64 * MIB
MEMORY_LIMIT_ENV = "RBEE_MEMORY_LIMIT_BYTES"


def human_bytes(n: int | float) -> str:
    """``1.9 GiB`` / ``72 MiB``: how preflight messages write sizes."""
    if abs(n) >= 0.1 * GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"


def slots_phrase(parallel: int) -> str:
    """``1 slot`` / ``4 slots``: how narration counts a worker's slots."""
    return f"{parallel} slot" if parallel == 1 else f"{parallel} slots"


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """What a worker with this model, context and number of slots is planned to use, in bytes."""

    weights: int
    #: The KV cache of one slot (``ctx_size`` tokens); the worker holds ``parallel`` of them.
    kv_per_slot: int
    runtime: int
    ctx_size: int
    kv_estimated: bool  # True: no GGUF header yet, the KV figure is the rough fallback
    parallel: int = 1

    @property
    def kv_cache(self) -> int:
        """The whole KV cache: ``ctx_size x parallel`` tokens."""
        return self.kv_per_slot * self.parallel

    @property
    def total(self) -> int:
        """Weights + KV cache + runtime."""
        return self.weights + self.kv_cache + self.runtime

    def explain(self) -> str:
        """``model 0.2 GiB + context of 4 slots x 4096 tokens 0.3 GiB + runtime 256 MiB``."""
        approx = "~" if self.kv_estimated else ""
        return (
            f"model {human_bytes(self.weights)} + context of {slots_phrase(self.parallel)} x {self.ctx_size} tokens "
            f"{approx}{human_bytes(self.kv_cache)} + runtime {human_bytes(self.runtime)}"
        )


def memory_need(model_size: int, ctx_size: int, kv_bytes: int | None, parallel: int = 1) -> MemoryNeed:
    """The plan for one worker of ``parallel`` slots of ``ctx_size`` tokens each.

    ``kv_bytes``: the KV cache of ONE slot (``ctx_size`` tokens) from the GGUF header, or
    None if unknown (then ``FALLBACK_KV_BYTES_PER_TOKEN`` per token). The worker's cache
    holds ``ctx_size x parallel`` tokens, so the plan counts ``parallel`` times that.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, not {parallel}")
    estimated = kv_bytes is None
    kv = ctx_size * FALLBACK_KV_BYTES_PER_TOKEN if kv_bytes is None else kv_bytes
    return MemoryNeed(model_size, kv, RUNTIME_OVERHEAD_BYTES, ctx_size, estimated, parallel)


def memory_limit() -> int | None:
    """``RBEE_MEMORY_LIMIT_BYTES`` as an int, if set (``PreflightError`` if not a number)."""
    raw = os.environ.get(MEMORY_LIMIT_ENV)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise PreflightError(f"{MEMORY_LIMIT_ENV}={raw!r} is not a number of bytes") from None


def system_memory() -> tuple[int, int]:
    """(total, available) RAM in bytes: ``/proc/meminfo`` on Linux, ``sysconf`` elsewhere."""
    try:
        fields: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def free_memory(reserved: int) -> tuple[int, str]:
    """Bytes a new worker may use, and a note on where the figure comes from.

    ``reserved``: what the hive's running workers were planned to use (only counted
    against a configured limit: the kernel's figure already reflects them).
    """
    _, available = system_memory()
    limit = memory_limit()
    if limit is None:
        return available, "available RAM"
    capped = max(0, limit - reserved)
    if capped < available:
        planned = f" minus {human_bytes(reserved)} planned for running workers" if reserved else ""
        return capped, f"{MEMORY_LIMIT_ENV}={limit}{planned}"
    return available, "available RAM"


def check_memory(
    need: MemoryNeed,
    *,
    model: str,
    free: int,
    source: str,
    smaller: Sequence[tuple[str, int]] = (),
    device_label: str = "node",
) -> None:
    """``PreflightError`` with the numbers if ``need`` does not fit in ``free``.

    ``smaller``: (quantisation, file size) of other GGUFs of the same repository, so the
    message can say which one would fit.
    """
    if need.total <= free:
        return
    message = (
        f"not enough memory for {model}: needs {human_bytes(need.total)} ({need.explain()}), "
        f"{device_label} has {human_bytes(free)} free ({source})"
    )
    hints = []
    for quant, size in sorted(smaller, key=lambda qs: qs[1]):
        if size < need.weights:
            alt = memory_need(size, need.ctx_size, None if need.kv_estimated else need.kv_per_slot, need.parallel)
            hints.append(f"a {quant} of this model needs {human_bytes(alt.total)}")
    if hints:
        message += "; " + ", ".join(hints[:3])
    else:
        message += "; free memory, stop a worker, or use a smaller context (ctx_size) or fewer slots (parallel)"
    raise PreflightError(
        message,
        details={"needs_bytes": need.total, "free_bytes": free, "weights_bytes": need.weights,
                 "kv_cache_bytes": need.kv_cache, "runtime_bytes": need.runtime, "ctx_size": need.ctx_size,
                 "parallel": need.parallel, "kv_cache_tokens": need.ctx_size * need.parallel},
    )


def check_disk(bytes_to_write: int, directory: Path, *, model: str) -> None:
    """``PreflightError`` with the numbers if ``directory``'s disk cannot take the download."""
    free = shutil.disk_usage(directory).free
    if bytes_to_write + DISK_MARGIN_BYTES <= free:
        return
    raise PreflightError(
        f"not enough disk for {model}: the download needs {human_bytes(bytes_to_write)} "
        f"(+{human_bytes(DISK_MARGIN_BYTES)} margin), {directory} has {human_bytes(free)} free",
        details={"needs_bytes": bytes_to_write, "free_bytes": free, "directory": str(directory)},
    )


def check_backend(backend: str, device: int, node: dict[str, Any]) -> dict[str, Any]:
    """The detected device for (backend, device); ``BackendUnavailableError`` naming what exists."""
    backends = list(node.get("backends") or ["cpu"])
    if backend not in backends:
        raise BackendUnavailableError(
            f"backend {backend!r} is not available on this node {node.get('hostname', '')!r}; "
            f"it has: {', '.join(backends)} (rbee never falls back to another backend silently)",
            details={"backend": backend, "available_backends": backends},
        )
    devices = [d for d in node.get("devices") or [] if d.get("backend") == backend]
    for found in devices:
        if found.get("index") == device:
            return found
    indexes = ", ".join(str(d.get("index")) for d in devices) or "none"
    raise BackendUnavailableError(
        f"{backend} device {device} does not exist on this node; {backend} devices: {indexes}",
        details={"backend": backend, "device": device, "available_backends": backends},
    )
