"""Task name -> handler, one registry per consumer.

``@task("name")`` only marks a function or method; it returns the function unchanged, so a
handler stays an ordinary callable in tests and other code. A ``Registry`` collects the marked
callables of an object (an instance's bound methods, a module's functions, or a list of
functions), decides once whether each is ``async`` or runs on the thread pool, and compiles an
argument validator from its type hints (pydantic) so a bad message is refused before the call.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from serve_queue.config import TaskOptions
from serve_queue.errors import ConfigurationError, InvalidArguments, UnknownTask

__all__ = ["Handler", "Registry", "task", "task_options"]

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__serve_queue_task__"


def task(name: str | None = None, **options: Any) -> Callable[[F], F]:
    """Mark a function or method as the handler of task ``name``.

    ``name`` defaults to ``"<module>.<function name>"`` as in Celery. ``options`` are
    ``TaskOptions`` fields: ``max_retries``, ``default_retry_delay``, ``acks`` ("late" or
    "early"), ``acks_on_failure_or_timeout``, ``time_limit``, ``soft_time_limit``,
    ``ignore_result``, ``validate_args``. The function is returned unchanged.
    """

    def mark(func: F) -> F:
        target = _unwrap(func)
        task_name = name or f"{target.__module__}.{target.__name__}"
        try:
            setattr(target, _MARK, TaskOptions(name=task_name, **options))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ConfigurationError(f"bad options for task {task_name!r}: {exc}") from None
        return func

    return mark


def task_options(func: Any) -> TaskOptions | None:
    """The options ``@task`` attached to ``func``, or None if it is not a task handler."""
    opts = getattr(_unwrap(func), _MARK, None)
    return opts if isinstance(opts, TaskOptions) else None


def _unwrap(func: Any) -> Any:
    return func.__func__ if isinstance(func, (staticmethod, classmethod)) else func


Validator = Callable[[Sequence[Any], Mapping[str, Any]], tuple[list[Any], dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Handler:
    """A registered handler: the callable to run and everything decided about it up front."""

    options: TaskOptions
    func: Callable[..., Any]
    is_async: bool
    validate: Validator

    @property
    def name(self) -> str:
        return self.options.name


class Registry:
    """Task name -> ``Handler``. Registering two handlers under one name is an error."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    @classmethod
    def from_objects(cls, *sources: Any) -> Registry:
        """A registry of every ``@task`` callable found in ``sources`` (see ``add``)."""
        registry = cls()
        for source in sources:
            registry.add(source)
        return registry

    def add(self, source: Any) -> int:
        """Register the ``@task`` callables of ``source`` and return how many were found.

        ``source`` may be an instance (its marked methods, bound), a module (its marked
        functions), a single marked function, or an iterable of those.
        """
        found = list(_marked_callables(source))
        for func, options in found:
            self.register(func, options)
        return len(found)

    def register(self, func: Callable[..., Any], options: TaskOptions) -> Handler:
        if options.name in self._handlers:
            other = self._handlers[options.name].func
            raise ConfigurationError(
                f"two handlers for task {options.name!r}: {_describe(other)} and {_describe(func)}"
            )
        handler = Handler(
            options=options,
            func=func,
            is_async=inspect.iscoroutinefunction(func),
            validate=_compile_validator(func, options),
        )
        self._handlers[options.name] = handler
        return handler

    def get(self, name: str) -> Handler:
        try:
            return self._handlers[name]
        except KeyError:
            raise UnknownTask(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __len__(self) -> int:
        return len(self._handlers)

    def names(self) -> list[str]:
        return sorted(self._handlers)


def _marked_callables(source: Any) -> Iterable[tuple[Callable[..., Any], TaskOptions]]:
    if isinstance(source, types.ModuleType):
        for value in vars(source).values():
            if callable(value) and (opts := task_options(value)) is not None:
                yield value, opts
    elif isinstance(source, (list, tuple, set, frozenset)):
        for item in source:
            yield from _marked_callables(item)
    elif (opts := task_options(source)) is not None and callable(source):
        yield source, opts
    elif isinstance(source, type):
        raise ConfigurationError(
            f"{source.__qualname__} is a class: pass an instance, e.g. {source.__qualname__}()"
        )
    else:
        for attr in dir(type(source)):
            static = inspect.getattr_static(type(source), attr, None)
            if (opts := task_options(static)) is not None:
                yield getattr(source, attr), opts


def _describe(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", repr(func))


# -- argument validation -------------------------------------------------------------------


def _compile_validator(func: Callable[..., Any], options: TaskOptions) -> Validator:
    """Build, once, the function that binds and validates a message's args for ``func``."""
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    if not params:
        return _no_arguments
    hints = _type_hints(func)
    if not options.validate_args or not any(hints.get(p.name, Any) is not Any for p in params):
        return _binder(signature)
    return _pydantic_validator(signature, hints)


def _type_hints(func: Callable[..., Any]) -> dict[str, Any]:
    """Resolve ``func``'s hints, also against its defining module's namespace.

    A class shipped by value (cloudpickle, as Ray does with a decorated deployment class)
    carries only the globals its code uses, so string annotations (``from __future__ import
    annotations``) may name things it lacks, such as ``Any``; the module itself has them.
    """
    try:
        return typing.get_type_hints(func)
    except NameError:
        pass
    except Exception as exc:
        raise ConfigurationError(f"cannot resolve type hints of {_describe(func)}: {exc}") from exc
    target = getattr(func, "__func__", func)
    namespace: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        namespace.update(vars(importlib.import_module(target.__module__)))
    namespace.update(getattr(target, "__globals__", {}))
    try:
        return typing.get_type_hints(func, globalns=namespace)
    except Exception as exc:  # an unresolvable forward reference is a definition error
        raise ConfigurationError(f"cannot resolve type hints of {_describe(func)}: {exc}") from exc


def _no_arguments(
    args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    if args or kwargs:
        raise InvalidArguments(f"takes no arguments but got args={args!r} kwargs={kwargs!r}")
    return [], {}


def _bind(
    signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> inspect.BoundArguments:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidArguments(f"arguments do not match the handler's signature: {exc}") from None
    bound.apply_defaults()
    return bound


def _fast_binder(
    signature: inspect.Signature,
) -> Callable[[Sequence[Any], Mapping[str, Any]], dict[str, Any] | None] | None:
    """For a signature of plain parameters (no ``*args``/``**kwargs``/positional-only), a
    binder that maps arguments to names with defaults applied, as ``Signature.bind`` +
    ``apply_defaults`` would, in a fraction of the time; it returns None for anything it does
    not bind cleanly (too many, unknown, duplicate or missing arguments), and the caller then
    lets ``Signature.bind`` produce the error. None when the signature is not plain."""
    params = list(signature.parameters.values())
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind not in plain for p in params):
        return None
    positional = tuple(
        p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    )
    names = frozenset(p.name for p in params)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    count = len(params)

    def bind(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
        if len(args) > len(positional):
            return None
        bound = dict(zip(positional, args, strict=False))
        if kwargs:
            if not names.issuperset(kwargs) or any(key in bound for key in kwargs):
                return None
            bound.update(kwargs)
        if len(bound) < count:
            for name, default in defaults.items():
                bound.setdefault(name, default)
            if len(bound) < count:
                return None
        return bound

    return bind


def _binder(signature: inspect.Signature) -> Validator:
    fast = _fast_binder(signature)

    def bind_only(
        args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        if fast is None or fast(args, kwargs) is None:
            _bind(signature, args, kwargs)
        return list(args), dict(kwargs)

    return bind_only


def _pydantic_validator(signature: inspect.Signature, hints: Mapping[str, Any]) -> Validator:
    params = list(signature.parameters.values())
    fields: dict[str, Any] = {}
    for index, param in enumerate(params):
        annotation = hints.get(param.name, Any)
        if param.kind is param.VAR_POSITIONAL:
            annotation = tuple[annotation, ...]  # type: ignore[valid-type]
        elif param.kind is param.VAR_KEYWORD:
            annotation = dict[str, annotation]  # type: ignore[valid-type]
        # neutral field names: a parameter called "json" or "model_config" must not clash
        fields[f"p{index}"] = (annotation, Field(validation_alias=param.name))
    model: type[BaseModel] = create_model(
        "TaskArguments", __config__=ConfigDict(arbitrary_types_allowed=True), **fields
    )
    fast = _fast_binder(signature)
    rebuild = _plain_rebuilder(params) if fast is not None else None

    def validate(
        args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        bound = None if fast is None else fast(args, kwargs)
        if bound is None:
            bound = _bind(signature, args, kwargs).arguments
        try:
            values = model.model_validate(bound)
        except ValidationError as exc:
            raise InvalidArguments(f"arguments failed validation: {_summarise(exc)}") from None
        return _rebuild(params, values) if rebuild is None else rebuild(values)

    return validate


def _plain_rebuilder(
    params: list[inspect.Parameter],
) -> Callable[[BaseModel], tuple[list[Any], dict[str, Any]]]:
    """``_rebuild`` for plain parameters, with the field names worked out once."""
    positional = [
        f"p{i}" for i, p in enumerate(params) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    keyword = [
        (f"p{i}", p.name) for i, p in enumerate(params) if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]

    def rebuild(values: BaseModel) -> tuple[list[Any], dict[str, Any]]:
        fields = values.__dict__
        return [fields[f] for f in positional], {name: fields[f] for f, name in keyword}

    return rebuild


def _rebuild(
    params: list[inspect.Parameter], values: BaseModel
) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for index, param in enumerate(params):
        value = getattr(values, f"p{index}")
        if param.kind is param.VAR_POSITIONAL:
            args.extend(value)
        elif param.kind is param.VAR_KEYWORD:
            kwargs.update(value)
        elif param.kind is param.KEYWORD_ONLY:
            kwargs[param.name] = value
        else:
            args.append(value)
    return args, kwargs


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
