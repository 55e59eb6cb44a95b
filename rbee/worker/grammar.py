"""OpenAI's ``response_format`` as a GBNF grammar for the native core's grammar sampler.

``response_format_grammar(response_format)`` gives the grammar (or ``None`` for free text):

- ``{"type": "text"}``: no grammar;
- ``{"type": "json_object"}``: any JSON object (llama-cpp-python's ``JSON_GBNF``, which is
  llama.cpp's ``grammars/json.gbnf``);
- ``{"type": "json_schema", "json_schema": {"schema": {...}}}``: the schema converted by
  llama-cpp-python's own converter (``json_schema_to_gbnf``, what
  ``LlamaGrammar.from_json_schema`` uses). A schema it cannot convert raises
  ``ValueError`` with the converter's own message.

The shape of ``response_format`` was checked before (``rbee.requests``).

Why the converter's file is loaded on its own rather than ``import llama_cpp.llama_grammar``:
importing the ``llama_cpp`` package loads libllama through ctypes and installs
llama-cpp-python's log callback with ``llama_log_set``, replacing the native core's, which
keeps llama.cpp's first error for our error messages. ``llama_grammar.py`` itself needs only
the standard library, so it is executed as a module of its own from the installed package's
directory (located with ``find_spec``, which does not import the package).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

from ..errors import NativeError


@functools.cache
def _llama_grammar() -> ModuleType:
    """llama-cpp-python's ``llama_grammar`` module, loaded without its package (see above)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise NativeError("llama-cpp-python is not installed: its JSON schema converter is needed")
    path = Path(spec.origin).resolve().parent / "llama_grammar.py"
    module_spec = importlib.util.spec_from_file_location("rbee_llama_cpp_grammar", path)
    if module_spec is None or module_spec.loader is None:
        raise NativeError(f"cannot load llama-cpp-python's grammar module from {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def json_object_grammar() -> str:
    """GBNF for any JSON object (llama.cpp's ``json.gbnf``, as llama-cpp-python ships it)."""
    return _llama_grammar().JSON_GBNF


#: An integer with both bounds and at most this many values in between is given to the
#: converter as the enum of those values: the converter ignores ``minimum``/``maximum``
#: (a TODO in llama-cpp-python 0.3.36), an enum it enforces. Wider ranges stay unenforced.
MAX_INTEGER_ENUM = 1024


def _int_bound(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if float(value).is_integer() else None


def bounded_integers_as_enums(node: Any) -> Any:
    """``schema`` with every small bounded integer (``{"type": "integer", "minimum": 1,
    "maximum": 5}``, exclusive bounds too) turned into ``{"enum": [1, 2, 3, 4, 5]}``."""
    if isinstance(node, list):
        return [bounded_integers_as_enums(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: bounded_integers_as_enums(value) for key, value in node.items()}
    if out.get("type") == "integer" and "enum" not in out:
        low = _int_bound(out.get("minimum"))
        high = _int_bound(out.get("maximum"))
        if low is None and _int_bound(out.get("exclusiveMinimum")) is not None:
            low = _int_bound(out["exclusiveMinimum"]) + 1
        if high is None and _int_bound(out.get("exclusiveMaximum")) is not None:
            high = _int_bound(out["exclusiveMaximum"]) - 1
        if low is not None and high is not None and 0 <= high - low < MAX_INTEGER_ENUM:
            kept = {k: v for k, v in out.items()
                    if k not in ("type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}
            return {**kept, "enum": list(range(low, high + 1))}
    return out


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """GBNF for JSON following ``schema``; ``ValueError`` with the converter's message when
    it cannot convert it."""
    try:
        text = json.dumps(bounded_integers_as_enums(schema))
    except (TypeError, ValueError) as exc:  # not JSON (built in Python, not parsed)
        raise ValueError(f"the schema is not JSON: {exc}") from None
    try:
        return _llama_grammar().json_schema_to_gbnf(text)
    except RecursionError:
        raise ValueError("the schema nests too deeply") from None
    except Exception as exc:  # the converter asserts, and trips over shapes it does not expect
        raise ValueError(str(exc) or type(exc).__name__) from None


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar ``response_format`` asks for, or ``None`` (free text)."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json_object_grammar()
    if kind == "json_schema":
        return json_schema_grammar(response_format["json_schema"]["schema"])
    return None
