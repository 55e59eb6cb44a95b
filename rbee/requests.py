"""The typed requests of rbee: model references, sampling parameters, an ``infer`` request.

No I/O, no Trio: the keeper checks a command line with this module before it starts or
contacts anything, the queen checks ``POST /v1/jobs`` bodies with it, and the worker builds
its ``POST /v1/inference`` checks on it (adding what only it knows: its context size and
job ids). Every default and every bound is written once, here.

How a field is described: each field of ``SamplingParams`` and ``InferRequest`` is a
plain dataclass field whose default is the request's default, with a ``Spec`` in its
metadata (JSON type, bounds, the message a value out of bounds gets, a one-line
description). ``FieldProblems`` checks a JSON object against those fields, and
``json_schema(cls)`` writes the same fields out as a JSON Schema (draft 2020-12), so the
documented schema and the checks cannot drift apart.

Why frozen dataclasses and our own small checker and schema emitter rather than msgspec
or pydantic: msgspec (fast, and it emits JSON Schema) stops at the *first* bad field,
and we answer every bad field at once (``details`` lists them all, so a client fixes its
request in one round); pydantic would be a heavy dependency for a keeper that must refuse
a bad command line in well under a second. The checker is a few dozen lines of stdlib.

Rules (the why of the less obvious ones):

- JSON ``true``/``false`` are not numbers, although Python's ``bool`` is an ``int``:
  ``"max_tokens": true`` is a client bug, not a request for one token.
- Integer fields take integers only (``7.0`` is rejected); number fields take integers
  too. ``NaN`` and infinities are refused (``parse_json_object`` refuses them as "not
  JSON"; a huge literal that overflows to infinity is refused as not finite).
- Unknown fields are ignored, so that a newer client can talk to an older server.
- An optional field that is absent or ``null`` takes its default; the sampling defaults
  are llama.cpp's (temperature 0.8, top_p 0.95, top_k 40, min_p 0.05, repeat_penalty 1.0,
  presence and frequency penalties 0, a random seed), ``max_tokens`` 256. One exception:
  ``max_tokens`` absent is 256, but ``null`` (Python ``None``) is *no limit* (OpenAI's
  absent ``max_tokens``, llama-server's -1: until the end of generation or the context is
  full); its ``Spec`` says so with ``null_means_unlimited``.
- The prompt is ``prompt`` (text) or ``messages`` (a conversation the worker renders with
  the model's chat template): exactly one of them, else one problem naming both.
- ``response_format`` is OpenAI's, passed on as it is; only its shape is checked here
  (the worker turns a schema into a grammar, and refuses one it cannot).

Model references (DESIGN.md, State on disk):

- ``hf:org/repo``: a Hugging Face repository; the hive picks its GGUF by quantisation,
  Q4_K_M first, then Q5_K_M, Q8_0, F16;
- ``hf:org/repo:Q4_K_M``: the GGUF of that quantisation in the repository;
- ``hf:org/repo/file.gguf`` (or ``hf:org/repo/sub/dir/file.gguf``): exactly that file;
- ``file:/abs/path.gguf``: a GGUF already on the node (absolute path);
- ``gemma3-270m``: the built-in alias, the embedded Gemma-3 270M Q4_K_M.

Anything else is an ``InvalidRequestError`` whose message lists these forms.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import MISSING, dataclass, field
from typing import Any, Mapping

from .errors import InvalidRequestError

# -- model references ---------------------------------------------------------------------

#: The alias of the embedded default model.
EMBEDDED_ALIAS = "gemma3-270m"

ACCEPTED_FORMS = (
    "hf:org/repo, hf:org/repo:Q4_K_M, hf:org/repo/file.gguf, file:/abs/path.gguf, " + EMBEDDED_ALIAS
)

# Hub repository names: letters, digits, '-', '_', '.'; neither part starts with '.' or '-'.
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = re.compile(rf"^({_NAME})/({_NAME})$")
_QUANT = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One parsed model reference.

    ``provider`` is ``hf``, ``file`` or ``embedded``. For ``hf``: ``repo`` is ``org/repo``,
    and at most one of ``quant`` and ``filename`` is set. For ``file``: ``path``.
    ``reference`` is the canonical string (the catalogue key).
    """

    reference: str
    provider: str
    repo: str | None = None
    quant: str | None = None
    filename: str | None = None
    path: str | None = None


def _invalid_reference(raw: object, why: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"invalid model reference {raw!r}: {why}; accepted forms: {ACCEPTED_FORMS}",
        details=[{"field": "model", "constraint": ACCEPTED_FORMS, "message": why}],
    )


def parse_reference(raw: object) -> ModelRef:
    """Parse a model reference; ``InvalidRequestError`` naming the accepted forms if bad."""
    if not isinstance(raw, str) or not raw.strip():
        raise _invalid_reference(raw, "a model reference is a non-empty string")
    text = raw.strip()
    if text == EMBEDDED_ALIAS:
        return ModelRef(reference=EMBEDDED_ALIAS, provider="embedded")
    if text.startswith("file:"):
        return _parse_file(raw, text[len("file:") :])
    if text.startswith("hf:"):
        return _parse_hf(raw, text[len("hf:") :])
    raise _invalid_reference(raw, "unknown provider or alias")


def _parse_file(raw: str, path: str) -> ModelRef:
    if not path.startswith("/"):
        raise _invalid_reference(raw, "a file: reference needs an absolute path")
    if "\0" in path or "/../" in path + "/":
        raise _invalid_reference(raw, "a file: path may not contain NUL or '..'")
    if not path.lower().endswith(".gguf"):
        raise _invalid_reference(raw, "a file: reference names a .gguf file")
    return ModelRef(reference=f"file:{path}", provider="file", path=path)


def _parse_hf(raw: str, rest: str) -> ModelRef:
    quant = None
    if ":" in rest:
        rest, quant = rest.rsplit(":", 1)
        if not _QUANT.match(quant):
            raise _invalid_reference(raw, f"{quant!r} is not a quantisation name like Q4_K_M")
        quant = quant.upper()
    parts = rest.split("/")
    if len(parts) < 2 or not _REPO.match("/".join(parts[:2])):
        raise _invalid_reference(raw, "an hf: reference starts with org/repo")
    repo = "/".join(parts[:2])
    if len(parts) == 2:
        if quant:
            return ModelRef(reference=f"hf:{repo}:{quant}", provider="hf", repo=repo, quant=quant)
        return ModelRef(reference=f"hf:{repo}", provider="hf", repo=repo)
    if quant:
        raise _invalid_reference(raw, "name either a quantisation or a file, not both")
    filename = "/".join(parts[2:])
    if any(p in ("", ".", "..") for p in parts[2:]):
        raise _invalid_reference(raw, "the file part of an hf: reference is a plain relative path")
    if not filename.lower().endswith(".gguf"):
        raise _invalid_reference(raw, "the file of an hf: reference is a .gguf file")
    return ModelRef(reference=f"hf:{repo}/{filename}", provider="hf", repo=repo, filename=filename)


# -- limits -------------------------------------------------------------------------------

#: The backends a worker can run on.
BACKENDS = ("cpu", "cuda", "metal")
#: A node name (the node registry's rule): it travels in URLs, logs and SSH config.
NODE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
#: The native core takes top_k as an int32.
MAX_INT32 = 2**31 - 1
#: Seeds are 32-bit in llama.cpp, and 0xFFFFFFFF there means "random": not a seed.
MAX_SEED = 2**32 - 2
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
#: Who may speak in ``messages`` (OpenAI's roles that carry plain text).
ROLES = ("system", "user", "assistant")
#: OpenAI's ``response_format.type``s: free text, any JSON object, JSON following a schema.
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")

# -- JSON helpers -------------------------------------------------------------------------


#: JSON nested deeper than this is refused before it is parsed: no request of ours nests
#: more than a few levels (a ``response_format`` schema a dozen or so), and Python's
#: parser (and every checker that walks the result) recurses once per level, so 50,000
#: ``[`` would be a ``RecursionError``, not an answer.
MAX_JSON_DEPTH = 64

# The depth scan runs in C (a loop over the characters in Python would take seconds for a
# 16 MiB body of brackets): drop the strings (escapes included: the unrolled loop matches a
# 5 MB prompt in one go), then every ASCII character but brackets (outside strings JSON has
# no other), with ``{}`` as ``[]`` (the parser checks that they match); then each pass drops
# the innermost pairs: one nesting level. A run of openers is as deep as it is long.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_ONLY_BRACKETS = {code: None for code in range(128) if chr(code) not in "[]{}"} | {ord("{"): "[", ord("}"): "]"}
_TOO_MANY_OPENERS = "[" * (MAX_JSON_DEPTH + 1)


class _Constant:
    """Where ``NaN``, ``Infinity`` or ``-Infinity`` stood in a parsed body (``name``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _body_problem(constraint: str, message: str, *, field: str = "(body)") -> InvalidRequestError:
    return InvalidRequestError(message, details=[{"field": field, "constraint": constraint, "message": message}])


def _too_deep(text: str) -> bool:
    """Whether the JSON ``text`` nests arrays and objects deeper than ``MAX_JSON_DEPTH``
    (brackets inside strings do not count). Text that is not JSON may pass: the parser
    says what is wrong with it."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False  # cannot nest deeper than it has brackets
    brackets = _JSON_STRING.sub("", text).translate(_ONLY_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if _TOO_MANY_OPENERS in brackets:
            return True
        shallower = brackets.replace("[]", "")
        if not shallower or len(shallower) == len(brackets):
            return False
        brackets = shallower
    return "[]" in brackets  # a pair left after as many levels


def _constant_path(value: Any, path: str = "") -> tuple[str, str] | None:
    """(where, which) of the first ``_Constant`` in a parsed body (``max_tokens``,
    ``messages[0].content``); the body's depth was bounded before it was parsed."""
    if isinstance(value, _Constant):
        return path or "(body)", value.name
    if isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{n}]", item) for n, item in enumerate(value))
    else:
        return None
    for where, item in items:
        found = _constant_path(item, where)
        if found is not None:
            return found
    return None


def parse_json_object(body: bytes, *, required: bool = True) -> dict[str, Any]:
    """The JSON object in a request ``body``, or ``InvalidRequestError`` (400) naming why not.

    Refused, each with its own message and ``details`` constraint: an empty body
    (``required``; otherwise it is ``{}``), bytes that are not UTF-8 (naming the byte
    offset), JSON nested deeper than ``MAX_JSON_DEPTH`` (found by a scan, before the
    parser recurses), text that is not JSON, ``NaN``/``Infinity``/``-Infinity`` (not JSON,
    although Python's parser takes them: naming the field), and any JSON value but an object.
    A leading UTF-8 byte order mark is ignored (RFC 8259 lets a parser do so).
    """
    bom = 3 if body.startswith(b"\xef\xbb\xbf") else 0
    body = body[bom:]
    if not body.strip():
        if not required:
            return {}
        raise _body_problem("required", "the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _body_problem("utf-8", f"the request body is not UTF-8: byte 0x{body[exc.start]:02x} at offset "
                                     f"{bom + exc.start} ({exc.reason}); send JSON encoded as UTF-8") from None
    if _too_deep(text):
        raise _body_problem(f"max_depth:{MAX_JSON_DEPTH}",
                            f"the request body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels; "
                            f"no rbee request nests that deep")
    constants: list[_Constant] = []

    def constant(name: str) -> _Constant:
        constants.append(_Constant(name))
        return constants[-1]

    try:
        obj = json.loads(text, parse_constant=constant)
    except RecursionError:  # the scan passes what is not JSON; the parser may still recurse on it
        raise _body_problem(f"max_depth:{MAX_JSON_DEPTH}", f"the request body nests arrays and objects "
                                                           f"deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        why = str(exc)
        if why.startswith("Exceeds the limit"):  # CPython's int_max_str_digits
            why = f"a number has more than {sys.get_int_max_str_digits()} digits"
        raise _body_problem("json", f"the request body is not JSON: {why}") from None
    if constants:
        where, name = _constant_path(obj) or ("(body)", constants[0].name)
        raise _body_problem("finite", f"{where}: {name} is not JSON (JSON numbers are finite); "
                                      f"send a number or null", field=where)
    if not isinstance(obj, dict):
        raise _body_problem("object", f"the request body must be a JSON object, not {json_type(obj)}")
    return obj


def json_type(value: Any) -> str:
    """What ``value`` is, in JSON words with an article (``a number``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "an object"


# -- field descriptions -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """What one JSON field of a request is; the dataclass field it describes holds the default.

    ``type`` is a JSON Schema type (``integer``, ``number``, ``string``, ``boolean``),
    ``stop`` (stop sequences: an array of strings, or one string), ``messages`` (an array
    of ``Message`` objects) or ``response_format`` (OpenAI's object). Bounds are JSON Schema's
    ``minimum`` / ``exclusiveMinimum`` / ``maximum``; a value outside them is told
    ``range_message``, except that with ``maximum_message`` the maximum is a limit of the
    implementation, checked and reported on its own.
    """

    type: str
    description: str
    #: ``null`` (Python ``None``) is a value of its own (no limit), not the default; only
    #: an absent field takes the default.
    null_means_unlimited: bool = False
    minimum: int | float | None = None
    exclusive_minimum: int | float | None = None
    maximum: int | float | None = None
    range_message: str = ""
    maximum_message: str = ""
    min_length: int | None = None
    pattern: str | None = None
    pattern_message: str = ""
    enum: tuple[str, ...] = ()
    #: A string that may not hold a NUL character (it travels to C as a C string).
    no_nul: bool = False

    def range_constraint(self) -> str:
        """The ``constraint`` of a value out of bounds: ``>=1``, ``in:(0,1]``, ``>0`` ..."""
        if self.minimum is not None:
            low, bracket, op = self.minimum, "[", ">="
        else:
            low, bracket, op = self.exclusive_minimum, "(", ">"
        if self.maximum is not None and not self.maximum_message:
            if low is None:
                return f"<={_num(self.maximum)}"
            return f"in:{bracket}{_num(low)},{_num(self.maximum)}]"
        return f"{op}{_num(low)}"

    def in_range(self, value: int | float) -> bool:
        """Whether ``value`` is within the bounds (the separately reported maximum aside)."""
        if self.minimum is not None and value < self.minimum:
            return False
        if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
            return False
        if self.maximum is not None and not self.maximum_message and value > self.maximum:
            return False
        return True


def _num(value: int | float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def described(default: Any, spec: Spec) -> Any:
    """A dataclass field with ``default`` (``MISSING``: required) described by ``spec``."""
    return field(default=default, metadata={"spec": spec})


#: A field whose value was bad (the problem is recorded); never a valid value.
INVALID: Any = type("Invalid", (), {"__repr__": lambda self: "INVALID"})()


# -- Message ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One message of a conversation: who speaks (``system``, ``user``, ``assistant``) and
    what they say (plain text; an OpenAI layer flattens text parts before it gets here).

    Constructing one checks it (``InvalidRequestError``).
    """

    role: str = described(MISSING, Spec(
        "string", "Who speaks: system, user or assistant.", enum=ROLES))
    content: str = described(MISSING, Spec(
        "string", "What they say (text, no NUL character).", no_nul=True))

    def __post_init__(self) -> None:
        _check_instance(self, "message")

    def as_json(self) -> dict[str, str]:
        """``{"role", "content"}``."""
        return {"role": self.role, "content": self.content}


# -- SamplingParams -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How tokens are picked, and when generation stops. ``temperature == 0`` is greedy.

    Constructing one checks it (``InvalidRequestError`` listing every bad field) and
    normalises it: ``None`` takes the default (but ``max_tokens=None`` is no limit),
    numbers become ``float``, ``stop`` a tuple.
    """

    max_tokens: int | None = described(256, Spec(
        "integer", "Stop after this many generated tokens; null: no limit (until the end of "
                   "generation or the context is full).",
        null_means_unlimited=True, minimum=1, range_message="max_tokens must be at least 1"))
    temperature: float = described(0.8, Spec(
        "number", "Sampling temperature; 0 is greedy (always the most likely token).",
        minimum=0, range_message="temperature must be 0 (greedy) or more"))
    top_p: float = described(0.95, Spec(
        "number", "Nucleus sampling: keep the most likely tokens up to this total probability.",
        exclusive_minimum=0, maximum=1, range_message="top_p must be greater than 0 and at most 1"))
    top_k: int = described(40, Spec(
        "integer", "Sample from the k most likely tokens; 0 is off.",
        minimum=0, maximum=MAX_INT32, range_message="top_k must be 0 (off) or more",
        maximum_message=f"top_k must be at most {MAX_INT32}"))
    min_p: float = described(0.05, Spec(
        "number", "Drop tokens less likely than this fraction of the most likely one; 0 is off.",
        minimum=0, maximum=1, range_message="min_p must be between 0 (off) and 1"))
    repeat_penalty: float = described(1.0, Spec(
        "number", "Penalty for repeating recent tokens; 1.0 is off.",
        exclusive_minimum=0, range_message="repeat_penalty must be greater than 0 (1.0 = off)"))
    presence_penalty: float = described(0.0, Spec(
        "number", "OpenAI's presence penalty: lower the logit of every token that already "
                  "appeared by this much; 0 is off.",
        minimum=-2, maximum=2, range_message="presence_penalty must be between -2 and 2 (0 = off)"))
    frequency_penalty: float = described(0.0, Spec(
        "number", "OpenAI's frequency penalty: lower the logit of every token by this much "
                  "times how often it appeared; 0 is off.",
        minimum=-2, maximum=2, range_message="frequency_penalty must be between -2 and 2 (0 = off)"))
    seed: int | None = described(None, Spec(
        "integer", "Random seed, for repeatable output; null picks one at random.",
        minimum=0, maximum=MAX_SEED, range_message=f"seed must be between 0 and {MAX_SEED}"))
    stop: tuple[str, ...] = described((), Spec(
        "stop", f"Stop sequences (at most {MAX_STOP_SEQUENCES}, each 1 to {MAX_STOP_LENGTH} "
                "characters, no NUL); one string is one sequence."))

    def __post_init__(self) -> None:
        _check_instance(self, "sampling parameters")

    def as_json(self) -> dict[str, Any]:
        """Every field with its value, as JSON values (``stop`` a list, ``seed`` maybe null)."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "stop": list(self.stop)}


# -- InferRequest -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferRequest:
    """One ``infer`` job: which model, what prompt, where, and how to sample.

    In JSON the sampling fields sit beside the others (``{"model", "prompt",
    "max_tokens", ...}``). The prompt is ``prompt`` (text) or ``messages`` (a conversation,
    rendered with the model's chat template): exactly one of them. ``ref`` is ``model``
    parsed (``parse_reference``). Constructing one checks it, as ``SamplingParams`` does;
    ``messages`` becomes a tuple of ``Message`` (dicts are accepted).
    """

    model: str = described(MISSING, Spec(
        "string", f"Model reference: {ACCEPTED_FORMS}.", min_length=1))
    prompt: str | None = described(None, Spec(
        "string", "The prompt text; exactly one of prompt and messages.", min_length=1))
    messages: tuple[Message, ...] | None = described(None, Spec(
        "messages", "The conversation so far (at least one message), rendered with the model's "
                    "chat template, the assistant's turn opened; exactly one of prompt and messages."))
    node: str | None = described(None, Spec(
        "string", "The node to run on (localhost, or one added with setup add-node); "
                  "null lets the scheduler place the job.",
        pattern=NODE_NAME_PATTERN,
        pattern_message="node must be a node name: 1 to 63 letters, digits or . _ -, "
                        "starting with a letter or digit"))
    backend: str | None = described(None, Spec(
        "string", "The backend to run on; null picks the node's best.", enum=BACKENDS))
    device: int | None = described(None, Spec(
        "integer", "Device index for the backend; null is device 0.",
        minimum=0, range_message="device must be 0 or more (a device index)"))
    sampling: SamplingParams = field(default_factory=SamplingParams, metadata={"flatten": SamplingParams})
    cache_prompt: bool = described(True, Spec(
        "boolean", "Reuse the longest cached prefix of the prompt (prompt caching)."))
    chat: bool = described(False, Spec(
        "boolean", "Wrap the prompt in the model's chat template (as one user message)."))
    response_format: dict[str, Any] | None = described(None, Spec(
        "response_format", "OpenAI's response_format: {\"type\": \"text\"} (free text), "
                           "{\"type\": \"json_object\"} (any JSON object) or {\"type\": \"json_schema\", "
                           "\"json_schema\": {\"name\", \"schema\", \"strict\"}} (JSON following the schema); "
                           "null is free text."))
    ref: ModelRef = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.sampling, SamplingParams):
            raise InvalidRequestError(
                f"invalid infer request: sampling must be SamplingParams, not {type(self.sampling).__name__}",
                details=[{"field": "sampling", "constraint": "type:SamplingParams",
                          "message": "sampling must be SamplingParams"}],
            )
        _check_instance(self, "infer request")

    def worker_body(self, job_id: str) -> dict[str, Any]:
        """The JSON body of a worker's ``POST /v1/inference`` for this request: ``prompt``
        or ``messages`` (whichever it has), every sampling field (``max_tokens`` null = no
        limit), ``cache_prompt``, ``chat`` and, when set, ``response_format``."""
        body: dict[str, Any] = {"job_id": job_id}
        if self.messages is not None:
            body["messages"] = [m.as_json() for m in self.messages]
        else:
            body["prompt"] = self.prompt
        body.update(self.sampling.as_json(), cache_prompt=self.cache_prompt, chat=self.chat)
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body

    def public(self) -> dict[str, Any]:
        """The request as JSON for logs and listings: the prompt's length (the characters of
        every message's content), not its text; how many messages; the response format's type."""
        chars = len(self.prompt) if self.prompt is not None else sum(len(m.content) for m in self.messages or ())
        return {
            "model": self.model,
            "reference": self.ref.reference,
            "node": self.node,
            "backend": self.backend,
            "device": self.device,
            **self.sampling.as_json(),
            "cache_prompt": self.cache_prompt,
            "chat": self.chat,
            "prompt_chars": chars,
            "messages": None if self.messages is None else len(self.messages),
            "response_format": None if self.response_format is None else self.response_format.get("type"),
        }


def parse_sampling(body: Mapping[str, Any]) -> SamplingParams:
    """The sampling fields of a JSON object; ``InvalidRequestError`` listing every bad one."""
    problems = FieldProblems(body, "sampling parameters")
    values = problems.fields(SamplingParams)
    problems.raise_if_any()
    return SamplingParams(**values)


def parse_infer_request(body: Mapping[str, Any]) -> InferRequest:
    """Check an ``infer`` request (a JSON object); ``InvalidRequestError`` listing every bad field.

    Unknown fields (``operation``, newer ones) are ignored; absent or null ones take their
    defaults. The error's message is one line summarising every problem.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequestError(
            f"invalid infer request: the request must be a JSON object, not {json_type(body)}",
            details=[{"field": "(body)", "constraint": "object", "message": "the body must be a JSON object"}],
        )
    problems = FieldProblems(body, "infer request")
    values = problems.fields(InferRequest)
    problems.raise_if_any()
    return InferRequest(**values)


# -- checking -----------------------------------------------------------------------------


class FieldProblems:
    """Checks the fields of one JSON object, collecting every problem before raising.

    ``fields(cls)`` / ``field(cls, name)`` return checked values (``INVALID`` where bad);
    ``fail`` records a problem of the caller's own; ``raise_if_any`` raises
    ``InvalidRequestError`` whose ``details`` list them all as
    ``{"field", "constraint", "message"}`` and whose message is one line: ``invalid <what>:
    <message>`` or ``invalid <what>: N problems: <message>; <message> ...``.
    """

    def __init__(self, obj: Mapping[str, Any], what: str = "request") -> None:
        self.obj = obj
        self.what = what
        self.details: list[dict[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.details)

    def fail(self, field: str, constraint: str, message: str) -> None:
        """Record one problem with ``field``."""
        self.details.append({"field": field, "constraint": constraint, "message": message})

    def bad(self, field: str) -> bool:
        """Whether a problem with ``field`` has been recorded."""
        return any(d["field"] == field for d in self.details)

    def summary(self) -> str:
        """The one-line message of the problems recorded so far."""
        if len(self.details) == 1:
            return f"invalid {self.what}: {self.details[0]['message']}"
        return f"invalid {self.what}: {len(self.details)} problems: " + "; ".join(
            d["message"] for d in self.details
        )

    def raise_if_any(self) -> None:
        """``InvalidRequestError`` with every problem recorded, if there is one."""
        if self.details:
            raise InvalidRequestError(self.summary(), details=list(self.details))

    def fields(self, cls: type) -> dict[str, Any]:
        """Checked values of every described field of ``cls`` (keyword arguments for it)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            nested = f.metadata.get("flatten")
            if nested is not None:
                inner = self.fields(nested)
                values[f.name] = INVALID if INVALID in inner.values() else nested(**inner)
            elif "spec" in f.metadata:
                values[f.name] = self.field(cls, f.name)
        return values

    def field(self, cls: type, name: str) -> Any:
        """The checked value of ``cls``'s described field ``name`` (``INVALID`` if bad).

        Checking ``InferRequest``'s ``messages`` also checks that exactly one of ``prompt``
        and ``messages`` was given (a problem of ``prompt``'s, naming both).
        """
        f = _described_field(cls, name)
        value = _check(self, name, f.metadata["spec"], f.default, self.obj.get(name), name in self.obj)
        if name == "model" and cls is InferRequest and isinstance(value, str):
            try:
                parse_reference(value)
            except InvalidRequestError as exc:
                self.fail("model", ACCEPTED_FORMS, exc.message)
                return INVALID
        if name == "messages" and cls is InferRequest:
            self._prompt_or_messages()
        return value

    def _prompt_or_messages(self) -> None:
        has_prompt = self.obj.get("prompt") is not None
        has_messages = self.obj.get("messages") is not None
        if has_prompt and has_messages:
            self.fail("prompt", "one_of:prompt|messages",
                      "prompt and messages exclude each other: give exactly one of them")
        elif not has_prompt and not has_messages:
            self.fail("prompt", "required", "prompt or messages is required (exactly one of them)")


def _described_field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name and "spec" in f.metadata:
            return f
    raise KeyError(f"{cls.__name__} has no described field {name!r}")


def _check(problems: FieldProblems, name: str, spec: Spec, default: Any, value: Any, present: bool) -> Any:
    """``value`` of field ``name`` checked against ``spec``: normalised, or ``INVALID``.
    ``present``: the field is in the object (a ``null`` there, not an absent field)."""
    if value is None:
        if spec.null_means_unlimited and present:
            return None
        if default is MISSING:
            problems.fail(name, "required", f"{name} is required")
            return INVALID
        return default
    or_null = " or null" if default is None or spec.null_means_unlimited else ""
    kind = spec.type
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            problems.fail(name, "type:integer", f"{name} must be an integer{or_null}, not {json_type(value)}")
            return INVALID
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.fail(name, "type:number", f"{name} must be a number{or_null}, not {json_type(value)}")
            return INVALID
        try:
            value = float(value)
        except OverflowError:  # an integer literal too big for a double
            value = math.inf
        if not math.isfinite(value):  # 1e999 parses to inf
            problems.fail(name, "finite", f"{name} must be a finite number")
            return INVALID
    elif kind == "boolean":
        if not isinstance(value, bool):
            problems.fail(name, "type:boolean", f"{name} must be true or false, not {json_type(value)}")
            return INVALID
        return value
    elif kind == "string":
        return _check_string(problems, name, spec, value, or_null)
    elif kind == "stop":
        return _check_stop(problems, name, value)
    elif kind == "messages":
        return _check_messages(problems, name, value)
    elif kind == "response_format":
        return _check_response_format(problems, name, value)
    if not spec.in_range(value):
        problems.fail(name, spec.range_constraint(), spec.range_message)
        return INVALID
    if spec.maximum_message and value > spec.maximum:
        problems.fail(name, f"<={_num(spec.maximum)}", spec.maximum_message)
        return INVALID
    return value


def _check_string(problems: FieldProblems, name: str, spec: Spec, value: Any, or_null: str) -> Any:
    if not isinstance(value, str):
        problems.fail(name, "type:string", f"{name} must be a string{or_null}, not {json_type(value)}")
        return INVALID
    if spec.min_length and len(value) < spec.min_length:
        problems.fail(name, f"min_length:{spec.min_length}", f"{name} must not be empty")
        return INVALID
    if spec.pattern and not re.fullmatch(spec.pattern, value):
        problems.fail(name, f"pattern:{spec.pattern}", spec.pattern_message)
        return INVALID
    if spec.enum and value not in spec.enum:
        problems.fail(name, "enum:" + "|".join(spec.enum),
                      f"{name} must be one of {', '.join(spec.enum)}, not {value!r}")
        return INVALID
    if spec.no_nul and "\0" in value:
        problems.fail(name, "no_nul", f"{name} must not contain a NUL character")
        return INVALID
    return value


def _check_messages(problems: FieldProblems, name: str, messages: Any) -> Any:
    """An array of at least one ``{"role", "content"}`` object; a tuple of ``Message``."""
    if not isinstance(messages, (list, tuple)):
        problems.fail(name, "type:array", f"{name} must be an array of messages, not {json_type(messages)}")
        return INVALID
    if not messages:
        problems.fail(name, "min_items:1", f"{name} must hold at least one message")
        return INVALID
    before = len(problems.details)
    checked = []
    for n, item in enumerate(messages):
        where = f"{name}[{n}]"
        if isinstance(item, Message):
            checked.append(item)  # checked when it was built
            continue
        if not isinstance(item, Mapping):
            problems.fail(where, "type:object",
                          f"{where} must be an object with role and content, not {json_type(item)}")
            continue
        values = {f.name: _check(problems, f"{where}.{f.name}", f.metadata["spec"], f.default, item.get(f.name),
                                 f.name in item)
                  for f in dataclasses.fields(Message)}
        if INVALID not in values.values():
            checked.append(Message(**values))
    return INVALID if len(problems.details) > before else tuple(checked)


def _check_response_format(problems: FieldProblems, name: str, value: Any) -> Any:
    """OpenAI's ``response_format`` shape; the object itself is kept, as it came."""
    if not isinstance(value, Mapping):
        problems.fail(name, "type:object", f"{name} must be an object, not {json_type(value)}")
        return INVALID
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        problems.fail(f"{name}.type", "enum:" + "|".join(RESPONSE_FORMAT_TYPES),
                      f"{name}.type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, not "
                      + (repr(kind) if isinstance(kind, str) else json_type(kind)))
        return INVALID
    if kind != "json_schema":
        return value
    wrapper = value.get("json_schema")
    where = f"{name}.json_schema"
    if not isinstance(wrapper, Mapping):
        problems.fail(where, "type:object", f"{where} must be an object with the schema, not {json_type(wrapper)}")
        return INVALID
    before = len(problems.details)
    if not isinstance(wrapper.get("schema"), Mapping):
        problems.fail(f"{where}.schema", "type:object",
                      f"{where}.schema must be a JSON Schema object, not {json_type(wrapper.get('schema'))}")
    if wrapper.get("name") is not None and not isinstance(wrapper["name"], str):
        problems.fail(f"{where}.name", "type:string", f"{where}.name must be a string, not {json_type(wrapper['name'])}")
    if wrapper.get("strict") is not None and not isinstance(wrapper["strict"], bool):
        problems.fail(f"{where}.strict", "type:boolean",
                      f"{where}.strict must be true or false, not {json_type(wrapper['strict'])}")
    return INVALID if len(problems.details) > before else value


def _check_stop(problems: FieldProblems, name: str, stop: Any) -> Any:
    if isinstance(stop, str):
        stop = [stop]  # OpenAI's API takes one string as well as a list
    if not isinstance(stop, (list, tuple)):
        problems.fail(name, "type:array", f"{name} must be an array of strings, not {json_type(stop)}")
        return INVALID
    before = len(problems.details)
    if len(stop) > MAX_STOP_SEQUENCES:
        problems.fail(name, f"max_items:{MAX_STOP_SEQUENCES}",
                      f"{name} may hold at most {MAX_STOP_SEQUENCES} sequences")
    for n, item in enumerate(stop):
        where = f"{name}[{n}]"
        if not isinstance(item, str):
            problems.fail(where, "type:string", f"{where} must be a string, not {json_type(item)}")
        elif not item:
            problems.fail(where, "min_length:1", f"{where} must not be empty")
        elif len(item) > MAX_STOP_LENGTH:
            problems.fail(where, f"max_length:{MAX_STOP_LENGTH}",
                          f"{where} may be at most {MAX_STOP_LENGTH} characters")
        elif "\0" in item:
            problems.fail(where, "no_nul", f"{where} must not contain a NUL character")
    return INVALID if len(problems.details) > before else tuple(stop)


def _check_instance(instance: Any, what: str) -> None:
    """Check a dataclass built in Python as a parsed one would be; normalise its fields."""
    cls = type(instance)
    obj = {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls) if "spec" in f.metadata}
    problems = FieldProblems(obj, what)
    values = {name: problems.field(cls, name) for name in obj}
    problems.raise_if_any()
    for name, value in values.items():
        if value is not getattr(instance, name):
            object.__setattr__(instance, name, value)
    if cls is InferRequest:
        object.__setattr__(instance, "ref", parse_reference(instance.model))


# -- JSON Schema --------------------------------------------------------------------------

#: ECMA-262 (JSON Schema's regex dialect): no NUL character.
_NO_NUL = "^[^\\u0000]*$"
_SCHEMA_TYPES = {"integer": "integer", "number": "number", "string": "string", "boolean": "boolean"}


def json_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``SamplingParams``, ``InferRequest`` or
    ``Message`` bodies.

    Written from the same field descriptions the checks use: types, defaults, bounds and
    descriptions. Optional fields accept ``null`` (their default; ``max_tokens`` null is
    no limit); unknown fields are allowed (ignored). ``InferRequest``'s ``oneOf`` says that
    exactly one of ``prompt`` and ``messages`` is given (not null).
    """
    doc = (cls.__doc__ or "").strip().splitlines()
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": cls.__name__,
        "description": doc[0] if doc else cls.__name__,
        **_object_schema(cls),
    }
    if cls is InferRequest:
        schema["oneOf"] = [
            {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
        ]
    return schema


def _object_schema(cls: type) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    _schema_properties(cls, properties, required)
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": True}


def _response_format_schema() -> dict[str, Any]:
    """OpenAI's ``response_format``: a ``type``, and with ``json_schema`` the schema object."""
    wrapper = {
        "type": "object",
        "properties": {
            "name": {"type": ["string", "null"]},
            "schema": {"type": "object"},
            "strict": {"type": ["boolean", "null"]},
        },
        "required": ["schema"],
    }
    return {
        "type": ["object", "null"],
        "properties": {"type": {"enum": list(RESPONSE_FORMAT_TYPES)}},
        "required": ["type"],
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"properties": {"json_schema": wrapper}, "required": ["json_schema"]},
    }


def _schema_properties(cls: type, properties: dict[str, Any], required: list[str]) -> None:
    for f in dataclasses.fields(cls):
        nested = f.metadata.get("flatten")
        if nested is not None:
            _schema_properties(nested, properties, required)
            continue
        spec: Spec | None = f.metadata.get("spec")
        if spec is None:
            continue
        optional = f.default is not MISSING
        prop: dict[str, Any] = {}
        if spec.type == "messages":
            prop.update(type=["array", "null"], minItems=1, items=_object_schema(Message))
        elif spec.type == "response_format":
            prop.update(_response_format_schema())
        elif spec.type == "stop":
            # An array of sequences, or one sequence: each keyword applies to its own type.
            item = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH, "pattern": _NO_NUL}
            prop.update(type=["array", "string", "null"], items=item, maxItems=MAX_STOP_SEQUENCES,
                        minLength=1, maxLength=MAX_STOP_LENGTH, pattern=_NO_NUL)
        else:
            base = _SCHEMA_TYPES[spec.type]
            prop["type"] = [base, "null"] if optional else base
        if optional:
            prop["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        if spec.minimum is not None:
            prop["minimum"] = spec.minimum
        if spec.exclusive_minimum is not None:
            prop["exclusiveMinimum"] = spec.exclusive_minimum
        if spec.maximum is not None:
            prop["maximum"] = spec.maximum
        if spec.min_length is not None:
            prop["minLength"] = spec.min_length
        if spec.pattern is not None:
            prop["pattern"] = spec.pattern
        if spec.no_nul:
            prop["pattern"] = _NO_NUL
        if spec.enum:
            prop["enum"] = [*spec.enum, None] if optional else list(spec.enum)
        prop["description"] = spec.description
        properties[f.name] = prop
        if not optional:
            required.append(f.name)


#: Every sampling default, as one value (``DEFAULT_SAMPLING.max_tokens`` is 256).
DEFAULT_SAMPLING = SamplingParams()
