"""OpenAI's wire format for rbee's job events, with no I/O: what the queen's
``/v1/chat/completions`` and ``/v1/completions`` speak.

Job events in, OpenAI bytes and objects out, h11-style (nothing here reads a socket or a
clock; the caller passes ``created``):

- ``ChatStream`` / ``TextStream``: ``feed(event) -> bytes`` and ``close() -> bytes``, the
  server-sent events of a streamed answer. Every event is one ``data: <JSON>\\n\\n`` (no
  ``event:`` lines): for chat a first delta ``{"role": "assistant", "content": ""}``, a
  content delta per token, one chunk with ``finish_reason``, a usage chunk
  (``choices: []``) when the client asked for ``stream_options.include_usage``, and
  ``data: [DONE]\\n\\n``. An ``Error`` is one ``data: {"error": {...}}`` (what OpenAI's
  clients raise from) followed by ``[DONE]``, and never a ``finish_reason``. With
  ``narration=True`` (the client sent ``X-Rbee-Narration: 1``) narration travels as SSE
  comments, ``: narration <the rbee event JSON>\\n\\n``, which every SSE reader skips.
- ``ChatResult`` / ``TextResult``: ``feed(event)`` over a whole job, then ``body()``: the
  ``chat.completion`` / ``text_completion`` object, or ``error`` when the job failed.
- ``parse_chat_request`` / ``parse_completion_request``: an OpenAI request body to rbee's
  infer request (a dict for ``rbee.requests.parse_infer_request``), refusing what rbee
  does not do (``n`` > 1, logprobs, tools) with a 400 naming the field.

Usage is the tokens actually used: ``prompt_tokens`` from the worker's ``metrics``,
``completion_tokens`` from its ``end`` (what the client was sent).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, Callable, ClassVar, Mapping

from ..errors import InvalidRequestError, ModelNotFoundError, NarrationError, error_type, http_status_for_code
from ..requests import ACCEPTED_FORMS, EMBEDDED_ALIAS, FieldProblems, json_type, parse_infer_request, parse_reference
from .events import End, Error, Event, Loading, Metrics, NarrationEvent, Prefill, Token
from .wire import dumps, event_json

DONE_BYTES = b"data: [DONE]\n\n"
#: The header a client sends to get rbee's narration as SSE comments in the stream.
NARRATION_HEADER = "X-Rbee-Narration"
#: OpenAI's default ``max_tokens`` of a text completion (a chat completion has no limit).
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Roles of chat messages; ``developer`` is OpenAI's newer name for ``system``.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: rbee's own request fields a client may add to an OpenAI body (``extra_body``).
RBEE_EXTRAS = ("node", "backend", "device", "top_k", "min_p", "repeat_penalty", "cache_prompt")
#: OpenAI sampling fields rbee takes as they are.
PASSED_THROUGH = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                  "response_format")


def finish_reason(stop_reason: str) -> str:
    """OpenAI's ``finish_reason`` for rbee's ``stop_reason``: ``length`` when a token
    limit ended it (``max_tokens``, also when the slot's context filled), else ``stop``."""
    return "length" if stop_reason == "max_tokens" else "stop"


def error_object(code: str, message: str) -> dict[str, Any]:
    """OpenAI's error object for an rbee error known by code (a job's ``error`` event)."""
    return {"message": message, "type": error_type(http_status_for_code(code)), "param": None, "code": code}


def _json_str(text: str) -> bytes:
    """``text`` as a JSON string literal in UTF-8 (lone surrogates as ``\\uXXXX``)."""
    try:
        return encode_basestring(text).encode("utf-8")
    except UnicodeEncodeError:
        return encode_basestring_ascii(text).encode("ascii")


@dataclass(slots=True)
class Usage:
    """The tokens of one request as the worker counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tokens_seen: int = 0
    ended: bool = False

    def feed(self, event: Event) -> None:
        kind = type(event)
        if kind is Token:
            self.tokens_seen += 1
        elif kind is Metrics:
            self.prompt_tokens = int(event.prompt_tokens)
            self.cached_tokens = int(event.prompt_tokens_cached)
            if not self.ended:
                self.completion_tokens = int(event.tokens_out)
        elif kind is End:
            self.completion_tokens = int(event.tokens_out)
            self.cached_tokens = int(event.prompt_tokens_cached) or self.cached_tokens
            self.ended = True

    def as_json(self) -> dict[str, Any]:
        """OpenAI's ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


# -- streams ------------------------------------------------------------------------------


class _Stream:
    """The SSE bytes of one streamed completion (see the module doc)."""

    object_name: ClassVar[str]

    def __init__(self, model: str, completion_id: str, created: int, *, include_usage: bool = False,
                 narration: bool = False) -> None:
        self.model = model
        self.completion_id = completion_id
        self.created = created
        self.include_usage = include_usage
        self.narration = narration
        self.usage = Usage()
        #: The first chunk went out (chat: the role delta).
        self.started = False
        #: The ``finish_reason`` chunk went out.
        self.finished = False
        #: An error went out instead.
        self.failed = False
        self.closed = False
        head = dumps({"id": completion_id, "object": self.object_name, "created": created, "model": model})
        self._head = b"data: " + head[:-1] + b',"choices":['
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    # What a kind of stream puts in a choice.
    def _start(self) -> bytes:
        return b""

    def _text_choice(self, text: bytes) -> bytes:
        raise NotImplementedError

    def _finish_choice(self, reason: str) -> bytes:
        raise NotImplementedError

    def _chunk(self, choice: bytes) -> bytes:
        return self._head + choice + self._tail

    def _begin(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        return self._start()

    def feed(self, event: Event) -> bytes:
        """The bytes this event adds to the stream (often none)."""
        kind = type(event)
        if self.narration and kind in (NarrationEvent, Prefill, Loading) and not self.closed:
            return narration_comment(event)  # after the finish too: infer_complete says tok/s
        if self.closed or self.finished or self.failed:
            return b""
        self.usage.feed(event)
        if kind is Token:
            if not event.t:
                return self._begin()
            return self._begin() + self._chunk(self._text_choice(_json_str(event.t)))
        if kind is End:
            self.finished = True
            return self._begin() + self._chunk(self._finish_choice(finish_reason(event.stop_reason)))
        if kind is Error:
            self.failed = True
            return error_event(event.code, event.message)
        return b""

    def close(self) -> bytes:
        """The end of the stream (the job's channel ended): usage, then ``[DONE]``."""
        if self.closed:
            return b""
        self.closed = True
        if self.failed:
            return DONE_BYTES
        if not self.finished:
            self.failed = True
            return error_event("job_failed", "the job ended without an end event") + DONE_BYTES
        if self.include_usage:
            usage = dumps({"id": self.completion_id, "object": self.object_name, "created": self.created,
                           "model": self.model, "choices": [], "usage": self.usage.as_json()})
            return b"data: " + usage + b"\n\n" + DONE_BYTES
        return DONE_BYTES


class ChatStream(_Stream):
    """``chat.completion.chunk`` events: role delta, content deltas, finish, usage, [DONE]."""

    object_name = "chat.completion.chunk"

    def _start(self) -> bytes:
        return self._chunk(b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                           b'"finish_reason":null}')

    def _text_choice(self, text: bytes) -> bytes:
        return b'{"index":0,"delta":{"content":' + text + b'},"logprobs":null,"finish_reason":null}'

    def _finish_choice(self, reason: str) -> bytes:
        return b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"' + reason.encode() + b'"}'


class TextStream(_Stream):
    """``text_completion`` events: a chunk per token, finish, usage, [DONE]."""

    object_name = "text_completion"

    def _text_choice(self, text: bytes) -> bytes:
        return b'{"index":0,"text":' + text + b',"logprobs":null,"finish_reason":null}'

    def _finish_choice(self, reason: str) -> bytes:
        return b'{"index":0,"text":"","logprobs":null,"finish_reason":"' + reason.encode() + b'"}'


def error_event(code: str, message: str) -> bytes:
    """``data: {"error": {...}}\\n\\n``: a failure after the stream's status went out."""
    return b"data: " + dumps({"error": error_object(code, message)}) + b"\n\n"


def narration_comment(event: Event) -> bytes:
    """``: narration <event JSON>\\n\\n`` (an SSE comment: readers that do not want it skip it)."""
    try:
        return b": narration " + event_json(event) + b"\n\n"
    except NarrationError:
        return b""


# -- whole answers ------------------------------------------------------------------------


class _Result:
    """A whole completion gathered from a job's events."""

    object_name: ClassVar[str]

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.error: Error | None = None

    def feed(self, event: Event) -> None:
        """Take the next event of the job."""
        if self.error is not None or self.finish_reason is not None:
            return
        self.usage.feed(event)
        kind = type(event)
        if kind is Token:
            self.pieces.append(event.t)
        elif kind is End:
            self.finish_reason = finish_reason(event.stop_reason)
        elif kind is Error:
            self.error = event

    def close(self) -> None:
        """The job's channel ended: a job that never said ``end`` failed."""
        if self.error is None and self.finish_reason is None:
            self.error = Error(code="job_failed", message="the job ended without an end event")

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _choice(self) -> dict[str, Any]:
        raise NotImplementedError

    def body(self, model: str, completion_id: str, created: int) -> dict[str, Any]:
        """The completion object (only when the job ended without an error)."""
        return {"id": completion_id, "object": self.object_name, "created": created, "model": model,
                "choices": [self._choice()], "usage": self.usage.as_json()}


class ChatResult(_Result):
    """A ``chat.completion`` object."""

    object_name = "chat.completion"

    def _choice(self) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": self.text, "refusal": None},
                "logprobs": None, "finish_reason": self.finish_reason}


class TextResult(_Result):
    """A ``text_completion`` object."""

    object_name = "text_completion"

    def _choice(self) -> dict[str, Any]:
        return {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason}


# -- requests -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """An OpenAI request as rbee runs it."""

    #: The rbee infer request (``operation: infer``), for ``parse_infer_request``.
    body: dict[str, Any]
    #: The model as the client named it (echoed in every answer).
    model: str
    stream: bool
    include_usage: bool


def split_model(model: str, is_node: Callable[[str], bool]) -> tuple[str, str | None]:
    """``REF@NODE`` -> ``(REF, NODE)`` when what follows the last ``@`` is a known node;
    otherwise the whole string is the reference."""
    ref, at, node = model.rpartition("@")
    if at and ref and node and is_node(node):
        return ref, node
    return model, None


def parse_chat_request(body: Mapping[str, Any], *, is_node: Callable[[str], bool]) -> OpenAIRequest:
    """A ``POST /v1/chat/completions`` body as rbee's infer request.

    ``InvalidRequestError`` (400) listing every bad field; ``ModelNotFoundError`` (404) for
    a model that is no model reference. The fields rbee itself checks (sampling bounds,
    ``max_tokens``, the messages' contents) are checked by ``parse_infer_request`` next.
    """
    problems = FieldProblems(_object(body), "chat completion request")
    out: dict[str, Any] = {"operation": "infer"}
    model = _model(problems, body, out, is_node)
    out["messages"] = _messages(problems, body.get("messages"))
    _unsupported(problems, body, "logprobs", lambda v: v is True, "logprobs are not supported")
    _unsupported(problems, body, "top_logprobs", lambda v: v is not None, "logprobs are not supported")
    _unsupported(problems, body, "tools", lambda v: bool(v), "tools (function calling) are not supported")
    _unsupported(problems, body, "functions", lambda v: bool(v), "functions are not supported")
    _unsupported(problems, body, "audio", lambda v: v is not None, "audio output is not supported")
    stream, include_usage = _common(problems, body, out, default_max_tokens=None)
    return _finish(problems, out, model, stream, include_usage)


def parse_completion_request(body: Mapping[str, Any], *, is_node: Callable[[str], bool]) -> OpenAIRequest:
    """A ``POST /v1/completions`` body as rbee's infer request (see ``parse_chat_request``)."""
    problems = FieldProblems(_object(body), "completion request")
    out: dict[str, Any] = {"operation": "infer"}
    model = _model(problems, body, out, is_node)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, str) for p in prompt):
            problems.fail("prompt", "max_items:1", "prompt must be one string: rbee answers one prompt per request")
        else:
            problems.fail("prompt", "type:string", "prompt must be a string (token arrays are not supported)")
    elif prompt is not None and not isinstance(prompt, str):
        problems.fail("prompt", "type:string", f"prompt must be a string, not {json_type(prompt)}")
    else:
        out["prompt"] = prompt
    _unsupported(problems, body, "logprobs", lambda v: v is not None and v is not False,
                 "logprobs are not supported")
    _unsupported(problems, body, "echo", lambda v: v is True, "echo is not supported")
    _unsupported(problems, body, "best_of", lambda v: v not in (None, 1), "best_of must be 1")
    _unsupported(problems, body, "suffix", lambda v: bool(v), "suffix (insertion) is not supported")
    if body.get("chat") is not None:
        out["chat"] = body["chat"]
    stream, include_usage = _common(problems, body, out, default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS)
    return _finish(problems, out, model, stream, include_usage)


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidRequestError(
            f"the request body must be a JSON object, not {json_type(body)}",
            details=[{"field": "(body)", "constraint": "object", "message": "the body must be a JSON object"}],
        )
    return body


def _model(problems: FieldProblems, body: Mapping[str, Any], out: dict[str, Any],
           is_node: Callable[[str], bool]) -> str | None:
    model = body.get("model")
    if model is None:
        problems.fail("model", "required", "model is required")
        return None
    if not isinstance(model, str) or not model.strip():
        problems.fail("model", "type:string", f"model must be a model reference, not {json_type(model)}")
        return None
    reference, node = split_model(model.strip(), is_node)
    out["model"] = reference
    given = body.get("node")
    if node is not None:
        if given is not None and given != node:
            problems.fail("node", "matches:model", f"node {given!r} contradicts the model's @{node}")
        out["node"] = node
    return model


def _messages(problems: FieldProblems, messages: Any) -> Any:
    if messages is None:
        problems.fail("messages", "required", "messages is required")
        return None
    if not isinstance(messages, list) or not messages:
        problems.fail("messages", "min_items:1", "messages must be a non-empty array of messages")
        return None
    out = []
    for n, message in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(message, Mapping):
            problems.fail(where, "type:object", f"{where} must be an object, not {json_type(message)}")
            continue
        role = message.get("role")
        if role in ("tool", "function"):
            problems.fail(f"{where}.role", "enum:" + "|".join(ROLES),
                          f"{where}.role {role!r}: tool results are not supported (no tools)")
            continue
        if not isinstance(role, str) or role not in ROLES:
            problems.fail(f"{where}.role", "enum:" + "|".join(ROLES),
                          f"{where}.role must be one of {', '.join(ROLES)}, not "
                          + (repr(role) if isinstance(role, str) else json_type(role)))
            continue
        content = _content(problems, f"{where}.content", message.get("content"))
        if content is not None:
            out.append({"role": ROLES[role], "content": content})
    return out


def _content(problems: FieldProblems, where: str, content: Any) -> str | None:
    """A message's text: a string, or its text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for n, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                problems.fail(f"{where}[{n}]", "type:text",
                              f"{where}[{n}] must be a text part {{\"type\": \"text\", \"text\": ...}}"
                              + (f" ({kind} parts are not supported)" if isinstance(kind, str) else ""))
        return "\n".join(texts)
    problems.fail(where, "type:string", f"{where} must be a string or an array of text parts,"
                                        f" not {json_type(content)} (tool calls are not supported)")
    return None


def _unsupported(problems: FieldProblems, body: Mapping[str, Any], name: str, refused: Callable[[Any], bool],
                 message: str) -> bool:
    if refused(body.get(name)):
        problems.fail(name, "unsupported", f"{name}: {message}")
        return True
    return False


def _common(problems: FieldProblems, body: Mapping[str, Any], out: dict[str, Any], *,
            default_max_tokens: int | None) -> tuple[bool, bool]:
    """The fields both routes share; returns (stream, include_usage)."""
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        problems.fail("n", "enum:1", "n must be 1: rbee answers with one choice per request")
    _unsupported(problems, body, "logit_bias", lambda v: bool(v), "logit_bias is not supported")
    # max_completion_tokens is OpenAI's newer name; null means no limit.
    if "max_completion_tokens" in body:
        out["max_tokens"] = body["max_completion_tokens"]
    elif "max_tokens" in body:
        out["max_tokens"] = body["max_tokens"]
    else:
        out["max_tokens"] = default_max_tokens
    for name in PASSED_THROUGH + RBEE_EXTRAS:
        if body.get(name) is not None and name not in out:
            out[name] = body[name]
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        problems.fail("stream", "type:boolean", f"stream must be true or false, not {json_type(stream)}")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, Mapping):
            problems.fail("stream_options", "type:object",
                          f"stream_options must be an object, not {json_type(options)}")
        else:
            usage = options.get("include_usage")
            if usage is not None and not isinstance(usage, bool):
                problems.fail("stream_options.include_usage", "type:boolean",
                              f"stream_options.include_usage must be true or false, not {json_type(usage)}")
            include_usage = usage is True
    return stream is True, include_usage


def _root(field: str) -> str:
    return re.split(r"[\[.]", field, maxsplit=1)[0]


def _finish(problems: FieldProblems, out: dict[str, Any], model: str | None, stream: bool,
            include_usage: bool) -> OpenAIRequest:
    if problems:
        # Every bad field at once: add what rbee's own checks say of the other fields.
        bad = {_root(d["field"]) for d in problems.details} | {"model"}
        if bad & {"prompt", "messages"}:
            bad |= {"prompt", "messages"}
        try:
            parse_infer_request({k: v for k, v in out.items() if k not in bad})
        except InvalidRequestError as exc:
            for detail in exc.details if isinstance(exc.details, list) else []:
                if _root(str(detail.get("field"))) not in bad:
                    problems.details.append(detail)
    problems.raise_if_any()
    assert model is not None
    try:
        parse_reference(out["model"])
    except InvalidRequestError:
        why = ""
        if "@" in model and "node" not in out:
            why = f" (and {model.rpartition('@')[2]!r} is not a known node)"
        raise ModelNotFoundError(
            f"the model {model!r} does not exist{why}: a model is {ACCEPTED_FORMS}, optionally with"
            f" @NODE (see GET /v1/models; {EMBEDDED_ALIAS} is always there)",
            details=[{"field": "model", "constraint": ACCEPTED_FORMS, "message": f"no model {model!r}"}],
        ) from None
    return OpenAIRequest(body=out, model=model, stream=stream, include_usage=include_usage)
