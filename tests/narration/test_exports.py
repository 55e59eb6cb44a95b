"""The public names of rbee.narration: re-exported, the very same objects, nothing missing."""

from __future__ import annotations

import importlib

import pytest

import rbee.narration

# name -> the module that defines it (the contract other engineers code against).
PUBLIC = {
    "NarrationEvent": "events",
    "Started": "events",
    "Token": "events",
    "Metrics": "events",
    "Prefill": "events",
    "End": "events",
    "Error": "events",
    "Loading": "events",
    "Ready": "events",
    "UnknownEvent": "events",
    "WorkerChange": "events",
    "Done": "events",
    "DONE": "events",
    "Event": "events",
    "EVENT_TYPES": "events",
    "LEVELS": "events",
    "narrate": "narrate",
    "narration_context": "narrate",
    "outside_jobs": "narrate",
    "current_job_id": "narrate",
    "current_correlation_id": "narrate",
    "set_process_sink": "narrate",
    "get_process_sink": "narrate",
    "stdout_sink": "narrate",
    "emit": "narrate",
    "Sink": "narrate",
    "redact_text": "redact",
    "redact_event": "redact",
    "REDACTED": "redact",
    "NarrationRenderer": "render",
    "RENDER_MODES": "render",
}


@pytest.mark.parametrize(("name", "module"), sorted(PUBLIC.items()))
def test_public_name_is_reexported_as_the_same_object(name, module):
    defining = importlib.import_module(f"rbee.narration.{module}")
    assert getattr(rbee.narration, name) is getattr(defining, name)


def test_every_public_class_and_function_of_the_core_modules_is_reexported():
    for module in ("events", "narrate"):
        defining = importlib.import_module(f"rbee.narration.{module}")
        for name, value in vars(defining).items():
            if name.startswith("_") or getattr(value, "__module__", None) != defining.__name__:
                continue
            assert (
                getattr(rbee.narration, name, None) is value
            ), f"{module}.{name} is not re-exported"


def test_codec_modules_offer_the_contract():
    from rbee.narration import jsonlines, sse, wire

    assert rbee.narration.sse is sse and rbee.narration.jsonlines is jsonlines
    for name in ("encode", "encode_done", "encode_ping", "Decoder"):
        assert callable(getattr(sse, name))
    for name in ("encode", "Decoder"):
        assert callable(getattr(jsonlines, name))
    for name in ("to_dict", "from_dict", "dumps", "loads", "event_json"):
        assert callable(getattr(wire, name))
    for decoder in (sse.Decoder(), jsonlines.Decoder()):
        assert callable(decoder.feed) and callable(decoder.close)


def test_the_function_narrate_shadows_its_module_on_the_package():
    # `from rbee.narration import narrate` must give the function everyone calls; the
    # module stays reachable as `from rbee.narration.narrate import ...`.
    from rbee.narration.narrate import narrate as defined

    assert rbee.narration.narrate is defined and callable(rbee.narration.narrate)


def test_no_unexpected_public_names():
    modules = {"events", "redact", "render", "sse", "jsonlines", "wire", "openai"}
    public = {name for name in vars(rbee.narration) if not name.startswith("_")}
    assert public - modules == set(PUBLIC)
