"""Our Redis result backend against a real redis-server and a real Celery 5.7 client.

What we store, Celery's ``AsyncResult`` reads (value, exception type, state, woken by the
PUBLISH); what Celery stores, we read; SUCCESS is final; the TTL is Celery's; all our waits
share one pub/sub connection.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any, TypeVar

import pytest
import redis
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Celery
from celery.exceptions import MaxRetriesExceededError, NotRegistered, Reject, TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult

from serve_queue import results
from serve_queue.errors import ResultBackendError, TaskTimeout
from tests.servers import free_port

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

T = TypeVar("T")

#: Celery's Redis backend writes with SETEX, which redis-py 8 flags as deprecated
celery_writes = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


class CustomError(Exception):
    """Defined in a module the reading process has loaded: comes back as this very class."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)


class CeleryClient:
    """A Celery 5.7 app used only as a result client, its blocking calls on one thread of
    its own (Celery keeps its backend per thread)."""

    def __init__(self, url: str, **conf: Any) -> None:
        self.app = Celery("interop-results", set_as_current=False)
        self.app.conf.update(result_backend=url, **conf)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celery-client")

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, functools.partial(func, *args, **kwargs))

    async def get(self, task_id: str, timeout: float = 5.0) -> Any:
        return await self.call(self._get, task_id, timeout)

    def _get(self, task_id: str, timeout: float) -> Any:
        return AsyncResult(task_id, app=self.app).get(timeout=timeout)

    async def state(self, task_id: str) -> tuple[str, Any, str | None]:
        """``(state, result, traceback)`` as ``AsyncResult`` reports them."""
        return await self.call(self._state, task_id)

    def _state(self, task_id: str) -> tuple[str, Any, str | None]:
        result = AsyncResult(task_id, app=self.app)
        return result.state, result.result, result.traceback

    async def close(self) -> None:
        await self.call(self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        backend = self.app.backend
        backend.result_consumer.stop()
        backend.client.connection_pool.disconnect()
        self.app.close()


@pytest.fixture
async def backend(redis_url: str) -> AsyncIterator[results.RedisResultBackend]:
    ours = results.RedisResultBackend(redis_url)
    await ours.connect()
    yield ours
    await ours.close()


@pytest.fixture
async def celery(redis_url: str) -> AsyncIterator[CeleryClient]:
    client = CeleryClient(redis_url)
    yield client
    await client.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def new_id() -> str:
    return str(uuid.uuid4())


# -- Celery reads what we store ------------------------------------------------------------


async def test_success_read_by_celery(
    backend: results.RedisResultBackend, celery: CeleryClient, raw: redis.Redis
) -> None:
    tid = new_id()
    await backend.store(tid, results.success_meta(tid, {"sum": 5, "items": [1, "a"]}))
    assert await celery.get(tid) == {"sum": 5, "items": [1, "a"]}
    assert (await celery.state(tid))[0] == "SUCCESS"
    value = raw.get(f"celery-task-meta-{tid}")
    assert value is not None and value.startswith(b'{"status": "SUCCESS", "result": ')
    assert 86_390_000 < raw.pttl(f"celery-task-meta-{tid}") <= 86_400_000


async def test_builtin_failure_raises_the_same_type_in_celery(
    backend: results.RedisResultBackend, celery: CeleryClient
) -> None:
    tid = new_id()
    tb = "Traceback (most recent call last):\nValueError: boom\n"
    await backend.store(tid, results.failure_meta(tid, ValueError("boom"), traceback=tb))
    with pytest.raises(ValueError, match=r"^boom$") as info:
        await celery.get(tid)
    assert type(info.value) is ValueError and info.value.args == ("boom",)
    state, result, traceback = await celery.state(tid)
    assert (state, type(result), traceback) == ("FAILURE", ValueError, tb)


async def test_custom_failures_in_celery(
    backend: results.RedisResultBackend, celery: CeleryClient
) -> None:
    loaded, unloaded = new_id(), new_id()
    await backend.store(loaded, results.failure_meta(loaded, CustomError(42, "x"), traceback=None))
    with pytest.raises(CustomError) as info:
        await celery.get(loaded)
    assert info.value.args == (42, "x")
    # a class from a module the reading process never imported: Celery makes up a class
    module = "sqapp_never_imported"
    assert module not in sys.modules
    foreign = types.new_class("ForeignError", (Exception,))
    foreign.__module__ = module
    await backend.store(unloaded, results.failure_meta(unloaded, foreign(7, "y"), traceback=None))
    with pytest.raises(Exception) as caught:
        await celery.get(unloaded)
    assert type(caught.value).__name__ == "ForeignError"
    assert caught.value.args == (7, "y")


@pytest.mark.parametrize("reason", ["revoked", "expired"])
async def test_revoked_in_celery(
    backend: results.RedisResultBackend, celery: CeleryClient, reason: str
) -> None:
    tid = new_id()
    await backend.store(tid, results.revoked_meta(tid, reason))
    with pytest.raises(TaskRevokedError, match=reason):
        await celery.get(tid)
    assert (await celery.state(tid))[0] == "REVOKED"


OUR_FAILURES: list[tuple[Callable[[str], dict[str, Any]], type[BaseException], tuple[Any, ...]]]
OUR_FAILURES = [
    (lambda t: results.not_registered_meta(t, "app.nope"), NotRegistered, ("app.nope",)),
    (lambda t: results.reject_meta(t, "bad input"), Reject, ("bad input", False)),
    (lambda t: results.time_limit_meta(t, 2.0), TimeLimitExceeded, (2,)),
    (lambda t: results.soft_time_limit_meta(t, "tb"), SoftTimeLimitExceeded, ()),
    (lambda t: results.invalid_arguments_meta(t, "add() takes 2"), TypeError, ("add() takes 2",)),
    (
        lambda t: results.failure_meta(t, results.max_retries_exceeded("a.b", t), traceback=None),
        MaxRetriesExceededError,
        None,
    ),
]


@pytest.mark.parametrize(("build", "raised", "args"), OUR_FAILURES)
async def test_our_failure_kinds_raise_celerys_exceptions(
    backend: results.RedisResultBackend,
    celery: CeleryClient,
    build: Callable[[str], dict[str, Any]],
    raised: type[BaseException],
    args: tuple[Any, ...] | None,
) -> None:
    tid = new_id()
    await backend.store(tid, build(tid))
    with pytest.raises(raised) as info:
        await celery.get(tid)
    assert type(info.value) is raised
    if args is not None:
        assert info.value.args == args
    assert (await celery.state(tid))[0] == "FAILURE"


async def test_retry_state_then_success(
    backend: results.RedisResultBackend, celery: CeleryClient
) -> None:
    tid = new_id()
    await backend.store(tid, results.retry_meta(tid, KeyError("try-0"), traceback="tb"))
    state, result, traceback = await celery.state(tid)
    assert (state, type(result), result.args, traceback) == ("RETRY", KeyError, ("try-0",), "tb")
    await backend.store(tid, results.success_meta(tid, "done", parent_id=tid))
    assert await celery.get(tid) == "done"


async def test_celery_get_waiting_before_the_store_is_woken_by_the_publish(
    backend: results.RedisResultBackend, celery: CeleryClient, raw: redis.Redis
) -> None:
    # control: once Celery's get() has subscribed and read the key, a value written without
    # PUBLISH does not wake it
    unpublished = new_id()
    waiting = asyncio.ensure_future(celery.get(unpublished, timeout=1.0))
    await celery_is_listening(raw, unpublished)
    raw.set(
        f"celery-task-meta-{unpublished}",
        results.encode_meta(unpublished, results.success_meta(unpublished, 1)),
    )
    with pytest.raises(CeleryTimeout):
        await waiting
    # ours publishes: the waiting client returns the value
    tid = new_id()
    waiting = asyncio.ensure_future(celery.get(tid, timeout=10.0))
    await celery_is_listening(raw, tid)
    await backend.store(tid, results.success_meta(tid, "woken"))
    assert await waiting == "woken"


async def celery_is_listening(raw: redis.Redis, task_id: str) -> None:
    """Until Celery's get() for ``task_id`` has subscribed and done its one GET of the key."""
    raw.config_resetstat()
    await until(lambda: subscribed(raw, task_id) == 1 and command_calls(raw, "get") >= 1)


async def test_success_is_never_overwritten(
    backend: results.RedisResultBackend, celery: CeleryClient, raw: redis.Redis
) -> None:
    tid, marker = new_id(), new_id()
    key = f"celery-task-meta-{tid}"
    pubsub = raw.pubsub()
    pubsub.subscribe(key, f"celery-task-meta-{marker}")
    await backend.store(tid, results.success_meta(tid, 1))
    await backend.store(tid, results.failure_meta(tid, ValueError("late"), traceback=None))
    await backend.store(tid, results.started_meta(tid, hostname="h", pid=1))
    await backend.store(marker, results.success_meta(marker, 0))
    published = []
    while True:
        message = pubsub.get_message(timeout=5)
        assert message is not None
        if message["type"] != "message":
            continue
        if message["channel"] == f"celery-task-meta-{marker}".encode():
            break
        published.append(results.decode_meta(message["data"])["status"])
    pubsub.close()
    assert published == ["SUCCESS"]  # the refused writes were not published either
    assert await celery.get(tid) == 1
    assert (await backend.get(tid) or {})["status"] == "SUCCESS"


@celery_writes
async def test_a_success_written_by_celery_is_final_for_us_too(
    backend: results.RedisResultBackend, celery: CeleryClient
) -> None:
    tid = new_id()
    await celery.call(lambda: celery.app.backend.store_result(tid, 8, "SUCCESS"))
    await backend.store(tid, results.failure_meta(tid, ValueError("late"), traceback=None))
    assert await celery.get(tid) == 8


async def test_ttl_none_and_global_keyprefix(redis_url: str, raw: redis.Redis) -> None:
    forever = results.RedisResultBackend(redis_url, result_ttl=None, global_keyprefix="app")
    await forever.connect()
    client = CeleryClient(redis_url, result_backend_transport_options={"global_keyprefix": "app"})
    try:
        tid = new_id()
        await forever.store(tid, results.success_meta(tid, "prefixed"))
        assert raw.pttl(f"app_celery-task-meta-{tid}") == -1
        assert await client.get(tid) == "prefixed"
    finally:
        await client.close()
        await forever.close()


RICH = {
    "when": datetime(2026, 11, 23, 19, 8, 16, 547887, tzinfo=timezone.utc),
    "day": date(2026, 11, 23),
    "amount": Decimal("12.30"),
    "id": uuid.UUID("083f369f-b86e-481e-a3c6-7137c86700eb"),
    "blob": b"\x00\xffbytes",
}


@celery_writes
async def test_rich_types_round_trip_both_ways(
    backend: results.RedisResultBackend, celery: CeleryClient
) -> None:
    ours, theirs = new_id(), new_id()
    await backend.store(ours, results.success_meta(ours, RICH))
    assert await celery.get(ours) == RICH
    await celery.call(lambda: celery.app.backend.store_result(theirs, RICH, "SUCCESS"))
    meta = await backend.wait(theirs, timeout=5)
    assert meta["result"] == RICH
    assert meta["task_id"] == theirs


@celery_writes
async def test_celery_failure_decoded_by_us(
    backend: results.RedisResultBackend, celery: CeleryClient
) -> None:
    tid = new_id()
    exc = CustomError(3, "three")
    await celery.call(lambda: celery.app.backend.mark_as_failure(tid, exc, traceback="tb"))
    meta = await backend.get(tid)
    assert meta is not None
    failed = results.exception_from_meta(tid, meta)
    assert (failed.exc_type, failed.exc_module) == ("CustomError", __name__)
    assert (failed.exc_message, failed.traceback) == ([3, "three"], "tb")


# -- our wait() ------------------------------------------------------------------------


async def test_wait_returns_when_another_connection_stores(
    backend: results.RedisResultBackend, redis_url: str
) -> None:
    other = results.RedisResultBackend(redis_url)
    await other.connect()
    try:
        tid = new_id()
        waiting = asyncio.ensure_future(backend.wait(tid, timeout=10))
        await other.store(tid, results.started_meta(tid, hostname="h", pid=1))
        await other.store(tid, results.success_meta(tid, 42))
        meta = await waiting
        assert (meta["status"], meta["result"]) == ("SUCCESS", 42)
        assert (await backend.wait(tid, timeout=0.5))["result"] == 42  # already stored
    finally:
        await other.close()


async def test_wait_timeout_and_get_unknown(backend: results.RedisResultBackend) -> None:
    tid = new_id()
    assert await backend.get(tid) is None
    await backend.store(tid, results.started_meta(tid, hostname="h", pid=1))
    with pytest.raises(TaskTimeout):
        await backend.wait(tid, timeout=0.2)


async def test_concurrent_waits_share_one_pubsub_connection(
    backend: results.RedisResultBackend, redis_url: str, raw: redis.Redis
) -> None:
    ids = [new_id() for _ in range(500)]
    already = {client["id"] for client in pubsub_clients(raw)}
    waits = [asyncio.ensure_future(backend.wait(tid, timeout=30)) for tid in ids]
    await until(lambda: subscribed(raw, *ids) == 500)
    ours = [client for client in pubsub_clients(raw) if client["id"] not in already]
    assert [int(client["sub"]) for client in ours] == [500]  # one connection, 500 channels
    other = results.RedisResultBackend(redis_url)
    await other.connect()
    try:
        await asyncio.gather(*(other.store(t, results.success_meta(t, t)) for t in ids))
    finally:
        await other.close()
    metas = await asyncio.gather(*waits)
    assert [meta["result"] for meta in metas] == ids
    await until(lambda: subscribed(raw, *ids) == 0)
    # the shared connection keeps serving new waits after all channels were dropped
    again = new_id()
    waiting = asyncio.ensure_future(backend.wait(again, timeout=10))
    await until(lambda: subscribed(raw, again) == 1)
    await backend.store(again, results.success_meta(again, "again"))
    assert (await waiting)["result"] == "again"


async def test_many_stores_are_coalesced(
    backend: results.RedisResultBackend, raw: redis.Redis
) -> None:
    raw.config_resetstat()
    ids = [new_id() for _ in range(5000)]
    await asyncio.gather(*(backend.store(t, results.success_meta(t, i)) for i, t in enumerate(ids)))
    calls = command_calls(raw, "evalsha")
    assert 0 < calls <= 5000 // 50
    stored = raw.mget([f"celery-task-meta-{t}" for t in ids])
    assert [results.decode_meta(v)["result"] for v in stored if v] == list(range(5000))


async def test_waits_and_stores_survive_a_server_restart(
    backend: results.RedisResultBackend, redis_server: Any, redis_url: str, raw: redis.Redis
) -> None:
    missed, later = new_id(), new_id()
    waits = [asyncio.ensure_future(backend.wait(t, timeout=30)) for t in (missed, later)]
    await until(lambda: subscribed(raw, missed, later) == 2)
    redis_server.restart()  # drops every connection, and all data
    # stored (and never published to us) before the loop runs again, so before our pub/sub
    # connection is back: only the re-read after resubscribing can find it
    with redis.Redis.from_url(redis_url) as fresh:
        fresh.set(
            f"celery-task-meta-{missed}",
            results.encode_meta(missed, results.success_meta(missed, "missed")),
        )
    await backend.store(later, results.success_meta(later, "after restart"))
    metas = await asyncio.gather(*waits)
    assert [meta["result"] for meta in metas] == ["missed", "after restart"]


# -- errors ------------------------------------------------------------------------------


async def test_waits_fail_when_the_server_stays_down_and_work_again_after(
    backend: results.RedisResultBackend, redis_server: Any, raw: redis.Redis
) -> None:
    tid = new_id()
    waiting = asyncio.ensure_future(backend.wait(tid, timeout=30))
    await until(lambda: subscribed(raw, tid) == 1)
    redis_server.stop()
    try:
        with pytest.raises(ResultBackendError, match="pub/sub connection"):
            await waiting
        with pytest.raises(ResultBackendError):
            await backend.store(tid, results.success_meta(tid, 1))
    finally:
        redis_server.start()
    waiting = asyncio.ensure_future(backend.wait(tid, timeout=10))
    await backend.store(tid, results.success_meta(tid, "back"))
    assert (await waiting)["result"] == "back"


async def test_unreachable_server_is_a_result_backend_error_without_the_password() -> None:
    backend = results.RedisResultBackend(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(ResultBackendError) as info:
        await backend.connect()
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert info.value.__cause__ is not None
    with pytest.raises(ResultBackendError, match="not connected"):
        await backend.store("t", results.success_meta("t", 1))


# -- helpers -----------------------------------------------------------------------------


def command_calls(raw: redis.Redis, command: str) -> int:
    stats = raw.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def pubsub_clients(raw: redis.Redis) -> list[dict[str, Any]]:
    return [client for client in raw.client_list() if int(client.get("sub", 0)) > 0]


def subscribed(raw: redis.Redis, *task_ids: str) -> int:
    """How many subscriptions the task channels have, all together."""
    counts = raw.pubsub_numsub(*(f"celery-task-meta-{tid}" for tid in task_ids))
    return sum(int(count) for _, count in counts)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a server-side condition (there is no event to await for it) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)
