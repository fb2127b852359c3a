"""Result metas match what Celery 5.7 stored in the captured fixtures; local backends; the
scheme table. No server needed (the Redis backend is tested in tests/interop)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from serve_queue import results
from serve_queue.config import BrokerURL
from serve_queue.errors import (
    ConfigurationError,
    InvalidArguments,
    MissingDependency,
    Reject,
    ResultBackendError,
    Retry,
    TaskFailed,
    TaskRevoked,
    TaskTimeout,
    UnknownTask,
)
from serve_queue.executor import SoftTimeLimitExceeded, TimeLimitExceeded
from serve_queue.results.batch import Batcher
from serve_queue.types import ResultBackend

FIXTURES = Path(os.environ.get("SERVE_QUEUE_CELERY_FIXTURES", "/work/shared/fixtures/celery_wire"))
RESULTS = FIXTURES / "redis" / "results"


def captured(name: str, *path: str) -> dict[str, Any]:
    """A meta Celery stored, decoded from the raw Redis value (kombu JSON, key order kept)."""
    entry: Any = json.loads((RESULTS / name).read_text())
    for step in path:
        entry = entry[step]
    meta = results.decode_meta(entry["raw_value"])
    assert meta == entry["decoded"]
    return meta


def stored(meta: dict[str, Any]) -> dict[str, Any]:
    """What a backend holds after storing ``meta`` (its kombu JSON, decoded again)."""
    return results.decode_meta(results.encode_meta(meta["task_id"], meta))


def shape(value: Any) -> Any:
    """Keys in order and value types, recursively: what must match Celery's meta."""
    if isinstance(value, dict):
        return [(key, shape(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


def assert_like_celery(
    ours: dict[str, Any], celery: dict[str, Any], *, same: tuple[str, ...]
) -> None:
    ours = stored(ours)
    assert shape(ours) == shape(celery)
    for key in same:
        assert ours[key] == celery[key], key
    if celery["date_done"] is not None:
        done = datetime.fromisoformat(ours["date_done"])
        assert done.utcoffset() is not None and done.utcoffset().total_seconds() == 0
        assert ours["date_done"].endswith("+00:00")
        assert abs((datetime.now(timezone.utc) - done).total_seconds()) < 60


class CustomError(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)


# -- builders against the fixtures -------------------------------------------------------


def test_success_matches_celery() -> None:
    celery = captured("success.json")
    ours = results.success_meta(celery["task_id"], 5)
    assert_like_celery(ours, celery, same=("status", "result", "traceback", "children", "task_id"))


def test_failure_builtin_exception_matches_celery() -> None:
    celery = captured("failure_builtin_exc.json")
    ours = results.failure_meta(
        celery["task_id"], ValueError("boom"), traceback=celery["traceback"]
    )
    assert_like_celery(ours, celery, same=("status", "result", "traceback", "children", "task_id"))


def test_failure_custom_exception_matches_celery() -> None:
    celery = captured("failure_custom_exc.json")
    ours = stored(
        results.failure_meta(celery["task_id"], CustomError(42, "custom detail"), traceback="tb")
    )
    assert_like_celery(ours, celery, same=("status", "children", "task_id"))
    assert ours["result"] == {**celery["result"], "exc_module": __name__}


def test_unknown_task_matches_celery() -> None:
    celery = captured("unknown_task.json")
    ours = results.not_registered_meta(celery["task_id"], "sqapp.does_not_exist")
    assert_like_celery(ours, celery, same=("status", "result", "traceback", "children", "task_id"))
    generic = results.failure_meta(
        celery["task_id"], UnknownTask("sqapp.does_not_exist"), traceback=None
    )
    assert generic["result"] == celery["result"]


def test_rejected_matches_celery() -> None:
    celery = captured("rejected.json")
    ours = results.reject_meta(celery["task_id"], "rejected on purpose")
    assert_like_celery(ours, celery, same=("status", "result", "traceback", "children", "task_id"))
    generic = results.failure_meta(celery["task_id"], Reject("rejected on purpose"), traceback=None)
    assert generic["result"] == celery["result"]


@pytest.mark.parametrize(
    ("fixture", "reason"), [("revoked.json", "revoked"), ("expired.json", "expired")]
)
def test_revoked_and_expired_match_celery(fixture: str, reason: str) -> None:
    celery = captured(fixture)
    ours = results.revoked_meta(celery["task_id"], reason)
    assert_like_celery(ours, celery, same=("status", "result", "traceback", "children", "task_id"))


def test_retry_then_success_match_celery() -> None:
    retry = captured("retry_then_success.json", "retry")
    ours = results.retry_meta(retry["task_id"], KeyError("try-0"), traceback=retry["traceback"])
    same = ("status", "result", "traceback", "children", "date_done", "task_id")
    assert_like_celery(ours, retry, same=same)
    done = captured("retry_then_success.json", "then_success")
    tid = done["task_id"]
    ours = results.success_meta(tid, "done after 2 retries", parent_id=tid)
    same = ("status", "result", "traceback", "children", "parent_id", "task_id")
    assert_like_celery(ours, done, same=same)


def test_retry_with_serve_queue_retry_stores_its_exc_or_nothing() -> None:
    tid = str(uuid.uuid4())
    assert results.retry_meta(tid, Retry(5))["result"] is None
    wrapped = results.retry_meta(tid, Retry(5, exc=KeyError("x")), "tb")
    assert wrapped["result"] == {
        "exc_type": "KeyError",
        "exc_message": ["x"],
        "exc_module": "builtins",
    }
    assert wrapped["date_done"] is None


def test_time_limits_match_celery() -> None:
    hard = captured("time_limits_and_worker_lost.json", "hard_time_limit")
    same = ("status", "result", "traceback", "children", "task_id")
    assert_like_celery(results.time_limit_meta(hard["task_id"], 1.0), hard, same=same)
    generic = results.failure_meta(hard["task_id"], TimeLimitExceeded(1.0), traceback=None)
    assert_like_celery(generic, hard, same=same)
    soft = captured("time_limits_and_worker_lost.json", "soft_time_limit")
    ours = results.soft_time_limit_meta(soft["task_id"], soft["traceback"])
    assert_like_celery(ours, soft, same=same)
    generic = results.failure_meta(
        soft["task_id"], SoftTimeLimitExceeded(), traceback=soft["traceback"]
    )
    assert_like_celery(generic, soft, same=same)


def test_started_matches_celery() -> None:
    celery = captured("started.json", "started")
    ours = results.started_meta(celery["task_id"], hostname="w1@sqhost", pid=21970)
    assert stored(ours) == celery


def test_group_and_parent_ids_come_before_task_id() -> None:
    celery = captured("chord.json", "body")
    ours = results.success_meta(
        celery["task_id"], 6, group_id=celery["group_id"], parent_id=celery["parent_id"]
    )
    same = ("status", "result", "children", "group_id", "parent_id", "task_id")
    assert_like_celery(ours, celery, same=same)


def test_ids_only_when_set() -> None:
    meta = results.failure_meta("t", ValueError(), traceback=None, parent_id=None, group_id="")
    assert "parent_id" not in meta and "group_id" not in meta
    assert list(meta)[-1] == "task_id"


# -- exception encoding ----------------------------------------------------------------


def test_exception_args_are_made_json_safe() -> None:
    odd = object()
    encoded = results.encode_exception(ValueError(1, b"\xff", odd, {"k": [1.5]}))
    assert encoded["exc_message"][:2] == [1, b"\xff"]
    assert encoded["exc_message"][2] == repr(odd)
    assert encoded["exc_message"][3] == {"k": [1.5]}
    round_trip = stored(results.failure_meta("t", ValueError(b"\xff"), traceback=None))
    assert round_trip["result"]["exc_message"] == [b"\xff"]


def test_nested_exception_class_uses_qualname() -> None:
    class Outer:
        class Inner(Exception):
            pass

    encoded = results.encode_exception(Outer.Inner("x"))
    assert encoded["exc_type"].endswith("Outer.Inner")
    assert encoded["exc_module"] == __name__


def test_max_retries_exceeded_as_celery_writes_it() -> None:
    exc = results.max_retries_exceeded("sqapp.flaky", "abc", 3, args=[1, 2], kwargs={"k": 1})
    assert str(exc) == "Can't retry sqapp.flaky[abc] args:(1, 2) kwargs:{'k': 1}"
    assert exc.max_retries == 3
    assert results.encode_exception(exc) == {
        "exc_type": "MaxRetriesExceededError",
        "exc_message": ["Can't retry sqapp.flaky[abc] args:(1, 2) kwargs:{'k': 1}"],
        "exc_module": "celery.exceptions",
    }


def test_invalid_arguments_is_the_type_error_celery_would_store() -> None:
    expected = {
        "exc_type": "TypeError",
        "exc_message": ["add() missing 1 required"],
        "exc_module": "builtins",
    }
    assert results.invalid_arguments_meta("t", "add() missing 1 required")["result"] == expected
    generic = results.failure_meta(
        "t", InvalidArguments("add() missing 1 required"), traceback=None
    )
    assert generic["result"] == expected


def test_unencodable_result_is_stored_as_encode_error_failure() -> None:
    meta = results.success_meta("t", object(), parent_id="p")
    decoded = results.decode_meta(results.encode_meta("t", meta))
    assert decoded["status"] == results.FAILURE
    assert decoded["result"]["exc_type"] == "EncodeError"
    assert decoded["result"]["exc_module"] == "kombu.exceptions"
    assert "not JSON serializable" in decoded["result"]["exc_message"][0]
    assert decoded["parent_id"] == "p" and decoded["task_id"] == "t"
    assert isinstance(decoded["traceback"], str)


# -- decoding --------------------------------------------------------------------------


def test_exception_from_meta_carries_the_remote_exception() -> None:
    celery = captured("failure_custom_exc.json")
    exc = results.exception_from_meta(celery["task_id"], celery)
    assert type(exc) is TaskFailed
    assert (exc.exc_type, exc.exc_module, exc.exc_message) == (
        "CustomError",
        "sqapp",
        [42, "custom detail"],
    )
    assert exc.traceback == celery["traceback"]
    assert exc.task_id == celery["task_id"]
    assert "CustomError(42, custom detail)" in str(exc)


@pytest.mark.parametrize("fixture", ["revoked.json", "expired.json"])
def test_exception_from_meta_revoked(fixture: str) -> None:
    celery = captured(fixture)
    exc = results.exception_from_meta(celery["task_id"], celery)
    assert isinstance(exc, TaskRevoked)
    assert exc.exc_type == "TaskRevokedError" and exc.exc_module == "celery.exceptions"
    assert exc.traceback is None


def test_exception_from_meta_tolerates_odd_results() -> None:
    exc = results.exception_from_meta("t", {"status": "FAILURE", "result": "boom", "traceback": 3})
    assert (exc.exc_type, exc.exc_message, exc.exc_module, exc.traceback) == (
        "Exception",
        ["boom"],
        None,
        None,
    )
    exc = results.exception_from_meta(
        "t", {"status": "FAILURE", "result": {"exc_type": "E", "exc_message": "m"}}
    )
    assert exc.exc_message == ["m"]


def test_states() -> None:
    assert sorted(results.READY_STATES) == ["FAILURE", "REVOKED", "SUCCESS"]
    states = ("PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED")
    assert [results.is_ready(s) for s in states] == [False, False, False, True, True, True]
    assert not results.is_ready(None)


def test_decode_meta_rejects_non_objects() -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        results.decode_meta(b"[1, 2]")


# -- local backends ----------------------------------------------------------------------


async def test_memory_backend_round_trip_and_success_is_final() -> None:
    backend = results.MemoryResultBackend()
    assert isinstance(backend, ResultBackend)
    await backend.connect()
    assert await backend.get("t") is None
    await backend.store("t", results.started_meta("t", hostname="h", pid=1))
    assert (await backend.get("t") or {})["status"] == "STARTED"
    rich = {
        "when": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        "d": date(2026, 1, 2),
        "n": Decimal("1.10"),
        "u": uuid.UUID(int=7),
        "b": b"\x00\xff",
        "t": (1, 2),
    }
    await backend.store("t", results.success_meta("t", rich))
    await backend.store("t", results.failure_meta("t", ValueError("late"), traceback=None))
    meta = await backend.get("t")
    assert meta is not None and meta["status"] == "SUCCESS"
    assert meta["result"] == {**rich, "t": [1, 2]}
    await backend.close()


async def test_memory_backend_wait() -> None:
    backend = results.MemoryResultBackend()
    waiting = asyncio.ensure_future(backend.wait("t", timeout=10))
    await asyncio.sleep(0)
    await backend.store("t", results.retry_meta("t", KeyError("k"), "tb"))
    await asyncio.sleep(0)
    assert not waiting.done()
    await backend.store("t", results.success_meta("t", 3))
    assert (await waiting)["result"] == 3
    assert (await backend.wait("t", timeout=0))["result"] == 3  # already stored
    with pytest.raises(TaskTimeout):
        await backend.wait("other", timeout=0.01)
    assert backend.keys() == ["t"]


async def test_null_backend() -> None:
    backend = results.NullResultBackend()
    assert isinstance(backend, ResultBackend)
    await backend.connect()
    await backend.store("t", results.success_meta("t", 1))
    assert await backend.get("t") is None
    with pytest.raises(ConfigurationError, match="no result backend is configured"):
        await backend.wait("t", timeout=1)
    await backend.close()


# -- the scheme table ------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, "none", "NONE", ""])
def test_open_none(url: str | None) -> None:
    assert isinstance(results.open_result_backend(url), results.NullResultBackend)


def test_open_memory_and_redis() -> None:
    assert isinstance(results.open_result_backend("memory://"), results.MemoryResultBackend)
    backend = results.open_result_backend("redis://:s3cret@127.0.0.1:6390/1", result_ttl=60)
    assert isinstance(backend, results.RedisResultBackend)
    assert backend.result_ttl == 60
    assert "s3cret" not in repr(backend) and "***" in repr(backend)
    parsed = BrokerURL.parse("rediss://127.0.0.1:6390/2")
    backend = results.open_result_backend(parsed, global_keyprefix="app")
    assert isinstance(backend, results.RedisResultBackend)
    assert backend.key("x") == "app_celery-task-meta-x"
    assert (
        results.RedisResultBackend("redis://h", global_keyprefix="app:").key("x")
        == "app:celery-task-meta-x"
    )


def test_open_sqlite(tmp_path: Path) -> None:
    sqlite = pytest.importorskip("serve_queue.adapters.sqlite")
    backend = results.open_result_backend(f"sqlite:///{tmp_path / 'r.db'}")
    assert isinstance(backend, sqlite.SQLiteResultBackend)


def test_open_unknown_and_rpc() -> None:
    with pytest.raises(ConfigurationError, match="unknown result backend scheme 'mongodb'"):
        results.open_result_backend("mongodb://h/")
    with pytest.raises(ConfigurationError, match=r"rpc:// results travel over the AMQP broker"):
        results.open_result_backend("rpc://")


def test_missing_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(MissingDependency, match=r"serve-queue\[redis\]") as info:
        results.open_result_backend("redis://127.0.0.1:6379/0")
    assert info.value.package == "redis"


# -- coalescing --------------------------------------------------------------------------


async def test_batcher_coalesces_one_tick_and_answers_each_caller() -> None:
    sizes: list[int] = []

    async def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        await asyncio.sleep(0)
        return [item * 10 for item in items]

    batcher: Batcher[int, int] = Batcher(run, max_batch=40, max_inflight=2)
    answers = await asyncio.gather(*(batcher.submit(i) for i in range(100)))
    assert answers == [i * 10 for i in range(100)]
    assert sizes == [40, 40, 20]  # one tick's worth, cut at max_batch
    await batcher.drain()


async def test_batcher_gives_every_caller_the_error() -> None:
    cause = OSError("connection reset")

    async def run(items: list[int]) -> list[int]:
        raise ResultBackendError("cannot store") from cause

    batcher: Batcher[int, int] = Batcher(run)
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(exc, ResultBackendError) for exc in outcomes)
    assert len({id(exc) for exc in outcomes}) == 3  # one exception object per caller
    assert all(exc.__cause__ is cause for exc in outcomes if isinstance(exc, BaseException))
