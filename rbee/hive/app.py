"""The hive's HTTP API (quart-trio), DESIGN.md's Hive section plus what the queen needs.

- ``GET /v1/health`` (also ``/health``): no token needed.
- ``GET /openapi.json``: this API as an OpenAPI 3.1 document (``rbee.openapi``); no token needed.
- ``GET /v1/detect``: the node's backends and devices (``rbee-hive detect``'s JSON), measured
  at each call (free memory and disk change as workers and models come and go).
- ``GET /v1/workers`` -> ``{"workers": [{worker_id, url, state, model_ref, sha256, backend,
  device, pid, ctx_size, slots: {total, busy}, memory_bytes, idle_timeout_s, api_key}]}``;
  ``state`` is ``loading``, ``idle``, ``busy``, ``full`` or ``stopping``. ``api_key`` is an
  extension: the key the hive minted for the worker, so that the hive's caller (the queen)
  can call the worker directly. Anyone who may call the hive may use its workers.
- ``GET /v1/events``: SSE of ``worker`` events (``WorkerChange``, the same fields as the
  listing): ``present`` for each live worker on connect, then ``spawned``, ``ready``,
  ``capacity`` (busy slots changed) and ``exited`` (with ``reason``, ``exit_code``) as they
  happen; ``: ping`` when quiet; ``[DONE]`` when the hive shuts down.
- ``POST /v1/workers/spawn {model, backend="cpu", device=0, ctx_size?, parallel?}`` -> 201
  ``{worker_id, url, state: "loading", api_key, model_ref, pid, backend, device, ctx_size,
  slots}``; waits while the model is provisioned (narrated on stdout and into the
  worker's narration). ``parallel`` defaults to the hive's ``--worker-parallel``.
- ``POST /v1/workers/ready``: the worker's callback, authenticated by its own key.
- ``GET /v1/workers/{id}/narration``: SSE of the worker's stdout/stderr since spawn, then
  live, ``[DONE]`` when it exited. ``POST /v1/workers/{id}/shutdown``.
- ``GET /v1/models`` -> ``{"models": [catalog entries]}``.
- ``DELETE /v1/models?model=REF`` -> ``{reference, local_path, size, file_deleted}``: the
  catalog entry goes, and the file too when rbee put it under ``$RBEE_HOME/models``; 404
  ``model_not_found``, 409 ``model_in_use`` while a worker has it (``HiveState.remove_model``).
- ``POST /v1/models/resolve {model}`` -> ``{reference, sha256, size, on_disk, file}``: which
  file the reference means on this node, fetching nothing (404 ``model_not_found``).
- ``POST /v1/models/download {model}`` -> 202 ``{download_id, model_ref}``;
  ``GET /v1/models/download/{id}/progress``: SSE of narration (``download_progress`` with
  ``bytes_done``, ``bytes_total``, ``percent``, ``bytes_per_sec``, ``eta_s``), then a
  ``download_complete`` narration, or an ``error`` event; then ``[DONE]``.
- ``POST /v1/shutdown`` -> 202: stop every worker, then exit.

Errors are rbee's envelope ``{"error": {"code", "message", "details", "type", "param"}}``, never a traceback.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio

from ..http_common import install_error_edge, json_body, model_query, sse_response, streaming_app
from ..narration import narrate
from ..openapi import HIVE, OPENAPI_PATH, served_document
from .auth import check_request
from .config import ACTOR
from .detect import detect_node
from .eventlog import sse_body
from .events import sse_body as worker_events_body
from .service import HiveState


def create_app(state: HiveState) -> QuartTrio:
    """The quart-trio app of one hive."""
    # A spawn waits for a download, and narration streams last as long as their worker.
    app = streaming_app("rbee-hive")
    install_error_edge(app, "rbee-hive", on_bug=lambda exc: traceback.print_exception(exc, file=sys.stderr))

    @app.before_request
    async def check_token() -> Any:
        check_request(request.path, request.headers.get("Authorization"), state.api_token)
        return None

    @app.get("/v1/health")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "hostname": state.node.get("hostname"), "workers": len(state.workers.list()),
                "rbee_version": state.node.get("rbee_version")}

    @app.get(OPENAPI_PATH)
    async def openapi_document() -> dict[str, Any]:
        return served_document(HIVE, app.url_map)

    @app.get("/v1/detect")
    async def detect() -> dict[str, Any]:
        # Measured now, and kept: a spawn's backend check reads the same facts.
        state.node = await trio.to_thread.run_sync(detect_node)
        return state.node

    @app.get("/v1/workers")
    async def list_workers() -> dict[str, Any]:
        return {"workers": [w.public(with_key=True) for w in state.workers.list()]}

    @app.post("/v1/workers/spawn")
    async def spawn() -> tuple[dict[str, Any], int]:
        worker = await state.spawn(await json_body())
        return worker.public(with_key=True), 201

    @app.post("/v1/workers/ready")
    async def ready() -> dict[str, Any]:
        body = await json_body()
        worker = state.workers.mark_ready(request.headers.get("Authorization"), body)
        return {"worker_id": worker.worker_id, "state": worker.state}

    @app.get("/v1/events")
    async def events() -> Response:
        # The body subscribes when it starts: the present workers, then the live changes.
        return sse_response(worker_events_body(state.workers.subscribe, state.config.ping_interval_s))

    @app.get("/v1/workers/<worker_id>/narration")
    async def worker_narration(worker_id: str) -> Response:
        return sse_response(sse_body(state.workers.log_of(worker_id), state.config.ping_interval_s))

    @app.post("/v1/workers/<worker_id>/shutdown")
    async def worker_shutdown(worker_id: str) -> dict[str, Any]:
        # Optional body {"reason": why, "kill": true}: the queen kills a stalled worker.
        body = await json_body(required=False)
        reason = body.get("reason") if isinstance(body.get("reason"), str) else "asked over HTTP"
        worker = state.workers.get(worker_id)
        await state.workers.stop(worker, reason[:200], kill=body.get("kill") is True)
        return {"worker_id": worker_id, "state": "stopped", "exit_code": worker.returncode}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"models": [e.public() for e in state.catalog.list()]}

    @app.delete("/v1/models")
    async def remove_model() -> dict[str, Any]:
        return state.remove_model(model_query())

    @app.post("/v1/models/resolve")
    async def resolve_model() -> dict[str, Any]:
        return await state.resolve_model(await json_body())

    @app.post("/v1/models/download")
    async def download() -> tuple[dict[str, Any], int]:
        record = await state.start_download(await json_body())
        return {"download_id": record.download_id, "model_ref": record.reference}, 202

    @app.get("/v1/models/download/<download_id>/progress")
    async def download_progress(download_id: str) -> Response:
        return sse_response(sse_body(state.download(download_id).log, state.config.ping_interval_s))

    @app.post("/v1/shutdown")
    async def shutdown() -> tuple[dict[str, Any], int]:
        narrate(ACTOR, "shutdown_request", "Shutdown requested over HTTP")
        state.shutdown.set()
        return {"status": "shutting_down"}, 202

    return app
