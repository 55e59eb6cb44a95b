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

``RBEE_DETECT_OVERRIDE`` (for tests and demos only) replaces what is reported about the
node, so that a CPU-only machine can stand in for a GPU node or a Mac in placement tests:
a JSON object with some of ``hostname``, ``backends``, ``devices`` (detect's own shapes);
the keys given replace the detected ones, the others stay measured. CPU is always there,
as in a real detection: it is added to ``backends`` and its detected device kept when the
override leaves them out. What the node *reports* never decides what a worker can *run*:
a spawn checks the backends our build really has (``require_built_backend``) before any
worker process starts.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
from importlib import metadata
from typing import Any

from ..errors import BackendUnavailableError
from ..paths import models_dir
from ..requests import BACKENDS
from .preflight import free_memory, system_memory

DETECT_OVERRIDE_ENV = "RBEE_DETECT_OVERRIDE"
#: The keys of detect's JSON an override may replace (the rest is always measured).
OVERRIDE_KEYS = ("hostname", "backends", "devices")
#: The fields of one device in an override, and whether each must be there.
_DEVICE_FIELDS = {"backend": True, "index": True, "name": False, "memory_total_bytes": False,
                  "memory_free_bytes": False}
_OVERRIDE_EXAMPLE = ('{"backends": ["cpu", "cuda"], "devices": [{"backend": "cuda", "index": 0, '
                     '"memory_free_bytes": 25769803776}]}')


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


def _override_error(problem: str) -> ValueError:
    return ValueError(f"{DETECT_OVERRIDE_ENV} {problem}: give a JSON object with any of {', '.join(OVERRIDE_KEYS)}, "
                      f"such as {_OVERRIDE_EXAMPLE}, or unset it (it is for tests and demos only)")


def _shown(value: Any) -> str:
    """A value as a message quotes it: its JSON, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_device(device: Any, where: str) -> None:
    if not isinstance(device, dict):
        raise _override_error(f"{where} must be an object, not {_shown(device)}")
    unknown = sorted(set(device) - set(_DEVICE_FIELDS))
    if unknown:
        raise _override_error(f"{where} has unknown key(s) {', '.join(unknown)} (a device has "
                              f"{', '.join(_DEVICE_FIELDS)})")
    missing = [k for k, required in _DEVICE_FIELDS.items() if required and k not in device]
    if missing:
        raise _override_error(f"{where} lacks {' and '.join(missing)}")
    if device["backend"] not in BACKENDS:
        raise _override_error(f"{where}.backend must be one of {', '.join(BACKENDS)}, not {_shown(device['backend'])}")
    if not _is_count(device["index"]):
        raise _override_error(f"{where}.index must be an integer >= 0, not {_shown(device['index'])}")
    if "name" in device and not isinstance(device["name"], str):
        raise _override_error(f"{where}.name must be a string, not {_shown(device['name'])}")
    for key in ("memory_total_bytes", "memory_free_bytes"):
        if device.get(key) is not None and not _is_count(device[key]):
            raise _override_error(f"{where}.{key} must be a number of bytes (an integer >= 0), "
                                  f"not {_shown(device[key])}")


def detect_override() -> dict[str, Any]:
    """``RBEE_DETECT_OVERRIDE``, parsed and checked: what replaces detect's own findings
    (``{}`` when unset). For tests and demos only: it makes a node *report* backends and
    devices it may not have (a CPU-only machine standing in for a GPU node or a Mac).

    The one place that reads the variable. A malformed value (not JSON, not an object, an
    unknown key, a wrong type) is a ``ValueError`` whose one line names what is wrong and
    the fix; ``rbee-hive daemon`` and ``rbee-hive detect`` print it and exit 2.
    """
    raw = os.environ.get(DETECT_OVERRIDE_ENV, "")
    if not raw.strip():
        return {}
    try:
        override = json.loads(raw)
    except ValueError as exc:
        raise _override_error(f"is not JSON ({exc})") from None
    if not isinstance(override, dict):
        raise _override_error(f"must be a JSON object, not {_shown(override)}")
    unknown = sorted(set(override) - set(OVERRIDE_KEYS))
    if unknown:
        raise _override_error(f"has unknown key(s) {', '.join(unknown)}")
    if "hostname" in override:
        hostname = override["hostname"]
        if not isinstance(hostname, str) or not hostname.strip():
            raise _override_error(f"hostname must be a non-empty string, not {_shown(hostname)}")
    if "backends" in override:
        backends = override["backends"]
        if (not isinstance(backends, list) or not backends or any(b not in BACKENDS for b in backends)
                or len(set(backends)) != len(backends)):
            raise _override_error(f"backends must be a non-empty list of distinct names from "
                                  f"{', '.join(BACKENDS)}, not {_shown(backends)}")
    if "devices" in override:
        devices = override["devices"]
        if not isinstance(devices, list):
            raise _override_error(f"devices must be a list of devices, not {_shown(devices)}")
        for i, device in enumerate(devices):
            _check_device(device, f"devices[{i}]")
    return override


def node_hostname() -> str:
    """The hostname the node reports: the override's, else the machine's."""
    return detect_override().get("hostname") or socket.gethostname()


def require_built_backend(backend: str) -> None:
    """``BackendUnavailableError`` unless our llama.cpp build can run ``backend``.

    What the node reports (``detect_node``) may come from ``RBEE_DETECT_OVERRIDE``; this
    asks the build itself, so a spawn is refused at once, before any provisioning, and no
    worker process is ever started on a backend the build lacks.
    """
    built = built_backends()
    if backend in built:
        return
    said = f" ({DETECT_OVERRIDE_ENV} says so)" if backend in detect_override().get("backends", ()) else ""
    raise BackendUnavailableError(
        f"node {node_hostname()} reports backend {backend}{said}, but this rbee build's llama.cpp lacks {backend} "
        f"(it has: {', '.join(built)}); no worker was started: install a llama.cpp build with {backend} on the "
        f"node (docs/native.md), or use --backend cpu",
        details={"backend": backend, "available_backends": built},
    )


def detect_node() -> dict[str, Any]:
    """The node's backends, devices and free disk, as the JSON of ``rbee-hive detect``,
    with ``RBEE_DETECT_OVERRIDE`` applied (``ValueError`` when it is malformed)."""
    override = detect_override()  # first: a malformed value is said before anything is measured
    backends = built_backends()
    total, _ = system_memory()
    free, _ = free_memory(reserved=0)
    cpu = {"backend": "cpu", "index": 0, "name": _cpu_name(), "memory_total_bytes": total, "memory_free_bytes": free}
    devices: list[dict[str, Any]] = [cpu]
    cuda = nvidia_devices()
    # CUDA devices are listed even when our build lacks CUDA (the user sees the GPU), but
    # the backend is only listed when a worker can use it: a spawn checks ``backends`` (and,
    # since an override may list more, the build itself: ``require_built_backend``).
    devices += cuda
    if "metal" in backends:
        # Apple silicon: the GPU shares the RAM.
        devices.append({"backend": "metal", "index": 0, "name": "Apple GPU (Metal)",
                        "memory_total_bytes": total, "memory_free_bytes": free})
    try:
        version = metadata.version("rbee")
    except metadata.PackageNotFoundError:
        version = "unknown"
    if "backends" in override:
        # CPU is always there, listed first, as in a real detection.
        backends = ["cpu", *(b for b in override["backends"] if b != "cpu")]
    if "devices" in override:
        listed = [dict(d) for d in override["devices"]]
        devices = listed if any(d["backend"] == "cpu" for d in listed) else [cpu, *listed]
    return {
        "hostname": node_hostname(),
        "backends": backends,
        "devices": devices,
        "disk_free_bytes": shutil.disk_usage(models_dir()).free,
        "rbee_version": version,
    }
