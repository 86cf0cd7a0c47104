"""VoiceServer: many concurrent calls in one process, inbound and outbound, with draining.

Every media stream gets its own :class:`~voice_runtime.session.VoiceSession` from a factory.
Sessions are found by call SID, stream SID and route token, so an outbound script gets the
session of the call it placed and no audio, mark, transcript or intent of one call can reach
another. The pieces live beside this module and are re-exported here:
:mod:`voice_runtime.calls` (:class:`Route`, :class:`CallRegistry`, the sync handler pool) and
:mod:`voice_runtime.webhooks` (the HTTP handlers, which VoiceServer inherits). Routes::

    WS   /voice, /voice/{token}     Twilio Media Streams
    POST /twilio/voice              incoming-call webhook -> <Connect><Stream> (or busy TwiML)
    POST /twilio/status             call-status and async AMD callbacks -> session events
    POST /twilio/sms                incoming-SMS webhook (when ``on_sms`` is given)
    GET  /health, /ready            liveness; readiness is 503 while draining
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI, WebSocket

from voice_runtime._callbacks import CallbackRunner, CallbacksBusyError
from voice_runtime._sync import forbid_on_loop, run_loop_cleanups, running_loop
from voice_runtime.call_lifecycle import CallLifecycle
from voice_runtime.call_wiring import CallWiring, stt_factory_for
from voice_runtime.calls import CallRegistry, HandlerPool, Route, make_route
from voice_runtime.cluster import Cluster, cluster_for
from voice_runtime.config import settings
from voice_runtime.errors import ConfigurationError, MissingStreamUrlError
from voice_runtime.events import EventBus
from voice_runtime.logutil import LogLimiter, clip
from voice_runtime.observability import install as install_observability
from voice_runtime.providers import SttProvider, TtsProvider
from voice_runtime.session import VoiceSession
from voice_runtime.transports.security import (
    IPNetwork,
    SignaturePolicy,
    TrustedProxies,
    check_public_url,
    check_websocket_signature,
    require_public_url,
    trusted_networks,
)
from voice_runtime.transports.twilio_ws import MediaStreamCall, StreamOptions
from voice_runtime.urls import http_base
from voice_runtime.watchdog import LoopWatchdog
from voice_runtime.webhooks import ENDED_STATUSES as ENDED_STATUSES
from voice_runtime.webhooks import MAX_WEBHOOK_BYTES as MAX_WEBHOOK_BYTES
from voice_runtime.webhooks import MAX_WEBHOOK_FIELDS as MAX_WEBHOOK_FIELDS
from voice_runtime.webhooks import TWIML as TWIML
from voice_runtime.webhooks import WEBHOOK_READ_TIMEOUT_S, WebhookRoutes

logger = logging.getLogger(__name__)

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


class VoiceServer(CallLifecycle, WebhookRoutes):
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

    When ``on_call`` raises or returns while the call is up, its queued audio plays, then the
    call ends; a raise is logged, emitted as ``SessionEvent("handler_failed")`` and first
    speaks ``error_message`` with ``error_tts`` (or ``goodbye_tts``) when both are set.

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

    ``console=True`` serves the live call console at ``/console`` and the browser phone at
    ``/phone``, token-protected when reachable from outside (docs/console-and-phone.md).
    ``cluster``: a :class:`~voice_runtime.cluster.Cluster` or a Redis URL makes this server one
    instance of a cluster (signed route tokens naming it, call owners and control on Redis,
    hand-off when full; see docs/scaling.md); None uses VOICE_REDIS_URL when set, and without
    it the server runs alone and never imports Redis; False never joins one.
    """

    _stt_in_thread = True  # build each call's STT off the loop (see call_wiring.CallWiring)

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
        error_message: str | None = None,
        error_tts: TtsProvider | None = None,
        stream_options: StreamOptions | None = None,
        hangup_regions: Any = None,
        watchdog: LoopWatchdog | None = None,
        max_webhook_bytes: int = MAX_WEBHOOK_BYTES,
        callback_workers: int = 8,
        max_pending_callbacks: int = 64,
        stt: str | list[str] | Callable[[], SttProvider] | None = None,
        console: bool = False,
        console_token: str | None = None,
        metrics: bool | None = None,
        tracing: Any = None,
        cluster: Cluster | str | bool | None = None,
    ) -> None:
        if max_webhook_bytes < 1:
            raise ConfigurationError("max_webhook_bytes must be at least 1")
        if callback_workers < 1 or max_pending_callbacks < 1:
            raise ConfigurationError("callback_workers and max_pending_callbacks must be >= 1")
        if public_url is not None:
            check_public_url(public_url)
        self.on_call = on_call
        #: The call event stream of every call this server runs (see voice_runtime.events).
        self.events = EventBus()
        # Every call's STT: a provider name (create_stt) or a factory; a session's own wins.
        self.stt_factory = stt_factory_for(stt)
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
        self.error_message = error_message
        self.error_tts = error_tts
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
        self._pool = HandlerPool(lambda: self.max_calls)
        self._threads = self._pool.threads
        # Watches the event loop while media streams are served: a blocking call in a
        # handler delays every call's audio, and the warning says so.
        self.watchdog = watchdog or LoopWatchdog()
        self._streams = 0
        # No /docs, /redoc or /openapi.json: a phone endpoint need not publish its API map.
        self.app = app or FastAPI(
            title="voice_runtime",
            lifespan=self._lifespan,
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )
        if app is not None:
            self._wrap_lifespan(app)
        # Prometheus /metrics (on an app of our own unless asked) and OpenTelemetry spans,
        # from self.events (docs/observability.md); before the routes, so {path} stays last.
        if metrics is None and app is not None:
            metrics = False
        self.observability = install_observability(self, metrics=metrics, tracing=tracing)
        self.console: Any = None  # /console and /phone: voice_runtime.console.WebConsole
        if console:
            from voice_runtime.console import install_console

            install_console(self, token=console_token)
        self._install(self.app)
        # A Cluster, a Redis URL, or None: VOICE_REDIS_URL when set, else one process alone.
        self.cluster = cluster_for(cluster)
        if self.cluster is not None:
            self.cluster.attach(self)

    @property
    def refusals(self) -> dict[str, int]:
        """Refused webhooks, streams and starts so far, by reason (see docs/calls.md)."""
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
        await self._on_startup_async()
        yield
        await self._on_shutdown()

    def _wrap_lifespan(self, app: FastAPI) -> None:
        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            await self._on_startup_async()
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

    async def _on_startup_async(self) -> None:
        self._on_startup()
        if self.cluster is not None:
            await self.cluster.start()

    async def _on_shutdown(self) -> None:
        await self.drain()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.callbacks.aclose()
        await run_loop_cleanups()

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
        # A cluster instance is also reached (and signed for) at its own URL.
        own = self.cluster.instance_url if self.cluster is not None else None
        return SignaturePolicy.from_settings(
            public_base_url=self.public_url,
            trust_forwarded_headers=self._trusted_proxies,
            other_base_urls=(own,) if own else (),
        )

    def _install(self, app: FastAPI) -> None:
        app.add_api_websocket_route(self.path, self._stream_endpoint)
        app.add_api_websocket_route(self.path + "/{token}", self._routed_endpoint)
        app.add_api_route(self.webhook_prefix + "/voice", self._voice_webhook, methods=["POST"])
        app.add_api_route(self.webhook_prefix + "/status", self._status_webhook, methods=["POST"])
        app.add_api_route(self.webhook_prefix + "/sms", self._sms_webhook, methods=["POST"])
        app.add_api_route(
            self.webhook_prefix + "/whisper/{token}/{step}", self._whisper_webhook, methods=["POST"]
        )
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
        token = self._route_token(self.route_ttl_s, call_sid)
        route = make_route(self.route_ttl_s, parameters, session, call_sid, token=token)
        self.registry.add_route(route)
        return route

    def session_for_call(self, call_sid: str, timeout: float = 0.0) -> VoiceSession | None:
        """The session of ``call_sid``; waits up to ``timeout`` for its stream to start.

        Waiting blocks: LoopThreadError on an event loop thread (wait in a worker thread).
        """
        if timeout <= 0:
            return self.registry.by_call_sid(call_sid)
        forbid_on_loop(running_loop(), "VoiceServer.session_for_call")
        return self.registry.wait_for_call(call_sid, timeout)

    def _route_token(self, ttl_s: float, call_sid: str | None = None) -> str | None:
        # In a cluster a token is signed and names this instance; alone, a random one.
        return None if self.cluster is None else self.cluster.issue_token(ttl_s, call_sid)

    def _public_base(self) -> str:
        own = self.cluster.instance_url if self.cluster is not None else None
        base = own or self.public_url or settings().voice_public_url or settings().voice_stream_url
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
        self._bind_outbound(session, route, call_sid, phone)
        return session

    async def place_call_async(
        self, phone: str, *, parameters: Mapping[str, str] | None = None, **options: Any
    ) -> VoiceSession:
        """Async twin of :meth:`place_call`."""
        from voice_runtime.transports import twilio_call

        session, route = self._outbound_route(parameters, await self._new_session())
        self._default_callbacks(options)
        call_sid = await twilio_call.initiate_outbound_call_async(
            phone,
            stream_url=self._public_base(),
            route_token=route.token,
            parameters=route.parameters,
            **options,
        )
        self._bind_outbound(session, route, call_sid, phone)
        return session

    def _outbound_route(
        self, parameters: Mapping[str, str] | None, session: VoiceSession | None = None
    ) -> tuple[VoiceSession, Route]:
        if self.draining:
            raise ConfigurationError("the server is draining and places no new calls")
        if session is None:  # place_call: called from the user's thread, not the loop
            session = self.session_factory()
        params = {"direction": "outbound", **dict(parameters or {})}
        return session, self.new_route(parameters=params, session=session)

    def _bind_outbound(
        self, session: VoiceSession, route: Route, call_sid: str, phone: str = ""
    ) -> None:
        session.call_sid = call_sid
        route.call_sid = call_sid
        self.registry.bind_call(call_sid, session)
        if self.cluster is not None:
            self.cluster.call_started(call_sid, "outbound", phone)

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
        base = http_base(base)
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
            why = None
            if self.cluster is None:
                route = self.registry.claim(token)
            else:  # refused before accept when another instance owns it, forged or expired
                route, why = self.cluster.claim_route(token, self.registry)
            if route is None:
                self._refuse(
                    "bad_route", why or "media stream refused: unknown or expired route token"
                )
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
        expected = route.call_sid if route is not None else None
        try:
            session = (
                route.session
                if route is not None and route.session is not None
                else await self._new_session()
            )
        except CallbacksBusyError:
            self.registry.release()
            self._refuse("callbacks_busy", "media stream refused: callbacks busy")
            await _close_try_again_later(websocket)
            return
        except BaseException:
            self.registry.release()
            raise
        try:
            await websocket.accept()
            await self._run_call(websocket, session, expected)
        finally:
            self.registry.ended(session)
            self.registry.release()
            if self.cluster is not None:
                self.cluster.call_ended(session.call_sid)

    async def _new_session(self) -> VoiceSession:
        if self.session_factory is VoiceSession:
            return VoiceSession()  # the default factory runs no user code
        # session_factory is user code: it runs in a worker thread (or on the loop if async).
        session: VoiceSession = await self.callbacks.run(self.session_factory)
        return session

    async def _run_call(self, websocket: Any, session: VoiceSession, expected: str | None) -> None:
        session.port.callbacks.runner = self.callbacks
        session.port.events.bus = self.events
        wiring = CallWiring(
            session,
            self.hangup_regions,
            stt_factory=self.stt_factory,
            in_thread=self._stt_in_thread,
        )
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
        if reason is None and self.cluster is not None:
            params = start.custom_parameters
            self.cluster.call_started(
                start.call_sid, params.get("direction", ""), params.get("caller_number")
            )
        if reason is not None:
            self._refuse(
                reason,
                "media stream start refused",
                call_sid=clip(start.call_sid),
                expected_call_sid=clip(expected),
            )
        return reason

    # ------------------------------------------------------------------ webhooks
    # The webhook and health handlers are inherited from voice_runtime.webhooks.WebhookRoutes.

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


async def _close_try_again_later(websocket: WebSocket) -> None:
    # A close code only reaches the client after the handshake (before it, ASGI servers
    # answer HTTP 403), so accept first: 1013 tells the far end to retry later.
    await websocket.accept()
    await websocket.close(code=1013)
