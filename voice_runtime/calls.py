"""Call routes, the call registry and the pool that runs sync call handlers.

:class:`Route` is a one-time token for one expected media stream; :class:`CallRegistry`
finds live sessions by call SID, stream SID and route token and counts the ``max_calls``
slots; :class:`HandlerPool` runs sync ``on_call`` handlers. All three are thread-safe and
free of I/O; :class:`~voice_runtime.server.VoiceServer` uses them (and re-exports the first
two).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from voice_runtime.logutil import describe_error, log_limiter
from voice_runtime.providers import TtsProvider
from voice_runtime.providers.base import speak_async
from voice_runtime.session import VoiceSession
from voice_runtime.types import SessionEvent

logger = logging.getLogger(__name__)

__all__ = [
    "CallRegistry",
    "HandlerPool",
    "Route",
    "end_after_handler",
    "finish_async",
    "finish_sync",
    "handler_failed",
    "make_route",
    "speak_error",
    "speak_error_async",
]


@dataclass
class Route:
    """A one-time route token for one expected media stream.

    ``reserved``: the route holds one ``max_calls`` slot (routes the voice webhook hands out);
    its stream takes the slot over, and expiry or eviction gives it back.
    """

    token: str
    expires_at: float
    parameters: dict[str, str] = field(default_factory=dict)
    session: VoiceSession | None = None
    call_sid: str | None = None
    reserved: bool = False


class CallRegistry:
    """Live sessions by call SID, stream SID and route token, and the call slots (thread-safe).

    A slot is held by every reserved route and every admitted stream, from before its
    websocket is accepted until it ends, so ``max_calls`` counts calls on their way in too.
    The route table holds at most ``max_routes`` routes; expired ones go first (a heap by
    expiry, so a webhook costs O(log n)), then the soonest to expire.
    """

    def __init__(self, max_routes: int = 10_000) -> None:
        self.max_routes = max_routes
        self.routes_evicted = 0
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._expiry: list[tuple[float, int, str]] = []
        self._seq = 0
        self._route_by_call: dict[str, str] = {}
        self._slots = 0
        self._by_call: dict[str, VoiceSession] = {}
        self._by_stream: dict[str, VoiceSession] = {}
        self._live: set[int] = set()
        self._sessions: dict[int, VoiceSession] = {}
        self._call_waiters: dict[str, threading.Event] = {}

    def add_route(self, route: Route) -> None:
        """Remember a route until it is claimed or expires."""
        route.reserved = False  # only add_reserved_route takes a slot
        with self._lock:
            evicted = self._insert(route, time.monotonic())
            if route.session is not None and route.call_sid:
                self._by_call[route.call_sid] = route.session
        _log_evicted(evicted)

    def add_reserved_route(self, route: Route, limit: int) -> bool:
        """Add ``route`` holding a slot; False (nothing added) when ``limit`` slots are taken.

        A pending route for the same call SID is replaced (a replayed webhook takes no second
        slot).
        """
        with self._lock:
            now = time.monotonic()
            self._prune(now)
            if route.call_sid:
                old = self._route_by_call.get(route.call_sid)
                if old is not None:
                    self._drop(self._routes.get(old))
            if self._slots >= limit:
                return False
            self._slots += 1
            route.reserved = True
            evicted = self._insert(route, now)
        _log_evicted(evicted)
        return True

    def _insert(self, route: Route, now: float) -> int:
        """Add ``route`` (lock held); return how many live routes were evicted for room."""
        self._prune(now)
        evicted = 0
        while len(self._routes) >= self.max_routes and self._expiry:
            _, _, token = heapq.heappop(self._expiry)
            if token in self._routes:
                self._drop(self._routes[token])
                evicted += 1
        self.routes_evicted += evicted
        self._routes[route.token] = route
        if route.call_sid and route.reserved:
            self._route_by_call[route.call_sid] = route.token
        self._seq += 1
        heapq.heappush(self._expiry, (route.expires_at, self._seq, route.token))
        if len(self._expiry) > 2 * len(self._routes) + 64:
            # Claimed routes leave stale heap entries; rebuilding now and then keeps the heap
            # proportional to the table (amortised O(1) per route).
            self._expiry = [(r.expires_at, i, t) for i, (t, r) in enumerate(self._routes.items())]
            heapq.heapify(self._expiry)
        return evicted

    def _drop(self, route: Route | None) -> None:
        """Forget a pending route and give back its slot (lock held)."""
        if route is None or self._routes.pop(route.token, None) is None:
            return
        if route.call_sid and self._route_by_call.get(route.call_sid) == route.token:
            del self._route_by_call[route.call_sid]
        if route.reserved:
            route.reserved = False
            self._slots -= 1

    def claim(self, token: str) -> Route | None:
        """Take a route for its stream; None when unknown, used or expired.

        A reserved route's slot passes to the caller, who gives it back with :meth:`release`.
        """
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            route = self._routes.pop(token, None)
            if route is None:
                return None
            if route.call_sid and self._route_by_call.get(route.call_sid) == token:
                del self._route_by_call[route.call_sid]
            if route.expires_at < now:
                if route.reserved:
                    route.reserved = False
                    self._slots -= 1
                return None
        return route

    def _prune(self, now: float) -> None:
        heap = self._expiry
        while heap and heap[0][0] < now:
            _, _, token = heapq.heappop(heap)
            route = self._routes.get(token)
            if route is None:
                continue
            if route.expires_at >= now:  # its expiry was moved later: keep it
                self._seq += 1
                heapq.heappush(heap, (route.expires_at, self._seq, token))
                continue
            self._drop(route)

    def reserve(self, limit: int) -> bool:
        """Take one call slot unless ``limit`` are taken (give it back with :meth:`release`)."""
        with self._lock:
            self._prune(time.monotonic())
            if self._slots >= limit:
                return False
            self._slots += 1
            return True

    def release(self) -> None:
        """Give back a slot taken by :meth:`reserve` or a claimed reserved route."""
        with self._lock:
            self._slots = max(0, self._slots - 1)

    @property
    def reserved_count(self) -> int:
        """Call slots taken: live calls, accepted streams not yet started, unused routes."""
        with self._lock:
            self._prune(time.monotonic())
            return self._slots

    @property
    def route_count(self) -> int:
        """Routes waiting for their stream."""
        with self._lock:
            self._prune(time.monotonic())
            return len(self._routes)

    def claim_call(
        self,
        session: VoiceSession,
        call_sid: str,
        stream_sid: str,
        expected_call_sid: str | None = None,
    ) -> str | None:
        """Index a starting stream's SIDs for ``session``; the reason when refused, else None.

        A call SID or stream SID belongs to one session: a start that names one another
        session holds, or a call SID other than the one its route was issued for, is refused
        and changes nothing.
        """
        with self._lock:
            if expected_call_sid and call_sid != expected_call_sid:
                return "call_sid_mismatch"
            other = self._by_call.get(call_sid)
            if other is not None and other is not session:
                return "call_sid_in_use"
            other = self._by_stream.get(stream_sid)
            if other is not None and other is not session:
                return "stream_sid_in_use"
            if call_sid:
                self._by_call[call_sid] = session
            if stream_sid:
                self._by_stream[stream_sid] = session
            return None

    def bind_call(self, call_sid: str, session: VoiceSession) -> None:
        """Index a session by its call SID (known before the stream when we placed the call)."""
        with self._lock:
            self._by_call[call_sid] = session
            waiter = self._call_waiters.pop(call_sid, None)
        if waiter is not None:
            waiter.set()

    def started(self, session: VoiceSession) -> None:
        """Index a session whose stream started."""
        with self._lock:
            self._live.add(id(session))
            self._sessions[id(session)] = session
            if session.stream_sid:
                self._by_stream[session.stream_sid] = session
            if session.call_sid:
                self._by_call[session.call_sid] = session
                waiter = self._call_waiters.pop(session.call_sid, None)
            else:
                waiter = None
        if waiter is not None:
            waiter.set()

    def ended(self, session: VoiceSession) -> None:
        """Forget a session whose call ended."""
        with self._lock:
            self._live.discard(id(session))
            self._sessions.pop(id(session), None)
            if session.stream_sid and self._by_stream.get(session.stream_sid) is session:
                del self._by_stream[session.stream_sid]
            if session.call_sid and self._by_call.get(session.call_sid) is session:
                del self._by_call[session.call_sid]

    def by_call_sid(self, call_sid: str) -> VoiceSession | None:
        """The session of a call, if this server knows it."""
        with self._lock:
            return self._by_call.get(call_sid)

    def by_stream_sid(self, stream_sid: str) -> VoiceSession | None:
        """The session of a stream, if live."""
        with self._lock:
            return self._by_stream.get(stream_sid)

    def wait_for_call(self, call_sid: str, timeout: float) -> VoiceSession | None:
        """Block until a session for ``call_sid`` exists; None on timeout."""
        with self._lock:
            session = self._by_call.get(call_sid)
            if session is not None:
                return session
            waiter = self._call_waiters.setdefault(call_sid, threading.Event())
        waiter.wait(timeout)
        return self.by_call_sid(call_sid)

    @property
    def live_count(self) -> int:
        """Number of calls with a live media stream."""
        with self._lock:
            return len(self._live)

    def live_sessions(self) -> list[VoiceSession]:
        """Sessions with a live media stream."""
        with self._lock:
            return list(self._sessions.values())


class HandlerPool:
    """Runs sync call handlers on at most ``size()`` daemon threads; the rest wait in order.

    Threads are started on demand and end when no handler waits, so an idle server holds
    none, and (being daemons) a handler that never returns cannot block process exit.
    """

    def __init__(self, size: Callable[[], int]) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Callable[[VoiceSession], Any], VoiceSession]] = deque()
        self.threads: set[threading.Thread] = set()

    def submit(self, fn: Callable[[VoiceSession], Any], session: VoiceSession) -> None:
        """Run ``fn(session)`` on a pool thread as soon as one is free."""
        with self._lock:
            self._jobs.append((fn, session))
            if len(self.threads) >= max(1, self._size()):
                return
            thread = threading.Thread(target=self._work, name="vr-on-call", daemon=True)
            self.threads.add(thread)
        thread.start()

    @property
    def waiting(self) -> int:
        """Handlers waiting for a free thread."""
        with self._lock:
            return len(self._jobs)

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                if not self._jobs or len(self.threads) > max(1, self._size()):
                    # Also shrinks the pool when max_calls was lowered at run time.
                    self.threads.discard(me)
                    return
                fn, session = self._jobs.popleft()
            try:
                fn(session)
            except BaseException:
                # Even SystemExit from a handler must not silently shrink the pool.
                logger.exception("call handler failed", extra={"call_sid": session.call_sid})


def handler_failed(session: VoiceSession, exc: BaseException) -> None:
    """Log a failed ``on_call`` handler once with its traceback and emit ``handler_failed``."""
    logger.error(
        "call handler failed: %s",
        describe_error(exc),
        exc_info=exc,
        extra={"call_sid": session.call_sid},
    )
    # Only the error type: its message may quote what the caller said or their number.
    data = {"error": type(exc).__name__, "call_sid": session.call_sid}
    session.emit_event(SessionEvent("handler_failed", data))


def speak_error(tts: TtsProvider, text: str, session: VoiceSession) -> None:
    """Speak the server's error message (blocking); a failing TTS is logged, not raised."""
    try:
        tts.speak(text, session)
    except Exception as exc:
        logger.warning("error message could not be spoken: %s", describe_error(exc))


async def speak_error_async(tts: TtsProvider, text: str, session: VoiceSession) -> None:
    """Async twin of :func:`speak_error`, bounded so a stalled TTS cannot hold the line."""
    try:
        await asyncio.wait_for(speak_async(tts, text, session), 10.0)
    except Exception as exc:
        logger.warning("error message could not be spoken: %s", describe_error(exc))


def finish_sync(
    session: VoiceSession,
    generation: int,
    exc: BaseException | None,
    speaker: tuple[str, TtsProvider] | None,
) -> None:
    """After a sync handler: report its error, speak the error message, then hang up."""
    if exc is not None:
        handler_failed(session, exc)
        if speaker is not None and not session.is_disconnected:
            speak_error(speaker[1], speaker[0], session)
    end_after_handler(session, generation)


async def finish_async(
    session: VoiceSession,
    generation: int,
    exc: BaseException | None,
    speaker: tuple[str, TtsProvider] | None,
) -> None:
    """Async twin of :func:`finish_sync`."""
    if exc is not None:
        handler_failed(session, exc)
        if speaker is not None and not session.is_disconnected:
            await speak_error_async(speaker[1], speaker[0], session)
    end_after_handler(session, generation)


def end_after_handler(session: VoiceSession, generation: int) -> None:
    """Hang up once the queued audio is heard: a finished handler must not leave dead air."""
    if not session.is_disconnected:
        session.request_disconnect(generation, after_playback=True)


def _log_evicted(evicted: int) -> None:
    if evicted and log_limiter().allow("route_evicted"):
        logger.warning(
            "route table full: evicted the routes closest to expiry",
            extra={"evicted": evicted, "count": log_limiter().count("route_evicted")},
        )


def make_route(
    ttl_s: float,
    parameters: Mapping[str, str] | None,
    session: VoiceSession | None,
    call_sid: str | None,
    *,
    token: str | None = None,
) -> Route:
    """A new route expiring ``ttl_s`` seconds from now (``token``, default a random one)."""
    return Route(
        token=token or secrets.token_urlsafe(24),
        expires_at=time.monotonic() + ttl_s,
        parameters=dict(parameters or {}),
        session=session,
        call_sid=call_sid,
    )
