"""The executor: async on the loop, sync on a bounded pool that never blocks the loop,
contextvars carried into threads, soft and hard time limits."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from serve_queue.executor import Executor, SoftTimeLimitExceeded, TimeLimitExceeded

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_async_handlers_run_on_the_loop_thread() -> None:
    executor = Executor(threads=2)

    async def where() -> int:
        return threading.get_ident()

    assert await executor.run(where, True, [], {}) == threading.get_ident()
    executor.shutdown()


async def test_sync_handlers_run_on_the_pool_with_the_callers_contextvars() -> None:
    executor = Executor(threads=2)

    def where() -> tuple[int, str]:
        return threading.get_ident(), request_id.get()

    request_id.set("r-42")
    ident, seen = await executor.run(where, False, [], {})
    assert ident != threading.get_ident()
    assert seen == "r-42"
    executor.shutdown()


async def test_blocking_handlers_never_block_the_loop_and_the_pool_is_bounded() -> None:
    executor = Executor(threads=2)
    active = 0
    peak = 0
    lock = threading.Lock()

    def block() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.2)
        with lock:
            active -= 1

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    await asyncio.gather(*(executor.run(block, False, [], {}) for _ in range(6)))
    tick_task.cancel()
    assert peak == 2  # bounded by threads
    assert ticks >= 20  # 6 x 0.2 s / 2 threads = 0.6 s during which the loop kept ticking
    executor.shutdown()


async def test_soft_limit_cancels_an_async_handler() -> None:
    executor = Executor(threads=1)

    async def slow() -> None:
        await asyncio.sleep(10)

    with pytest.raises(SoftTimeLimitExceeded):
        await executor.run(slow, True, [], {}, soft_time_limit=0.05)
    executor.shutdown()


async def test_soft_limit_can_be_handled_by_the_handler() -> None:
    executor = Executor(threads=1)

    async def careful() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "cleaned up"
        return "finished"

    assert (
        await executor.run(careful, True, [], {}, soft_time_limit=0.05, time_limit=1)
        == "cleaned up"
    )
    executor.shutdown()


async def test_hard_limit_abandons_async_and_sync_handlers() -> None:
    executor = Executor(threads=1)

    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # ignores the soft limit and overruns the hard one
        return "late"

    with pytest.raises(TimeLimitExceeded) as info:
        await executor.run(stubborn, True, [], {}, soft_time_limit=0.05, time_limit=0.1)
    assert info.value.limit == 0.1

    with pytest.raises(TimeLimitExceeded):
        await executor.run(time.sleep, False, [0.5], {}, time_limit=0.05)
    executor.shutdown()


async def test_results_and_exceptions_pass_through() -> None:
    executor = Executor(threads=1)

    async def boom() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        await executor.run(boom, True, [], {})
    assert await executor.run(pow, False, [2, 10], {}, time_limit=5) == 1024
    executor.shutdown()


async def test_sync_time_limits_do_not_count_the_wait_for_a_thread() -> None:
    """A saturated pool queues calls; their limits start when a thread begins each one."""
    executor = Executor(threads=1)
    first_running = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def hold() -> str:
        first_running.set()
        release.wait(10)  # holds the only thread until the test lets go
        ran.append("hold")
        return "held"

    def quick() -> str:
        ran.append("quick")
        return "quick"

    first = asyncio.create_task(executor.run(hold, False, [], {}))
    await asyncio.to_thread(first_running.wait, 10)
    # queued behind ``hold`` for far longer than its own limits allow
    second = asyncio.create_task(
        executor.run(quick, False, [], {}, soft_time_limit=0.05, time_limit=0.1)
    )
    done, _ = await asyncio.wait({second}, timeout=0.5)
    assert not done  # still waiting for the thread: not timed out
    release.set()
    assert await first == "held"
    assert await second == "quick"
    assert ran == ["hold", "quick"]
    executor.shutdown()


async def test_a_queued_sync_call_cancelled_before_it_starts_never_runs() -> None:
    executor = Executor(threads=1)
    release = threading.Event()
    ran: list[str] = []
    first = asyncio.create_task(executor.run(release.wait, False, [10], {}))
    queued = asyncio.create_task(executor.run(ran.append, False, ["queued"], {}, time_limit=5))
    await asyncio.sleep(0)  # both calls are submitted: the second waits for the thread
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    release.set()
    assert await first is True
    await executor.run(ran.append, False, ["after"], {}, time_limit=5)
    assert ran == ["after"]
    executor.shutdown()
