"""The fast argument binder agrees with ``inspect.Signature.bind`` on every call shape."""

from __future__ import annotations

from typing import Any

import pytest

from serve_queue.config import TaskOptions
from serve_queue.errors import InvalidArguments
from serve_queue.registry import _compile_validator


def typed(a: int, b: str = "x", *, c: float = 1.5) -> None: ...


def untyped(a, b="x", *, c=1.5):  # type: ignore[no-untyped-def]
    ...


def required_kw(a: int, *, c: float) -> None: ...


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1,), {}),
    ((1, "y"), {}),
    ((1,), {"b": "y"}),
    ((), {"a": 1}),
    ((1,), {"c": 2.5}),
    ((1, "y"), {"c": 2}),
    ((1, "y", 3), {}),  # too many positional
    ((), {}),  # missing a
    ((1,), {"a": 2}),  # a twice
    ((1,), {"d": 2}),  # unknown keyword
    (("zz",), {}),  # fails validation (typed) / binds (untyped)
]


def _outcome(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    validate = _compile_validator(func, TaskOptions(name="t"))
    try:
        return validate(list(args), kwargs)
    except InvalidArguments as exc:
        return ("error", str(exc))


def _reference(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    import inspect

    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except TypeError:
        return "error"
    bound.apply_defaults()
    return bound.arguments


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
@pytest.mark.parametrize("func", [typed, untyped, required_kw])
def test_fast_binding_matches_signature_bind(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    got = _outcome(func, args, kwargs)
    expected = _reference(func, args, kwargs)
    if expected == "error":
        assert got[0] == "error" and "do not match" in got[1]
        return
    if isinstance(got, tuple) and got[0] == "error":  # bound, then failed validation
        assert func is not untyped and "failed validation" in got[1]
        return
    positional, keywords = got
    if func is untyped:  # bind-only: the arguments pass through unchanged
        assert (positional, keywords) == (list(args), kwargs)
        return
    names = [n for n in expected if n != "c"]
    assert positional == [expected[n] for n in names]
    assert keywords == {"c": expected["c"]}
