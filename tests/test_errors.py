"""The error tree: the class decides the code, the registry holds every class once, and an
error keeps its class across a hop (a stream's ``{code, message}``)."""

from __future__ import annotations

import inspect

import pytest
import trio

from rbee import errors
from rbee.errors import (
    ERRORS,
    BelowError,
    ModelLoadError,
    RbeeError,
    error_for_code,
    http_status_for_code,
    single_cause,
)

#: The statuses a daemon may answer with: the caller's fault, or something below / busy.
ALLOWED_STATUSES = {400, 401, 404, 405, 408, 409, 413, 422, 431, 502, 503, 504}


def _module_classes() -> list[type[RbeeError]]:
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, RbeeError) and cls is not RbeeError and cls.__module__ == errors.__name__]


def test_the_registry_holds_every_class_once_under_its_own_code() -> None:
    classes = _module_classes()
    assert sorted(c.__name__ for c in ERRORS.values()) == sorted(c.__name__ for c in classes)
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "two classes share a code"
    for code, cls in ERRORS.items():
        assert cls.code == code


def test_no_error_class_lives_outside_the_tree() -> None:
    """Every RbeeError subclass anywhere in rbee is declared in rbee/errors.py."""
    import rbee.client  # noqa: F401 - import the daemons' modules so their classes exist
    import rbee.hive.app  # noqa: F401
    import rbee.keeper.main  # noqa: F401
    import rbee.queen.app  # noqa: F401
    import rbee.worker.app  # noqa: F401

    todo, seen = [RbeeError], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    strays = [f"{c.__module__}.{c.__qualname__}" for c in seen if c.__module__ != errors.__name__]
    assert strays == []


@pytest.mark.parametrize("cls", list(ERRORS.values()), ids=lambda c: c.code)
def test_each_class_answers_an_allowed_status_never_500(cls: type[RbeeError]) -> None:
    assert cls.http_status in ALLOWED_STATUSES
    body = cls("it broke").envelope()["error"]
    assert body["code"] == cls.code and body["message"] == "it broke"
    assert body["type"] == ("server_error" if cls.http_status >= 500 else body["type"])


def test_an_error_keeps_its_class_across_a_stream() -> None:
    again = error_for_code("model_load_failed", "not a GGUF")
    assert type(again) is ModelLoadError and again.http_status == 422
    assert http_status_for_code("worker_stalled") == 504


def test_an_unknown_code_from_a_newer_peer_is_an_error_from_below_that_keeps_its_code() -> None:
    again = error_for_code("brand_new_failure", "something new broke")
    assert type(again) is BelowError and again.code == "brand_new_failure" and again.http_status == 502
    assert BelowError.code == "upstream_failed"  # the class itself is untouched


def test_no_call_site_may_pick_a_code() -> None:
    with pytest.raises(TypeError):
        RbeeError("x", code="other")  # type: ignore[call-arg]


def test_single_cause_unwraps_a_nursery() -> None:
    async def fail() -> None:
        raise ModelLoadError("the model would not load")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)

    with pytest.raises(BaseExceptionGroup) as caught:
        trio.run(main)
    cause = single_cause(caught.value)
    assert isinstance(cause, ModelLoadError) and "Exceptions from Trio nursery" not in str(cause)
    pair = ExceptionGroup("two", [ValueError("a"), ValueError("b")])
    assert single_cause(pair) is pair  # two causes stay a group: the caller names both
