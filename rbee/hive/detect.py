"""What this node offers: backends, devices with memory, free disk (``rbee-hive detect``).

The JSON form, which the queen stores per node::

    {"hostname": "blep", "backends": ["cpu", "cuda"],
     "devices": [{"backend": "cpu", "index": 0, "name": "...", "memory_total_bytes": ...,
                  "memory_free_bytes": ...}, ...],
     "disk_free_bytes": ..., "rbee_version": "0.1.0"}

CPU is always there (its memory is the RAM). CUDA and Metal count when our llama.cpp build
has them (``rbee.worker.engine.available_backends()``); CUDA devices and their memory come
from ``nvidia-smi`` when it is installed. A build without the native core (not compiled
yet) still reports CPU: the worker will say what is wrong when it starts.
"""

from __future__ import annotations

import platform
import shutil
import socket
import subprocess
from importlib import metadata
from typing import Any

from ..paths import models_dir
from .preflight import free_memory, system_memory


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def built_backends() -> list[str]:
    """The backends our llama.cpp build has (``["cpu"]`` if the native core is missing)."""
    try:
        from ..worker.engine import available_backends

        return list(available_backends())
    except Exception:  # noqa: BLE001 - an unbuilt or broken native core still leaves CPU
        return ["cpu"]


def nvidia_devices() -> list[dict[str, Any]]:
    """CUDA devices from ``nvidia-smi`` (empty if it is missing or fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    devices = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            devices.append({
                "backend": "cuda", "index": int(parts[0]), "name": parts[1],
                "memory_total_bytes": int(float(parts[2]) * 1024 * 1024),
                "memory_free_bytes": int(float(parts[3]) * 1024 * 1024),
            })
        except ValueError:
            continue
    return devices


def detect_node() -> dict[str, Any]:
    """The node's backends, devices and free disk, as the JSON of ``rbee-hive detect``."""
    backends = built_backends()
    total, _ = system_memory()
    free, _ = free_memory(reserved=0)
    devices: list[dict[str, Any]] = [
        {"backend": "cpu", "index": 0, "name": _cpu_name(), "memory_total_bytes": total, "memory_free_bytes": free}
    ]
    cuda = nvidia_devices()
    # CUDA devices are listed even when our build lacks CUDA (the user sees the GPU), but
    # the backend is only listed when a worker can use it: a spawn checks ``backends``.
    devices += cuda
    if "metal" in backends:
        # Apple silicon: the GPU shares the RAM.
        devices.append({"backend": "metal", "index": 0, "name": "Apple GPU (Metal)",
                        "memory_total_bytes": total, "memory_free_bytes": free})
    try:
        version = metadata.version("rbee")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "hostname": socket.gethostname(),
        "backends": backends,
        "devices": devices,
        "disk_free_bytes": shutil.disk_usage(models_dir()).free,
        "rbee_version": version,
    }
