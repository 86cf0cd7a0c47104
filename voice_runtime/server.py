"""VoiceServer: many concurrent calls in one process, inbound and outbound, with draining.

Every media stream gets its own :class:`~voice_runtime.session.VoiceSession` from a factory.
Sessions are found by call SID, stream SID and route token, so an outbound script gets the
session of the call it placed and no audio, mark, transcript or intent of one call can reach
another. Routes::

    WS   /voice, /voice/{token}     Twilio Media Streams
    POST /twilio/voice              incoming-call webhook -> <Connect><Stream> (or busy TwiML)
    POST /twilio/status             call-status and async AMD callbacks -> session events
    POST /twilio/sms                incoming-SMS webhook (when ``on_sms`` is given)
    GET  /health, /ready            liveness; readiness is 503 while draining
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import ClientDisconnect

from voice_runtime._callbacks import CallbackRunner, CallbacksBusyError
from voice_runtime._callbacks import is_async_callable as _is_async_callable
from voice_runtime.call_wiring import CallWiring
from voice_runtime.config import settings
from voice_runtime.errors import ConfigurationError, MissingStreamUrlError
from voice_runtime.logutil import LogLimiter, clip, log_limiter
from voice_runtime.providers import TtsProvider
from voice_runtime.session import VoiceSession
from voice_runtime.transports.security import (
    IPNetwork,
    SignaturePolicy,
    TrustedProxies,
    check_public_url,
    check_request_signature,
    check_websocket_signature,
    refusal_before_body,
    request_base_url,
    require_public_url,
    trusted_networks,
)
from voice_runtime.transports.twilio_ws import MediaStreamCall, StreamOptions
from voice_runtime.transports.xml_text import xml_safe
from voice_runtime.types import SessionEvent
from voice_runtime.watchdog import LoopWatchdog

logger = logging.getLogger(__name__)

TWIML = "application/xml"
MAX_WEBHOOK_BYTES = 64 * 1024
"""Default cap on a webhook body; Twilio's largest (an SMS with media URLs) is a few KB."""
MAX_WEBHOOK_FIELDS = 256
WEBHOOK_READ_TIMEOUT_S = 10.0
"""A webhook body must arrive within this long (a slow sender holds no handler longer)."""
ENDED_STATUSES = frozenset({"completed", "busy", "no-answer", "canceled", "failed"})
# Keys of VoiceServer.refusals.
REFUSAL_REASONS = (
    "busy",
    "draining",
    "bad_route",
    "unrouted",
    "no_start",
    "call_sid_mismatch",
    "call_sid_in_use",
    "stream_sid_in_use",
)

__all__ = ["CallRegistry", "Route", "VoiceServer"]


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


def _twiml_busy(message: str) -> str:
    from twilio.twiml.voice_response import VoiceResponse

    response = VoiceResponse()
    response.say(xml_safe(message))
    response.hangup()
    return str(response)


class _HandlerPool:
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


class VoiceServer:
    """Serves Twilio calls, one session per call, on a FastAPI app.

    ``on_call(session)`` runs once the call's stream starts: a coroutine function as a task
    on the loop, a plain function on a pool of at most ``max_calls`` threads.

    Admission: at most ``max_calls`` calls hold a slot at once. A slot is taken by every
    route the voice webhook hands out (until its stream claims it, or it expires after
    ``inbound_route_ttl_s``) and by every media stream from before its websocket is accepted
    until it ends (a stream that sends no ``start`` in ``StreamOptions.start_timeout_s`` is
    closed). Over the limit the webhook answers busy TwiML and a stream is closed with 1013.
    A ``start`` whose call SID another stream holds, or that differs from the call SID its
    route was issued for, is closed with 1008. ``refusals`` counts every refusal by reason.

    ``allow_unrouted_streams``: None (default) serves ``{path}`` without a route token only
    while signatures are not enforced (a signed upgrade of that fixed URL could be replayed).

    The webhooks' callbacks
    (``inbound_parameters``, ``on_sms``, a session's ``on_event``) run the same way, a plain
    function on a pool of ``callback_workers`` threads (at most ``max_pending_callbacks`` in
    flight; beyond that a webhook answers 503), so none of them blocks the audio of calls.

    ``trust_forwarded_headers``: the proxy networks (``["10.0.0.0/8"]``, or one
    comma-separated string) whose ``X-Forwarded-Proto``/``-Host`` are honoured when no public
    URL is configured; ``True`` means loopback only, ``False`` none. With signatures enforced,
    a public URL (``public_url``, VOICE_PUBLIC_URL or VOICE_STREAM_URL) is required:
    :meth:`check_config` raises without one, :meth:`serve` refuses to start, and until one is
    set every webhook and media stream is refused.
    """

    def __init__(
        self,
        *,
        on_call: Callable[[VoiceSession], Any] | None = None,
        session_factory: Callable[[], VoiceSession] = VoiceSession,
        app: FastAPI | None = None,
        path: str = "/voice",
        webhook_prefix: str = "/twilio",
        public_url: str | None = None,
        trust_forwarded_headers: TrustedProxies = False,
        max_calls: int = 200,
        route_ttl_s: float = 300.0,
        inbound_route_ttl_s: float = 30.0,
        max_routes: int = 10_000,
        allow_unrouted_streams: bool | None = None,
        inbound_parameters: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None,
        on_sms: Callable[[Any], str | None] | None = None,
        busy_message: str = "All our lines are busy right now. Please call again later.",
        drain_timeout: float = 30.0,
        goodbye: str = "We have to end this call now. Please call again. Goodbye.",
        goodbye_tts: TtsProvider | None = None,
        stream_options: StreamOptions | None = None,
        hangup_regions: Any = None,
        watchdog: LoopWatchdog | None = None,
        max_webhook_bytes: int = MAX_WEBHOOK_BYTES,
        callback_workers: int = 8,
        max_pending_callbacks: int = 64,
    ) -> None:
        if max_webhook_bytes < 1:
            raise ConfigurationError("max_webhook_bytes must be at least 1")
        if callback_workers < 1 or max_pending_callbacks < 1:
            raise ConfigurationError("callback_workers and max_pending_callbacks must be >= 1")
        if public_url is not None:
            check_public_url(public_url)
        self.on_call = on_call
        self.session_factory = session_factory
        self.path = "/" + path.strip("/")
        self.webhook_prefix = "/" + webhook_prefix.strip("/")
        self.public_url = public_url
        self.trust_forwarded_headers = trust_forwarded_headers
        self.max_calls = max_calls
        self.route_ttl_s = route_ttl_s
        self.inbound_route_ttl_s = inbound_route_ttl_s
        self.allow_unrouted_streams = allow_unrouted_streams
        self.inbound_parameters = inbound_parameters
        self.on_sms = on_sms
        self.busy_message = busy_message
        self.drain_timeout = drain_timeout
        self.goodbye = goodbye
        self.goodbye_tts = goodbye_tts
        self.stream_options = stream_options or StreamOptions()
        self.hangup_regions = hangup_regions
        self.max_webhook_bytes = max_webhook_bytes
        self.webhook_read_timeout_s = WEBHOOK_READ_TIMEOUT_S
        self.callbacks = CallbackRunner(workers=callback_workers, max_pending=max_pending_callbacks)
        self.webhook_refusals = LogLimiter()
        self.registry = CallRegistry(max_routes=max_routes)
        self.draining = False
        # Counts refusals by reason (and limits their log lines: a peer can trigger them).
        self._refused = LogLimiter(first=5, every=1000)
        self._call_tasks: set[asyncio.Task[Any]] = set()
        self._pool = _HandlerPool(lambda: self.max_calls)
        self._threads = self._pool.threads
        # Watches the event loop while media streams are served: a blocking call in a
        # handler delays every call's audio, and the warning says so.
        self.watchdog = watchdog or LoopWatchdog()
        self._streams = 0
        self.app = app or FastAPI(title="voice_runtime", lifespan=self._lifespan)
        if app is not None:
            self._wrap_lifespan(app)
        self._install(self.app)

    @property
    def refusals(self) -> dict[str, int]:
        """Refused webhooks, streams and starts so far, by reason (see the README)."""
        return {reason: self._refused.count(reason) for reason in REFUSAL_REASONS}

    @property
    def refused_busy(self) -> int:
        """Webhooks answered busy and streams closed with 1013 because of ``max_calls``."""
        return self._refused.count("busy")

    @property
    def handlers_waiting(self) -> int:
        """Sync ``on_call`` handlers waiting for a free pool thread."""
        return self._pool.waiting

    def _refuse(self, reason: str, message: str, **extra: Any) -> None:
        if self._refused.allow(reason):
            logger.warning(
                message, extra={"reason": reason, "count": self._refused.count(reason), **extra}
            )

    # ------------------------------------------------------------------ app wiring

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._on_startup()
        yield
        await self._on_shutdown()

    def _wrap_lifespan(self, app: FastAPI) -> None:
        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            self._on_startup()
            async with inner(a) as state:
                yield state
            await self._on_shutdown()

        app.router.lifespan_context = lifespan

    def _on_startup(self) -> None:
        # Only logged here: tests and scripts serve on port 0 and set public_url once the
        # port is known. serve() and `voice-runtime serve` refuse to start instead.
        try:
            self.check_config()
        except ConfigurationError as exc:
            # One fixed message per cause, naming what to set; it carries no secret.
            logger.error(str(exc))

    async def _on_shutdown(self) -> None:
        await self.drain()
        self.callbacks.shutdown()

    def check_config(self) -> None:
        """Raise ConfigurationError for a malformed public URL, or none with signatures on."""
        require_public_url(self._policy())

    @property
    def trust_forwarded_headers(self) -> tuple[IPNetwork, ...]:
        """Proxy networks whose X-Forwarded-Proto/-Host are honoured (empty: none)."""
        return self._trusted_proxies

    @trust_forwarded_headers.setter
    def trust_forwarded_headers(self, value: TrustedProxies) -> None:
        self._trusted_proxies = trusted_networks(value)

    def _policy(self) -> SignaturePolicy:
        return SignaturePolicy.from_settings(
            public_base_url=self.public_url, trust_forwarded_headers=self._trusted_proxies
        )

    def _install(self, app: FastAPI) -> None:
        app.add_api_websocket_route(self.path, self._stream_endpoint)
        app.add_api_websocket_route(self.path + "/{token}", self._routed_endpoint)
        app.add_api_route(self.webhook_prefix + "/voice", self._voice_webhook, methods=["POST"])
        app.add_api_route(self.webhook_prefix + "/status", self._status_webhook, methods=["POST"])
        app.add_api_route(self.webhook_prefix + "/sms", self._sms_webhook, methods=["POST"])
        app.add_api_route("/health", self._health, methods=["GET"])
        app.add_api_route("/ready", self._ready, methods=["GET"])

    # ------------------------------------------------------------------ routes and sessions

    def new_route(
        self,
        *,
        parameters: Mapping[str, str] | None = None,
        session: VoiceSession | None = None,
        call_sid: str | None = None,
    ) -> Route:
        """Create a one-time route token for a stream this server expects."""
        route = _make_route(self.route_ttl_s, parameters, session, call_sid)
        self.registry.add_route(route)
        return route

    def session_for_call(self, call_sid: str, timeout: float = 0.0) -> VoiceSession | None:
        """The session of ``call_sid``; waits up to ``timeout`` for its stream to start."""
        if timeout <= 0:
            return self.registry.by_call_sid(call_sid)
        return self.registry.wait_for_call(call_sid, timeout)

    def _public_base(self) -> str:
        base = self.public_url or settings().voice_public_url or settings().voice_stream_url
        if not base:
            raise MissingStreamUrlError()
        return base

    def place_call(
        self, phone: str, *, parameters: Mapping[str, str] | None = None, **options: Any
    ) -> VoiceSession:
        """Call ``phone``; return the session its stream will use (blocking REST request).

        ``options`` go to :func:`~voice_runtime.transports.twilio_call.initiate_outbound_call`
        (status callback, machine detection, timeouts, recording, ...). Wait for the callee
        with ``session.wait_for_ws_connect()``.
        """
        from voice_runtime.transports import twilio_call

        session, route = self._outbound_route(parameters)
        self._default_callbacks(options)
        call_sid = twilio_call.initiate_outbound_call(
            phone,
            stream_url=self._public_base(),
            route_token=route.token,
            parameters=route.parameters,
            **options,
        )
        self._bind_outbound(session, route, call_sid)
        return session

    async def place_call_async(
        self, phone: str, *, parameters: Mapping[str, str] | None = None, **options: Any
    ) -> VoiceSession:
        """Async twin of :meth:`place_call`."""
        from voice_runtime.transports import twilio_call

        session, route = self._outbound_route(parameters)
        self._default_callbacks(options)
        call_sid = await twilio_call.initiate_outbound_call_async(
            phone,
            stream_url=self._public_base(),
            route_token=route.token,
            parameters=route.parameters,
            **options,
        )
        self._bind_outbound(session, route, call_sid)
        return session

    def _outbound_route(self, parameters: Mapping[str, str] | None) -> tuple[VoiceSession, Route]:
        if self.draining:
            raise ConfigurationError("the server is draining and places no new calls")
        session = self.session_factory()
        params = {"direction": "outbound", **dict(parameters or {})}
        return session, self.new_route(parameters=params, session=session)

    def _bind_outbound(self, session: VoiceSession, route: Route, call_sid: str) -> None:
        session.call_sid = call_sid
        route.call_sid = call_sid
        self.registry.bind_call(call_sid, session)

    def _default_callbacks(self, options: dict[str, Any]) -> None:
        # Status posts and async AMD results come back to /twilio/status as session events;
        # without an explicit URL Twilio would not post async AMD results at all.
        status_url = self._status_url()
        options.setdefault("status_callback", status_url)
        if options.get("async_amd") and status_url is not None:
            options.setdefault("async_amd_status_callback", status_url)

    def _status_url(self) -> str | None:
        try:
            base = self._public_base()
        except MissingStreamUrlError:
            return None
        base = base.replace("wss://", "https://", 1).replace("ws://", "http://", 1).rstrip("/")
        return f"{base}{self.webhook_prefix}/status"

    # ------------------------------------------------------------------ media streams

    async def _stream_endpoint(self, websocket: WebSocket) -> None:
        await self._serve_stream(websocket, None)

    async def _routed_endpoint(self, websocket: WebSocket, token: str) -> None:
        await self._serve_stream(websocket, token)

    async def _serve_stream(self, websocket: WebSocket, token: str | None) -> None:
        self._streams += 1
        if self._streams == 1:
            self.watchdog.start()
        try:
            await self._serve_stream_watched(websocket, token)
        finally:
            self._streams -= 1
            if self._streams == 0:
                await self.watchdog.stop()

    def unrouted_streams_allowed(self, policy: SignaturePolicy | None = None) -> bool:
        """Whether ``{path}`` without a route token is served (see ``allow_unrouted_streams``)."""
        if self.allow_unrouted_streams is not None:
            return self.allow_unrouted_streams
        return (policy or self._policy()).mode != "enforce"

    async def _serve_stream_watched(self, websocket: WebSocket, token: str | None) -> None:
        policy = self._policy()
        if not check_websocket_signature(websocket, policy):
            await websocket.close(code=1008)
            return
        route: Route | None = None
        if token is not None:
            route = self.registry.claim(token)
            if route is None:
                self._refuse("bad_route", "media stream refused: unknown or expired route token")
                await websocket.close(code=1008)
                return
        elif not self.unrouted_streams_allowed(policy):
            self._refuse("unrouted", "media stream refused: streams need a route token")
            await websocket.close(code=1008)
            return
        # A claimed webhook route brings the slot it reserved; any other stream takes one
        # now, before accepting, so a burst of sockets cannot all pass the check.
        holds_slot = route is not None and route.reserved
        if self.draining and (route is None or route.session is None):
            if holds_slot:
                self.registry.release()
            self._refuse("draining", "media stream refused: the server is draining")
            await _close_try_again_later(websocket)
            return
        if not holds_slot and not self.registry.reserve(self.max_calls):
            self._refuse("busy", "media stream refused: server is at max_calls")
            await _close_try_again_later(websocket)
            return
        session = (
            route.session
            if route is not None and route.session is not None
            else self.session_factory()
        )
        expected = route.call_sid if route is not None else None
        try:
            await websocket.accept()
            await self._run_call(websocket, session, expected)
        finally:
            self.registry.ended(session)
            self.registry.release()

    async def _run_call(self, websocket: Any, session: VoiceSession, expected: str | None) -> None:
        wiring = CallWiring(session, self.hangup_regions)
        call = MediaStreamCall(
            websocket,
            session,
            options=self.stream_options,
            hangup=wiring.hangup,
            on_start=wiring.on_start(self._call_started),
            check_start=lambda start: self._check_start(session, start, expected),
            on_end=wiring.finish,
        )
        try:
            await call.run()
        finally:
            await wiring.finish()
        if not call.started and call.refused is None:
            self._refused.allow("no_start")  # counted; the call logged it

    def _check_start(self, session: VoiceSession, start: Any, expected: str | None) -> str | None:
        reason = self.registry.claim_call(session, start.call_sid, start.stream_sid, expected)
        if reason is not None:
            self._refuse(
                reason,
                "media stream start refused",
                call_sid=clip(start.call_sid),
                expected_call_sid=clip(expected),
            )
        return reason

    def _call_started(self, session: VoiceSession) -> None:
        self.registry.started(session)
        if self.on_call is None:
            return
        if _is_async_callable(self.on_call):
            task = asyncio.create_task(self._run_async_handler(session), name="vr-on-call")
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)
        else:
            self._pool.submit(self._run_sync_handler, session)

    async def _run_async_handler(self, session: VoiceSession) -> None:
        assert self.on_call is not None
        handler = asyncio.ensure_future(self.on_call(session))
        ended = asyncio.ensure_future(session.wait_until_disconnected_async())
        try:
            await asyncio.wait({handler, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not handler.done():
                # Give the handler a moment to finish its post-call work, then end it.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(handler), 5.0)
            if not handler.done():
                handler.cancel()
            with contextlib.suppress(BaseException):
                await handler
            if handler.done() and not handler.cancelled() and handler.exception() is not None:
                logger.error(
                    "call handler failed",
                    exc_info=handler.exception(),
                    extra={"call_sid": session.call_sid},
                )
        finally:
            ended.cancel()
            handler.cancel()

    def _run_sync_handler(self, session: VoiceSession) -> None:
        assert self.on_call is not None
        try:
            self.on_call(session)
        except Exception:
            logger.exception("call handler failed", extra={"call_sid": session.call_sid})

    # ------------------------------------------------------------------ webhooks

    def _refuse_webhook(self, status: int, kind: str, message: str | None = None) -> Response:
        """A refusal; the connection closes, so an unread body is never read."""
        if self.webhook_refusals.allow(kind) and message is not None:
            logger.warning(message, extra={"refused": self.webhook_refusals.count(kind)})
        return Response(status_code=status, headers={"Connection": "close"})

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The webhook's signed form, or the refusal to answer instead.

        Nothing unbounded is read before authentication: with signatures enforced a request
        without ``X-Twilio-Signature`` is refused before its body is read; a body is capped
        at ``max_webhook_bytes`` while it streams in (Content-Length first, a chunked body
        as it arrives). The signature covers the form, so the capped body is parsed once
        (no interpretation yet), then checked.
        """
        policy = self._policy()
        why = refusal_before_body(request, policy)
        if why is not None:
            return self._refuse_webhook(503 if why == "no_public_url" else 403, why)
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            pairs = parse_qsl(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=True,
                max_num_fields=MAX_WEBHOOK_FIELDS,
            )
        except ValueError:  # UnicodeDecodeError is one too
            return self._refuse_webhook(400, "malformed", "webhook refused: malformed form body")
        if not check_request_signature(request, ImmutableMultiDict(pairs), policy):
            return self._refuse_webhook(403, "signature")
        return dict(pairs)

    async def _read_body(self, request: Request) -> bytes | Response:
        cap = self.max_webhook_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                return self._refuse_webhook(
                    400, "malformed", "webhook refused: malformed form body"
                )
            if int(declared) > cap:
                return self._refuse_webhook(413, "too_large", "webhook refused: body too large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.webhook_read_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > cap:
                        break
        except TimeoutError:
            return self._refuse_webhook(
                408, "slow_body", "webhook refused: body arrived too slowly"
            )
        except ClientDisconnect:
            return self._refuse_webhook(400, "disconnect")
        if len(body) > cap:
            return self._refuse_webhook(413, "too_large", "webhook refused: body too large")
        return bytes(body)

    async def _user_callback(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a user callback off the loop; a Response when it is refused or failed."""
        try:
            return await self.callbacks.run(fn, *args)
        except CallbacksBusyError:
            return self._refuse_webhook(503, "callbacks_busy", "webhook refused: callbacks busy")
        except Exception:
            if self.webhook_refusals.allow("callback_failed"):
                logger.exception("webhook callback failed")
            return Response(status_code=500)

    def _busy_answer(self) -> Response:
        self._refuse("draining" if self.draining else "busy", "incoming call refused")
        return Response(_twiml_busy(self.busy_message), media_type=TWIML)

    async def _voice_webhook(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        call_sid = form.get("CallSid", "")
        if not _is_sid(call_sid):
            return self._refuse_webhook(400, "incomplete", "webhook refused: incomplete form")
        if self.draining or self.registry.reserved_count >= self.max_calls:
            # Refused before any user callback runs; the reservation below is the real check.
            return self._busy_answer()
        from voice_runtime.transports.twilio_call import build_route_stream_xml

        params: dict[str, str] = {
            "direction": "inbound",
            "caller_number": form.get("From", ""),
            "called_number": form.get("To", ""),
        }
        if self.inbound_parameters is not None:
            extra = await self._user_callback(self.inbound_parameters, form)
            if isinstance(extra, Response):
                return extra
            if not isinstance(extra, Mapping):
                logger.error("inbound_parameters must return a mapping")
                return Response(status_code=500)
            params.update({str(k): str(v) for k, v in extra.items()})
        params = {k: v for k, v in params.items() if v}
        ttl = min(self.route_ttl_s, self.inbound_route_ttl_s)
        route = _make_route(ttl, params, None, call_sid)
        # The route holds a max_calls slot until its stream claims it or it expires.
        if self.draining or not self.registry.add_reserved_route(route, self.max_calls):
            return self._busy_answer()
        base = self._public_base_for(request)
        xml = build_route_stream_xml(base, route.token, parameters=params, path=self.path)
        return Response(xml, media_type=TWIML)

    def _public_base_for(self, request: Request) -> str:
        try:
            return self._public_base()
        except MissingStreamUrlError:
            # Only reachable with signatures off: enforced ones need a configured URL.
            return request_base_url(request, self._policy())

    async def _emit(self, session: VoiceSession, event: SessionEvent) -> None:
        """Deliver ``event`` to ``on_event`` off the loop, in order per session."""
        handler = session.on_event
        if handler is None:
            return
        if _is_async_callable(handler):
            await self.callbacks.run(_emit_async, handler, event, key=id(session))
        else:
            await self.callbacks.run(session.emit_event, event, key=id(session))

    async def _status_webhook(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        call_sid = form.get("CallSid", "")
        if not _is_sid(call_sid):
            return self._refuse_webhook(400, "incomplete", "webhook refused: incomplete form")
        session = self.registry.by_call_sid(call_sid)
        if session is None:
            return Response(status_code=204)
        status = form.get("CallStatus")
        answered_by = form.get("AnsweredBy")
        try:
            if status:
                fields = {"status": status, **_status_fields(form)}
                await self._emit(session, SessionEvent("call_status", fields))
            if answered_by:
                await self._emit(session, SessionEvent("answered_by", {"answered_by": answered_by}))
            if status in ENDED_STATUSES and not session.is_connected:
                # The call never reached the stream (busy, no answer, ...): release its
                # waiters, after its events (on_disconnected is a user callback too).
                await self.callbacks.run(session.signal_disconnected, key=id(session))
                self.registry.ended(session)
        except CallbacksBusyError:
            return self._refuse_webhook(503, "callbacks_busy", "webhook refused: callbacks busy")
        return Response(status_code=204)

    async def _sms_webhook(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        from voice_runtime.transports.twilio_sms import parse_inbound_sms, sms_reply_twiml

        try:
            sms = parse_inbound_sms(form)
        except ValueError:
            return self._refuse_webhook(400, "incomplete", "webhook refused: incomplete form")
        reply: Any = None
        if self.on_sms is not None:
            reply = await self._user_callback(self.on_sms, sms)
            if isinstance(reply, Response):
                return reply
        return Response(sms_reply_twiml(None if reply is None else str(reply)), media_type=TWIML)

    async def _health(self) -> JSONResponse:
        return JSONResponse(
            {"status": "ok", "live_calls": self.registry.live_count, "draining": self.draining}
        )

    async def _ready(self) -> JSONResponse:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready", "live_calls": self.registry.live_count})

    # ------------------------------------------------------------------ running

    def serve(
        self, *, host: str = "127.0.0.1", port: int | None = None, log_level: str = "info"
    ) -> None:
        """Serve until SIGTERM/SIGINT, then drain live calls and return (blocking)."""
        from voice_runtime.serving import serve_forever

        serve_forever(self, host=host, port=port, log_level=log_level)

    def start_in_thread(self, *, host: str = "127.0.0.1", port: int = 0) -> Any:
        """Serve on a background thread; the returned handle's ``stop()`` drains first."""
        from voice_runtime.serving import BackgroundVoiceServer

        return BackgroundVoiceServer(self, host=host, port=port).start()

    # ------------------------------------------------------------------ draining

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking calls, let live ones finish, then say goodbye and hang up the rest.

        No call is cut mid-sentence: the goodbye is queued behind the audio already queued,
        and each call ends after its last audio's mark. Everything ends within ``timeout``
        (default ``drain_timeout``).
        """
        self.draining = True
        timeout = self.drain_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        goodbye_budget = min(10.0, timeout * 0.4)
        logger.info("draining", extra={"live_calls": self.registry.live_count})
        # Polls a thread-safe counter; 50 ms granularity is plenty for a drain.
        while self.registry.live_count and loop.time() < deadline - goodbye_budget:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        remaining = self.registry.live_sessions()
        if remaining:
            budget = max(0.1, deadline - loop.time() - 0.5)
            await asyncio.gather(
                *(asyncio.wait_for(self._say_goodbye(s), budget) for s in remaining),
                return_exceptions=True,
            )
        while self.registry.live_count and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for session in self.registry.live_sessions():
            session.request_disconnect()
        for task in list(self._call_tasks):
            task.cancel()

    async def _say_goodbye(self, session: VoiceSession) -> None:
        if session.is_disconnected:
            return
        if self.goodbye_tts is not None and self.goodbye:
            tts = self.goodbye_tts
            await asyncio.to_thread(tts.speak, self.goodbye, session)
        session.request_disconnect(after_playback=True)


def _log_evicted(evicted: int) -> None:
    if evicted and log_limiter().allow("route_evicted"):
        logger.warning(
            "route table full: evicted the routes closest to expiry",
            extra={"evicted": evicted, "count": log_limiter().count("route_evicted")},
        )


def _make_route(
    ttl_s: float,
    parameters: Mapping[str, str] | None,
    session: VoiceSession | None,
    call_sid: str | None,
) -> Route:
    return Route(
        token=secrets.token_urlsafe(24),
        expires_at=time.monotonic() + ttl_s,
        parameters=dict(parameters or {}),
        session=session,
        call_sid=call_sid,
    )


async def _close_try_again_later(websocket: WebSocket) -> None:
    # A close code only reaches the client after the handshake (before it, ASGI servers
    # answer HTTP 403), so accept first: 1013 tells the far end to retry later.
    await websocket.accept()
    await websocket.close(code=1013)


def _is_sid(value: str) -> bool:
    # Twilio SIDs are two letters and 32 hex digits; anything else is not Twilio's form.
    return 0 < len(value) <= 64 and value.isascii() and value.isalnum()


async def _emit_async(handler: Callable[[SessionEvent], Any], event: SessionEvent) -> None:
    try:
        await handler(event)
    except Exception:
        logger.exception("on_event callback failed", extra={"event": event.kind})


def _status_fields(form: Mapping[str, str]) -> dict[str, str]:
    keys = (
        "CallDuration",
        "SequenceNumber",
        "Timestamp",
        "CallbackSource",
        "SipResponseCode",
        "Direction",
    )
    return {k: form[k] for k in keys if k in form}
