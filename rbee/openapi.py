"""The OpenAPI 3.1 documents of rbee's daemons (``GET /openapi.json``), with no I/O.

Each daemon's document is built from a route table (``worker_routes()``,
``hive_routes()``, ``queen_routes()``) and from the typed definitions the code itself checks
and writes with, so that the contract cannot drift from what the daemons do:

- request bodies: ``rbee.requests.json_schema`` (the same field specs that validate them),
  and the bounds and names the other validators use (``BACKENDS``, ``NODE_NAME_PATTERN``,
  the hive's ``MAX_CTX_SIZE``, the worker's ``JOB_ID_PATTERN``);
- the error envelope: ``RbeeError.envelope``'s shape, and for each HTTP status the codes
  whose class answers with it (``rbee.errors.ERRORS``), with the ``type`` that status gives;
- the SSE events: the dataclasses of ``rbee.narration.events`` (their fields, and which are
  left out when null, as ``rbee.narration.wire`` writes them); each stream lists the event
  types it carries, and every one ends with ``data: [DONE]``;
- JSON answers built from dataclasses (the hive's catalog entries and workers, the queen's
  nodes) from those dataclasses.

``document(daemon, rules)`` checks the table against the app's own routes (``rules``: the
``(method, path)`` pairs of its ``url_map``): a route without a row, or a row without a
route, is an ``InternalError`` naming it, and a test builds every daemon's document, so a
new route cannot ship undocumented.

An SSE response is documented the way OpenAPI 3.2 reads ``text/event-stream`` and 3.1
tools understand too: its ``schema`` describes one event as ``{event, data}``, ``data`` a
string whose ``contentMediaType`` is JSON and whose ``contentSchema`` is the event's object
(``x-rbee-events`` lists the types). A JSON field documented with a range or a pattern is
checked the same way by the daemon; what only a running daemon knows (a worker's context
size, which nodes exist) is said in the descriptions.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import __version__
from .errors import ERRORS, InternalError, error_type
from .narration import events as ev
from .requests import (
    ACCEPTED_FORMS,
    BACKENDS,
    EMBEDDED_ALIAS,
    NODE_NAME_PATTERN,
    InferRequest,
    SamplingParams,
    json_schema,
)

OPENAPI_VERSION = "3.1.0"
#: Where every daemon serves its document; open like the health routes (see docs/http.md).
OPENAPI_PATH = "/openapi.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
WORKER, HIVE, QUEEN = "llm-worker-rbee", "rbee-hive", "queen-rbee"
#: The statuses of rbee's errors (each class has one): 4xx for the caller's faults,
#: 502/503/504 for trouble below or "not now". Never 500.
ERROR_STATUSES = tuple(sorted({cls.http_status for cls in ERRORS.values()}))
_REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    """``{"$ref": "#/components/schemas/<name>"}``."""
    return {"$ref": _REF + name}


# -- the route table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One operation of a daemon, as its document shows it.

    ``answer`` names the component schema of a JSON success body; ``stream`` the SSE event
    types of a ``text/event-stream`` success (``openai:<chunk schema>`` for OpenAI's data-only
    events); both set: the request decides (OpenAI's ``stream``). ``errors``: the statuses this route answers
    beside those every route may (401 without the token, 503 for a bug or a drain, 4XX of
    the shared edge). ``public``: no token needed; ``worker_key``: the worker's own key
    instead of the daemon's token (the hive's ready callback). ``shutdown``: the route stops
    the daemon (the fuzzer leaves it out).
    """

    method: str
    path: str
    summary: str
    answer: str | None = None
    ok: int = 200
    body: str | None = None
    body_optional: bool = False
    stream: tuple[str, ...] = ()
    errors: tuple[int, ...] = ()
    public: bool = False
    shutdown: bool = False
    worker_key: bool = False
    #: The media types of the success body (``answer`` is their schema).
    answer_types: tuple[str, ...] = ("application/json",)
    headers: tuple[str, ...] = ()
    description: str = ""
    params: Mapping[str, str] = field(default_factory=dict)
    #: Required query parameters (strings) by name, with their descriptions.
    query: Mapping[str, str] = field(default_factory=dict)


#: Response headers a route may document, by name.
HEADERS: dict[str, dict[str, Any]] = {
    "X-Rbee-Job-Id": {"description": "The id of the job this answer belongs to (DELETE /v1/jobs/{id} cancels it).",
                      "schema": {"type": "string"}},
    "Retry-After": {"description": "Seconds after which the same request may succeed.",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "WWW-Authenticate": {"description": "Bearer: this route needs a bearer token.", "schema": {"type": "string"}},
}


# -- schemas from the typed definitions ---------------------------------------------------

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of a field's Python type: scalars, ``X | None``, mappings, sequences."""
    if hint is Any:
        return {}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [type_schema(arg) for arg in typing.get_args(hint)]
        if all(set(p) == {"type"} and isinstance(p["type"], str) for p in parts):
            return {"type": [p["type"] for p in parts]}
        return {"anyOf": parts}
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return {"type": "object"}
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return {"type": "array", **({"items": type_schema(args[0])} if args else {})}
    raise TypeError(f"no JSON Schema for the type {hint!r}")


def dataclass_schema(cls: type, *, omit_null: bool, exclude: Iterable[str] = (),
                     description: str | None = None) -> dict[str, Any]:
    """The JSON object a dataclass is written as.

    ``omit_null``: the wire's rule (``rbee.narration.wire``): a field whose default is
    None is left out while None, so only the other fields are required; otherwise
    (``asdict``) every field is there. Unknown keys are allowed: a newer daemon may add
    fields, and readers ignore what they do not know.
    """
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        properties[f.name] = type_schema(hints[f.name])
        if not (omit_null and f.default is None):
            required.append(f.name)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return {"type": "object", "description": description or doc, "properties": properties, "required": required}


def event_component(cls: type) -> str:
    """The component name of an event class: ``TokenEvent``, ``NarrationEvent`` ..."""
    name = cls.__name__
    return name if name.endswith("Event") else name + "Event"


def event_schema(cls: type) -> dict[str, Any]:
    """The JSON of one stream event (``"type"`` plus its fields, as ``wire.to_dict`` writes it)."""
    schema = dataclass_schema(cls, omit_null=True, exclude=("extra",))
    schema["properties"] = {"type": {"const": cls.type}, **schema["properties"]}
    schema["required"] = ["type", *schema["required"]]
    if cls is ev.NarrationEvent:
        schema["properties"]["level"] = {"enum": list(ev.LEVELS)}
        # Free extra fields sit beside the named ones: numbers, strings, booleans, null.
        schema["additionalProperties"] = {"type": ["string", "number", "boolean", "null"]}
        schema["description"] += (" Extra fields (bytes_done, tokens_out, duration_ms ...) sit beside the named"
                                  " ones.")
    return schema


def _sse_event_object(types_: Sequence[str]) -> dict[str, Any]:
    """The schema of one SSE event of a stream of rbee events of ``types_``, or ``[DONE]``.

    An event is ``{"event": <type>, "data": "<its JSON>"}``; the end is ``{"data":
    "[DONE]"}`` with no name (which SSE readers call ``message``). One ``if``/``then`` per
    type picks the data's schema.
    """
    by_type = {cls.type: cls for cls in ev.EVENT_TYPES.values()}
    rules = [
        {
            "if": {"required": ["event"], "properties": {"event": {"const": t}}},
            "then": {"properties": {"data": {"contentMediaType": "application/json",
                                              "contentSchema": ref(event_component(by_type[t]))}}},
        }
        for t in types_
    ]
    named = {"required": ["event"], "properties": {"event": {"enum": list(types_)}}}
    rules.append({"if": {"not": named}, "then": {"properties": {"data": {"const": "[DONE]"}}}})
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"event": {"enum": [*types_, "message"]}, "data": {"type": "string"}},
        "allOf": rules,
    }


def _openai_sse_event_object(chunk: str) -> dict[str, Any]:
    """One event of OpenAI's stream: ``data: <chunk or error JSON>``, or ``data: [DONE]``;
    no ``event:`` name (SSE readers call that ``message``)."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"event": {"const": "message"}, "data": {"type": "string"}},
        "if": {"properties": {"data": {"const": "[DONE]"}}},
        "else": {"properties": {"data": {"contentMediaType": "application/json",
                                          "contentSchema": {"anyOf": [ref(chunk), ref("OpenAIStreamError")]}}}},
    }


def error_envelope() -> dict[str, Any]:
    """The envelope of every error answer (``RbeeError.envelope``: OpenAI's error object)."""
    statuses = sorted({cls.http_status for cls in ERRORS.values()})
    return {
        "type": "object",
        "description": "Every error answer of every rbee daemon: OpenAI's error object, with rbee's code and "
                       "details. `type` follows the HTTP status; `param` names the first bad field.",
        "required": ["error"],
        "properties": {"error": {
            "type": "object",
            "required": ["message", "type", "param", "code", "details"],
            "properties": {
                "message": {"type": "string", "description": "One line naming the cause and the fix."},
                "type": {"enum": sorted({error_type(s) for s in statuses})},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string", "description": "Stable; the class of the error decides it and the status."},
                "details": {"description": "For a bad request: [{field, constraint, message}], every bad field; "
                                           "else null or an object (retry_after ...)."},
            },
        }},
    }


def codes_of(status: int) -> list[str]:
    """The error codes whose class answers with ``status``."""
    return sorted(code for code, cls in ERRORS.items() if cls.http_status == status)


def error_response(status: int) -> dict[str, Any]:
    """The response object of one error status: the envelope, its codes and its ``type``."""
    codes = codes_of(status)
    error: dict[str, Any] = {"type": {"const": error_type(status)}}
    # 502 also relays a code that a newer daemon below sent and this one does not know.
    if codes and status != 502:
        error["code"] = {"enum": codes}
    response: dict[str, Any] = {
        "description": f"Error ({', '.join(codes) or 'an edge error'})",
        "content": {"application/json": {"schema": {
            "allOf": [ref("ErrorEnvelope")], "properties": {"error": {"properties": error}},
        }}},
    }
    if status == 503:
        response["headers"] = {"Retry-After": HEADERS["Retry-After"]}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": HEADERS["WWW-Authenticate"]}
    return response


def _object(properties: Mapping[str, Any], required: Iterable[str] = (), description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dict(properties), "required": list(required)}
    if description:
        schema["description"] = description
    return schema


def _without_meta(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A component schema: the document's dialect applies, so no ``$schema`` of its own."""
    return {k: v for k, v in schema.items() if k != "$schema"}


def _slots() -> dict[str, Any]:
    return _object({"total": {"type": "integer", "minimum": 1}, "busy": {"type": "integer", "minimum": 0}},
                   ["total", "busy"])


def _device() -> dict[str, Any]:
    """One device of a node, as ``rbee-hive detect`` lists it (the hive's ``Detect``, the
    queen's ``NodeStatus``)."""
    return _object({"backend": {"type": "string"}, "index": {"type": "integer"}, "name": {"type": "string"},
                    "memory_total_bytes": {"type": ["integer", "null"]},
                    "memory_free_bytes": {"type": ["integer", "null"]}}, ["backend", "index"])


def _model_field(description: str = f"Model reference: {ACCEPTED_FORMS}.") -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": description}


def shared_schemas() -> dict[str, Any]:
    """The components every daemon's document has: the envelope and the stream events."""
    schemas: dict[str, Any] = {"ErrorEnvelope": error_envelope()}
    for cls in ev.EVENT_TYPES.values():
        schemas[event_component(cls)] = event_schema(cls)
    schemas["Shutdown"] = _object({"status": {"const": "shutting_down"}}, ["status"])
    schemas["OpenAPIDocument"] = {"type": "object", "description": "This document (OpenAPI 3.1).",
                                  "required": ["openapi", "info", "paths"]}
    return schemas


# -- the worker ---------------------------------------------------------------------------

#: The events of one inference stream (started ... end), in no particular order here.
INFERENCE_EVENTS = ("started", "narration", "prefill", "token", "metrics", "end", "error")


def worker_inference_schema() -> dict[str, Any]:
    """``POST /v1/inference``'s body: an infer request without what only the queen uses
    (``model``, ``node``, ``backend``, ``device``), plus the worker's own ``job_id``."""
    from .worker.validation import JOB_ID_PATTERN

    schema = _without_meta(json_schema(InferRequest))
    properties = {k: v for k, v in schema["properties"].items() if k not in ("model", "node", "backend", "device")}
    properties["job_id"] = {"type": ["string", "null"], "pattern": f"^{JOB_ID_PATTERN.pattern}$",
                            "description": "Names the stream (DELETE /v1/inference/{job_id}); null: a fresh one."}
    properties["max_tokens"] = {**properties["max_tokens"], "description": properties["max_tokens"]["description"]
                                + " At most the worker's context size; prompt plus max_tokens must fit in it."}
    return {**schema, "title": "WorkerInferenceRequest", "properties": properties,
            "required": [r for r in schema["required"] if r in properties]}


def worker_routes() -> tuple[list[Route], dict[str, Any]]:
    """The worker's routes and its own component schemas."""
    states = ["loading", "idle", "busy", "full", "error"]
    schemas = {
        "WorkerHealth": _object({"status": {"const": "ok"}, "worker_id": {"type": "string"},
                                 "state": {"enum": states}}, ["status", "worker_id", "state"]),
        "WorkerReady": _object({"ready": {"type": "boolean"}, "state": {"enum": states}, "slots": _slots(),
                                "error": _object({"code": {"type": "string"}, "message": {"type": "string"}},
                                                 ["code", "message"])},
                               ["ready", "state", "slots"]),
        "WorkerInferenceRequest": worker_inference_schema(),
        "InferenceCancelled": _object({"job_id": {"type": "string"}, "cancelled": {"type": "boolean"}},
                                      ["job_id", "cancelled"]),
        "WorkerShutdownRequest": _object({"reason": {"type": ["string", "null"]}}, [],
                                         "Why (the hive says): a running job's stream ends with it."),
        "WorkerShutdown": _object({"shutting_down": {"const": True}}, ["shutting_down"]),
    }
    routes = [
        Route("get", "/health", "Liveness, in every state (also while loading)", "WorkerHealth", public=True),
        Route("get", OPENAPI_PATH, "This document", "OpenAPIDocument", public=True),
        Route("get", "/v1/ready", "Whether the model is loaded, and the slots", "WorkerReady"),
        Route("get", "/v1/loading/progress", "The model load: loading events, then ready (or error)",
              stream=("loading", "ready", "error")),
        Route("post", "/v1/inference", "One generation, streamed", body="WorkerInferenceRequest",
              stream=INFERENCE_EVENTS, errors=(400, 409),
              description="400 lists every bad field; 409 job_exists: the job_id runs here; 503 loading or full "
                          "with Retry-After."),
        Route("delete", "/v1/inference/{job_id}", "Cancel one stream (idempotent)", "InferenceCancelled",
              params={"job_id": "The stream's job_id."}),
        Route("post", "/v1/shutdown", "Stop the worker (as SIGTERM)", "WorkerShutdown", shutdown=True,
              body="WorkerShutdownRequest", body_optional=True),
    ]
    return routes, schemas


# -- the hive -----------------------------------------------------------------------------

#: The ``?model=`` of the routes that remove a model (a query: references hold '/' and ':').
MODEL_QUERY = f"The model to remove, as listed or as asked for: {ACCEPTED_FORMS}."


def model_removed() -> dict[str, Any]:
    """What removing a model answers (``HiveState.remove_model``)."""
    return _object({
        "reference": {"type": "string", "description": "The catalog's reference of the model removed."},
        "local_path": {"type": "string"},
        "size": {"type": "integer", "minimum": 0},
        "file_deleted": {"type": "boolean", "description": "false: the file is not rbee's (a file: model, or one "
                                                           "in the Hugging Face cache) and stays where it is."},
    }, ["reference", "local_path", "size", "file_deleted"])



def hive_routes() -> tuple[list[Route], dict[str, Any]]:
    """The hive's routes and its own component schemas."""
    from .hive.catalog import CatalogEntry
    from .hive.service import MAX_CTX_SIZE
    from .hive.workers import _NOT_LISTED

    worker = dataclass_schema(ev.WorkerChange, omit_null=False, exclude=_NOT_LISTED,
                              description="One worker of the hive (the fields of its `worker` events).")
    worker["properties"]["slots"] = _slots()
    worker["properties"]["api_key"] = {"type": ["string", "null"],
                                       "description": "The worker's key, for the hive's caller to call it directly."}
    worker["required"] += ["slots", "api_key"]
    schemas = {
        "HiveHealth": _object({"status": {"const": "ok"}, "hostname": {"type": ["string", "null"]},
                               "workers": {"type": "integer", "minimum": 0},
                               "rbee_version": {"type": ["string", "null"]}},
                              ["status", "hostname", "workers", "rbee_version"]),
        "Detect": _object({"hostname": {"type": "string"}, "backends": {"type": "array", "items": {"enum": list(BACKENDS)}},
                           "devices": {"type": "array", "items": _device()},
                           "disk_free_bytes": {"type": "integer"}, "rbee_version": {"type": "string"}},
                          ["hostname", "backends", "devices"], "What `rbee-hive detect` measured at start."),
        "HiveWorker": worker,
        "HiveWorkers": _object({"workers": {"type": "array", "items": ref("HiveWorker")}}, ["workers"]),
        "SpawnRequest": _object({
            "model": _model_field(),
            "backend": {"enum": [*BACKENDS, None], "default": "cpu"},
            "device": {"type": ["integer", "null"], "minimum": 0, "default": 0},
            "ctx_size": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_CTX_SIZE,
                         "description": "Tokens of each slot's context; null: the worker's default (4096)."},
            "parallel": {"type": ["integer", "null"], "minimum": 1,
                         "description": "Slots (streams at once); null: the hive's --worker-parallel."},
        }, ["model"], "Start a worker: preflight, provision the model, spawn."),
        "ReadyCallback": _object({"worker_id": {"type": "string"}}, ["worker_id"],
                                 "The worker's callback once loaded (url, model_ref ... may come too)."),
        "ReadyAnswer": _object({"worker_id": {"type": "string"}, "state": {"type": "string"}}, ["worker_id", "state"]),
        "WorkerStopRequest": _object({
            "reason": {"type": ["string", "null"], "description": "Why, in a few words (cut to 200 characters)."},
            "kill": {"type": ["boolean", "null"], "description": "true: SIGKILL at once (a stalled worker)."},
        }, [], "How to stop the worker; no body: politely, 'asked over HTTP'."),
        "WorkerStopped": _object({"worker_id": {"type": "string"}, "state": {"const": "stopped"},
                                  "exit_code": {"type": ["integer", "null"]}}, ["worker_id", "state", "exit_code"]),
        "CatalogEntry": dataclass_schema(CatalogEntry, omit_null=False),
        "Models": _object({"models": {"type": "array", "items": ref("CatalogEntry")}}, ["models"]),
        "ModelRequest": _object({"model": _model_field()}, ["model"]),
        "Resolution": _object({"reference": {"type": "string"}, "sha256": {"type": ["string", "null"]},
                               "size": {"type": "integer"}, "on_disk": {"type": "boolean"}, "file": {"type": "string"}},
                              ["reference", "sha256", "size", "on_disk", "file"],
                              "Which file a reference means on this node (nothing is fetched)."),
        "DownloadStarted": _object({"download_id": {"type": "string"}, "model_ref": {"type": "string"}},
                                   ["download_id", "model_ref"]),
        "ModelRemoved": model_removed(),
    }
    worker_id = {"worker_id": "The worker's id (GET /v1/workers)."}
    routes = [
        Route("get", "/health", "Liveness", "HiveHealth", public=True),
        Route("get", "/v1/health", "Liveness", "HiveHealth", public=True),
        Route("get", OPENAPI_PATH, "This document", "OpenAPIDocument", public=True),
        Route("get", "/v1/detect", "The node's backends and devices", "Detect"),
        Route("get", "/v1/workers", "The live workers", "HiveWorkers"),
        Route("post", "/v1/workers/spawn", "Start a worker (waits while its model is provisioned)", "HiveWorker",
              ok=201, body="SpawnRequest", errors=(400, 404, 409, 422, 502)),
        Route("post", "/v1/workers/ready", "A worker's ready callback, with its own key", "ReadyAnswer",
              body="ReadyCallback", errors=(400,), worker_key=True),
        Route("get", "/v1/events", "Worker changes: present workers first, then each change, [DONE] at the end",
              stream=("worker",)),
        Route("get", "/v1/workers/{worker_id}/narration", "A worker's narration since its spawn, [DONE] once it exited",
              stream=("narration", "loading", "ready", "error"), errors=(404,), params=worker_id),
        Route("post", "/v1/workers/{worker_id}/shutdown", "Stop one worker; answers once it is gone", "WorkerStopped",
              body="WorkerStopRequest", body_optional=True, errors=(404,), params=worker_id),
        Route("get", "/v1/models", "The model catalog", "Models"),
        Route("delete", "/v1/models", "Remove a model: its catalog entry, and its file when rbee put it there",
              "ModelRemoved", errors=(400, 404, 409), query={"model": MODEL_QUERY},
              description="404 model_not_found: not in the catalog; 409 model_in_use: a worker has it, or a "
                          "spawn or download is provisioning it."),
        Route("post", "/v1/models/resolve", "Which file a reference means here (fetches nothing)", "Resolution",
              body="ModelRequest", errors=(400, 404, 422, 502)),
        Route("post", "/v1/models/download", "Provision a model in the background", "DownloadStarted", ok=202,
              body="ModelRequest", errors=(400, 404, 422, 502)),
        Route("get", "/v1/models/download/{download_id}/progress",
              "A download's narration, then download_complete or an error, then [DONE]",
              stream=("narration", "error"), errors=(404,), params={"download_id": "From POST /v1/models/download."}),
        Route("post", "/v1/shutdown", "Stop every worker, then the hive", "Shutdown", ok=202, shutdown=True),
    ]
    return routes, schemas


# -- the queen ----------------------------------------------------------------------------

#: What a job's stream carries: the hive's and the worker's events, relayed.
JOB_EVENTS = ("narration", "loading", "ready", "started", "prefill", "token", "metrics", "end", "error")


def _sampling_properties() -> dict[str, Any]:
    return dict(json_schema(SamplingParams)["properties"])


def openai_request_schemas() -> dict[str, Any]:
    """OpenAI's request bodies as rbee takes them (``rbee.narration.openai``): the sampling
    and rbee's extra fields are ``rbee.requests``'s; what rbee refuses is documented as the
    only values it takes (``n`` 1, no tools, no logprobs ...)."""
    from .narration.openai import PASSED_THROUGH, RBEE_EXTRAS, ROLES

    infer = json_schema(InferRequest)["properties"]
    sampling = _sampling_properties()
    shared = {name: (sampling.get(name) or infer[name]) for name in (*PASSED_THROUGH, *RBEE_EXTRAS)}
    max_tokens = sampling["max_tokens"]
    common = {
        "model": _model_field(f"Model reference ({ACCEPTED_FORMS}), optionally REF@NODE to pick the node."),
        "stream": {"type": ["boolean", "null"], "default": False},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": ["boolean", "null"]}}},
        "n": {"enum": [1, None], "description": "rbee answers with one choice."},
        "logit_bias": {"type": ["object", "null"], "maxProperties": 0, "description": "Not supported."},
        **shared,
    }
    text_part = _object({"type": {"const": "text"}, "text": {"type": "string"}}, ["type", "text"])
    message = _object({
        "role": {"enum": list(ROLES)},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}]},
    }, ["role", "content"])
    chat = _object({
        **common,
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_tokens": {**max_tokens, "description": "Null or absent: no limit (until the end of generation or the "
                                                    "context is full)."},
        "max_completion_tokens": {**max_tokens, "description": "OpenAI's newer name of max_tokens (wins over it)."},
        "logprobs": {"enum": [False, None], "description": "Not supported."},
        "top_logprobs": {"type": "null", "description": "Not supported."},
        "tools": {"type": ["array", "null"], "maxItems": 0, "description": "Not supported."},
        "functions": {"type": ["array", "null"], "maxItems": 0, "description": "Not supported."},
        "audio": {"type": "null", "description": "Not supported."},
    }, ["model", "messages"], "OpenAI's chat completion request.")
    completion = _object({
        **common,
        "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                              "maxItems": 1}]},
        "max_tokens": {**max_tokens, "default": 16},
        "max_completion_tokens": {**max_tokens, "description": "OpenAI's newer name of max_tokens (wins over it)."},
        "chat": infer["chat"],
        "logprobs": {"enum": [False, None], "description": "Not supported."},
        "echo": {"enum": [False, None], "description": "Not supported."},
        "best_of": {"enum": [1, None]},
        "suffix": {"enum": ["", None], "description": "Not supported."},
    }, ["model", "prompt"], "OpenAI's (legacy) completion request.")
    return {"ChatCompletionRequest": chat, "CompletionRequest": completion}


def openai_answer_schemas() -> dict[str, Any]:
    """OpenAI's answers as ``rbee.narration.openai`` writes them."""
    usage = _object({"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                     "total_tokens": {"type": "integer"},
                     "prompt_tokens_details": _object({"cached_tokens": {"type": "integer"}})},
                    ["prompt_tokens", "completion_tokens", "total_tokens"])
    finish = {"enum": ["stop", "length", None]}

    def completion(obj: str, choice: dict[str, Any], *, chunk: bool) -> dict[str, Any]:
        props = {"id": {"type": "string"}, "object": {"const": obj}, "created": {"type": "integer"},
                 "model": {"type": "string"},
                 "choices": {"type": "array", "items": choice, **({} if chunk else {"minItems": 1})},
                 "usage": {"anyOf": [usage, {"type": "null"}]}}
        return _object(props, ["id", "object", "created", "model", "choices"])

    chat_message = _object({"role": {"const": "assistant"}, "content": {"type": "string"}}, ["role", "content"])
    delta = _object({"role": {"const": "assistant"}, "content": {"type": "string"}})
    chat_choice = _object({"index": {"type": "integer"}, "message": chat_message, "finish_reason": finish},
                          ["index", "message", "finish_reason"])
    chunk_choice = _object({"index": {"type": "integer"}, "delta": delta, "finish_reason": finish},
                           ["index", "delta", "finish_reason"])
    text_choice = _object({"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": finish},
                          ["index", "text", "finish_reason"])
    model = _object({"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                     "owned_by": {"type": "string"}}, ["id", "object", "created", "owned_by"])
    stream_error = _object({"error": _object({"message": {"type": "string"}, "type": {"type": "string"},
                                              "param": {"type": ["string", "null"]}, "code": {"type": "string"}},
                                             ["message", "type", "code"])}, ["error"],
                           "A failure after the stream's status went out; [DONE] follows.")
    return {
        "ChatCompletion": completion("chat.completion", chat_choice, chunk=False),
        "ChatCompletionChunk": completion("chat.completion.chunk", chunk_choice, chunk=True),
        "TextCompletion": completion("text_completion", text_choice, chunk=False),
        "TextCompletionChunk": completion("text_completion", text_choice, chunk=True),
        "OpenAIStreamError": stream_error,
        "Model": model,
        "ModelList": _object({"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
                             ["object", "data"]),
    }


def queen_routes() -> tuple[list[Route], dict[str, Any]]:
    """The queen's routes (rbee's and OpenAI's) and its own component schemas."""
    from .hive.catalog import CatalogEntry
    from .queen.nodes import DEFAULT_HIVE_COMMAND, LOCALHOST, Node
    from .queen.status import HIVE_ANSWER_S

    infer = _without_meta(json_schema(InferRequest))
    detach = {"type": ["boolean", "null"], "default": False,
              "description": "Keep the job running when its stream's reader goes away."}
    infer_job = {**infer, "title": "InferJob", "properties": {
        "operation": {"enum": ["infer", None], "default": "infer"}, **infer["properties"], "detach": detach}}
    download_job = _object({"operation": {"const": "download"}, "model": _model_field(),
                            "node": {"type": ["string", "null"], "default": LOCALHOST}, "detach": detach},
                           ["operation", "model"], "Provision a model on a node (its progress is the job's stream).")
    port = {"type": "integer", "minimum": 1, "maximum": 65535}
    node_request = _object({
        "name": {"type": "string", "pattern": NODE_NAME_PATTERN, "not": {"const": LOCALHOST}},
        "ssh_host": {"type": "string", "minLength": 1, "pattern": "^[^-]"},
        "ssh_port": {**port, "default": 22},
        "ssh_user": {"type": ["string", "null"]},
        "ssh_key": {"type": ["string", "null"], "description": "A private key file on the queen's machine."},
        "rbee_hive_command": {"type": ["string", "null"], "default": DEFAULT_HIVE_COMMAND},
        "hive_port": {"type": "integer", "minimum": 0, "maximum": 65535, "default": 0,
                      "description": "0: the hive picks a port."},
    }, ["name", "ssh_host"], "A node to add; the queen tests SSH to it first.")
    queen_worker = _object({
        "worker_id": {"type": "string"}, "node": {"type": "string"}, "model": {"type": "string"},
        "model_ref": {"type": "string"}, "sha256": {"type": ["string", "null"]}, "backend": {"type": "string"},
        "device": {"type": "integer"}, "state": {"type": "string"}, "slots": _slots(),
        "memory_bytes": {"type": "integer"}, "unload_in_s": {"type": ["number", "null"]}, "url": {"type": "string"},
    }, ["worker_id", "node", "model", "model_ref", "backend", "device", "state", "slots", "url"])
    node_status = _object({
        "name": {"type": "string"},
        "local": {"type": "boolean", "description": "The built-in localhost (its hive is the queen's child)."},
        "reachable": {"type": ["boolean", "null"],
                      "description": "true: its hive answered just now; false: the queen cannot reach it "
                                     "(unreachable_reason says why); null: no hive has run there yet."},
        "unreachable_reason": {"type": ["string", "null"]},
        "hive_up": {"type": "boolean", "description": "A hive runs there now (none is started to answer)."},
        "hive_error": {"type": ["string", "null"], "description": "Why its running hive did not answer."},
        "facts_from": {"enum": ["hive", "registry", None],
                       "description": "hive: measured when its hive started; registry: when the node was added; "
                                      "null: not known yet."},
        "backends": {"type": "array", "items": {"type": "string"}},
        "devices": {"type": "array", "items": _device()},
        "memory_free_bytes": {"type": ["integer", "null"], "description": "Free RAM (its cpu device's)."},
        "workers": {"type": "array", "items": ref("QueenWorker")},
        "models": {"type": ["array", "null"], "items": ref("CatalogEntry"),
                   "description": "Its hive's catalog; null when no hive runs there or it did not answer."},
    }, ["name", "local", "reachable", "unreachable_reason", "hive_up", "hive_error", "facts_from", "backends",
        "devices", "memory_free_bytes", "workers", "models"])
    job = _object({"job_id": {"type": "string"}, "operation": {"enum": ["infer", "download"]},
                   "state": {"type": "string"}, "detach": {"type": "boolean"}},
                  ["job_id", "operation", "state", "detach"])
    schemas = {
        "QueenHealth": _object({
            "status": {"const": "ok"},
            "service": {"const": QUEEN, "description": "What tells a queen from any other server answering here."},
            "version": {"type": "string", "description": "The rbee version of this queen."},
            "pid": {"type": "integer", "minimum": 1}, "uptime_s": {"type": "number", "minimum": 0},
            "jobs": {"type": "integer", "minimum": 0}, "hives": {"type": "array", "items": {"type": "string"}},
        }, ["status", "service", "version", "pid", "uptime_s", "jobs", "hives"]),
        "JobRequest": {"anyOf": [ref("InferJob"), ref("DownloadJob")],
                       "description": "An infer job (the default operation) or a download job."},
        "InferJob": infer_job,
        "DownloadJob": download_job,
        "JobCreated": _object({"job_id": {"type": "string"}, "sse_url": {"type": "string"}}, ["job_id", "sse_url"]),
        "Job": job,
        "Jobs": _object({"jobs": {"type": "array", "items": ref("Job")}}, ["jobs"]),
        "JobCancelled": _object({"job_id": {"type": "string"}, "state": {"type": "string"}}, ["job_id", "state"]),
        "Node": dataclass_schema(Node, omit_null=False),
        "Nodes": _object({"nodes": {"type": "array", "items": ref("Node")}}, ["nodes"]),
        "NodeRequest": node_request,
        "NodeRemoved": _object({"removed": {"type": "string"}}, ["removed"]),
        "QueenWorker": queen_worker,
        "NodeStatus": node_status,
        "ClusterStatus": _object({"nodes": {"type": "array", "items": ref("NodeStatus")}}, ["nodes"],
                                 "Every node of the registry, localhost first."),
        "QueenWorkers": _object({"workers": {"type": "array", "items": ref("QueenWorker")}}, ["workers"]),
        "WorkersShutdownRequest": _object({"node": {"type": ["string", "null"]},
                                           "worker_id": {"type": ["string", "null"]}}, [],
                                          "Which workers to stop: all, a node's, or one."),
        "WorkersStopped": _object({"stopped": {"type": "array", "items": _object(
            {"node": {"type": "string"}, "worker_id": {"type": "string"}}, ["node", "worker_id"])}}, ["stopped"]),
        "CatalogEntry": dataclass_schema(CatalogEntry, omit_null=False),
        "NodeModels": _object({"node": {"type": "string"}, "models": {"type": "array", "items": ref("CatalogEntry")}},
                              ["node", "models"]),
        "NodeModelRemoved": {**model_removed(), "properties": {"node": {"type": "string"},
                                                               **model_removed()["properties"]},
                             "required": ["node", *model_removed()["required"]]},
        "Metrics": {"type": "string", "description": "Prometheus text exposition format (OpenMetrics when asked)."},
        **openai_request_schemas(),
        **openai_answer_schemas(),
    }
    job_id = {"job_id": "From POST /v1/jobs."}
    node = {"name": "A node name (localhost, or one added)."}
    routes = [
        Route("get", "/health", "Liveness", "QueenHealth", public=True),
        Route("get", OPENAPI_PATH, "This document", "OpenAPIDocument", public=True),
        Route("post", "/v1/jobs", "Submit a job; read it at sse_url", "JobCreated", ok=201, body="JobRequest",
              errors=(400, 404)),
        Route("post", "/v2/tasks", "Submit a job and answer with its stream", body="JobRequest", stream=JOB_EVENTS,
              errors=(400, 404), headers=("X-Rbee-Job-Id",)),
        Route("get", "/v1/jobs", "The jobs the queen knows", "Jobs"),
        Route("get", "/v1/jobs/{job_id}/stream", "A job's stream (one reader)", stream=JOB_EVENTS, errors=(404,),
              headers=("X-Rbee-Job-Id",), params=job_id),
        Route("delete", "/v1/jobs/{job_id}", "Cancel a job", "JobCancelled", errors=(404,), params=job_id),
        Route("get", "/v1/nodes", "The node registry", "Nodes"),
        Route("post", "/v1/nodes", "Add a node (tests SSH first)", "Node", ok=201, body="NodeRequest",
              errors=(400, 409, 422, 502),
              description="409 node_exists: the name, or the SSH host and port, is a node already."),
        Route("delete", "/v1/nodes/{name}", "Remove a node", "NodeRemoved", errors=(400, 404), params=node),
        Route("get", "/v1/status", "The cluster at a glance: per node its reachability, hive, devices, workers "
              "and models", "ClusterStatus",
              description=f"Running hives are asked in parallel (each within {HIVE_ANSWER_S:g} s); nothing is "
                          "started to answer."),
        Route("get", "/v1/workers", "The scheduler's workers", "QueenWorkers"),
        Route("get", "/metrics", "Prometheus metrics", "Metrics",
              answer_types=("text/plain", "application/openmetrics-text")),
        Route("post", "/v1/workers/shutdown", "Stop workers through their hives", "WorkersStopped",
              body="WorkersShutdownRequest", body_optional=True, errors=(400, 404, 502)),
        Route("get", "/v1/nodes/{name}/models", "A node's model catalog (starts its hive)", "NodeModels",
              errors=(404, 502, 504), params=node),
        Route("delete", "/v1/nodes/{name}/models", "Remove a model from a node (starts its hive)",
              "NodeModelRemoved", errors=(400, 404, 409, 502, 504), params=node, query={"model": MODEL_QUERY},
              description="The node's hive decides: 404 model_not_found, 409 model_in_use while a worker has it."),
        Route("post", "/v1/chat/completions", "OpenAI chat completion (an infer job)", "ChatCompletion",
              body="ChatCompletionRequest", stream=("openai:ChatCompletionChunk",),
              errors=(400, 404, 409, 422, 502, 504), headers=("X-Rbee-Job-Id",)),
        Route("post", "/v1/completions", "OpenAI text completion (an infer job)", "TextCompletion",
              body="CompletionRequest", stream=("openai:TextCompletionChunk",),
              errors=(400, 404, 409, 422, 502, 504), headers=("X-Rbee-Job-Id",)),
        Route("get", "/v1/models", "OpenAI's model list: the running hives' catalogs and the embedded model",
              "ModelList"),
        Route("get", "/v1/models/{model_id}", "One model of GET /v1/models (REF@NODE too)", "Model", errors=(404,),
              params={"model_id": f"A model id of GET /v1/models ({EMBEDDED_ALIAS} ...); may contain '/'."}),
        Route("post", "/v1/shutdown", "Stop the queen (jobs, hives, workers)", "Shutdown", ok=202, shutdown=True),
    ]
    return routes, schemas


ROUTE_TABLES: dict[str, Callable[[], tuple[list[Route], dict[str, Any]]]] = {
    WORKER: worker_routes, HIVE: hive_routes, QUEEN: queen_routes,
}


# -- the document -------------------------------------------------------------------------

_PARAM = re.compile(r"<(?:[a-z]+:)?([A-Za-z_][A-Za-z0-9_]*)>")


def openapi_path(rule: str) -> str:
    """A Werkzeug rule as an OpenAPI path: ``/v1/jobs/<job_id>`` -> ``/v1/jobs/{job_id}``."""
    return _PARAM.sub(r"{\1}", rule)


def app_routes(url_map: Any) -> set[tuple[str, str]]:
    """The ``(method, OpenAPI path)`` pairs of a Quart app's ``url_map``: HEAD and OPTIONS,
    which Quart answers for every route, left out (the apps have no static-files route)."""
    pairs = set()
    for rule in url_map.iter_rules():
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                pairs.add((method.lower(), openapi_path(rule.rule)))
    return pairs


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.method + re.sub(r"[^A-Za-z0-9]+", "_", route.path).rstrip("_"),
        "summary": route.summary,
        "tags": [route.path.split("/")[2] if route.path.startswith("/v") else "daemon"],
    }
    if route.description:
        op["description"] = route.description
    if route.public:
        op["security"] = []
    elif route.worker_key:
        op["security"] = [{"workerKey": []}]
    if route.shutdown:
        op["x-rbee-shutdown"] = True
    params = re.findall(r"{([^}]+)}", route.path)
    parameters = [
        {"name": p, "in": "path", "required": True, "description": route.params.get(p, ""),
         "schema": {"type": "string", "minLength": 1}}
        for p in params
    ] + [
        {"name": name, "in": "query", "required": True, "description": description,
         "schema": {"type": "string", "minLength": 1}}
        for name, description in route.query.items()
    ]
    if parameters:
        op["parameters"] = parameters
    if route.body:
        op["requestBody"] = {"required": not route.body_optional,
                             "content": {"application/json": {"schema": ref(route.body)}}}
    success: dict[str, Any] = {"description": route.summary, "content": {}}
    if route.answer:
        for media in route.answer_types:
            success["content"][media] = {"schema": ref(route.answer)}
    if route.stream:
        if route.stream[0].startswith("openai:"):
            item = _openai_sse_event_object(route.stream[0].removeprefix("openai:"))
            types_ = ["openai"]
        else:
            item = _sse_event_object(route.stream)
            types_ = list(route.stream)
        success["content"]["text/event-stream"] = {"schema": item, "x-rbee-events": types_}
    if route.headers:
        success["headers"] = {h: HEADERS[h] for h in route.headers}
    responses: dict[str, Any] = {str(route.ok): success}
    statuses = set(route.errors) | {503}
    if route.body or route.query:
        statuses.add(400)
    if not route.public:
        statuses.add(401)
    for status in sorted(statuses):
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    # The shared edge: 404/405 for routes and methods, 413 and 431 for sizes, any 4xx.
    responses["4XX"] = {"$ref": "#/components/responses/Error4XX"}
    op["responses"] = responses
    return op


_served: dict[str, dict[str, Any]] = {}


def served_document(daemon: str, url_map: Any) -> dict[str, Any]:
    """``GET /openapi.json``'s body: ``document(daemon)`` checked against the app's
    ``url_map``, built at the first request and kept (the routes never change after)."""
    if daemon not in _served:
        _served[daemon] = document(daemon, app_routes(url_map))
    return _served[daemon]


def document(daemon: str, rules: Iterable[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``daemon`` (``WORKER``, ``HIVE`` or ``QUEEN``).

    ``rules``: the app's ``(method, path)`` pairs (``app_routes``); when given, they must be
    exactly the table's, else ``InternalError`` names the difference.
    """
    routes, own = ROUTE_TABLES[daemon]()
    table = {(r.method, r.path) for r in routes}
    if len(table) != len(routes):
        raise InternalError(f"the route table of {daemon} lists a route twice")
    if rules is not None:
        rules = set(rules)
        missing, extra = sorted(rules - table), sorted(table - rules)
        if missing or extra:
            raise InternalError(f"{daemon}'s OpenAPI route table does not match its app: undocumented routes "
                                f"{missing}, documented routes it lacks {extra}")
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    error_responses = {f"Error{s}": error_response(s) for s in ERROR_STATUSES}
    error_responses["Error4XX"] = {
        "description": "An error of the caller's request (the envelope): method_not_allowed, payload_too_large, "
                       "headers_too_large, not_found ...",
        "content": {"application/json": {"schema": ref("ErrorEnvelope")}},
    }
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": JSON_SCHEMA_DIALECT,
        "info": {
            "title": daemon,
            "version": __version__,
            "description": f"The HTTP API of {daemon}, part of rbee. Every error answer is the envelope "
                           "(ErrorEnvelope): 4xx for the caller's faults, 502/503/504 when something below "
                           "failed or the daemon cannot take the request now; never 500. Streams are "
                           "server-sent events ending with `data: [DONE]`, with `: ping` comments when quiet.",
        },
        "paths": paths,
        "components": {
            "schemas": {**shared_schemas(), **own},
            "responses": error_responses,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "Needed when the daemon was started with a token "
                                          "(RBEE_API_TOKEN, --token-file, the worker's key)."},
                "workerKey": {"type": "http", "scheme": "bearer", "description": "The key the hive minted for the worker."},
            },
        },
        # A token only when the daemon has one: bearer, or nothing.
        "security": [{"bearer": []}, {}],
    }
