"""The suite's own machinery: the leak guard of conftest.py and the virtual clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from voice_runtime.testing.clock import ManualClock

pytest_plugins = ["pytester"]

LEAKY_TESTS = """
import asyncio
import threading
import time


async def test_leaves_a_task_running():
    asyncio.get_running_loop().create_task(asyncio.sleep(60), name="forgotten")


def test_leaves_a_thread_running():
    threading.Thread(target=time.sleep, args=(5,), name="forgotten", daemon=True).start()


async def test_leaves_a_thread_running_from_an_async_test():
    threading.Thread(target=time.sleep, args=(5,), name="forgotten", daemon=True).start()


async def test_a_task_that_ends_soon_after_is_not_a_leak():
    asyncio.get_running_loop().create_task(asyncio.sleep(0.02))


def test_a_thread_that_ends_soon_after_is_not_a_leak():
    threading.Thread(target=time.sleep, args=(0.05,), daemon=True).start()


async def test_the_loops_default_executor_is_not_a_leak():
    await asyncio.to_thread(time.sleep, 0)
"""


def test_leak_guard_fails_tests_that_leave_tasks_or_threads(pytester: pytest.Pytester) -> None:
    guard = (Path(__file__).parent / "conftest.py").read_text()
    pytester.makeconftest(guard + "\nLEAK_GRACE_S = 0.3  # the leaks here never end: fail fast\n")
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    pytester.makepyfile(test_leaky=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*ERROR at teardown of test_leaves_a_task_running*",
            "*test leaked 1 task(s): forgotten (sleep)*",
            "*ERROR at teardown of test_leaves_a_thread_running *",
            "*ERROR at teardown of test_leaves_a_thread_running_from_an_async_test*",
            "*test leaked 1 thread(s): forgotten (Thread)*",
        ]
    )


async def test_follow_keeps_real_time_and_skips_ahead_while_asked() -> None:
    clock = ManualClock()
    skipping = True
    follower = asyncio.create_task(clock.follow(skip_while=lambda: skipping))
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        await asyncio.wait_for(clock.sleep_until(1.0), 10)
        fast = loop.time() - t0
        skipping = False
        t1 = loop.time()
        await asyncio.wait_for(clock.sleep_until(1.2), 10)
        slow = loop.time() - t1
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
    assert fast < 0.8  # ten times faster than real time, with room for a loaded machine
    assert slow >= 0.15  # never ahead of real time when not skipping
