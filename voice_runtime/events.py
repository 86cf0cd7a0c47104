"""The call event stream: one place where every part of a call says what happened.

The session's stream port, the transport, STT providers, barge-in and realtime agents publish
small typed :class:`CallEvent` values to an :class:`EventBus`; metrics, traces, the console and
user code read them there instead of instrumenting the media path each on their own. A
:class:`~voice_runtime.server.VoiceServer` has one bus, ``server.events``, shared by all its
calls; a session outside a server publishes to a bus of its own
(``session.port.events.bus``).

Three ways to listen::

    server.events.subscribe(callback)          # sync, on the event loop thread; keep it quick
    async for event in server.events.stream():  # async, bounded queue per subscriber
        ...
    async for event in server.events.stream(call_sid="CA..."):  # one call only
        ...

Publishing never blocks and never raises into the media path: a failing callback is logged
and counted (``bus.errors``), a stream subscriber that falls behind loses the oldest events
(counted in ``bus.dropped`` and its own ``dropped``). With nobody listening, a publisher's
cost is one attribute test (:attr:`EventBus.active`).

Event data never carries phone numbers. The caller's words and digits travel only in the
fields named in :data:`SENSITIVE_FIELDS` (``text``, ``digit``); :meth:`CallEvent.redacted`
drops them, and consumers show them only when their operator asks for them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from voice_runtime.logutil import LogLimiter

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = [
    "AGENT_AUDIO_DONE",
    "AGENT_AUDIO_HEARD",
    "AGENT_AUDIO_QUEUED",
    "BARGE_IN",
    "CALLER_SPEECH_ENDED",
    "CALLER_SPEECH_STARTED",
    "CALL_ENDED",
    "CALL_STARTED",
    "CLEAR",
    "DRAINING",
    "DTMF",
    "ERROR",
    "KINDS",
    "PROVIDER_CONNECT",
    "SENSITIVE_FIELDS",
    "TOOL_CALL",
    "TRANSCRIPT_COMMITTED",
    "TURN_LATENCY",
    "USAGE",
    "CallEvent",
    "CallEvents",
    "EventBus",
    "EventStream",
    "attach",
    "emit_from",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

# ---------------------------------------------------------------------- kinds
# ``data`` of each kind is listed beside it; every field is optional for a consumer.

#: The media stream started. data: ``tracks``.
CALL_STARTED: Final = "call_started"
#: The caller began speaking (a VAD said so). data: ``source`` (stt, barge_in, agent).
CALLER_SPEECH_STARTED: Final = "caller_speech_started"
#: The caller stopped speaking (end of an utterance). data: ``source``, ``speech_ms``.
CALLER_SPEECH_ENDED: Final = "caller_speech_ended"
#: The STT (or a realtime agent) committed the caller's words. data: ``vendor``, ``text``.
TRANSCRIPT_COMMITTED: Final = "transcript_committed"
#: The first audio of an agent response was queued for the caller. data: ``response``
#: (1, 2, ... per call), ``position_ms`` (on the playback axis).
AGENT_AUDIO_QUEUED: Final = "agent_audio_queued"
#: The caller heard the first audio of a response (a mark echo confirmed it). data:
#: ``response``, ``queued_to_heard_ms``, ``mark_rtt_ms`` (the confirming mark's round trip,
#: playback of the audio ahead of it included), and ``since_start_ms`` for the first response.
AGENT_AUDIO_HEARD: Final = "agent_audio_heard"
#: The caller heard all the audio of a response (the end of what was queued). data:
#: ``response``, ``audio_ms``.
AGENT_AUDIO_DONE: Final = "agent_audio_done"
#: Agent audio not yet heard was discarded. data: ``played_ms``, ``dropped_chunks``.
CLEAR: Final = "clear"
#: The caller talked over the agent and the agent stopped. data: ``source``,
#: ``latency_ms`` (speech onset to barge-in), ``agent_played_ms``.
BARGE_IN: Final = "barge_in"
#: The caller pressed a key. data: ``digit``.
DTMF: Final = "dtmf"
#: A realtime agent's tool ran. data: ``tool``, ``ok``, ``duration_ms``, ``vendor``.
TOOL_CALL: Final = "tool_call"
#: A provider opened a vendor connection. data: ``vendor``, ``role`` (stt, tts, agent),
#: ``ok``, ``duration_ms``, ``attempt`` (0 first, then reconnects).
PROVIDER_CONNECT: Final = "provider_connect"
#: A provider or the call failed. data: ``vendor``, ``role``, ``reason`` (a short code).
ERROR: Final = "error"
#: A realtime agent reported token usage. data: ``vendor``, ``input_tokens``,
#: ``output_tokens``, and optional per-kind counts (``input_audio_tokens``, ...).
USAGE: Final = "usage"
#: One turn's latency: end of caller speech to first agent audio heard. data: ``total_ms``,
#: ``to_commit_ms`` (speech end to transcript), ``to_queued_ms`` (speech end to first audio
#: queued), ``queued_to_heard_ms`` (first audio queued to heard).
TURN_LATENCY: Final = "turn_latency"
#: The call ended. data: ``reason`` (a short code), ``duration_s``, ``frames_in``,
#: ``frames_out``, ``inbound_dropped``, ``outbound_dropped``, ``bad_frames`` (by reason),
#: ``marks_sent``, ``marks_echoed``, ``clears``.
CALL_ENDED: Final = "call_ended"
#: The server started draining (``call_sid`` is empty). data: ``live_calls``.
DRAINING: Final = "draining"

KINDS: Final = frozenset(
    {
        CALL_STARTED,
        CALLER_SPEECH_STARTED,
        CALLER_SPEECH_ENDED,
        TRANSCRIPT_COMMITTED,
        AGENT_AUDIO_QUEUED,
        AGENT_AUDIO_HEARD,
        AGENT_AUDIO_DONE,
        CLEAR,
        BARGE_IN,
        DTMF,
        TOOL_CALL,
        PROVIDER_CONNECT,
        ERROR,
        USAGE,
        TURN_LATENCY,
        CALL_ENDED,
        DRAINING,
    }
)

#: Data fields that carry call content (the caller's words, digits).
SENSITIVE_FIELDS: Final = frozenset({"text", "digit"})


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One thing that happened in a call.

    ``t`` is ``time.monotonic()`` when it happened (for durations), ``wall`` is
    ``time.time()`` (for display). ``data`` holds the kind's fields (see the kind constants).
    """

    kind: str
    call_sid: str
    stream_sid: str | None = None
    t: float = 0.0
    wall: float = 0.0
    data: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def redacted(self) -> CallEvent:
        """This event without the call content fields (:data:`SENSITIVE_FIELDS`)."""
        if not any(k in SENSITIVE_FIELDS for k in self.data):
            return self
        data = {k: v for k, v in self.data.items() if k not in SENSITIVE_FIELDS}
        return CallEvent(self.kind, self.call_sid, self.stream_sid, self.t, self.wall, data)

    def to_dict(self, *, content: bool = False) -> dict[str, Any]:
        """A JSON-ready dict; call content only with ``content=True``."""
        event = self if content else self.redacted()
        return {
            "kind": event.kind,
            "call_sid": event.call_sid,
            "stream_sid": event.stream_sid,
            "t": event.t,
            "wall": event.wall,
            "data": dict(event.data),
        }


Listener = Callable[[CallEvent], None]


class EventBus:
    """Fans call events out to subscribers; see the module docstring.

    ``publish`` runs the sync callbacks in the publishing thread (the event loop thread, for
    everything the runtime publishes) and hands events to stream subscribers on their loops.
    """

    def __init__(self, *, stream_queue_size: int = 1000) -> None:
        self.stream_queue_size = stream_queue_size
        # Copy-on-write: publish iterates a tuple, (un)subscribe replaces it.
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.Lock()
        self._log_limit = LogLimiter()
        #: Callback failures so far (each is logged, rate-limited).
        self.errors = 0
        #: Events stream subscribers lost because they fell behind.
        self.dropped = 0
        #: Events published while someone listened.
        self.published = 0

    @property
    def active(self) -> bool:
        """True while anyone listens (publishers may skip building events otherwise)."""
        return bool(self._listeners)

    def publish(self, event: CallEvent) -> None:
        """Deliver ``event`` to every subscriber; never blocks, never raises."""
        listeners = self._listeners
        if not listeners:
            return
        self.published += 1
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                self.errors += 1
                if self._log_limit.allow("listener_failed"):
                    logger.exception(
                        "call event listener failed", extra={"kind": event.kind, "n": self.errors}
                    )

    def subscribe(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns a function that unsubscribes.

        The callback runs on the event loop thread: keep it quick and never block in it.
        """
        with self._lock:
            self._listeners = (*self._listeners, callback)
        return lambda: self.unsubscribe(callback)

    def unsubscribe(self, callback: Listener) -> None:
        """Stop calling ``callback`` (no error when it is not subscribed)."""
        with self._lock:
            listeners = list(self._listeners)
            if callback in listeners:
                listeners.remove(callback)
            self._listeners = tuple(listeners)

    def stream(self, call_sid: str | None = None, *, maxsize: int | None = None) -> EventStream:
        """An async iterator of events (of one call with ``call_sid``) from now on.

        Use it as ``async for event in bus.stream(): ...`` (leaving the loop unsubscribes)
        or ``async with bus.stream() as events:`` with ``await events.get()``. At most
        ``maxsize`` events wait for the reader; beyond that the oldest are dropped and
        counted.
        """
        return EventStream(self, call_sid, maxsize or self.stream_queue_size)


class EventStream:
    """One async subscriber of an :class:`EventBus` with a bounded queue."""

    def __init__(self, bus: EventBus, call_sid: str | None, maxsize: int) -> None:
        self.bus = bus
        self.call_sid = call_sid
        self.maxsize = max(1, maxsize)
        #: Events this subscriber lost because it fell behind.
        self.dropped = 0
        self._queue: collections.deque[CallEvent] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._waiter: asyncio.Future[None] | None = None
        self._subscribed = False
        self._closed = False

    def _open(self) -> None:
        if not self._subscribed and not self._closed:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.get_ident()
            self._subscribed = True
            self.bus.subscribe(self._deliver)

    def _deliver(self, event: CallEvent) -> None:
        if self.call_sid is not None and event.call_sid != self.call_sid:
            return
        if threading.get_ident() == self._thread:
            self._push(event)
            return
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._push, event)
            except RuntimeError:  # its loop closed: nobody reads any more
                self.close()

    def _push(self, event: CallEvent) -> None:
        queue = self._queue
        if len(queue) >= self.maxsize:
            queue.popleft()
            self.dropped += 1
            self.bus.dropped += 1
        queue.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Unsubscribe; a reader waiting for the next event ends."""
        self._closed = True
        if self._subscribed:
            self._subscribed = False
            self.bus.unsubscribe(self._deliver)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> AsyncIterator[CallEvent]:
        self._open()
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[CallEvent]:
        # A generator, so leaving an ``async for`` early unsubscribes too (when the loop
        # finalises the generator), not only close() or ``async with``.
        try:
            while True:
                try:
                    event = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            self.close()

    async def __anext__(self) -> CallEvent:
        self._open()
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except BaseException:
                self.close()  # a cancelled reader stops listening
                raise
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def get(self, timeout: float | None = None) -> CallEvent:
        """The next event; TimeoutError after ``timeout`` s, StopAsyncIteration once closed.

        A timed-out (or cancelled) get leaves the stream open: the next get reads on.
        """
        self._open()
        if not self._queue and not self._closed:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                # wait_for cancels only the waiter future on timeout, never the subscription.
                await asyncio.wait_for(self._waiter, timeout)
            finally:
                self._waiter = None
        if not self._queue:
            raise StopAsyncIteration
        return self._queue.popleft()

    async def __aenter__(self) -> EventStream:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        """Unsubscribe (what ``async for`` does when the loop is left early)."""
        self.close()


class CallEvents:
    """The publisher of one call's events: stamps SIDs and times, derives responses and turns.

    Lives on the session's stream port (``session.port.events``); ``bus`` is the server's bus
    once the server runs the call (a bus of the session's own before). :meth:`emit` may be
    called from any thread: the event is stamped where it happened and delivered on the
    session's loop. It also turns what it sees into the derived events: the first heard audio
    of a response (``agent_audio_heard``) and each turn's latency (``turn_latency``).
    """

    __slots__ = (
        "bus",
        "_session",
        "_started_t",
        "_speech_end_t",
        "_commit_t",
        "_queued_t",
        "_responses",
        "awaiting_heard",
        "_response_start_ms",
        "_response_queued_t",
        "_heard_any",
        "_mark_sent_t",
        "turn_open",
        "playing",
    )

    def __init__(self, session: VoiceSession, bus: EventBus | None = None) -> None:
        self.bus = bus if bus is not None else EventBus()
        self._session = session
        self.reset()

    def reset(self) -> None:
        """Forget the previous call's turn state."""
        self._started_t = 0.0
        self._speech_end_t: float | None = None
        self._commit_t: float | None = None
        self._queued_t: float | None = None
        self._responses = 0
        # Set while the first audio of a response waits for its mark echo.
        self.awaiting_heard = False
        self._response_start_ms = 0.0
        self._response_queued_t = 0.0
        self._heard_any = False
        self._mark_sent_t = 0.0
        # The caller finished a turn and no agent audio was queued since: the next audio
        # starts a response even while earlier audio still plays.
        self.turn_open = False
        # Set from a response's first audio until all of it was heard (or cleared).
        self.playing = False

    @property
    def active(self) -> bool:
        """True while anyone listens to the bus."""
        return bool(self.bus._listeners)

    def emit(self, kind: str, /, t: float | None = None, **data: Any) -> None:
        """Publish ``kind`` with ``data`` for this call (any thread; cheap when nobody listens)."""
        bus = self.bus
        if not bus._listeners:
            return
        now = time.monotonic() if t is None else t
        session = self._session
        event = CallEvent(
            kind,
            session.call_sid or "",
            session.stream_sid,
            now,
            time.time() - (time.monotonic() - now),
            MappingProxyType(data) if data else _EMPTY,
        )
        loop = session.loop
        if loop is None or _running_loop() is loop:
            self._deliver(event)
            return
        try:
            loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is closed: the call is over
            pass

    def _deliver(self, event: CallEvent) -> None:
        kind = event.kind
        if kind in _TURN_KINDS:
            self._track(event)
        self.bus.publish(event)

    # ------------------------------------------------------------------ turns

    def _track(self, event: CallEvent) -> None:
        kind = event.kind
        t = event.t
        if kind == CALL_STARTED:
            self._started_t = t
        elif kind == CALLER_SPEECH_ENDED:
            self._speech_end_t, self._commit_t, self._queued_t = t, None, None
            self.turn_open = True
        elif kind == TRANSCRIPT_COMMITTED:
            if self._speech_end_t is None:
                # An STT that reports no speech end: the turn starts at its transcript.
                self._speech_end_t = t
                self.turn_open = True
            if self._commit_t is None:
                self._commit_t = t
        elif kind == AGENT_AUDIO_QUEUED and self._speech_end_t is not None and not self._queued_t:
            self._queued_t = t

    # ------------------------------------------------------------------ responses (port side)

    def audio_queued(self, position_ms: float) -> None:
        """A response starts at ``position_ms`` (loop only).

        The port calls this for audio queued while none was left to play, or the first audio
        after the caller's turn.
        """
        self._responses += 1
        self.awaiting_heard = self.playing = True
        self.turn_open = False
        self._response_start_ms = position_ms
        now = time.monotonic()
        self._response_queued_t = now
        self._mark_sent_t = 0.0
        self.emit(AGENT_AUDIO_QUEUED, t=now, response=self._responses, position_ms=position_ms)

    def mark_sent(self) -> None:
        """A mark went to the far end (loop only): the first of a response is timed."""
        if self.awaiting_heard and not self._mark_sent_t:
            self._mark_sent_t = time.monotonic()

    @property
    def watching(self) -> bool:
        """True while a response waits to be heard or to finish playing."""
        return self.awaiting_heard or self.playing

    def played(self, played_ms: float, queued_ms: float) -> None:
        """A mark echo moved playback to ``played_ms`` of ``queued_ms`` queued (loop only)."""
        start = self._response_start_ms
        if self.awaiting_heard and played_ms > start:
            self._heard()
        if self.playing and not self.awaiting_heard and played_ms >= queued_ms - 0.5:
            self.playing = False
            self.emit(AGENT_AUDIO_DONE, response=self._responses, audio_ms=played_ms - start)

    def _heard(self) -> None:
        self.awaiting_heard = False
        now = time.monotonic()
        data: dict[str, Any] = {
            "response": self._responses,
            "queued_to_heard_ms": (now - self._response_queued_t) * 1000.0,
        }
        if self._mark_sent_t:
            # The mark whose echo said so is the first one sent after the response began.
            data["mark_rtt_ms"] = (now - self._mark_sent_t) * 1000.0
        if not self._heard_any:
            self._heard_any = True
            if self._started_t:
                data["since_start_ms"] = (now - self._started_t) * 1000.0
        self.emit(AGENT_AUDIO_HEARD, t=now, **data)
        end = self._speech_end_t
        if end is None or not self.active:
            return
        commit, queued = self._commit_t, self._queued_t
        self._speech_end_t = self._commit_t = self._queued_t = None
        parts: dict[str, float] = {"total_ms": (now - end) * 1000.0}
        if commit is not None:
            parts["to_commit_ms"] = max(0.0, commit - end) * 1000.0
        if queued is not None:
            parts["to_queued_ms"] = max(0.0, queued - end) * 1000.0
            parts["queued_to_heard_ms"] = (now - max(queued, end)) * 1000.0
        self.emit(TURN_LATENCY, t=now, **parts)

    def cleared(self, played_ms: float, dropped_chunks: int) -> None:
        """Agent audio was cleared; the response in progress ends unheard (loop only)."""
        self.awaiting_heard = self.playing = False
        self.emit(CLEAR, played_ms=played_ms, dropped_chunks=dropped_chunks)


def emit_from(provider: Any, kind: str, /, **data: Any) -> None:
    """Publish ``kind`` through ``provider.call_events`` when the call wired one (else nothing).

    Providers declare ``call_events: CallEvents | None = None``; the server layer sets it when
    it builds the call's provider, so a provider needs no session to publish.
    """
    events = getattr(provider, "call_events", None)
    if events is not None:
        events.emit(kind, **data)


def attach(provider: Any, events: CallEvents) -> None:
    """Let ``provider`` (and the primary of an STT tee) publish to ``events``."""
    for target in (provider, getattr(provider, "primary", None)):
        if target is not None and hasattr(target, "call_events"):
            try:
                target.call_events = events
            except AttributeError:  # a read-only attribute: that provider does not publish
                pass


_TURN_KINDS = frozenset(
    {CALL_STARTED, CALLER_SPEECH_ENDED, TRANSCRIPT_COMMITTED, AGENT_AUDIO_QUEUED}
)

_running_loop = asyncio._get_running_loop
