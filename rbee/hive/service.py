"""What the hive's routes do: spawn a worker (preflight, provision, start) and downloads.

Spawn order, each step failing with a 4xx that says why before the next one costs
anything: the request's fields; backend and device (``preflight.check_backend``); the
model reference; where the file is (``Provisioner.resolve``: catalog, Hub metadata);
memory with the size known so far; provisioning (download or assembly, narrated on stdout
and into the new worker's narration log); memory again with the GGUF header's exact KV
figure; then the process. Memory counts the KV cache of ``ctx_size x parallel`` tokens:
each of the worker's slots may fill its context. Two spawns running at once are each
checked against the memory free at their moment: the second does not yet see the first
worker's use.
"""

from __future__ import annotations

import collections
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..errors import (
    InvalidRequestError,
    ModelInUseError,
    ModelNotFoundError,
    NotFoundError,
    RbeeError,
    ShuttingDownError,
)
from ..narration import narrate
from ..narration.events import Error
from ..paths import models_dir, state_error
from ..requests import BACKENDS, parse_reference
from . import preflight
from .catalog import ModelCatalog
from .config import ACTOR, HiveConfig
from .detect import nvidia_devices, require_built_backend
from .eventlog import EventLog
from .provision import Provisioner, Resolution, kv_bytes_at
from .workers import Worker, WorkerRegistry, new_worker_id

#: The worker's own default (``llm-worker-rbee --ctx-size``), used for the memory plan.
DEFAULT_CTX_SIZE = 4096
MAX_CTX_SIZE = 1 << 20
BACKEND_NAMES = BACKENDS


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """A checked ``POST /v1/workers/spawn`` body."""

    model: str
    backend: str = "cpu"
    device: int = 0
    ctx_size: int | None = None
    #: Slots of the worker (streams at once); None: the hive's ``--worker-parallel``.
    parallel: int | None = None


def _field_error(name: str, constraint: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"invalid spawn request: {name}: {message}",
        details=[{"field": name, "constraint": constraint, "message": message}],
    )


def validate_spawn(body: Any) -> SpawnRequest:
    """Check the spawn body; ``InvalidRequestError`` listing the bad field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _field_error("model", "non-empty string", "model is required (e.g. gemma3-270m)")
    backend = body.get("backend", "cpu") or "cpu"
    if not isinstance(backend, str):
        raise _field_error("backend", "|".join(BACKEND_NAMES), "backend is a string")
    device = body.get("device", 0)
    if device is None:
        device = 0
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise _field_error("device", "integer >= 0", "device is a device index")
    ctx = body.get("ctx_size")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or not 1 <= ctx <= MAX_CTX_SIZE):
        raise _field_error("ctx_size", f"integer 1..{MAX_CTX_SIZE}", "ctx_size is a number of tokens")
    parallel = body.get("parallel")
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1):
        raise _field_error("parallel", "integer >= 1",
                           f"parallel is the number of streams the worker serves at once, not {parallel!r}")
    return SpawnRequest(model=model.strip(), backend=backend.strip().lower(), device=device, ctx_size=ctx,
                        parallel=parallel)


@dataclass
class DownloadRecord:
    """One ``POST /v1/models/download``: its progress log, kept after it ends."""

    download_id: str
    reference: str
    log: EventLog = field(default_factory=EventLog)


def _prune_empty_folders(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to (not including) ``root`` while they are
    empty: a removed download leaves no ``hf/<org>/<repo>/`` behind."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or not ours to remove): the rest stays
        folder = folder.parent


@dataclass
class HiveState:
    """Everything the routes need; built by ``serve()``."""

    config: HiveConfig
    node: dict[str, Any]
    catalog: ModelCatalog
    provisioner: Provisioner
    workers: WorkerRegistry
    nursery: trio.Nursery
    api_token: str | None = None
    shutdown: trio.Event = field(default_factory=trio.Event)
    closing: bool = False
    downloads: dict[str, DownloadRecord] = field(default_factory=dict)
    #: Models that spawns have resolved and not yet handed to a worker (by reference):
    #: ``remove_model`` refuses them as it refuses a loaded one.
    preparing: collections.Counter[str] = field(default_factory=collections.Counter)

    def _device_memory(self, backend: str, device: dict[str, Any]) -> tuple[int, str, str]:
        """(free bytes, where the figure comes from, what to call the device) for a plan."""
        if backend == "cuda":
            for fresh in nvidia_devices():
                if fresh["index"] == device.get("index"):
                    device = fresh
            free = int(device.get("memory_free_bytes") or 0)
            return free, "free VRAM (nvidia-smi)", f"cuda device {device.get('index')} ({device.get('name')})"
        free, source = preflight.free_memory(self.workers.reserved_bytes())
        return free, source, "node"

    def _plan(self, res: Resolution, req: SpawnRequest, device: dict[str, Any], parallel: int,
              kv_per_slot: int | None) -> preflight.MemoryNeed:
        ctx = req.ctx_size or DEFAULT_CTX_SIZE
        need = preflight.memory_need(res.size, ctx, kv_per_slot, parallel)
        free, source, label = self._device_memory(req.backend, device)
        preflight.check_memory(need, model=res.reference, free=free, source=source,
                               smaller=list(res.alternatives), device_label=label)
        return need

    async def spawn(self, body: Any) -> Worker:
        """Preflight, provision and start one worker; returns it in state ``loading``."""
        req = validate_spawn(body)
        if self.closing:
            raise ShuttingDownError("the hive is shutting down; it takes no new workers")
        device = preflight.check_backend(req.backend, req.device, self.node)
        require_built_backend(req.backend)  # what the node reports may be RBEE_DETECT_OVERRIDE's
        ref = parse_reference(req.model)
        parallel = req.parallel or self.config.worker_parallel
        worker_id = new_worker_id()
        log = self.workers.open_log(worker_id)
        started = False
        held: str | None = None  # the reference this spawn counts in self.preparing
        try:
            ctx = req.ctx_size or DEFAULT_CTX_SIZE
            log.append(narrate(ACTOR, "spawn_request", f"Preparing worker {worker_id} for {ref.reference} on "
                               f"{req.backend}:{req.device} with {preflight.slots_phrase(parallel)} of {ctx} tokens",
                               worker_id=worker_id, target=worker_id, parallel=parallel, ctx_size=ctx,
                               cute=f"Making room in the hive for {worker_id}! 🐝",
                               story=f"The hive prepared a place for {worker_id}, to serve {ref.reference}."))
            res = await self.provisioner.resolve(ref)
            self.preparing[res.reference] += 1
            held = res.reference
            # The header's KV figure is per slot (ctx tokens); the plan counts every slot.
            self._plan(res, req, device, parallel, await trio.to_thread.run_sync(res.kv_bytes, ctx))
            entry = await self.provisioner.ensure(res, listener=log.append)
            exact = await trio.to_thread.run_sync(kv_bytes_at, Path(entry.local_path), ctx)
            need = self._plan(res, req, device, parallel, exact)
            log.append(narrate(ACTOR, "memory_plan", f"Worker {worker_id} is planned to use "
                               f"{preflight.human_bytes(need.total)} ({need.explain()})", worker_id=worker_id,
                               target=worker_id, needs_bytes=need.total, kv_cache_bytes=need.kv_cache,
                               parallel=parallel, ctx_size=ctx))
            if self.closing:
                raise ShuttingDownError("the hive is shutting down; it takes no new workers")
            self.catalog.touch(entry.reference)
            worker = self.workers.spawn(worker_id, entry, backend=req.backend, device=req.device,
                                        ctx_size=req.ctx_size, parallel=parallel, planned_bytes=need.total)
            started = True
            return worker
        except RbeeError as exc:
            narrate(ACTOR, "spawn_failed", f"Worker {worker_id} for {ref.reference} not started: {exc.message}",
                    level="error", worker_id=worker_id, target=worker_id)
            raise
        finally:
            if held is not None:
                self.preparing[held] -= 1
                if self.preparing[held] <= 0:
                    del self.preparing[held]
            if not started:
                self.workers.drop_log(worker_id)

    async def start_download(self, body: Any) -> DownloadRecord:
        """Resolve the model now (bad references fail the request), provision it in the background."""
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        if self.closing:
            raise ShuttingDownError("the hive is shutting down")
        ref = parse_reference(body.get("model"))
        res = await self.provisioner.resolve(ref)
        record = DownloadRecord(download_id=f"download-{secrets.token_hex(6)}", reference=res.reference)
        self.downloads[record.download_id] = record
        self.nursery.start_soon(self._run_download, record, res)
        return record

    async def resolve_model(self, body: Any) -> dict[str, Any]:
        """``POST /v1/models/resolve``: which file ``body["model"]`` means here, fetching nothing.

        A file or Hub repository/file that does not exist is a 404 ``model_not_found``.
        """
        if not isinstance(body, dict):
            raise InvalidRequestError("the request body must be a JSON object: {\"model\": REFERENCE}")
        ref = parse_reference(body.get("model"))
        res = await self.provisioner.resolve(ref)  # ModelNotFoundError is a 404 of its own
        return res.public()

    def remove_model(self, model: str) -> dict[str, Any]:
        """``DELETE /v1/models?model=REF``: forget a model, and delete its file when rbee
        put it under ``$RBEE_HOME/models`` (a download, the embedded model). A ``file:``
        model's file, or one used where it lies in the Hugging Face cache, is not rbee's:
        it stays, and only the catalog entry goes.

        404 ``model_not_found`` when the catalog does not hold it (by reference or alias);
        409 ``model_in_use`` while a worker has it (loading, serving or stopping) or a
        spawn or download is provisioning it.
        """
        ref = parse_reference(model)
        entry = self.catalog.get(ref.reference)
        if entry is None:
            raise ModelNotFoundError(f"no model {ref.reference} on this node "
                                     "(`rbee-keeper models list --node NODE` lists its models)")
        users = [w.worker_id for w in self.workers.list()
                 if w.model_ref == entry.reference or w.model_path == entry.local_path]
        if users:
            raise ModelInUseError(
                f"{entry.reference} is in use by worker {', '.join(users)}: stop it first "
                f"(`rbee-keeper workers shutdown --worker-id {users[0]}`) or wait until it unloads",
                details={"workers": users})
        if self.preparing.get(entry.reference) or self.provisioner.provisioning(entry.reference):
            raise ModelInUseError(f"{entry.reference} is being provisioned for a worker or a download: "
                                  "remove it once that is done")
        path = Path(entry.local_path)
        root = models_dir()
        ours = entry.provider in ("hf", "embedded") and path.resolve().is_relative_to(root.resolve())
        if ours:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise state_error(path, exc) from None
            _prune_empty_folders(path.parent, root)
        self.catalog.remove(entry.reference)
        kept = "" if ours else f" (its file {path} is not rbee's and stays)"
        narrate(ACTOR, "model_removed", f"{entry.reference} removed from the catalog{kept}",
                target=entry.reference, local_path=entry.local_path, file_deleted=ours)
        return {"reference": entry.reference, "local_path": entry.local_path, "size": entry.size,
                "file_deleted": ours}

    async def _run_download(self, record: DownloadRecord, res: Resolution) -> None:
        log = record.log
        try:
            already = res.entry is not None
            entry = await self.provisioner.ensure(res, listener=log.append)
            human = (f"{entry.reference} was already on this node" if already
                     else f"{entry.reference} is downloaded and verified")
            log.append(narrate(ACTOR, "download_complete", human, target=entry.reference,
                               bytes_total=entry.size, local_path=entry.local_path, sha256=entry.sha256,
                               cute=f"{entry.reference} is home safe! 🏠",
                               story=f"{entry.reference} lay safe on this node's disk."))
        except RbeeError as exc:
            log.append(Error(code=exc.code, message=exc.message))
        finally:
            log.close()

    def download(self, download_id: str) -> DownloadRecord:
        """A download by id; ``NotFoundError`` if unknown."""
        record = self.downloads.get(download_id)
        if record is None:
            raise NotFoundError(f"no download {download_id!r} on this hive")
        return record
