"""HTTP and websocket routes of the console and the browser phone.

Routes (only when ``VoiceServer(console=True)``)::

    GET  /console, /phone              the pages (``?token=`` sets the console cookie)
    GET  /console/static/{name}        their CSS and JavaScript, shipped in the package
    GET  /console/api/calls            live and recently ended calls (JSON)
    GET  /console/api/calls/{sid}/events   one call's event stream (server-sent events)
    POST /phone/api/call               a fresh route for one browser call (JSON)
    WS   /phone/stream/{token}         the browser's media stream while signatures are enforced

Every route but the static files needs :class:`~voice_runtime.console.auth.ConsoleAuth`.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections import OrderedDict
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from voice_runtime.calls import make_route
from voice_runtime.console.auth import COOKIE, ConsoleAuth
from voice_runtime.console.board import CallBoard
from voice_runtime.console.stream import call_event_stream
from voice_runtime.logutil import LogLimiter

if TYPE_CHECKING:
    from voice_runtime.server import VoiceServer

logger = logging.getLogger(__name__)

__all__ = ["PHONE_ROUTE_TTL_S", "WebConsole"]

PHONE_ROUTE_TTL_S = 30.0
"""A phone route must be used this soon after the page asked for it."""
MAX_PHONE_ROUTES = 64
MAX_VIEWERS = 8
"""Event streams open at once; more get 503 (each costs a subscriber and a level tap)."""
MAX_API_BODY = 4096
MAX_PARAMETERS = 16
MAX_PARAMETER_CHARS = 200
STATIC = {
    "style.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "phone.js": "text/javascript; charset=utf-8",
    "phone-worklet.js": "text/javascript; charset=utf-8",
}
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self)",
    # Same-origin scripts only; 'self' covers the page's own ws:/wss: origin in Chromium.
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'",
}


def _asset(name: str) -> bytes:
    return resources.files("voice_runtime.console").joinpath("static", name).read_bytes()


class WebConsole:
    """The console and browser phone of one VoiceServer (see the module docstring)."""

    def __init__(self, server: VoiceServer, *, token: str | None = None) -> None:
        self.server = server
        self.auth = ConsoleAuth(token, lambda: server._policy().public_base_url)
        self.refusals = LogLimiter(first=3, every=1000)
        self._pages = {name: _asset(f"{name}.html") for name in ("console", "phone")}
        self._static = {name: _asset(name) for name in STATIC}
        # Tokens of routes handed to phone pages (bounded: the oldest go first).
        self._phone_routes: OrderedDict[str, float] = OrderedDict()
        #: Open event streams (at most MAX_VIEWERS).
        self.viewers = 0

    @property
    def token(self) -> str:
        """The console token (generated when none was given)."""
        return self.auth.token

    def url(self, base: str, page: str = "console", *, with_token: bool = True) -> str:
        """The address of a page under ``base`` (``http://host:port``), with the token."""
        url = f"{base.rstrip('/')}/{page}"
        return f"{url}?token={self.token}" if with_token else url

    def install(self, app: Any) -> None:
        """Add the routes to ``app`` (a FastAPI app)."""
        app.add_api_route("/console", self._console_page, methods=["GET"])
        app.add_api_route("/phone", self._phone_page, methods=["GET"])
        app.add_api_route("/console/static/{name}", self._static_file, methods=["GET"])
        app.add_api_route("/phone/api/call", self._phone_call, methods=["POST"])
        # A plain ASGI endpoint: it hands the connection on to the media-stream route.
        app.router.routes.append(WebSocketRoute("/phone/stream/{token}", _Asgi(self._phone_stream)))
        self._install_console_api(app)

    def _install_console_api(self, app: Any) -> None:
        self.board = CallBoard(self.server)
        app.add_api_route("/console/api/calls", self._calls, methods=["GET"])
        app.add_api_route("/console/api/calls/{call_sid}/events", self._events, methods=["GET"])

    # ------------------------------------------------------------------ console API

    async def _calls(self, request: Request) -> Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        body = {
            "calls": self.board.rows(),
            "live_calls": self.server.registry.live_count,
            "draining": self.server.draining,
        }
        return Response(json.dumps(body), media_type="application/json", headers=PAGE_HEADERS)

    async def _events(self, request: Request, call_sid: str) -> Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        card = self.board.card(call_sid)
        if card is None:
            return Response(status_code=404)
        if self.viewers >= MAX_VIEWERS:
            return self._refuse("too_many_viewers", 503)
        content = request.query_params.get("content") == "1"
        self.viewers += 1
        return _ViewerResponse(
            call_event_stream(self.server, self.board, card, content=content),
            release=self._release_viewer,
            media_type="text/event-stream",
            headers={**PAGE_HEADERS, "X-Accel-Buffering": "no"},
        )

    def _release_viewer(self) -> None:
        self.viewers -= 1

    # ------------------------------------------------------------------ auth helpers

    def _refuse(self, kind: str, status: int = 401) -> Response:
        if self.refusals.allow(kind):
            count = self.refusals.count(kind)
            logger.warning("console request refused", extra={"reason": kind, "count": count})
        return Response(status_code=status, headers={"Connection": "close"})

    def _gate(self, conn: HTTPConnection, *, acting: bool = False) -> Response | None:
        """None when the request may go on, else the refusal to answer."""
        if acting and not self.auth.same_origin(conn):
            return self._refuse("cross_origin", 403)
        if not self.auth.allowed(conn):
            return self._refuse("unauthorized")
        return None

    # ------------------------------------------------------------------ pages

    async def _console_page(self, request: Request) -> Response:
        return self._page(request, "console")

    async def _phone_page(self, request: Request) -> Response:
        return self._page(request, "phone")

    def _page(self, request: Request, name: str) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if not self.auth.token_ok(given):
                self._refuse("bad_token")
                return Response(
                    _NEED_TOKEN, status_code=401, media_type="text/html", headers=PAGE_HEADERS
                )
            # Move the token into a cookie and out of the address bar and history.
            response = RedirectResponse(request.url.path, status_code=303)
            response.set_cookie(
                COOKIE,
                self.token,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return response
        if not self.auth.allowed(request):
            return Response(
                _NEED_TOKEN, status_code=401, media_type="text/html", headers=PAGE_HEADERS
            )
        return Response(self._pages[name], media_type="text/html", headers=PAGE_HEADERS)

    async def _static_file(self, name: str) -> Response:
        body = self._static.get(name)
        if body is None:
            return Response(status_code=404)
        return Response(
            body,
            media_type=STATIC[name],
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    # ------------------------------------------------------------------ browser phone

    async def _phone_call(self, request: Request) -> Response:
        refused = self._gate(request, acting=True)
        if refused is not None:
            return refused
        if self.server.draining:
            return Response(status_code=503)
        body = await _read_capped(request, MAX_API_BODY)
        params = _phone_parameters(body)
        if params is None:
            return Response("bad parameters", status_code=400)
        call_sid = "CA" + secrets.token_hex(16)
        params = {"direction": "inbound", "caller": "browser-phone", **params}
        route = make_route(PHONE_ROUTE_TTL_S, params, None, call_sid)
        self.server.registry.add_route(route)
        now = time.monotonic()
        self._phone_routes[route.token] = now + PHONE_ROUTE_TTL_S
        while len(self._phone_routes) > MAX_PHONE_ROUTES:
            self._phone_routes.popitem(last=False)
        # The browser cannot sign its upgrade as Twilio does: while signatures are enforced it
        # connects to /phone/stream/{token}, which checks the operator instead (below).
        signed = self.server._policy().mode == "enforce"
        path = f"/phone/stream/{route.token}" if signed else f"{self.server.path}/{route.token}"
        payload = {
            "call_sid": call_sid,
            "account_sid": "AC" + "0" * 32,
            "parameters": params,
            "stream_path": path,
        }
        return Response(json.dumps(payload), media_type="application/json", headers=PAGE_HEADERS)

    async def _phone_stream(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        websocket = WebSocket(scope, receive, send)
        token = scope.get("path_params", {}).get("token", "")
        expires = self._phone_routes.pop(token, None)
        if (
            expires is None
            or expires < time.monotonic()
            or not self.auth.same_origin(websocket)
            or not self.auth.allowed(websocket)
        ):
            self._refuse("phone_stream")
            await websocket.close(code=1008)
            return
        # The operator is authenticated and the route is one this console issued: sign the
        # upgrade with the server's own auth token, so the media-stream route serves it
        # exactly as it serves Twilio's (route claim, admission, call SID check).
        from twilio.request_validator import RequestValidator

        from voice_runtime.transports.security import public_url_for

        policy = self.server._policy()
        signature = ""
        if policy.mode == "enforce" and policy.auth_token:
            url = public_url_for(websocket, policy, websocket=True)
            signature = RequestValidator(policy.auth_token).compute_signature(url, {})
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"x-twilio-signature"]
        headers.append((b"x-twilio-signature", signature.encode("ascii")))
        signed = WebSocket({**scope, "headers": headers}, receive, send)
        await self.server._routed_endpoint(signed, token)


class _ViewerResponse(StreamingResponse):
    """A streaming response that gives its viewer slot back however it ends."""

    def __init__(self, content: Any, *, release: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _Asgi:
    """A coroutine as a plain ASGI app (Starlette would wrap a function or method)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.fn(scope, receive, send)


async def _read_capped(request: Request, cap: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > cap):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)


def _phone_parameters(body: bytes | None) -> dict[str, str] | None:
    """The page's stream parameters: a small mapping of short strings, else None."""
    if body is None:
        return None
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return None
    params = data.get("parameters", {}) if isinstance(data, dict) else None
    if not isinstance(params, dict) or len(params) > MAX_PARAMETERS:
        return None
    out: dict[str, str] = {}
    for key, value in params.items():
        if not isinstance(value, str) or not key or len(key) + len(value) > MAX_PARAMETER_CHARS:
            return None
        out[key] = value
    return out


_NEED_TOKEN = b"""<!doctype html><meta charset="utf-8"><title>voice_runtime console</title>
<body style="font-family:system-ui;background:#0f1419;color:#e6edf3;padding:40px">
<h1>Token needed</h1><p>This server is reachable from outside, so its console needs the token.
Open the address <code>voice-runtime serve --console</code> printed (it ends in
<code>?token=...</code>), or read <code>VoiceServer.console.token</code>.</p></body>"""
