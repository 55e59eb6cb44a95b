"""Checking a `POST /v1/inference` body before any token is spent on it.

``parse_inference_request(body, n_ctx=...)`` takes the raw request bytes and returns an
``InferenceRequest`` or raises ``InvalidRequestError`` whose ``details`` list every bad
field as ``{"field", "constraint", "message"}`` (all of them at once, so a client fixes
its request in one round). Nothing here does I/O or touches the engine.

Rules (the why of the less obvious ones):
- JSON ``true``/``false`` are not numbers here, although Python's ``bool`` is an ``int``:
  ``"max_tokens": true`` is a client bug, not a request for one token.
- ``NaN``/``Infinity`` are not JSON (Python's parser accepts them by default): a body with
  them is "not JSON".
- Unknown fields are ignored, so that a newer client can talk to an older worker.
- An optional field that is absent or ``null`` takes llama.cpp's default (temperature
  0.8, top_p 0.95, top_k 40, min_p 0.05, repeat_penalty 1.0, random seed); ``max_tokens``
  defaults to 256; ``cache_prompt`` (prompt-prefix reuse) defaults to true. Integer fields take JSON integers only (``7.0`` is rejected).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_PENALTY = 1.0
#: Seeds are 32-bit in llama.cpp, and 0xFFFFFFFF there means "random": not a seed.
MAX_SEED = 2**32 - 2
MAX_INT32 = 2**31 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
#: A job id travels in the DELETE URL path and in logs: keep it to URL-safe characters.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One validated inference request (``seed`` None = random)."""

    job_id: str
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    chat: bool
    #: Reuse the longest cached prefix of the prompt (llama-server's ``cache_prompt``).
    cache_prompt: bool = True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``, or ``InvalidRequestError`` when it is not one."""
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(
            f"the request body is not JSON: {exc}",
            details=[{"field": "(body)", "constraint": "json", "message": "the body must be a JSON object"}],
        ) from None
    if not isinstance(obj, dict):
        raise InvalidRequestError(
            f"the request body must be a JSON object, not {_json_type(obj)}",
            details=[{"field": "(body)", "constraint": "object", "message": "the body must be a JSON object"}],
        )
    return obj


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _Checker:
    """Collects field problems so that all of them are reported together."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.details: list[dict[str, str]] = []

    def fail(self, field: str, constraint: str, message: str) -> None:
        """Record one problem with ``field``."""
        self.details.append({"field": field, "constraint": constraint, "message": message})

    def integer(self, field: str, default: int) -> int | None:
        """The integer under ``field`` (absent or null: ``default``); None when invalid."""
        value = self.obj.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, "type:integer", f"{field} must be an integer, not {_json_type(value)}")
            return None
        return value

    def number(self, field: str, default: float) -> float | None:
        """The finite number under ``field`` (absent or null: ``default``); None when invalid."""
        value = self.obj.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(field, "type:number", f"{field} must be a number, not {_json_type(value)}")
            return None
        if not math.isfinite(value):  # 1e999 parses to inf
            self.fail(field, "finite", f"{field} must be a finite number")
            return None
        return float(value)


def parse_inference_request(body: bytes, *, n_ctx: int) -> InferenceRequest:
    """Validate the body of `POST /v1/inference` for a context of ``n_ctx`` tokens.

    ``max_tokens`` above ``n_ctx`` is rejected here; whether prompt plus ``max_tokens``
    fit is decided once the prompt is tokenized (``check_fits_context``).
    """
    obj = parse_json_object(body)
    c = _Checker(obj)

    prompt = obj.get("prompt")
    if "prompt" not in obj or prompt is None:
        c.fail("prompt", "required", "prompt is required")
    elif not isinstance(prompt, str):
        c.fail("prompt", "type:string", f"prompt must be a string, not {_json_type(prompt)}")
    elif not prompt:
        c.fail("prompt", "min_length:1", "prompt must not be empty")

    job_id = obj.get("job_id")
    if job_id is None:
        # A caller that does not name the job (curl) still gets one to DELETE it by.
        job_id = f"job-{uuid.uuid4().hex}"
    elif not isinstance(job_id, str):
        c.fail("job_id", "type:string", f"job_id must be a string, not {_json_type(job_id)}")
    elif not JOB_ID_PATTERN.fullmatch(job_id):
        c.fail("job_id", "pattern:[A-Za-z0-9._:-]{1,128}",
               "job_id must be 1 to 128 letters, digits or . _ : -")

    max_tokens = c.integer("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is not None:
        if max_tokens <= 0:
            c.fail("max_tokens", ">=1", "max_tokens must be at least 1")
        elif max_tokens > n_ctx:
            c.fail("max_tokens", f"<={n_ctx}",
                   f"max_tokens {max_tokens} is beyond this worker's context of {n_ctx} tokens")

    temperature = c.number("temperature", DEFAULT_TEMPERATURE)
    if temperature is not None and temperature < 0:
        c.fail("temperature", ">=0", "temperature must be 0 (greedy) or more")

    top_p = c.number("top_p", DEFAULT_TOP_P)
    if top_p is not None and not 0 < top_p <= 1:
        c.fail("top_p", "in:(0,1]", "top_p must be greater than 0 and at most 1")

    top_k = c.integer("top_k", DEFAULT_TOP_K)
    if top_k is not None and top_k < 0:
        c.fail("top_k", ">=0", "top_k must be 0 (off) or more")
    elif top_k is not None and top_k > MAX_INT32:  # the core takes an int32
        c.fail("top_k", f"<={MAX_INT32}", f"top_k must be at most {MAX_INT32}")

    min_p = c.number("min_p", DEFAULT_MIN_P)
    if min_p is not None and not 0 <= min_p <= 1:
        c.fail("min_p", "in:[0,1]", "min_p must be between 0 (off) and 1")

    repeat_penalty = c.number("repeat_penalty", DEFAULT_REPEAT_PENALTY)
    if repeat_penalty is not None and repeat_penalty <= 0:
        c.fail("repeat_penalty", ">0", "repeat_penalty must be greater than 0 (1.0 = off)")

    seed = obj.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            c.fail("seed", "type:integer", f"seed must be an integer or null, not {_json_type(seed)}")
            seed = None
        elif not 0 <= seed <= MAX_SEED:
            c.fail("seed", f"in:[0,{MAX_SEED}]", f"seed must be between 0 and {MAX_SEED}")
            seed = None

    stop = _check_stop(c, obj.get("stop"))

    chat = _check_bool(c, obj, "chat", False)
    cache_prompt = _check_bool(c, obj, "cache_prompt", True)

    if c.details:
        raise InvalidRequestError(_summary(c.details), details=c.details)
    return InferenceRequest(
        job_id=job_id,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        seed=seed,
        stop=stop,
        chat=chat,
        cache_prompt=cache_prompt,
    )


def _check_bool(c: _Checker, obj: dict[str, Any], name: str, default: bool) -> bool:
    value = obj.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        c.fail(name, "type:boolean", f"{name} must be true or false, not {_json_type(value)}")
        return default
    return value


def _check_stop(c: _Checker, stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]  # OpenAI's API takes one string as well as a list
    if not isinstance(stop, list):
        c.fail("stop", "type:array", f"stop must be an array of strings, not {_json_type(stop)}")
        return ()
    if len(stop) > MAX_STOP_SEQUENCES:
        c.fail("stop", f"max_items:{MAX_STOP_SEQUENCES}",
               f"stop may hold at most {MAX_STOP_SEQUENCES} sequences")
    for n, item in enumerate(stop):
        field = f"stop[{n}]"
        if not isinstance(item, str):
            c.fail(field, "type:string", f"{field} must be a string, not {_json_type(item)}")
        elif not item:
            c.fail(field, "min_length:1", f"{field} must not be empty")
        elif len(item) > MAX_STOP_LENGTH:
            c.fail(field, f"max_length:{MAX_STOP_LENGTH}",
                   f"{field} may be at most {MAX_STOP_LENGTH} characters")
        elif "\0" in item:
            c.fail(field, "no_nul", f"{field} must not contain a NUL character")
    return tuple(s for s in stop if isinstance(s, str))


def check_fits_context(request: InferenceRequest, prompt_tokens: int, n_ctx: int) -> None:
    """``InvalidRequestError`` when the prompt plus ``max_tokens`` exceed the context."""
    if prompt_tokens + request.max_tokens > n_ctx:
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {request.max_tokens}: "
            f"together beyond this worker's context of {n_ctx} tokens; "
            f"shorten the prompt or lower max_tokens",
            details=[{
                "field": "max_tokens" if prompt_tokens < n_ctx else "prompt",
                "constraint": f"prompt_tokens+max_tokens<={n_ctx}",
                "message": f"prompt ({prompt_tokens} tokens) plus max_tokens "
                           f"({request.max_tokens}) must fit in {n_ctx} tokens",
            }],
        )


def _summary(details: list[dict[str, str]]) -> str:
    if len(details) == 1:
        return f"invalid inference request: {details[0]['message']}"
    return f"invalid inference request: {len(details)} problems: " + "; ".join(
        d["message"] for d in details
    )
