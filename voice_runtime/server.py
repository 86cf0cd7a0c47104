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
import inspect
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse

from voice_runtime.config import settings
from voice_runtime.errors import ConfigurationError, MissingStreamUrlError
from voice_runtime.logutil import log_limited
from voice_runtime.providers import TtsProvider
from voice_runtime.session import VoiceSession
from voice_runtime.transports.security import (
    SignaturePolicy,
    check_request_signature,
    check_websocket_signature,
)
from voice_runtime.transports.twilio_ws import MediaStreamCall, StreamOptions, _rest_hangup
from voice_runtime.types import SessionEvent
from voice_runtime.watchdog import LoopWatchdog

logger = logging.getLogger(__name__)

TWIML = "application/xml"
MAX_WEBHOOK_BYTES = 64 * 1024
ENDED_STATUSES = frozenset({"completed", "busy", "no-answer", "canceled", "failed"})

__all__ = ["CallRegistry", "Route", "VoiceServer"]


@dataclass
class Route:
    """A one-time route token for one expected media stream."""

    token: str
    expires_at: float
    parameters: dict[str, str] = field(default_factory=dict)
    session: VoiceSession | None = None
    call_sid: str | None = None


class CallRegistry:
    """Live sessions by call SID, stream SID and route token (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._by_call: dict[str, VoiceSession] = {}
        self._by_stream: dict[str, VoiceSession] = {}
        self._live: set[int] = set()
        self._sessions: dict[int, VoiceSession] = {}
        self._call_waiters: dict[str, threading.Event] = {}

    def add_route(self, route: Route) -> None:
        """Remember a route until it is claimed or expires."""
        with self._lock:
            self._prune(time.monotonic())
            self._routes[route.token] = route
            if route.session is not None and route.call_sid:
                self._by_call[route.call_sid] = route.session

    def claim(self, token: str) -> Route | None:
        """Take a route for its stream; None when unknown, used or expired."""
        now = time.monotonic()
        with self._lock:
            route = self._routes.pop(token, None)
            self._prune(now)
        if route is None or route.expires_at < now:
            return None
        return route

    def _prune(self, now: float) -> None:
        for token in [t for t, r in self._routes.items() if r.expires_at < now]:
            del self._routes[token]

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
    response.say(message)
    response.hangup()
    return str(response)


class VoiceServer:
    """Serves Twilio calls, one session per call, on a FastAPI app.

    ``on_call(session)`` runs once the call's stream starts: a plain function runs in a
    worker thread, a coroutine function as a task on the loop.
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
        trust_forwarded_headers: bool = False,
        max_calls: int = 200,
        route_ttl_s: float = 300.0,
        allow_unrouted_streams: bool = True,
        inbound_parameters: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None,
        on_sms: Callable[[Any], str | None] | None = None,
        busy_message: str = "All our lines are busy right now. Please call again later.",
        drain_timeout: float = 30.0,
        goodbye: str = "We have to end this call now. Please call again. Goodbye.",
        goodbye_tts: TtsProvider | None = None,
        stream_options: StreamOptions | None = None,
        hangup_regions: Any = None,
        watchdog: LoopWatchdog | None = None,
    ) -> None:
        self.on_call = on_call
        self.session_factory = session_factory
        self.path = "/" + path.strip("/")
        self.webhook_prefix = "/" + webhook_prefix.strip("/")
        self.public_url = public_url
        self.trust_forwarded_headers = trust_forwarded_headers
        self.max_calls = max_calls
        self.route_ttl_s = route_ttl_s
        self.allow_unrouted_streams = allow_unrouted_streams
        self.inbound_parameters = inbound_parameters
        self.on_sms = on_sms
        self.busy_message = busy_message
        self.drain_timeout = drain_timeout
        self.goodbye = goodbye
        self.goodbye_tts = goodbye_tts
        self.stream_options = stream_options or StreamOptions()
        self.hangup_regions = hangup_regions
        self.registry = CallRegistry()
        self.draining = False
        self.refused_busy = 0
        self._call_tasks: set[asyncio.Task[Any]] = set()
        self._threads: set[threading.Thread] = set()
        # Watches the event loop while media streams are served: a blocking call in a
        # handler delays every call's audio, and the warning says so.
        self.watchdog = watchdog or LoopWatchdog()
        self._streams = 0
        self.app = app or FastAPI(title="voice_runtime", lifespan=self._lifespan)
        if app is not None:
            self._wrap_lifespan(app)
        self._install(self.app)

    # ------------------------------------------------------------------ app wiring

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        yield
        await self.drain()

    def _wrap_lifespan(self, app: FastAPI) -> None:
        inner = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: Any) -> AsyncIterator[Any]:
            async with inner(a) as state:
                yield state
            await self.drain()

        app.router.lifespan_context = lifespan

    def _policy(self) -> SignaturePolicy:
        return SignaturePolicy.from_settings(
            public_base_url=self.public_url, trust_forwarded_headers=self.trust_forwarded_headers
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
        route = Route(
            token=secrets.token_urlsafe(24),
            expires_at=time.monotonic() + self.route_ttl_s,
            parameters=dict(parameters or {}),
            session=session,
            call_sid=call_sid,
        )
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

    async def _serve_stream_watched(self, websocket: WebSocket, token: str | None) -> None:
        if not check_websocket_signature(websocket, self._policy()):
            await websocket.close(code=1008)
            return
        route: Route | None = None
        if token is not None:
            route = self.registry.claim(token)
            if route is None:
                log_limited(
                    logger, "bad_route", "media stream refused: unknown or expired route token"
                )
                await websocket.close(code=1008)
                return
        elif not self.allow_unrouted_streams:
            await websocket.close(code=1008)
            return
        if self.draining and (route is None or route.session is None):
            await _close_try_again_later(websocket)
            return
        if self.registry.live_count >= self.max_calls:
            self.refused_busy += 1
            log_limited(logger, "busy", "media stream refused: server is at max_calls")
            await _close_try_again_later(websocket)
            return
        session = (
            route.session
            if route is not None and route.session is not None
            else self.session_factory()
        )
        await websocket.accept()
        call = MediaStreamCall(
            websocket,
            session,
            options=self.stream_options,
            hangup=_rest_hangup(self.hangup_regions),
            on_start=self._call_started,
        )
        try:
            await call.run()
        finally:
            self.registry.ended(session)

    def _call_started(self, session: VoiceSession) -> None:
        self.registry.started(session)
        if self.on_call is None:
            return
        if _is_async_callable(self.on_call):
            task = asyncio.create_task(self._run_async_handler(session), name="vr-on-call")
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)
        else:
            thread = threading.Thread(
                target=self._run_sync_handler, args=(session,), name="vr-on-call", daemon=True
            )
            self._threads.add(thread)
            thread.start()

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
        finally:
            self._threads.discard(threading.current_thread())

    # ------------------------------------------------------------------ webhooks

    async def _form(self, request: Request) -> dict[str, str] | None:
        # Twilio posts application/x-www-form-urlencoded; parsing it here avoids needing
        # python-multipart (Starlette's request.form()) and bounds the body size.
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BYTES:
            log_limited(
                logger, "big_webhook", "webhook refused: body too large", extra={"bytes": len(body)}
            )
            return None
        data = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        if not check_request_signature(request, data, self._policy()):
            return None
        return data

    async def _voice_webhook(self, request: Request) -> Response:
        form = await self._form(request)
        if form is None:
            return Response(status_code=403)
        if self.draining or self.registry.live_count >= self.max_calls:
            self.refused_busy += 1
            return Response(_twiml_busy(self.busy_message), media_type=TWIML)
        from voice_runtime.transports.twilio_call import build_route_stream_xml

        params: dict[str, str] = {
            "direction": "inbound",
            "caller_number": form.get("From", ""),
            "called_number": form.get("To", ""),
        }
        if self.inbound_parameters is not None:
            params.update({str(k): str(v) for k, v in self.inbound_parameters(form).items()})
        params = {k: v for k, v in params.items() if v}
        route = self.new_route(parameters=params, call_sid=form.get("CallSid") or None)
        base = self._public_base_for(request)
        xml = build_route_stream_xml(base, route.token, parameters=params, path=self.path)
        return Response(xml, media_type=TWIML)

    def _public_base_for(self, request: Request) -> str:
        try:
            return self._public_base()
        except MissingStreamUrlError:
            url = request.url
            scheme = url.scheme
            netloc = url.netloc
            if self.trust_forwarded_headers:
                scheme = request.headers.get("x-forwarded-proto", scheme).split(",")[0].strip()
                netloc = request.headers.get("x-forwarded-host", netloc).split(",")[0].strip()
            return f"{scheme}://{netloc}"

    async def _status_webhook(self, request: Request) -> Response:
        form = await self._form(request)
        if form is None:
            return Response(status_code=403)
        call_sid = form.get("CallSid", "")
        session = self.registry.by_call_sid(call_sid) if call_sid else None
        if session is None:
            return Response(status_code=204)
        status = form.get("CallStatus")
        if status:
            session.emit_event(
                SessionEvent("call_status", {"status": status, **_status_fields(form)})
            )
        answered_by = form.get("AnsweredBy")
        if answered_by:
            session.emit_event(SessionEvent("answered_by", {"answered_by": answered_by}))
        if status in ENDED_STATUSES and not session.is_connected:
            # The call never reached the stream (busy, no answer, ...): release its waiters.
            session.signal_disconnected()
            self.registry.ended(session)
        return Response(status_code=204)

    async def _sms_webhook(self, request: Request) -> Response:
        form = await self._form(request)
        if form is None:
            return Response(status_code=403)
        from voice_runtime.transports.twilio_sms import parse_inbound_sms, sms_reply_twiml

        reply: str | None = None
        if self.on_sms is not None:
            result = self.on_sms(parse_inbound_sms(form))
            reply = await result if inspect.isawaitable(result) else result
        return Response(sms_reply_twiml(reply), media_type=TWIML)

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


async def _close_try_again_later(websocket: WebSocket) -> None:
    # A close code only reaches the client after the handshake (before it, ASGI servers
    # answer HTTP 403), so accept first: 1013 tells the far end to retry later.
    await websocket.accept()
    await websocket.close(code=1013)


def _is_async_callable(fn: Any) -> bool:
    """True for coroutine functions and for objects whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the bound __call__ of an instance
    )


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
