"""Byte-bounded audio queues and the per-call counters of a session."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SessionStats"]


class _AudioQueue(asyncio.Queue):  # type: ignore[type-arg]
    """An asyncio.Queue of audio chunks bounded in bytes as well as in items.

    ``nbytes`` is the audio it holds; ``None`` (the end sentinel) weighs nothing. ``full()``
    is also true at ``max_bytes`` (0: no byte bound), so ``await put()`` waits for room and
    ``put_nowait()`` raises QueueFull; either may overshoot by one chunk. The session's own
    producers check :meth:`fits` first, so through them the bound is exact.
    """

    def __init__(self, maxsize: int = 0, max_bytes: int = 0) -> None:
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.nbytes = 0

    # _put/_get/full replace asyncio.Queue's (not extend them): they run for every frame.
    def _put(self, item: Any) -> None:
        self._queue.append(item)  # type: ignore[attr-defined]
        if item is not None:
            self.nbytes += len(item)

    def _get(self) -> Any:
        item = self._queue.popleft()  # type: ignore[attr-defined]
        if item is not None:
            self.nbytes -= len(item)
        return item

    def full(self) -> bool:
        """True when no item may be added: the item or the byte bound is reached."""
        if 0 < self.max_bytes <= self.nbytes:
            return True
        return 0 < self._maxsize <= len(self._queue)  # type: ignore[attr-defined]

    def fits(self, size: int) -> bool:
        """True when one more chunk of ``size`` bytes stays within both bounds."""
        if self.max_bytes and self.nbytes + size > self.max_bytes:
            return False
        return not 0 < self._maxsize <= len(self._queue)  # type: ignore[attr-defined]


class _CountingQueue(_AudioQueue):
    """An :class:`_AudioQueue` that counts items put and taken and wakes a listener on put."""

    def __init__(self, maxsize: int = 0, max_bytes: int = 0) -> None:
        super().__init__(maxsize, max_bytes)
        self.put_count = 0
        self.taken_count = 0
        self.on_put: Callable[[Any], None] | None = None

    def _put(self, item: Any) -> None:
        self._queue.append(item)  # type: ignore[attr-defined]
        self.nbytes += len(item)
        self.put_count += 1
        if self.on_put is not None:
            self.on_put(item)

    def _get(self) -> Any:
        item = self._queue.popleft()  # type: ignore[attr-defined]
        self.nbytes -= len(item)
        self.taken_count += 1
        return item


@dataclass
class SessionStats:
    """Counters of one call; drops are never silent."""

    inbound_frames: int = 0
    inbound_dropped: int = 0
    outbound_chunks: int = 0
    outbound_dropped: int = 0
    outbound_cleared: int = 0
    audio_sent_bytes: int = 0
    marks_sent: int = 0
    marks_echoed: int = 0
    unknown_marks: int = 0
    clears_sent: int = 0
    clears_skipped: int = 0  # barge-in clears not made: uninterruptible audio was playing
    dtmf_digits: int = 0
    dtmf_dropped: int = 0
    bad_frames: dict[str, int] = field(default_factory=dict)
    inbound_dropped_bytes: int = 0
    outbound_dropped_bytes: int = 0

    def count_bad(self, reason: str) -> int:
        """Count one malformed or unusable inbound message; return the new count."""
        n = self.bad_frames.get(reason, 0) + 1
        self.bad_frames[reason] = n
        return n
