"""Ray Serve glue: a deployment class that consumes tasks on its replica's own event loop.

``queue.consumer(...)`` (see ``TaskQueue.consumer``) returns ``consumer_deployment(queue,
config)``: a class decorator, applied under ``@serve.deployment``, that subclasses the user's
class and adds what Serve calls by name:

- ``__init__``: the user's constructor, then the consumer starts on the replica's event loop
  (no thread): every ``@task`` method of the instance is registered automatically;
- ``check_health``: raises when the broker has been unreachable past the grace or the loop
  stalled, so Serve replaces the replica (and recovers on its own within the grace);
- ``record_autoscaling_stats``: running tasks, the queues' depth and oldest message age as
  this replica sees them (``serve_queue._autoscaling`` lists the keys), for ``BacklogPolicy``
  (through Serve's autoscaling context) or any custom policy;
- ``__del__`` (Serve awaits it as an async destructor): stop fetching, let running handlers
  finish within the drain budget (kept inside ``graceful_shutdown_timeout_s``), hand
  everything else back at once. Outside a replica it does nothing: the class stays a plain
  class whose handlers are ordinary methods.

Nothing here imports Ray at module import time; Ray is imported when a replica starts or a
policy is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from serve_queue._autoscaling import Reading, combine, replica_stats, sum_depths
from serve_queue.config import ConsumerConfig
from serve_queue.consumer import Consumer
from serve_queue.errors import ConfigurationError, ServeQueueError
from serve_queue.registry import Registry, task_options
from serve_queue.types import BrokerAdapter, QueueDepth, ResultBackend

__all__ = ["BacklogPolicy", "QueueSource", "consumer_deployment", "replica_consumer"]

log = logging.getLogger("serve_queue.serve")

C = TypeVar("C", bound=type)

#: seconds kept back from Serve's graceful_shutdown_timeout_s to hand work back and close
_SHUTDOWN_MARGIN_S = 2.0
_STATE_ATTR = "_serve_queue_consumer"
_START_ATTR = "_serve_queue_start"
#: what Serve shows as the policy of a ``BacklogPolicy`` (the instance travels pickled)
_POLICY_PATH = "serve_queue.serve:BacklogPolicy"


class QueueSource(Protocol):
    """What the glue needs from a ``TaskQueue``: fresh adapters and result backends."""

    def open_adapter(self) -> BrokerAdapter: ...

    def open_results(self) -> ResultBackend: ...


def consumer_deployment(queue: QueueSource, config: ConsumerConfig) -> Callable[[C], C]:
    """Class decorator turning ``cls`` into a consumer deployment class (see module doc)."""

    def decorate(cls: C) -> C:
        names = _task_names(cls)
        if not names:
            raise ConfigurationError(f"{cls.__qualname__} has no @task methods to consume")
        user_check = getattr(cls, "check_health", None)
        user_del = getattr(cls, "__del__", None)

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            cls.__init__(self, *args, **kwargs)  # type: ignore[misc]
            registry = Registry.from_objects(self)
            consumer = Consumer(
                queue.open_adapter(), registry, backend=queue.open_results(), config=config
            )
            setattr(self, _STATE_ATTR, consumer)
            setattr(self, _START_ATTR, _start_in_replica(consumer))

        async def check_health(self: Any) -> None:
            if user_check is not None:
                outcome = user_check(self)
                if inspect.isawaitable(outcome):
                    await outcome
            _raise_if_unhealthy(self)

        async def record_autoscaling_stats(self: Any) -> dict[str, float]:
            return await replica_stats(replica_consumer(self))

        def __del__(self: Any) -> Coroutine[Any, Any, None] | None:  # noqa: N807
            # Serve awaits the coroutine this returns (an async destructor). Not `async def`:
            # outside a replica (a plain instance in a test, or Python's own finalizer after
            # Serve's call) there is nothing to drain, and no un-awaited coroutine is made.
            starting = vars(self).pop(_START_ATTR, None)
            if starting is not None:
                return _shut_down(self, starting, user_del)
            return None if user_del is None else user_del(self)

        namespace = {
            "__init__": __init__,
            "check_health": check_health,
            "record_autoscaling_stats": record_autoscaling_stats,
            "__del__": __del__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        wrapped = type(cls.__name__, (cls,), namespace)
        return wrapped  # type: ignore[return-value]

    return decorate


def replica_consumer(instance: Any) -> Consumer:
    """The consumer a consumer-deployment instance runs (for tests and advanced hooks)."""
    consumer = getattr(instance, _STATE_ATTR, None)
    if not isinstance(consumer, Consumer):
        raise ConfigurationError(f"{type(instance).__qualname__} is not a consumer deployment")
    return consumer


def _task_names(cls: type) -> list[str]:
    """The task names of ``cls``'s ``@task`` methods; two methods for one name is an error."""
    seen: dict[str, str] = {}
    for attr in dir(cls):
        opts = task_options(inspect.getattr_static(cls, attr, None))
        if opts is None:
            continue
        if opts.name in seen:
            raise ConfigurationError(
                f"{cls.__qualname__}: two handlers for task {opts.name!r}: "
                f"{seen[opts.name]} and {attr}"
            )
        seen[opts.name] = attr
    return sorted(seen)


def _start_in_replica(consumer: Consumer) -> asyncio.Task[None] | None:
    """Start consuming on the running loop when inside a Serve replica; otherwise (the class
    instantiated in a test or a script) leave it to the caller: ``await consumer.start()``."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    if not _in_serve_replica():
        return None
    task = loop.create_task(consumer.start(), name="serve-queue-start")
    task.add_done_callback(_log_start_failure)
    return task


def _raise_if_unhealthy(instance: Any) -> None:
    """Raise (so Serve replaces the replica) when its consumer failed to start or is unfit."""
    starting = getattr(instance, _START_ATTR, None)
    if starting is not None and starting.done():
        failure = "cancelled" if starting.cancelled() else starting.exception()
        if failure is not None:
            raise RuntimeError(f"serve_queue consumer failed to start: {failure!r}")
    health = replica_consumer(instance).health()
    if not health.ok:
        raise RuntimeError(f"serve_queue consumer unhealthy: {health.reason}")


async def _shut_down(
    instance: Any, starting: asyncio.Task[None], user_del: Callable[[Any], Any] | None
) -> None:
    """The replica's destructor: drain the consumer within the budget, then the user's."""
    consumer = replica_consumer(instance)
    if not starting.done():  # still connecting (broker down): there is nothing to drain
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    await consumer.stop(drain_timeout=_drain_budget(consumer.config))
    if user_del is not None:
        outcome = user_del(instance)
        if inspect.isawaitable(outcome):
            await outcome


def _in_serve_replica() -> bool:
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:
        return False
    return True


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("serve_queue consumer failed to start", exc_info=task.exception())


def _drain_budget(config: ConsumerConfig) -> float:
    """The drain budget: the consumer's, kept inside what is left of Serve's graceful shutdown
    timeout when it awaits ``__del__``. Serve kills the replica ``graceful_shutdown_timeout_s``
    after it began stopping it, and first waits at least one ``graceful_shutdown_wait_loop_s``
    for ongoing Serve requests (longer while some are still running, which cannot be seen
    from here); the margin is for handing the rest back and closing."""
    try:
        from ray import serve

        deployment = serve.get_replica_context()._deployment_config
        graceful = float(deployment.graceful_shutdown_timeout_s)
        waited = float(deployment.graceful_shutdown_wait_loop_s)
    except Exception:
        return config.drain_timeout
    return max(0.0, min(config.drain_timeout, graceful - waited - _SHUTDOWN_MARGIN_S))


class BacklogPolicy:
    """A Serve autoscaling policy that sizes a consumer deployment by its queue backlog.

    desired replicas = ceil(backlog / target_per_replica), where, summed over the consumed
    queues (``serve_queue._autoscaling.combine``)::

        backlog   = ready + in_flight
        ready     = the broker's ready count, polled by the policy itself in Serve's controller
                    (so it scales up from zero replicas, when no replica reports)
        in_flight = max(sum over running replicas of their reported serve_queue_running,
                        the broker's reserved count from that poll)

    The replicas' numbers come from Serve's ``AutoscalingContext.aggregated_metrics``: what
    each replica returned from ``record_autoscaling_stats``, aggregated by Serve over
    ``look_back_period_s`` (``aggregation_function``, a mean by default). They are what makes
    RabbitMQ work: its broker count of unacked messages is only visible to the connection
    holding them, so the poll sees 0 in flight there, and a busy deployment with an empty
    ready queue would look idle. On Redis and SQLite the broker's reserved count is
    deployment-wide (prefetched messages, other consumers, leases of stopped replicas until
    they expire) and usually the larger one. Delayed messages (countdown, ETA, delayed
    retries) are not counted until they are due. Replicas push their stats every
    ``metrics_interval_s`` (10 s by default): keep ``downscale_delay_s`` above it, or a replica
    that has just taken work and not yet reported it can be stopped.

    ``oldest_age_s`` (how long the oldest ready message has waited, see ``combine``) is in the
    reading too, for subclasses that scale on latency: override ``decide``. Each call returns
    ``Reading.as_state()`` as the policy state, which Serve keeps and hands back.
    Serve applies its own bounds and up/down-scale delays on top. Build it with
    ``TaskQueue.autoscaling_policy``, which hands Serve ``as_serve_policy()``: the instance
    travels pickled with the queue's settings, and Serve's config shows only a redacted
    summary (never the broker password).
    """

    def __init__(
        self,
        queue: QueueSource,
        queues: Sequence[str],
        *,
        target_per_replica: float,
        poll_interval_s: float = 2.0,
    ) -> None:
        if target_per_replica <= 0:
            raise ConfigurationError("target_per_replica must be positive")
        self.queue = queue
        self.queues = tuple(queues)
        self.target_per_replica = target_per_replica
        self.poll_interval_s = poll_interval_s
        self._broker = QueueDepth()
        self._poll: asyncio.Task[None] | None = None
        self._last_poll = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_broker": QueueDepth(), "_poll": None, "_last_poll": 0.0}

    def as_serve_policy(self) -> Any:
        """This policy as a ``ray.serve.config.AutoscalingPolicy``.

        Serve only takes a function or a class by import path (``policy_kwargs`` must be JSON
        and are shown in its config), so the configured instance is handed over pickled, the
        way Serve ships every policy to its controller; ``policy_kwargs`` carry a redacted
        summary, so Serve's config shows the settings and sees a change of them.
        """
        from ray import cloudpickle
        from ray.serve.config import AutoscalingPolicy

        summary = {
            "broker": str(getattr(self.queue, "broker_url", type(self.queue).__name__)),
            "queues": list(self.queues),
            "target_per_replica": self.target_per_replica,
            "poll_interval_s": self.poll_interval_s,
        }
        return AutoscalingPolicy.from_serialized_policy_def(
            {"policy_function": _POLICY_PATH, "policy_kwargs": summary},
            cloudpickle.dumps(self),  # type: ignore[no-untyped-call]
        )

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = time.monotonic()
        if (
            self._poll is None or self._poll.done()
        ) and now - self._last_poll >= self.poll_interval_s:
            self._last_poll = now
            self._poll = asyncio.get_running_loop().create_task(self._read_broker())
        reading = self.reading(ctx)
        return self.decide(reading), reading.as_state()

    def reading(self, ctx: Any) -> Reading:
        """The latest broker poll combined with what Serve's context holds of the replicas."""
        return combine(self._broker, getattr(ctx, "aggregated_metrics", None))

    def decide(self, reading: Reading) -> int:
        """Replicas wanted for ``reading`` (before Serve's bounds and delays)."""
        return math.ceil(reading.backlog / self.target_per_replica)

    async def _read_broker(self) -> None:
        """One short-lived connection per poll: nothing is left open in Serve's controller
        when the deployment is redeployed or deleted and this policy is dropped."""
        adapter = self.queue.open_adapter()
        try:
            await adapter.connect()
            depths = [await adapter.depth(q) for q in self.queues]
        except ServeQueueError as exc:
            log.warning("autoscaling policy could not read the backlog: %s", exc)
            return
        finally:
            with contextlib.suppress(ServeQueueError):
                await adapter.close()
        self._broker = sum_depths(depths)
