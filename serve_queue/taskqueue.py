"""``TaskQueue``: the one object users configure, and the factory for everything else.

A ``TaskQueue`` is only settings (broker URL, result URL, defaults). It is cheap, picklable and
safe to define at module level and to ship into Ray Serve replicas: connections are opened
lazily, per process and per event loop, on first use.

    queue = TaskQueue("redis://127.0.0.1:6379/0", results="redis://127.0.0.1:6379/1")
    result = await queue.send_task("tasks.add", args=[2, 3])
    await result.get(timeout=10)

    worker = queue.worker(Handlers(), queues=["celery"], concurrency=200, threads=8)
    async with worker:
        ...
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from serve_queue import results as results_mod
from serve_queue.adapters import check_scheme, open_adapter
from serve_queue.config import BrokerURL, ConsumerConfig, RetryPolicy
from serve_queue.consumer import Consumer
from serve_queue.errors import ConfigurationError
from serve_queue.producer import AsyncResult, Producer
from serve_queue.registry import Registry
from serve_queue.serve import BacklogPolicy, consumer_deployment
from serve_queue.types import QueueDepth, ResultBackend

__all__ = ["TaskQueue"]

C = TypeVar("C", bound=type)


def _default_broker() -> str:
    from serve_queue.adapters.sqlite import default_url

    return default_url()


class TaskQueue:
    """Where tasks go and where their results are kept.

    ``broker``: a URL (``redis://``, ``amqp://``, ``sqlite:///path``, ``memory://``); none
    means the embedded SQLite broker (one machine, no server).
    ``results``: a result-backend URL; none means the broker's own database for the embedded
    broker and no result storage otherwise (as in Celery); ``"none"`` disables it explicitly.
    A scheme nothing here serves (``sqs://`` has no adapter yet), or whose client library is
    not installed, raises ``ConfigurationError`` / ``MissingDependency`` here, not at first use.
    ``broker_options`` go to the adapter (e.g. ``visibility_timeout``), ``result_options`` to
    the result backend (e.g. ``result_ttl``).
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        results: str | None = None,
        default_queue: str = "celery",
        serializer: str = "json",
        broker_options: Mapping[str, Any] | None = None,
        result_options: Mapping[str, Any] | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.broker_url = BrokerURL.parse(broker or _default_broker())
        if results is None and self.broker_url.scheme == "sqlite":
            results = self.broker_url.render(reveal=True)
        self.results_url = None if results in (None, "none") else BrokerURL.parse(results)
        check_scheme(self.broker_url.scheme)
        if self.results_url is not None:
            self._check_results(self.results_url.scheme)
        self.default_queue = default_queue
        self.serializer = serializer
        self.broker_options = dict(broker_options or {})
        self.result_options = dict(result_options or {})
        self.retry_policy = retry_policy or RetryPolicy()
        self._producers: dict[int, tuple[asyncio.AbstractEventLoop, Producer]] = {}
        self._shared_results: ResultBackend | None = None
        if self.broker_url.scheme == "memory" and "broker" not in self.broker_options:
            # in-process: producers and workers of this queue must see the same broker
            from serve_queue.adapters.memory import MemoryBroker

            self.broker_options["broker"] = MemoryBroker(self.broker_url.host or "memory")
        if self.results_url is not None and self.results_url.scheme == "memory":
            self._shared_results = results_mod.MemoryResultBackend()

    def __repr__(self) -> str:
        return f"TaskQueue(broker={self.broker_url}, results={self.results_url})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_producers"] = {}  # connections belong to one process and one loop
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # -- building blocks ---------------------------------------------------------------

    def open_adapter(self) -> Any:
        """A new, unconnected broker adapter for this queue's broker."""
        return open_adapter(self.broker_url, **self.broker_options)

    def open_results(self) -> ResultBackend:
        """A new, unconnected result backend (a null one when results are off)."""
        if self._shared_results is not None:
            return self._shared_results
        if self.results_url is not None and self.results_url.scheme == "rpc":
            return self._rpc_results()
        return results_mod.open_result_backend(self.results_url, **self.result_options)

    def _check_results(self, scheme: str) -> None:
        if scheme == "rpc":
            if self.broker_url.scheme not in ("amqp", "amqps", "pyamqp"):
                raise ConfigurationError(
                    f"rpc:// results need an AMQP broker, not {self.broker_url}"
                )
            return
        results_mod.check_result_scheme(scheme)

    def _rpc_results(self) -> ResultBackend:
        """Celery's ``rpc://`` backend: results travel as AMQP messages over the broker's own
        connection settings to the caller's reply queue (``rpc://`` names no server)."""
        self._check_results("rpc")
        from serve_queue.adapters.rabbitmq import RPCResultBackend

        return RPCResultBackend(self.broker_url, **self.result_options)

    def producer(self) -> Producer:
        """This event loop's producer, created on first use."""
        loop = asyncio.get_running_loop()
        entry = self._producers.get(id(loop))
        if entry is None or entry[0] is not loop:
            producer = Producer(
                self.open_adapter(),
                self.open_results(),
                default_queue=self.default_queue,
                serializer=self.serializer,
                retry_policy=self.retry_policy,
            )
            self._producers = {k: v for k, v in self._producers.items() if not v[0].is_closed()}
            self._producers[id(loop)] = (loop, producer)
            return producer
        return entry[1]

    # -- producing ---------------------------------------------------------------------

    async def send_task(
        self,
        name: str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Enqueue task ``name``; see ``Producer.send_task`` for the options."""
        return await self.producer().send_task(name, args, kwargs, **options)

    def result(self, task_id: str) -> AsyncResult:
        """A handle on the task ``task_id`` (sent by anyone), to read its state and result."""
        return self.producer().result(task_id)

    async def depth(self, queue: str | None = None) -> QueueDepth:
        """Ready + reserved + delayed counts of ``queue`` (default: the default queue)."""
        producer = self.producer()
        await producer.connect()
        return await producer.adapter.depth(queue or self.default_queue)

    async def close(self) -> None:
        """Close this event loop's producer connections (a later use reopens them)."""
        loop = asyncio.get_running_loop()
        entry = self._producers.pop(id(loop), None)
        if entry is not None:
            await entry[1].close()

    # -- consuming ---------------------------------------------------------------------

    def worker(
        self,
        *handlers: Any,
        queues: Sequence[str] | None = None,
        **config: Any,
    ) -> Consumer:
        """A consumer running the ``@task`` handlers found in ``handlers`` (instances,
        modules, functions). ``config`` takes ``ConsumerConfig`` fields: ``concurrency``,
        ``threads``, ``prefetch``, ``acks``, ``accept_content``, ``drain_timeout``, ..."""
        registry = Registry.from_objects(*handlers)
        return Consumer(
            self.open_adapter(),
            registry,
            backend=self.open_results(),
            config=self.consumer_config(queues, **config),
        )

    def consumer_config(self, queues: Sequence[str] | None = None, **config: Any) -> ConsumerConfig:
        try:
            return ConsumerConfig(queues=tuple(queues or (self.default_queue,)), **config)
        except ValueError as exc:
            raise ConfigurationError(f"bad consumer settings: {exc}") from None

    def consumer(self, *, queues: Sequence[str] | None = None, **config: Any) -> Callable[[C], C]:
        """Class decorator: make a Ray Serve deployment class a consumer of this queue.

        Apply it under ``@serve.deployment``. The replica starts consuming when it starts,
        registers every ``@task`` method, reports health and backlog to Serve, and drains on
        shutdown. See ``serve_queue.serve``.
        """
        settings = self.consumer_config(queues, **config)
        return consumer_deployment(self, settings)

    def autoscaling_policy(
        self,
        *,
        target_per_replica: float = 10.0,
        queues: Sequence[str] | None = None,
        poll_interval_s: float = 2.0,
    ) -> Any:
        """A ``ray.serve.config.AutoscalingPolicy`` that scales a consumer deployment of this
        queue on its backlog (ready + reserved messages): ``ceil(backlog / target_per_replica)``
        replicas, within the deployment's ``min_replicas``/``max_replicas`` (0 allowed) and
        Serve's up/down-scale delays. Pass it as ``AutoscalingConfig(policy=...)`` (or as
        ``"policy"`` in a deployment's ``autoscaling_config`` dict)."""
        policy = BacklogPolicy(
            self,
            tuple(queues or (self.default_queue,)),
            target_per_replica=target_per_replica,
            poll_interval_s=poll_interval_s,
        )
        return policy.as_serve_policy()
