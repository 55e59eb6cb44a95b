"""Checking a `POST /v1/inference` body before any token is spent on it.

``parse_inference_request(body, n_ctx=...)`` takes the raw request bytes and returns an
``InferenceRequest`` or raises ``InvalidRequestError`` whose ``details`` list every bad
field as ``{"field", "constraint", "message"}`` (all of them at once, so a client fixes
its request in one round). Nothing here does I/O or touches the engine.

The fields, their defaults, bounds and messages are ``rbee.requests``'s (``prompt`` or
``messages``, ``cache_prompt``, ``chat`` and ``response_format`` of ``InferRequest``, every
field of ``SamplingParams``), shared with the keeper and the queen; see that module for the
rules (booleans are not numbers, NaN is not JSON, unknown fields are ignored, null takes the
default, but ``max_tokens`` null is no limit). What only a worker checks is here: ``job_id``,
``max_tokens`` against its context (``n_ctx``), that ``response_format``'s schema can be
turned into a grammar (``grammar.py``, llama-cpp-python's converter), and that the prompt is
not so many bytes that no tokenization could fit it in the context (``check_prompt_size``:
a 5 MB prompt is refused at once, not after seconds of tokenizing).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from ..errors import InvalidRequestError, PayloadTooLargeError
from ..requests import (
    DEFAULT_SAMPLING,
    INVALID,
    FieldProblems,
    InferRequest,
    Message,
    SamplingParams,
    json_type,
    parse_json_object,
)
from .grammar import response_format_grammar

DEFAULT_MAX_TOKENS = DEFAULT_SAMPLING.max_tokens
#: A job id travels in the DELETE URL path and in logs: keep it to URL-safe characters.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: The most bytes of text one token may stand for, as a fixed bound rather than the
#: model's own figure (the native core does not expose its vocabulary, and reading the
#: GGUF's 262,144 token strings in Python takes about a second per load). Deliberately
#: loose: Gemma 3's longest token is 48 bytes (measured on its GGUF, as stored, which is
#: never shorter than the text it stands for). Every token covers at least one byte of
#: the text, so a prompt of B bytes is at least B / MAX_TOKEN_BYTES tokens, whatever the
#: tokenizer does; a prompt refused by this bound would have been refused after
#: tokenizing too, unless it were made mostly of tokens longer than this.
MAX_TOKEN_BYTES = 256


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One validated inference request (``seed`` None = random; ``max_tokens`` None = no
    limit: until the end of generation or the context is full). Exactly one of ``prompt``
    and ``messages`` is set."""

    job_id: str
    prompt: str | None
    max_tokens: int | None
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: The conversation, rendered with the model's chat template (instead of ``prompt``).
    messages: tuple[Message, ...] | None = None
    #: OpenAI's ``response_format`` as it came, and the GBNF grammar it asks for (or None).
    response_format: dict | None = None
    grammar: str | None = None

    @property
    def source(self) -> str | tuple[Message, ...]:
        """What the engine continues: the prompt text, or the conversation."""
        return self.messages if self.messages is not None else self.prompt  # type: ignore[return-value]

    @property
    def prompt_chars(self) -> int:
        """Characters of the prompt, or of every message's content."""
        if self.messages is not None:
            return sum(len(m.content) for m in self.messages)
        return len(self.prompt or "")

    @property
    def prompt_bytes(self) -> int:
        """UTF-8 bytes of text that the tokenizer surely sees: the raw prompt as it is;
        through a chat template (``messages``, ``chat``), each text without the whitespace
        around it, which a template may trim (Gemma's does)."""
        if self.messages is not None:
            return sum(len(m.content.strip().encode("utf-8")) for m in self.messages)
        text = self.prompt or ""
        return len((text.strip() if self.chat else text).encode("utf-8"))


def parse_inference_request(body: bytes, *, n_ctx: int) -> InferenceRequest:
    """Validate the body of `POST /v1/inference` for a context of ``n_ctx`` tokens.

    ``max_tokens`` above ``n_ctx`` is rejected here; whether prompt plus ``max_tokens``
    fit is decided once the prompt is tokenized (``check_fits_context``). A
    ``response_format`` schema the converter cannot turn into a grammar is a problem of
    ``response_format`` carrying the converter's message.
    """
    obj = parse_json_object(body)
    problems = FieldProblems(obj, "inference request")

    prompt = problems.field(InferRequest, "prompt")
    messages = problems.field(InferRequest, "messages")  # also: exactly one of the two

    job_id = obj.get("job_id")
    if job_id is None:
        # A caller that does not name the job (curl) still gets one to DELETE it by.
        job_id = f"job-{uuid.uuid4().hex}"
    elif not isinstance(job_id, str):
        problems.fail("job_id", "type:string", f"job_id must be a string, not {json_type(job_id)}")
    elif not JOB_ID_PATTERN.fullmatch(job_id):
        problems.fail("job_id", "pattern:[A-Za-z0-9._:-]{1,128}",
                      "job_id must be 1 to 128 letters, digits or . _ : -")

    sampling = problems.fields(SamplingParams)
    max_tokens = sampling["max_tokens"]
    if max_tokens is not INVALID and max_tokens is not None and max_tokens > n_ctx:
        problems.fail("max_tokens", f"<={n_ctx}",
                      f"max_tokens {max_tokens} is beyond this worker's context of {n_ctx} tokens")

    chat = problems.field(InferRequest, "chat")
    cache_prompt = problems.field(InferRequest, "cache_prompt")
    response_format = problems.field(InferRequest, "response_format")
    grammar = None
    if response_format is not INVALID:
        try:
            grammar = response_format_grammar(response_format)
        except ValueError as exc:
            problems.fail("response_format", "json_schema:convertible",
                          f"response_format: the JSON schema cannot be turned into a grammar: {exc}")

    problems.raise_if_any()
    request = InferenceRequest(job_id=job_id, prompt=prompt, messages=messages, **sampling, chat=chat,
                               cache_prompt=cache_prompt, response_format=response_format, grammar=grammar)
    check_prompt_size(request, n_ctx)
    return request


def check_prompt_size(request: InferenceRequest, n_ctx: int) -> None:
    """``PayloadTooLargeError`` (413) when the prompt has so many bytes that, at
    ``MAX_TOKEN_BYTES`` per token, it cannot fit the context with ``max_tokens`` (with no
    limit: with one token to generate): the verdict ``check_fits_context`` would give
    after tokenizing, given before it."""
    size = request.prompt_bytes
    least_tokens = -(-size // MAX_TOKEN_BYTES)
    room = n_ctx - (1 if request.max_tokens is None else request.max_tokens)
    if least_tokens <= room:
        return
    field = "messages" if request.messages is not None else "prompt"
    wanted = "one token" if request.max_tokens is None else f"max_tokens {request.max_tokens}"
    message = (f"the prompt is {size} bytes, at least {least_tokens} tokens (no token stands for more than "
               f"{MAX_TOKEN_BYTES} bytes): with {wanted} it cannot fit this worker's context of {n_ctx} tokens; "
               f"shorten the prompt")
    raise PayloadTooLargeError(message, details=[{
        "field": field, "constraint": f"prompt_bytes<={max(room, 0) * MAX_TOKEN_BYTES}", "message": message}])


def check_fits_context(request: InferenceRequest, prompt_tokens: int, n_ctx: int) -> None:
    """``InvalidRequestError`` when the prompt plus ``max_tokens`` exceed the context (with
    no limit: when the prompt leaves no room for one token)."""
    if request.max_tokens is None:
        if prompt_tokens < n_ctx:
            return
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens: it fills this worker's context of {n_ctx} tokens, "
            f"leaving no room to generate; shorten the prompt",
            details=[{
                "field": "messages" if request.messages is not None else "prompt",
                "constraint": f"prompt_tokens<{n_ctx}",
                "message": f"the prompt ({prompt_tokens} tokens) must leave room in {n_ctx} tokens",
            }],
        )
    if prompt_tokens + request.max_tokens > n_ctx:
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {request.max_tokens}: "
            f"together beyond this worker's context of {n_ctx} tokens; "
            f"shorten the prompt or lower max_tokens",
            details=[{
                "field": "max_tokens" if prompt_tokens < n_ctx else
                         "messages" if request.messages is not None else "prompt",
                "constraint": f"prompt_tokens+max_tokens<={n_ctx}",
                "message": f"prompt ({prompt_tokens} tokens) plus max_tokens "
                           f"({request.max_tokens}) must fit in {n_ctx} tokens",
            }],
        )
