"""A lean RFC 6455 server protocol for uvicorn, with a direct path for media streams.

uvicorn's own websocket protocols put every message through an ASGI dict, an
``asyncio.Queue``, a pause/resume of the socket and Starlette's wrapper, and every send through
the same layers in reverse. With 50 caller frames a second per call those layers were about a
third of the server's CPU in ``benchmarks/bench_calls.py``.

:class:`VoiceWebSocketProtocol` is a complete ASGI websocket protocol (any FastAPI/Starlette
websocket route works on it unchanged) that also offers the app a direct channel through the
``voice_runtime.fastws`` scope extension: ``MediaStreamCall`` (``transports.twilio_ws``)
attaches a callback that gets each text message synchronously from ``data_received``, and
writes its frames straight to the transport.

Use it with ``uvicorn.Config(app, ws=VoiceWebSocketProtocol)`` or, on the command line,
``uvicorn app:app --ws voice_runtime.transports.fastws:VoiceWebSocketProtocol``;
:func:`voice_runtime.serving.serve_forever` and the test servers use it by default.

The frames are parsed by the sans-I/O codec in :mod:`~voice_runtime.transports.wscodec`; the
ASGI scope, ``send`` and the app task are in :mod:`~voice_runtime.transports.fastws_asgi`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

from voice_runtime.transports.fastws_asgi import EXTENSION, asgi_send, build_scope, run_app
from voice_runtime.transports.guard import ConnectionLimits, abort, note
from voice_runtime.transports.wscodec import (
    MAX_FRAGMENTS,
    MAX_REQUEST,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    ProtocolError,
    WebSocketProtocolError,
    accept_response,
    close_payload,
    frame_header,
    handshake_problem,
    parse_close,
    parse_request,
    refusal_response,
    unmask,
)

__all__ = [
    "EXTENSION",
    "MAX_FRAGMENTS",
    "ProtocolError",
    "VoiceWebSocketProtocol",
    "WebSocketProtocolError",
    "frame_header",
    "unmask",
]

logger = logging.getLogger("uvicorn.error")

# Pull mode only: stop reading the socket while this many messages wait for the app.
_PAUSE_AT = 64
_RESUME_AT = 16
# On server shutdown a connection whose bytes have not left by then is aborted: the drain
# already gave the calls their time.
SHUTDOWN_GRACE_S = 1.0


class VoiceWebSocketProtocol(asyncio.Protocol):
    """uvicorn websocket protocol: full ASGI websocket support plus a direct media channel.

    The direct channel (``scope["extensions"]["voice_runtime.fastws"]["stream"]`` is this
    object) offers :meth:`attach`, :meth:`send_text`, :attr:`writable`, :meth:`wait_writable`
    and :meth:`close`. Before :meth:`attach`, messages wait in a bounded buffer for the ASGI
    ``receive``; after it, each one goes to the callback as it is parsed.

    :attr:`limits` bounds the connection: a close that does not complete within
    ``close_timeout_s`` aborts the transport, and a peer over its frame budget is closed
    with 1008. :meth:`with_limits` makes a subclass with other limits.
    """

    limits: ConnectionLimits = ConnectionLimits()

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[VoiceWebSocketProtocol]:
        """A subclass of this protocol that applies ``limits``."""
        return type(cls.__name__, (cls,), {"limits": limits, "__module__": cls.__module__})

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_running_loop()  # uvicorn builds it in data_received
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers: list[tuple[bytes, bytes]] = server_state.default_headers
        self.max_size: int = config.ws_max_size
        self.ping_interval: float | None = config.ws_ping_interval
        self.ping_timeout: float | None = config.ws_ping_timeout
        self.close_timeout = self.limits.close_timeout_s
        # The sans-I/O codec parses frames; this class does the I/O, ASGI and timers.
        self._parser = FrameParser(
            self._deliver,
            self._control,
            max_size=self.max_size,
            frame_rate=self.limits.ws_frames_per_s,
            frame_burst=self.limits.ws_frame_burst,
            clock=self.loop.time,
        )

        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.scope: dict[str, Any] = {}
        self._request = b""
        self._key = b""
        # open: handshake parsed; accepted: 101 sent; close_sent: our close frame went out.
        self.handshake_done = False
        self.accepted = False
        self.close_sent = False
        self.close_received = False
        self.disconnected = False
        self.disconnect_code = 1006
        self.disconnect_reason = ""
        self._denial: tuple[int, list[tuple[bytes, bytes]], list[bytes]] | None = None

        self._events: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._writable = True
        self._drained: asyncio.Future[None] | None = None
        self._on_text: Callable[[str], None] | None = None
        self._on_bytes: Callable[[bytes], None] | None = None
        self._on_close: Callable[[int], None] | None = None

        self._close_timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport; uvicorn replays the upgrade request next."""
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone: end the app's side (1006 unless a close was exchanged)."""
        self._lost = True
        self._stop_keepalive()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.connections.discard(self)
        self._set_writable(True)
        self._disconnected(self.disconnect_code)

    def eof_received(self) -> bool | None:
        """Half-close from the peer: let the transport close."""
        return None

    def pause_writing(self) -> None:
        """The transport's write buffer is above its high-water mark."""
        self._set_writable(False)

    def resume_writing(self) -> None:
        """The transport's write buffer drained."""
        self._set_writable(True)

    def shutdown(self) -> None:
        """uvicorn is stopping: tell the app (1012) and close the connection (bounded)."""
        self._stop_keepalive()
        if self.accepted and not self.close_sent:
            self._send_close(1012)
            self._disconnected(1012)
        elif self.handshake_done and not self.close_sent and self._denial is None:
            self.close_sent = True
            self._write_response(500, b"Internal Server Error")
        self._close_transport(min(self.close_timeout, SHUTDOWN_GRACE_S))

    def data_received(self, data: bytes) -> None:
        """Parse what arrived: the upgrade request first, then frames."""
        if not self.handshake_done:
            self._receive_request(data)
            return
        if self.close_received or self.transport.is_closing():
            return
        try:
            self._parser.feed(data)
        except ProtocolError as exc:
            self._fail(exc.code, exc.reason, exc.kind)

    # ------------------------------------------------------------------ handshake

    def _receive_request(self, data: bytes) -> None:
        self._request += data
        end = self._request.find(b"\r\n\r\n")
        if end < 0:
            if len(self._request) > MAX_REQUEST:
                self._reject_now(431, "request headers too large")
            return
        raw, rest = self._request[:end], self._request[end + 4 :]
        self._request = b""
        self.handshake_done = True
        try:
            req = parse_request(raw)
        except ProtocolError as exc:
            self._reject_now(exc.code, exc.reason)
            return
        problem = handshake_problem(req)
        if problem is not None:
            self._reject_now(*problem)
            return
        self._key = req.get(b"sec-websocket-key") or b""
        self.scope = build_scope(self, req)
        self._events.append({"type": "websocket.connect"})
        task = self.loop.create_task(run_app(self))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if rest:
            self.data_received(rest)

    def _reject_now(self, status: int, reason: str) -> None:
        note("refused_upgrade", "WebSocket upgrade refused", status=status, reason=reason)
        headers = [(b"sec-websocket-version", b"13")] if status == 426 else []
        self.close_sent = True
        self._write_response(status, reason.encode(), headers)
        self._close_transport()

    def _write_response(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        head = list(self.default_headers) + (headers or [])
        self.transport.write(refusal_response(status, head, body))

    # ------------------------------------------------------------------ frames in

    def _deliver(self, opcode: int, payload: bytes) -> bool:
        """Hand one message to the app; False once parsing should stop (closing)."""
        if self.close_sent:
            return not self.transport.is_closing()  # past our close: no more messages
        if opcode == OP_TEXT:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError(1007, "text message is not valid UTF-8") from None
            on_text = self._on_text
            if on_text is not None:
                on_text(text)
            else:
                self._push({"type": "websocket.receive", "text": text})
        else:
            on_bytes = self._on_bytes
            if on_bytes is not None:
                on_bytes(payload)
            else:
                self._push({"type": "websocket.receive", "bytes": payload})
        return not self.transport.is_closing()

    def _control(self, opcode: int, payload: bytes) -> bool:
        """Answer a ping, note a pong, or complete a close; False once parsing should stop."""
        if opcode == OP_PING:
            # A peer that pings but does not read gets no pongs while our write buffer is
            # over its high-water mark (RFC 6455 lets us answer only the latest ping).
            if not self.close_sent and self._writable:
                self.transport.write(frame_header(OP_PONG, len(payload)) + payload)
        elif opcode == OP_PONG:
            if self._ping_payload is not None and payload == self._ping_payload:
                self._ping_payload = None
                # Without a ping timeout _send_ping already scheduled the next ping: doing it
                # here too would start one more ping chain per answered ping.
                if self._pong_timer is not None:
                    self._pong_timer.cancel()
                    self._pong_timer = None
                    self._schedule_ping()
        else:
            self._peer_closed(payload)
            return False
        return not self.transport.is_closing()

    def _peer_closed(self, payload: bytes) -> None:
        self.close_received = True
        code, reason = parse_close(payload)
        self.disconnect_code, self.disconnect_reason = code, reason
        if not self.close_sent:
            # Echo the code (an empty close is answered with an empty one).
            self.close_sent = True
            echo = payload[:2]
            self.transport.write(frame_header(OP_CLOSE, len(echo)) + echo)
        self._disconnected(code, reason)
        self._close_transport()

    def _fail(self, code: int, reason: str, kind: str = "protocol_error") -> None:
        note(kind, "WebSocket connection failed", client=self.scope.get("client"), reason=reason)
        if self.accepted and not self.close_sent:
            self._send_close(code, reason)
        self._disconnected(code, reason)
        self._close_transport()

    # ------------------------------------------------------------------ delivery to the app

    def _push(self, event: dict[str, Any]) -> None:
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if len(self._events) >= _PAUSE_AT and not self._read_paused and not self.disconnected:
            self._read_paused = True
            self.transport.pause_reading()

    def _disconnected(self, code: int, reason: str = "") -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnect_code = code
        on_close = self._on_close
        self._on_text = self._on_bytes = self._on_close = None
        if on_close is not None:
            on_close(code)
        self._push({"type": "websocket.disconnect", "code": code, "reason": reason})

    def attach(
        self,
        on_text: Callable[[str], None],
        on_close: Callable[[int], None],
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        """Deliver every further message to the callbacks, from ``data_received``.

        Messages that arrived before go to them now, in order. ``on_close`` gets the close code
        once, when the connection ends. A callback must not raise.
        """
        self._on_text, self._on_close = on_text, on_close
        self._on_bytes = on_bytes or (lambda _data: None)
        events, self._events = self._events, collections.deque()
        for event in events:
            if event["type"] != "websocket.receive":
                continue
            if "text" in event:
                on_text(event["text"])
            else:
                self._on_bytes(event["bytes"])
        if self.disconnected:
            self._on_text = self._on_bytes = self._on_close = None
            on_close(self.disconnect_code)
        self._resume_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and not self.disconnected:
            self._read_paused = False
            self.transport.resume_reading()

    async def receive(self) -> dict[str, Any]:
        """ASGI receive."""
        while not self._events:
            if self.disconnected:
                return {"type": "websocket.disconnect", "code": self.disconnect_code}
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._events.popleft()
        if self._read_paused and len(self._events) <= _RESUME_AT:
            self._resume_reading()
        return event

    # ------------------------------------------------------------------ frames out

    @property
    def writable(self) -> bool:
        """False while the transport's write buffer is above its high-water mark."""
        return self._writable

    def _set_writable(self, value: bool) -> None:
        self._writable = value
        if value and self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    async def wait_writable(self) -> None:
        """Wait until the write buffer is below its high-water mark (or the peer is gone)."""
        if self._writable or self.disconnected:
            return
        if self._drained is None:
            self._drained = self.loop.create_future()
        await self._drained

    def send_text(self, text: str) -> bool:
        """Send one text message; False once the connection is closing or closed."""
        return self.send_texts((text,))

    def send_texts(self, texts: Sequence[str]) -> bool:
        """Send several text messages with one socket write; False once closing or closed."""
        if self.close_sent or self.disconnected or not self.accepted:
            return False
        parts = []
        for text in texts:
            data = text.encode("utf-8")
            parts.append(frame_header(OP_TEXT, len(data)))
            parts.append(data)
        # One write: one syscall and one segment for the peer, instead of one per message.
        self.transport.write(b"".join(parts))
        return True

    def send_bytes(self, data: bytes) -> bool:
        """Send one binary message; False once the connection is closing or closed."""
        if self.close_sent or self.disconnected or not self.accepted:
            return False
        self.transport.write(frame_header(OP_BINARY, len(data)) + data)
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (idempotent); the socket closes on the peer's reply."""
        if self.close_sent or self.disconnected:
            return
        if not self.accepted:
            self._deny_with_403()
            return
        self._send_close(code, reason)

    def _send_close(self, code: int, reason: str = "") -> None:
        self.close_sent = True
        payload = close_payload(code, reason)
        self.transport.write(frame_header(OP_CLOSE, len(payload)) + payload)
        self._resume_reading()  # the peer's reply must get through
        if self._close_timer is None and not self.transport.is_closing():
            self._close_timer = self.loop.call_later(self.close_timeout, self._close_expired)

    def _close_transport(self, bound: float | None = None) -> None:
        """Close the TCP connection; abort it if the close has not completed within ``bound``.

        ``transport.close()`` alone waits for the write buffer to drain: forever when the peer
        stopped reading, holding the fd (and, through the app, the call's slot).
        """
        self.transport.close()
        if self._lost:
            return
        when = self.loop.time() + (self.close_timeout if bound is None else bound)
        timer = self._close_timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._close_timer = self.loop.call_at(when, self._close_expired)

    def _close_expired(self) -> None:
        self._close_timer = None
        if self._lost:
            return
        if self.transport.is_closing() or self.transport.get_write_buffer_size():
            # Our bytes (the close frame among them) never left: the peer is not reading.
            abort(self.transport)
        else:
            # The peer never answered our close frame; nothing is pending, so close now.
            self.transport.close()

    def _deny_with_403(self) -> None:
        self.close_sent = True
        self._write_response(403, b"")
        self._disconnected(1006)
        self._close_transport()

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI send."""
        await asgi_send(self, message)

    def _accept(self, message: dict[str, Any]) -> None:
        headers = list(self.default_headers)
        headers += [(bytes(n), bytes(v)) for n, v in message.get("headers") or []]
        self.accepted = True
        self.transport.write(accept_response(self._key, headers, message.get("subprotocol")))
        self._schedule_ping()

    # ------------------------------------------------------------------ keepalive

    def _schedule_ping(self) -> None:
        interval = self.ping_interval
        if interval and interval > 0 and not self.close_sent and not self.disconnected:
            self._ping_timer = self.loop.call_later(interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping_timer = None
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self._ping_payload = struct.pack("!I", random.getrandbits(32))
        self.transport.write(frame_header(OP_PING, 4) + self._ping_payload)
        if self.ping_timeout and self.ping_timeout > 0:
            self._pong_timer = self.loop.call_later(self.ping_timeout, self._pong_missing)
        else:
            self._schedule_ping()

    def _pong_missing(self) -> None:
        self._pong_timer = None
        if not self.close_sent and not self.disconnected:
            self._fail(1011, "keepalive ping timeout", "keepalive_timeout")

    def _stop_keepalive(self) -> None:
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = None
        self._ping_payload = None
