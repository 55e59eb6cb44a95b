"""Check real answers of the daemons against their OpenAPI documents (``rbee.openapi``).

``Contract(doc).check(method, path, response)`` finds the operation of ``path`` (a template
like ``/v1/jobs/{job_id}``), the response its status documents (the exact status, else its
``4XX`` range) and the media type of the answer, and validates the body with jsonschema-rs
(which schemathesis brings): JSON bodies against their schema; SSE bodies event by event,
each ``{event, data}`` against the stream's event schema and each event's JSON data
against the schema of its type (``contentSchema``, an annotation a plain validator skips).
A mismatch is an ``AssertionError`` naming the route, the status and what differs.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs


def sse_blocks(raw: bytes) -> list[dict[str, Any]]:
    """The events of an SSE body as ``{"event"?, "data"}`` (comments and pings left out)."""
    events = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        event: dict[str, Any] = {}
        data = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            elif name == "event":
                event["event"] = value
        if data:
            event["data"] = "\n".join(data)
            events.append(event)
    return events


class Contract:
    """One daemon's document, and validators for the schemas in it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.components = doc["components"]

    def validator(self, schema: dict[str, Any]) -> jsonschema_rs.Validator:
        """A 2020-12 validator of ``schema`` whose ``#/components/...`` references resolve."""
        return jsonschema_rs.Draft202012Validator({"allOf": [schema], "components": self.components})

    def component(self, name: str) -> dict[str, Any]:
        return self.components["schemas"][name]

    def response(self, method: str, path: str, status: int) -> dict[str, Any]:
        """The documented response of ``status`` (its exact code, else its range)."""
        operation = self.doc["paths"][path][method.lower()]
        responses = operation["responses"]
        found = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX")
        assert found is not None, f"{method} {path}: status {status} is not documented ({sorted(responses)})"
        while "$ref" in found:
            found = self.components["responses"][found["$ref"].rsplit("/", 1)[1]]
        return found

    def check(self, method: str, path: str, response: httpx.Response, raw: bytes | None = None) -> list[dict[str, Any]]:
        """Validate ``response`` (read, or its ``raw`` body read so far for a stream cut short).

        Returns the decoded SSE events (``{"event"?, "data"}``) or ``[]`` for a JSON answer.
        """
        where = f"{method} {path} -> {response.status_code}"
        documented = self.response(method, path, response.status_code)
        media = response.headers.get("content-type", "").split(";")[0].strip()
        content = documented.get("content", {})
        assert media in content, f"{where}: content type {media!r} is not documented ({sorted(content)})"
        schema = content[media]["schema"]
        body = raw if raw is not None else response.content
        if media == "application/json":
            _validate(self.validator(schema), json.loads(body), where)
            return []
        if media != "text/event-stream":
            return []
        events = sse_blocks(body)
        item = self.validator(schema)
        kinds = content[media]["x-rbee-events"]
        for event in events:
            _validate(item, event, f"{where}: SSE event {event}")
            if event["data"] == "[DONE]":
                continue
            data = json.loads(event["data"])
            if kinds == ["openai"]:
                inner = schema["else"]["properties"]["data"]["contentSchema"]
            else:
                assert data.get("type") == event.get("event"), f"{where}: event name {event} and JSON type differ"
                rule = next(r for r in schema["allOf"] if r["if"].get("properties", {}).get("event", {}).get("const")
                            == data["type"])
                inner = rule["then"]["properties"]["data"]["contentSchema"]
                # Every key is a documented field (the wire writes nothing else), but for narration's extras.
                if data["type"] != "narration":
                    name = inner["$ref"].rsplit("/", 1)[1]
                    unknown = set(data) - set(self.component(name)["properties"])
                    assert not unknown, f"{where}: {data['type']} event has undocumented fields {unknown}"
            _validate(self.validator(inner), data, f"{where}: data of {event}")
        return events


def _validate(validator: jsonschema_rs.Validator, instance: Any, where: str) -> None:
    errors = [f"{e.message} at {list(e.instance_path)}" for e in validator.iter_errors(instance)]
    assert not errors, f"{where}: does not match the document: {errors[:5]}; instance: {str(instance)[:500]}"
