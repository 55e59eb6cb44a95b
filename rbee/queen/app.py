"""The queen's HTTP API (quart-trio): jobs, nodes, workers, models, shutdown, and OpenAI's
API (``openai_api.py``).

Every error leaves as rbee's JSON envelope (OpenAI's error object). Streams are SSE whose
body generator reads the job's channel: it batches whatever events are ready into one
write, sends ``: ping`` after ``ping_interval_s`` of quiet, and ``data: [DONE]`` when the
job's task has ended. If the client goes away first (Quart cancels the response and
closes the generator), the job is cancelled unless it was submitted with ``"detach": true``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, AsyncIterator

import trio
from quart import Response, request
from quart_trio import QuartTrio

from .. import __version__
from ..errors import InvalidRequestError, ModelNotFoundError, NotFoundError, ShuttingDownError
from ..http_common import check_bearer, install_error_edge, json_body, model_query, sse_response, streaming_app
from ..narration import narrate, sse
from ..openapi import OPENAPI_PATH, QUEEN, served_document
from ..requests import json_type, parse_infer_request
from .infer import submit_checks
from .jobs import Job
from .nodes import Node, validate_node_fields
from .openai_api import register_openai_routes
from .operations import DownloadJob, validate_download
from ..errors import QueueFullError
from .ssh import probe_node
from .state import QueenState
from .status import cluster_status, public_workers

ACTOR = "queen-rbee"
#: The routes anyone may call, also with RBEE_API_TOKEN set: health, and the OpenAPI
#: document (it holds nothing secret).
OPEN_PATHS = frozenset({"/health", OPENAPI_PATH})


def _log_bug(exc: BaseException) -> None:
    """A bug's traceback goes to the queen's stderr (its log); the client gets one line."""
    traceback.print_exception(exc, file=sys.stderr)


def _detach(body: dict[str, Any]) -> bool:
    """A job body's ``detach``: true, false or absent (a string such as "false" is a
    client's mistake, not a request to detach)."""
    detach = body.get("detach")
    if detach is not None and not isinstance(detach, bool):
        raise InvalidRequestError(
            f"detach must be true or false, not {json_type(detach)}",
            details=[{"field": "detach", "constraint": "type:boolean", "message": "detach must be true or false"}],
        )
    return bool(detach)


def submit_infer(state: QueenState, body: dict[str, Any], *, detach: bool = False) -> Job:
    """Submit an ``infer`` job (``POST /v1/jobs``, ``/v2/tasks`` and OpenAI's routes).

    Checked before the job exists: a bad request is a 400, an unknown node a 404, a full
    queue a 503 with Retry-After; nothing has started for any of them.
    """
    if state.draining:
        raise ShuttingDownError("queen-rbee is shutting down: it takes no new jobs (its running jobs finish first)")
    spec = parse_infer_request(body)
    submit_checks(state.nodes, spec)
    try:
        return state.jobs.submit(
            "infer", body, state.infer.run, detach=detach, spec=spec,
            admit=lambda job_id: state.scheduler.admit(job_id, spec.ref.reference),
        )
    except QueueFullError:
        state.metrics.job_finished("infer", "rejected")
        raise


def create_app(state: QueenState) -> QuartTrio:
    """The quart-trio app of one queen."""
    # Streams live as long as their job (a model download can take many minutes).
    app = streaming_app("queen-rbee")
    install_error_edge(app, "queen-rbee", on_bug=_log_bug)
    download_job = DownloadJob(state.nodes, state.hives, state.http)

    @app.before_request
    async def check_token() -> Any:
        if request.path not in OPEN_PATHS:
            check_bearer(state.api_token, request.headers.get("Authorization"),
                         hint="RBEE_API_TOKEN; for OpenAI clients: the api_key")
        return None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        # ``service`` tells a queen from any other server answering 200 here (the keeper
        # takes nothing else for one); pid and uptime are what `queen status` shows.
        return {"status": "ok", "service": ACTOR, "version": __version__, "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - state.started, 1),
                "jobs": len(state.jobs.list()), "hives": [h.node.name for h in state.hives.running()]}

    @app.get(OPENAPI_PATH)
    async def openapi_document() -> dict[str, Any]:
        return served_document(QUEEN, app.url_map)

    # -- jobs ---------------------------------------------------------------------------

    def submit(body: dict[str, Any]) -> Job:
        operation = body.get("operation", "infer")
        if operation == "infer":
            return submit_infer(state, body, detach=_detach(body))
        if operation == "download":
            if state.draining:
                raise ShuttingDownError("queen-rbee is shutting down: it takes no new jobs")
            return state.jobs.submit("download", validate_download(body), download_job.run, detach=_detach(body))
        raise InvalidRequestError(
            f"unknown operation {operation!r}",
            details=[{"field": "operation", "constraint": "infer|download", "message": "what the job does"}],
        )

    def stream_response(job: Job) -> Response:
        return sse_response(_job_events(state, job), headers={"X-Rbee-Job-Id": job.job_id})

    @app.post("/v1/jobs")
    async def create_job() -> tuple[dict[str, Any], int]:
        job = submit(await json_body())
        return {"job_id": job.job_id, "sse_url": f"/v1/jobs/{job.job_id}/stream"}, 201

    @app.post("/v2/tasks")
    async def one_shot_task() -> Response:
        job = submit(await json_body())
        return stream_response(state.jobs.take_stream(job.job_id))

    @app.get("/v1/jobs")
    async def list_jobs() -> dict[str, Any]:
        return {"jobs": [j.public() for j in state.jobs.list()]}

    @app.get("/v1/jobs/<job_id>/stream")
    async def job_stream(job_id: str) -> Response:
        return stream_response(state.jobs.take_stream(job_id))

    @app.delete("/v1/jobs/<job_id>")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = state.jobs.get(job_id)
        job.cancel()
        return {"job_id": job_id, "state": job.state if job.finished.is_set() else "cancelling"}

    # -- nodes --------------------------------------------------------------------------

    @app.get("/v1/nodes")
    async def list_nodes() -> dict[str, Any]:
        return {"nodes": [n.public() for n in state.nodes.list()]}

    @app.post("/v1/nodes")
    async def add_node() -> tuple[dict[str, Any], int]:
        fields = validate_node_fields(await json_body())
        candidate = Node(**fields)
        narrate(ACTOR, "ssh_probe", f"Testing SSH to node {candidate.name} ({candidate.ssh_host}:{candidate.ssh_port})", node=candidate.name)
        state.nodes.check_new(candidate)
        detect, host_key = await probe_node(state.bridge, candidate, state.hives.liveness)
        stored = state.nodes.put(Node(**{**fields, "detect": detect, "host_key": host_key or None}))
        narrate(ACTOR, "node_add", f"Node {stored.name} added: {detect.get('hostname', '?')}", node=stored.name)
        return stored.public(), 201

    @app.delete("/v1/nodes/<name>")
    async def remove_node(name: str) -> dict[str, Any]:
        state.nodes.remove(name)
        return {"removed": name}

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        # Every node at a glance (status.py): running hives asked in parallel, nothing started.
        return await cluster_status(state)

    # -- workers and models (through the running hives) ---------------------------------

    @app.get("/v1/workers")
    async def list_workers() -> dict[str, Any]:
        # The scheduler's records (status.py: GET /v1/status lists the same per node).
        return {"workers": public_workers(state.scheduler)}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render(request.headers.get("Accept", ""))
        return Response(body, status=200, content_type=content_type)

    @app.post("/v1/workers/shutdown")
    async def shutdown_workers() -> dict[str, Any]:
        # No body stops every worker; a body names a node and/or a worker, as strings (a
        # falsy non-string such as 0 or [] must not widen the request to every worker).
        body = await json_body(required=False)
        bad = [f for f in ("node", "worker_id") if body.get(f) is not None and not isinstance(body[f], str)]
        if bad:
            raise InvalidRequestError(
                f"invalid workers shutdown request: {' and '.join(bad)} must be a string or null",
                details=[{"field": f, "constraint": "type:string", "message": f"{f} must be a string or null"}
                         for f in bad],
            )
        node, worker_id = body.get("node"), body.get("worker_id")
        if node:
            state.nodes.get(node)  # an unknown node is a 404 naming the fix, not "nothing stopped"
        stopped = []
        for hive in state.hives.running():
            if node and hive.node.name != node:
                continue
            listing = await hive.request("GET", "/v1/workers")
            for worker in listing.get("workers", []):
                if worker_id and worker.get("worker_id") != worker_id:
                    continue
                await hive.request("POST", f"/v1/workers/{worker['worker_id']}/shutdown")
                stopped.append({"node": hive.node.name, "worker_id": worker["worker_id"]})
        if worker_id and not stopped:
            raise NotFoundError(f"no worker {worker_id!r} on the running hives (see `rbee-keeper workers list`)")
        return {"stopped": stopped}

    @app.get("/v1/nodes/<name>/models")
    async def node_models(name: str) -> dict[str, Any]:
        # rbee's own catalog listing of one node (starts its hive if needed); OpenAI's
        # GET /v1/models (openai_api.py) lists what the running hives have.
        node = state.nodes.get(name)
        hive = state.hives.get(node.name) or await state.hives.ensure(node)
        listing = await hive.request("GET", "/v1/models")
        return {"node": node.name, **(listing if isinstance(listing, dict) else {"models": listing})}

    @app.delete("/v1/nodes/<name>/models")
    async def remove_node_model(name: str) -> dict[str, Any]:
        # ?model=REF: references hold '/' and ':' (and file: paths '..'), which a query
        # carries as they are; the hive decides (404 unknown, 409 in use).
        node = state.nodes.get(name)
        model = model_query()
        hive = state.hives.get(node.name) or await state.hives.ensure(node)
        try:
            answer = await hive.request("DELETE", "/v1/models", params={"model": model})
        except ModelNotFoundError:  # the hive cannot name its node; the queen can
            raise ModelNotFoundError(f"no model {model} on node {node.name} "
                                     f"(`rbee-keeper models list --node {node.name}` lists its models)") from None
        state.infer.forget_resolved(node.name)  # the next job asks the catalog again
        narrate(ACTOR, "model_remove", f"{answer.get('reference', model)} removed from node {node.name}",
                node=node.name, target=str(answer.get("reference", model)))
        return {"node": node.name, **answer}

    register_openai_routes(app, state, lambda body: submit_infer(state, body))

    @app.post("/v1/shutdown")
    async def shutdown() -> tuple[dict[str, Any], int]:
        narrate(ACTOR, "shutdown", "Shutdown requested over HTTP")
        state.shutdown.set()
        return {"status": "shutting_down"}, 202

    return app


async def _job_events(state: QueenState, job: Job) -> AsyncIterator[bytes]:
    """The SSE body of one job: its events, pings when quiet, ``[DONE]`` at its end."""
    finished = False
    try:
        while (events := await job.receive_batch(trio.current_time() + state.ping_interval_s)) is not None:
            yield b"".join(sse.encode(event) for event in events) if events else sse.encode_ping()
        finished = True
        yield sse.encode_done()
    finally:
        # Synchronous on purpose: this runs while the response is being cancelled.
        if finished:
            state.jobs.forget(job)
        elif not job.detach and not job.finished.is_set():
            # The reader is gone: the job is cancelled and nobody's stream any more, so
            # the registry forgets it some time after it ends.
            job.stream_taken = False
            job.cancel()
