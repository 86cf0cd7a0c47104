"""Shared STT behaviour: echo discard, reconnect backoff and buffer, the reconnecting skeleton."""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from voice_runtime.events import ERROR, PROVIDER_CONNECT, TRANSCRIPT_COMMITTED, emit_from
from voice_runtime.logutil import clip

# The name these logs had before the STT half moved out of providers/base.py.
logger = logging.getLogger("voice_runtime.providers.base")

ECHO_TAIL_S = 0.4
HEALTHY_AFTER_S = 5.0  # an STT connection that lived this long counts as a working one

#: Why one STT connection ended: the caller's side is done (``stopped``, ``end_of_input``),
#: no reconnect can help (``terminal``), or a new connection may work (``fatal``).
EndKind = Literal["stopped", "end_of_input", "terminal", "fatal"]

__all__ = [
    "ECHO_TAIL_S",
    "HEALTHY_AFTER_S",
    "CallerAudioBuffer",
    "EchoGate",
    "EndKind",
    "ReconnectingStt",
    "backoff_delay",
]


class EchoGate:
    """Echo discard shared by STT providers.

    Committed text that arrives while the agent speaks, or within ``tail_s`` after it stops,
    is echo of our own audio and is dropped; partial text is dropped while speaking.
    """

    def __init__(
        self, tail_s: float = ECHO_TAIL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tail_s = tail_s
        self._clock = clock
        self._speaking = False
        self._stopped_at = float("-inf")
        self.discarded = 0

    def set_speaking(self, speaking: bool) -> None:
        """Record whether the agent is speaking now."""
        if self._speaking and not speaking:
            self._stopped_at = self._clock()
        self._speaking = speaking

    @property
    def speaking(self) -> bool:
        """True while the agent speaks."""
        return self._speaking

    def allow_committed(self) -> bool:
        """True when committed text arriving now is the caller's, not our echo."""
        if self._speaking or self._clock() - self._stopped_at < self.tail_s:
            self.discarded += 1
            return False
        return True

    def allow_partial(self) -> bool:
        """True when partial text arriving now should be reported."""
        return not self._speaking


def backoff_delay(
    attempt: int, base_s: float = 1.0, max_s: float = 30.0, jitter: float = 0.25
) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): ``base·2ⁿ`` capped, ± jitter."""
    delay = min(base_s * (2**attempt), max_s)
    return delay * (1.0 - jitter + 2.0 * jitter * random.random())  # noqa: S311 (not crypto)


class CallerAudioBuffer:
    """Caller audio a reconnecting STT must not lose (loop thread only).

    ``pending`` frames have not reached the vendor yet; ``sent`` frames went to the current
    connection since its last final transcript. When a connection dies, :meth:`rewind` puts
    the sent frames back in front of the pending ones, so the next connection hears the
    whole utterance in progress. Both together are bounded by ``max_ms``: the oldest audio
    goes first, and what was dropped is counted.
    """

    def __init__(self, max_ms: float = 20_000.0) -> None:
        self.max_bytes = int(max_ms * 8)
        self.dropped_bytes = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._sent: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._sent_bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes waiting to be sent."""
        return self._pending_bytes

    @property
    def sent_bytes(self) -> int:
        """Bytes sent since the last final transcript (replayed after a reconnect)."""
        return self._sent_bytes

    def push(self, frame: bytes) -> None:
        """Queue one caller frame to be sent."""
        self._pending.append(frame)
        self._pending_bytes += len(frame)
        while self._pending_bytes + self._sent_bytes > self.max_bytes:
            if self._sent:
                old = self._sent.popleft()
                self._sent_bytes -= len(old)
            else:
                old = self._pending.popleft()
                self._pending_bytes -= len(old)
            self.dropped_bytes += len(old)

    def peek(self, max_bytes: int) -> list[bytes]:
        """The next pending frames, at least one and at most ``max_bytes`` in all."""
        out: list[bytes] = []
        total = 0
        for frame in self._pending:
            if out and total + len(frame) > max_bytes:
                break
            out.append(frame)
            total += len(frame)
        return out

    def ack(self, count: int) -> None:
        """Mark the first ``count`` pending frames as sent."""
        for _ in range(min(count, len(self._pending))):
            frame = self._pending.popleft()
            self._pending_bytes -= len(frame)
            self._sent.append(frame)
            self._sent_bytes += len(frame)

    def committed(self) -> None:
        """A final transcript arrived: the audio sent so far no longer needs a replay."""
        self._sent.clear()
        self._sent_bytes = 0

    def rewind(self) -> None:
        """The connection died: send the unconfirmed audio again, before the pending audio."""
        self._sent.extend(self._pending)
        self._pending, self._sent = self._sent, collections.deque()
        self._pending_bytes += self._sent_bytes
        self._sent_bytes = 0

    def clear(self) -> None:
        """Forget all audio."""
        self._pending.clear()
        self._sent.clear()
        self._pending_bytes = self._sent_bytes = 0


class ReconnectingStt(abc.ABC):
    """Skeleton of an STT that keeps one vendor connection per call and reconnects.

    It owns the callbacks, the counters, the echo discard, the reconnect buffer, the task
    that moves caller frames into that buffer and the reconnect loop (exponential backoff,
    at most ``max_reconnects`` consecutive attempts, reset by a healthy connection; a
    terminal end or exhausted attempts call ``on_error``). A vendor implements the hooks:
    :meth:`_session_once` runs one connection, :meth:`_flush`, :meth:`_close_input` and
    :meth:`_disconnect` move audio and end it.
    """

    #: Name of the run task; the pump task is ``<name>-pump``.
    _task_name: ClassVar[str] = "stt"
    #: The vendor module's logger: its name says which vendor a message is about.
    _logger: ClassVar[logging.Logger] = logger
    #: False: once the caller's audio has ended, no further connection is attempted.
    _connect_after_input_end: ClassVar[bool] = True
    #: Where this provider publishes call events (set by the server layer per call).
    call_events: Any = None

    def __init__(
        self,
        *,
        max_reconnects: int,
        reconnect_base_delay: float,
        reconnect_max_delay: float,
        buffer_ms: float,
        echo_tail_s: float | Callable[[], float],
    ) -> None:
        self.max_reconnects = max_reconnects
        self.reconnect_base_delay = reconnect_base_delay
        self.reconnect_max_delay = reconnect_max_delay

        self.on_committed: Callable[[str], None] | None = None
        self.on_recognizing: Callable[[str], None] | None = None
        self.on_error: Callable[[str], None] | None = None

        self._connections = 0  # vendor connections opened, for operators and tests
        self._connect_t0 = time.monotonic()
        self.reconnects = 0
        self.failed = False  # True once on_error said the provider gave up
        # A callable tail is asked each time the agent stops speaking (a patched module
        # constant takes effect on a running provider, as in 0.1.x).
        self._echo_tail = echo_tail_s
        self._echo = EchoGate(echo_tail_s() if callable(echo_tail_s) else echo_tail_s)
        self._buffer = CallerAudioBuffer(buffer_ms)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._healthy = False  # set by the hooks once the current connection proved itself
        self._input_ended = False
        self._stopping = False
        self._pump_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None

    @property
    def vendor(self) -> str:
        """The vendor's short name (for events and metrics)."""
        return self._task_name.split("-")[0]

    @property
    def connections(self) -> int:
        """Vendor connections opened so far; counting one publishes ``provider_connect``."""
        return self._connections

    @connections.setter
    def connections(self, value: int) -> None:
        if value > self._connections:
            emit_from(
                self,
                PROVIDER_CONNECT,
                vendor=self.vendor,
                role="stt",
                ok=True,
                attempt=self.reconnects,
                duration_ms=(time.monotonic() - self._connect_t0) * 1000.0,
            )
        self._connections = value

    @property
    def running(self) -> bool:
        """True while the provider is connected or reconnecting (False once it gave up)."""
        return self._run_task is not None and not self._run_task.done()

    def set_speaking(self, speaking: bool) -> None:
        """Tell the provider whether the agent is speaking (echo discard)."""
        if callable(self._echo_tail):
            self._echo.tail_s = self._echo_tail()
        self._echo.set_speaking(speaking)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start reading caller audio and connecting; returns at once."""
        if self._run_task is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._check_credentials()
        self._loop = asyncio.get_running_loop()
        self._pump_task = asyncio.create_task(
            self._pump(inbound_queue), name=f"{self._task_name}-pump"
        )
        self._run_task = asyncio.create_task(self._run(), name=self._task_name)

    async def stop(self) -> None:
        """Close the vendor connection and end every task; idempotent."""
        self._stopping = True
        tasks = [t for t in (self._run_task, self._pump_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._disconnect()
        self._buffer.clear()

    # ------------------------------------------------------------------ vendor hooks

    def _check_credentials(self) -> None:
        """Raise MissingCredentialError when the vendor credential is missing (at start())."""
        return None  # a vendor without credentials needs no check

    @abc.abstractmethod
    async def _session_once(self) -> tuple[EndKind, str]:
        """Open one connection, serve it until it ends and close it; say why and the reason.

        Set ``_healthy`` once the connection proved itself, count it in ``connections``, and
        log a lost connection in the vendor's words.
        """

    @abc.abstractmethod
    def _flush(self) -> None:
        """Caller audio was buffered: get it to the live connection, if any (never blocks)."""

    @abc.abstractmethod
    def _close_input(self) -> None:
        """The caller's audio ended: let the live connection finish its last utterance."""

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Release the connection :meth:`stop` interrupted, if any."""

    # ------------------------------------------------------------------ skeleton

    async def _pump(self, inbound: asyncio.Queue[bytes | None]) -> None:
        """Move caller frames into the reconnect buffer, whatever state the connection is in."""
        while True:
            frame = await inbound.get()
            if frame is None:
                self._input_ended = True
                self._close_input()
                return
            if self.failed:
                continue  # gave up (on_error was called); keep draining the queue
            self._buffer.push(frame)
            self._flush()

    async def _run(self) -> None:
        """Connect, serve, and reconnect with backoff until stopped, ended or given up."""
        attempt = 0  # consecutive reconnect attempts since the last healthy connection
        first = True
        while not self._stopping and (self._connect_after_input_end or not self._input_ended):
            if not first:
                if attempt >= self.max_reconnects:
                    self._give_up(f"reconnect_exhausted_after_{attempt}_attempts")
                    return
                delay = backoff_delay(attempt, self.reconnect_base_delay, self.reconnect_max_delay)
                self._logger.info(
                    "reconnecting STT", extra={"attempt": attempt + 1, "delay_s": round(delay, 3)}
                )
                await asyncio.sleep(delay)
                attempt += 1
                self.reconnects += 1
            first = False
            self._healthy = False
            # The new connection hears the unconfirmed utterance in progress again.
            self._buffer.rewind()
            self._connect_t0 = time.monotonic()
            before = self._connections
            kind, reason = await self._session_once()
            if self._connections == before and kind in ("fatal", "terminal"):
                emit_from(self, ERROR, vendor=self.vendor, role="stt", reason="connect_failed")
            if self._healthy:
                attempt = 0
            if kind in ("stopped", "end_of_input") or self._stopping:
                return
            if kind == "terminal":
                self._give_up(reason)
                return

    def _give_up(self, reason: str) -> None:
        self.failed = True
        self._buffer.clear()
        self._logger.error("STT gave up: %s", clip(reason), extra={"reason": reason})
        emit_from(self, ERROR, vendor=self.vendor, role="stt", reason="gave_up")
        self._emit(self.on_error, reason)

    def _committed(self, text: str) -> None:
        """The vendor committed ``text``: publish it and call ``on_committed``."""
        emit_from(self, TRANSCRIPT_COMMITTED, vendor=self.vendor, text=text)
        self._emit(self.on_committed, text)

    def _emit(self, callback: Callable[[str], None] | None, text: str) -> None:
        if callback is None:
            return
        try:
            callback(text)
        except Exception:
            self._logger.exception("STT callback failed")
