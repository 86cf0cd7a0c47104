"""One wait loop for the test doubles: a predicate re-checked whenever an event says so."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


async def wait_on_change(
    changed: asyncio.Event,
    predicate: Callable[[], bool],
    timeout: float,  # noqa: ASYNC109 - the doubles' wait helpers all take a timeout
    *,
    poll: float = 0.05,
    give_up: Callable[[], bool] | None = None,
) -> bool:
    """Wait until ``predicate()`` holds, re-checking when ``changed`` is set (and every ``poll``).

    Returns the predicate's value at the end: True, or False after ``timeout`` seconds or once
    ``give_up()`` is true.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        remaining = deadline - loop.time()
        if remaining <= 0 or (give_up is not None and give_up()):
            return predicate()
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), min(remaining, poll))
    return True
