"""The registry: marking, collecting, duplicate names, sync/async, argument validation."""

from __future__ import annotations

import types
from typing import Any

import pytest
from pydantic import BaseModel

from serve_queue import ConfigurationError, InvalidArguments, Registry, UnknownTask, task
from serve_queue.registry import task_options


class Item(BaseModel):
    sku: str
    qty: int


class Handlers:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    @task("tasks.add")
    async def add(self, x: int, y: int) -> int:
        return x + y

    @task("tasks.resize", max_retries=5)
    def resize(self, path: str, *, width: int = 100) -> str:
        return f"{path}@{width}"

    @task("tasks.order")
    async def order(self, item: Item, *extra: int, **tags: str) -> dict[str, Any]:
        return {"item": item, "extra": extra, "tags": tags}

    @task("tasks.untyped")
    def untyped(self, a, b=2):  # type: ignore[no-untyped-def]
        return a, b

    @task("tasks.noargs")
    async def noargs(self) -> None:
        return None

    async def not_a_task(self) -> None:
        return None


def test_task_returns_the_function_unchanged_and_callable() -> None:
    h = Handlers()
    assert h.resize("a.png", width=3) == "a.png@3"
    assert task_options(Handlers.resize) is not None
    assert task_options(Handlers.not_a_task) is None


def test_collects_marked_methods_bound_and_decides_async_once() -> None:
    registry = Registry.from_objects(Handlers())
    assert registry.names() == sorted(
        ["tasks.add", "tasks.resize", "tasks.order", "tasks.untyped", "tasks.noargs"]
    )
    assert registry.get("tasks.add").is_async
    assert not registry.get("tasks.resize").is_async
    assert registry.get("tasks.resize").options.max_retries == 5


def test_unknown_name_raises_unknown_task() -> None:
    with pytest.raises(UnknownTask, match=r"tasks\.nope"):
        Registry().get("tasks.nope")


def test_two_handlers_for_one_name_is_a_configuration_error() -> None:
    class Other:
        @task("tasks.add")
        async def plus(self, x: int, y: int) -> int:
            return x + y

    with pytest.raises(ConfigurationError, match=r"two handlers for task 'tasks\.add'"):
        Registry.from_objects(Handlers(), Other())


def test_a_class_instead_of_an_instance_is_refused_clearly() -> None:
    with pytest.raises(ConfigurationError, match="pass an instance"):
        Registry.from_objects(Handlers)


def test_module_and_function_sources() -> None:
    @task()
    def standalone(x: int) -> int:
        return x

    module = types.ModuleType("fake_tasks")
    module.standalone = standalone  # type: ignore[attr-defined]
    assert Registry.from_objects(module).names() == [f"{__name__}.standalone"]
    assert Registry.from_objects([standalone]).names() == [f"{__name__}.standalone"]


def test_validation_coerces_like_fastapi_and_rebuilds_the_call() -> None:
    registry = Registry.from_objects(Handlers())
    args, kwargs = registry.get("tasks.add").validate(["2", 3], {})
    assert args == [2, 3] and kwargs == {}
    args, kwargs = registry.get("tasks.resize").validate(["p"], {"width": "7"})
    assert args == ["p"] and kwargs == {"width": 7}
    args, kwargs = registry.get("tasks.order").validate(
        [{"sku": "a", "qty": "2"}, "1", 2], {"color": "red"}
    )
    assert args == [Item(sku="a", qty=2), 1, 2] and kwargs == {"color": "red"}


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "match"),
    [
        ("tasks.add", [1], {}, "do not match"),
        ("tasks.add", [1, 2, 3], {}, "do not match"),
        ("tasks.add", ["x", 2], {}, "failed validation"),
        ("tasks.resize", ["p"], {"height": 1}, "do not match"),
        ("tasks.order", [{"sku": "a"}], {}, "qty"),
        ("tasks.noargs", [1], {}, "takes no arguments"),
        ("tasks.untyped", [], {}, "do not match"),
    ],
)
def test_bad_arguments_raise_invalid_arguments(
    name: str, args: list[Any], kwargs: dict[str, Any], match: str
) -> None:
    registry = Registry.from_objects(Handlers())
    with pytest.raises(InvalidArguments, match=match):
        registry.get(name).validate(args, kwargs)


def test_untyped_handlers_are_bound_not_coerced() -> None:
    registry = Registry.from_objects(Handlers())
    assert registry.get("tasks.untyped").validate(["1"], {}) == (["1"], {})


def test_parameter_names_that_clash_with_pydantic_are_fine() -> None:
    @task("tasks.clash")
    def clash(json: int, model_config: str, schema: float = 1.0) -> None:
        return None

    validate = Registry.from_objects([clash]).get("tasks.clash").validate
    assert validate(["1", "x"], {}) == ([1, "x", 1.0], {})


def test_bad_task_options_are_configuration_errors() -> None:
    def handler() -> None:
        return None

    with pytest.raises(ConfigurationError, match="soft_time_limit"):
        task("x", time_limit=1, soft_time_limit=2)(handler)
    with pytest.raises(ConfigurationError, match="bad options"):
        task("x", nonsense=1)(handler)


def test_hints_resolve_when_the_class_travels_by_value() -> None:
    """Ray ships a decorated deployment class by value: its methods keep only the globals
    their code uses, so a string annotation like ``Any`` must come from the module."""
    from ray import cloudpickle  # the copy Ray itself uses to ship deployment classes

    class Shipped:
        @task("tasks.shipped")
        async def run(self, data: dict[str, Any], n: int = 1) -> Any:
            return data, n

    clone = cloudpickle.loads(cloudpickle.dumps(Shipped))
    assert "Any" not in clone.run.__globals__  # what a replica receives
    validate = Registry.from_objects(clone()).get("tasks.shipped").validate
    assert validate([{"a": 1}, "2"], {}) == ([{"a": 1}, 2], {})
