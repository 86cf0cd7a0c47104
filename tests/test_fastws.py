"""VoiceWebSocketProtocol over real loopback sockets: RFC 6455 framing, ASGI, direct channel.

Well-formed traffic goes through the ``websockets`` sync client (a strict RFC 6455 peer that
also validates what the server writes); malformed traffic is hand-built and written on a
plain socket after a hand-made upgrade handshake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.responses import Response
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from voice_runtime.serving import uvicorn_config
from voice_runtime.testing.server import ServerThread
from voice_runtime.transports.fastws import EXTENSION, MAX_FRAGMENTS, VoiceWebSocketProtocol
from voice_runtime.transports.guard import ConnectionLimits

TIMEOUT = 5.0
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
# RFC 6455 section 1.3: this key must be answered with this accept value.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_MAX = 1 << 20  # ws_max_size set by uvicorn_config

# --------------------------------------------------------------------------- wire helpers


def masked(payload: bytes, key: bytes) -> bytes:
    """XOR a payload with a 4-byte mask the slow, obvious way (a test oracle)."""
    return bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    key: bytes = b"\x37\xfa\x21\x3d",
    length: int | None = None,
) -> bytes:
    """One client frame; ``length`` overrides the declared payload length."""
    n = len(payload) if length is None else length
    head = bytes(((0x80 if fin else 0) | (rsv << 4) | opcode,))
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes((mask_bit | n,))
    elif n < 1 << 16:
        head += bytes((mask_bit | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((mask_bit | 127,)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    return head + key + masked(payload, key)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass
class ServerFrame:
    """A frame as the server wrote it; ``length_form`` is 7, 16 or 64 (bits of length)."""

    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    length_form: int
    masked: bool

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")


def upgrade_request(
    path: str = "/echo",
    *,
    key: str | None = RFC_KEY,
    version: str | None = "13",
    extra: tuple[str, ...] = (),
    connection: str = "Upgrade",
) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket"]
    lines.append(f"Connection: {connection}")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RawClient:
    """A plain TCP socket speaking hand-built HTTP and frames; every read has a timeout."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names; repeated ones joined by ', ') and body."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        body = self._take(int(headers.get("content-length", "0")))
        return int(status), headers, body

    def handshake(self, path: str = "/echo", **kwargs: Any) -> dict[str, str]:
        self.send(upgrade_request(path, **kwargs))
        status, headers, _ = self.read_response()
        assert status == 101, (status, headers)
        return headers

    def read_frame(self) -> ServerFrame:
        b0, b1 = self._take(2)
        length = b1 & 0x7F
        form = 7
        if length == 126:
            length, form = int.from_bytes(self._take(2), "big"), 16
        elif length == 127:
            length, form = int.from_bytes(self._take(8), "big"), 64
        is_masked = bool(b1 & 0x80)
        key = self._take(4) if is_masked else b""
        payload = self._take(length)
        if is_masked:
            payload = masked(payload, key)
        return ServerFrame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload, form, is_masked)

    def expect_eof(self, timeout: float = TIMEOUT) -> None:
        """The server closes the TCP connection (FIN) within ``timeout``, sending nothing more."""
        assert self.buf == b""
        self.sock.settimeout(timeout)
        try:
            extra = self.sock.recv(65536)
        finally:
            self.sock.settimeout(TIMEOUT)
        assert extra == b"", f"unexpected bytes after the close: {extra!r}"

    def expect_close(self) -> ServerFrame:
        """The next frame is a well-formed close, and the TCP connection ends right after it."""
        got = self.read_frame()
        assert got.opcode == OP_CLOSE, got
        assert got.fin and not got.masked and got.rsv == 0
        self.expect_eof()
        return got


def ws_connect(port: int, path: str, **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("open_timeout", TIMEOUT)
    kwargs.setdefault("close_timeout", TIMEOUT)
    return connect(f"ws://127.0.0.1:{port}{path}", compression=None, **kwargs)


def assert_echo_works(port: int) -> None:
    """A fresh well-formed connection still gets its messages echoed."""
    with ws_connect(port, "/echo") as ws:
        ws.send("still serving")
        assert ws.recv(timeout=TIMEOUT) == "still serving"
        ws.send(b"\x00\x01")
        assert ws.recv(timeout=TIMEOUT) == b"\x00\x01"


# --------------------------------------------------------------------------- the app


class Inbox:
    """Per-test mailboxes (keyed by a token in the query string): the app posts, tests read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[str, queue.Queue[Any]] = {}

    def box(self, token: str) -> queue.Queue[Any]:
        with self._lock:
            return self._boxes.setdefault(token, queue.Queue())

    def put(self, token: str, item: Any) -> None:
        self.box(token).put(item)

    def get(self, token: str) -> Any:
        return self.box(token).get(timeout=TIMEOUT)


class Gates:
    """asyncio events on the server loop, opened from the test thread."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}  # touched on the server loop only
        self.loop: asyncio.AbstractEventLoop | None = None

    def _event(self, token: str) -> asyncio.Event:
        return self._events.setdefault(token, asyncio.Event())

    async def wait(self, token: str) -> None:
        await asyncio.wait_for(self._event(token).wait(), TIMEOUT)

    def open(self, token: str) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(lambda: self._event(token).set())


def build_app(inbox: Inbox, gates: Gates) -> FastAPI:
    """A small app with one websocket route per behaviour under test."""
    app = FastAPI()

    @app.websocket("/echo")
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await ws.send_text(message["text"])
                else:
                    await ws.send_bytes(message["bytes"])

    @app.websocket("/probe")
    async def probe(ws: WebSocket) -> None:
        inbox.put(ws.query_params["id"], "ran")
        await ws.accept()
        await ws.close()

    @app.websocket("/scope/{name}")
    async def scope_route(ws: WebSocket, name: str) -> None:
        offered = ws.scope["subprotocols"]
        await ws.accept(
            subprotocol="chat.v1" if "chat.v1" in offered else None,
            headers=[(b"x-extra", b"yes")],
        )
        scope = ws.scope
        await ws.send_json(
            {
                "name": name,
                "type": scope["type"],
                "path": scope["path"],
                "raw_path": scope["raw_path"].decode("latin-1"),
                "query_string": scope["query_string"].decode("latin-1"),
                "query": dict(ws.query_params),
                "probe_header": ws.headers.get("x-probe"),
                "scheme": scope["scheme"],
                "client_host": scope["client"][0],
                "server_port": scope["server"][1],
                "subprotocols": offered,
                "stream_is_protocol": isinstance(
                    scope["extensions"][EXTENSION]["stream"], VoiceWebSocketProtocol
                ),
                "denial_extension": "websocket.http.response" in scope["extensions"],
            }
        )
        await ws.close()

    async def echo_until_closed(ws: WebSocket) -> WebSocketDisconnect:
        await ws.accept()
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect as exc:
            return exc

    @app.websocket("/record")
    async def record(ws: WebSocket) -> None:
        closed = await echo_until_closed(ws)
        inbox.put(ws.query_params["id"], (closed.code, closed.reason))

    @app.websocket("/server-close")
    async def server_close(ws: WebSocket) -> None:
        await ws.accept()
        reason = ws.query_params.get("reason", "bye")
        await ws.close(code=4000, reason=reason)

    @app.websocket("/deny")
    async def deny(ws: WebSocket) -> None:
        await ws.close()

    @app.websocket("/crash-before-accept")
    async def crash_before_accept(ws: WebSocket) -> None:
        raise RuntimeError("app bug before accept")

    @app.websocket("/crash-after-accept")
    async def crash_after_accept(ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive_text()
        raise RuntimeError("app bug after accept")

    @app.websocket("/no-accept")
    async def no_accept(ws: WebSocket) -> None:
        return None

    @app.websocket("/denial")
    async def denial(ws: WebSocket) -> None:
        await ws.send_denial_response(
            Response(b"not a teapot socket", status_code=418, headers={"x-reason": "teapot"})
        )

    @app.websocket("/denial-chunked")
    async def denial_chunked(ws: WebSocket) -> None:
        await ws.send(
            {
                "type": "websocket.http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Basic")],
            }
        )
        await ws.send(
            {"type": "websocket.http.response.body", "body": b"part1-", "more_body": True}
        )
        await ws.send({"type": "websocket.http.response.body", "body": b"part2"})

    @app.websocket("/gated")
    async def gated(ws: WebSocket) -> None:
        token = ws.query_params["id"]
        await ws.accept()
        await gates.wait(token)
        received: list[str] = []
        while (text := await ws.receive_text()) != "end":
            received.append(text)
        inbox.put(token, received)
        await ws.send_text(f"got {len(received)}")
        with contextlib.suppress(WebSocketDisconnect):
            await ws.receive_text()

    @app.websocket("/hold")
    async def hold(ws: WebSocket) -> None:
        inbox.put("hold", (await echo_until_closed(ws)).code)

    @app.websocket("/direct")
    async def direct(ws: WebSocket) -> None:
        token = ws.query_params["id"]
        await ws.accept()
        stream: VoiceWebSocketProtocol = ws.scope["extensions"][EXTENSION]["stream"]
        await gates.wait(token)
        texts: list[str] = []
        closes: list[int] = []
        closed = asyncio.Event()

        def on_text(text: str) -> None:
            texts.append(text)
            if text == "quit":
                stream.close(4005, "direct bye")
            else:
                stream.send_text("echo:" + text)

        def on_bytes(data: bytes) -> None:
            stream.send_bytes(data[::-1])

        def on_close(code: int) -> None:
            closes.append(code)
            closed.set()

        stream.attach(on_text, on_close, on_bytes)
        await asyncio.wait_for(closed.wait(), TIMEOUT)
        # The lists, not copies: the test reads them again once the socket is gone.
        inbox.put(token, (texts, closes, stream.send_text("late")))

    @app.websocket("/flood")
    async def flood(ws: WebSocket) -> None:
        token = ws.query_params["id"]
        await ws.accept()
        stream: VoiceWebSocketProtocol = ws.scope["extensions"][EXTENSION]["stream"]
        chunk = b"\xab" * 65536
        sent = 0
        # Write until the transport's buffer passes its high-water mark (the client's socket
        # buffers fill first); the cap only guards against a machine with huge buffers.
        while stream.writable and sent < 2048:
            assert stream.send_bytes(chunk)
            sent += 1
        inbox.put(token, ("unwritable", sent, stream.writable))
        await asyncio.wait_for(stream.wait_writable(), TIMEOUT)
        inbox.put(token, ("writable", stream.writable))
        await ws.send_text("drained")
        with contextlib.suppress(WebSocketDisconnect):
            await ws.receive_text()

    return app


@dataclass
class Served:
    port: int
    inbox: Inbox
    gates: Gates


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One server (the library's default config) shared by the tests of this module."""
    inbox, gates = Inbox(), Gates()
    with ServerThread(build_app(inbox, gates)) as srv:
        gates.loop = srv.loop
        yield Served(srv.port, inbox, gates)


@contextlib.contextmanager
def serve_config(config: uvicorn.Config) -> Iterator[int]:
    """Serve a custom uvicorn.Config on a free 127.0.0.1 port in a thread; yield the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=lambda: asyncio.run(server.serve(sockets=[sock])), name="fastws-test", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive(), "server failed to start"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.005)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive()


class ErrorLog(logging.Handler):
    """Collects ERROR records: a protocol crash in data_received is logged by asyncio."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self.allowed: set[str] = set()
        self.loggers = [logging.getLogger("asyncio"), logging.getLogger("uvicorn.error")]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def watch(self) -> None:
        # (Re)attach: each new uvicorn.Config re-runs dictConfig, which drops our handler.
        for log in self.loggers:
            if self not in log.handlers:
                log.addHandler(self)

    def unexpected(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.getMessage() not in self.allowed]


@pytest.fixture(autouse=True)
def server_errors() -> Iterator[ErrorLog]:
    """Fail any test during which the server logged an error it did not expect."""
    handler = ErrorLog()
    handler.watch()
    yield handler
    for log in handler.loggers:
        log.removeHandler(handler)
    assert handler.unexpected() == []


def token() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- handshake


def test_handshake_answers_101_with_the_rfc_accept_value(served: Served) -> None:
    with RawClient(served.port) as client:
        client.send(upgrade_request("/echo", key=RFC_KEY))
        status, headers, body = client.read_response()
        assert status == 101
        assert headers["upgrade"].lower() == "websocket"
        assert "upgrade" in headers["connection"].lower()
        assert headers["sec-websocket-accept"] == RFC_ACCEPT
        assert "sec-websocket-protocol" not in headers
        assert body == b""
        # The connection is a websocket now.
        client.send(frame(OP_TEXT, b"after handshake"))
        got = client.read_frame()
        assert (got.opcode, got.payload, got.fin, got.masked) == (
            OP_TEXT,
            b"after handshake",
            True,
            False,
        )


def test_handshake_accept_value_for_a_random_key_and_no_extension_negotiated(
    served: Served,
) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    with RawClient(served.port) as client:
        headers = client.handshake(
            "/echo",
            key=key,
            connection="keep-alive, Upgrade",
            extra=("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",),
        )
        expected = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == expected
        # No extension is implemented, so none may be agreed (RSV1 would then be illegal).
        assert "sec-websocket-extensions" not in headers


@pytest.mark.parametrize(
    ("key", "version", "status"),
    [
        (None, "13", 400),
        ("not base64 at all!", "13", 400),
        (base64.b64encode(b"fifteen bytes!!").decode(), "13", 400),
        (RFC_KEY, "8", 426),
        (RFC_KEY, None, 426),
    ],
    ids=["missing-key", "garbage-key", "short-key", "version-8", "missing-version"],
)
def test_refused_upgrade_gets_an_http_error_and_the_app_never_runs(
    served: Served, key: str | None, version: str | None, status: int
) -> None:
    probe = token()
    with RawClient(served.port) as client:
        client.send(upgrade_request(f"/probe?id={probe}", key=key, version=version))
        got_status, headers, _ = client.read_response()
        assert got_status == status
        if status == 426:
            assert headers["sec-websocket-version"] == "13"
        client.expect_eof()
    # A valid upgrade to the same route runs the app exactly once: the refused one never did.
    with ws_connect(served.port, f"/probe?id={probe}") as ws, pytest.raises(ConnectionClosed):
        ws.recv(timeout=TIMEOUT)
    box = served.inbox.box(probe)
    assert box.get(timeout=TIMEOUT) == "ran"
    assert box.empty()


def test_subprotocol_accept_headers_path_and_query_reach_the_app(served: Served) -> None:
    with ws_connect(
        served.port,
        "/scope/a%20b?x=1&y=two%20words",
        subprotocols=["chat.v2", "chat.v1"],
        additional_headers={"X-Probe": "probe-value"},
    ) as ws:
        assert ws.subprotocol == "chat.v1"
        assert ws.response is not None
        assert ws.response.headers["x-extra"] == "yes"
        seen = json.loads(ws.recv(timeout=TIMEOUT))
    assert seen == {
        "name": "a b",
        "type": "websocket",
        "path": "/scope/a b",
        "raw_path": "/scope/a%20b",
        "query_string": "x=1&y=two%20words",
        "query": {"x": "1", "y": "two words"},
        "probe_header": "probe-value",
        "scheme": "ws",
        "client_host": "127.0.0.1",
        "server_port": served.port,
        "subprotocols": ["chat.v2", "chat.v1"],
        "stream_is_protocol": True,
        "denial_extension": True,
    }


def test_no_subprotocol_header_when_the_app_picks_none(served: Served) -> None:
    with RawClient(served.port) as client:
        headers = client.handshake(
            "/scope/x",
            extra=("Sec-WebSocket-Protocol: other", "Sec-WebSocket-Protocol: another"),
        )
        assert "sec-websocket-protocol" not in headers
        got = client.read_frame()
        assert got.opcode == OP_TEXT
        assert b'"subprotocols":["other","another"]' in got.payload


# --------------------------------------------------------------------------- echo and framing


@pytest.mark.parametrize("size", [0, 1, 125, 126, 300, 65535, 65536, 70_000, DEFAULT_MAX])
def test_websockets_client_round_trips_text_and_binary(served: Served, size: int) -> None:
    text = ("héllo wörld " * (size // 12 + 1)).encode()[:size].decode("utf-8", "ignore")
    data = os.urandom(size)
    with ws_connect(served.port, "/echo", max_size=None) as ws:
        ws.send(text)
        assert ws.recv(timeout=TIMEOUT) == text
        ws.send(data)
        assert ws.recv(timeout=TIMEOUT) == data


@pytest.mark.parametrize(
    ("size", "form"), [(0, 7), (125, 7), (126, 16), (65535, 16), (65536, 64), (70_000, 64)]
)
def test_raw_echo_uses_minimal_length_encoding(served: Served, size: int, form: int) -> None:
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    with RawClient(served.port) as client:
        client.handshake()
        client.send(frame(OP_BINARY, payload))
        got = client.read_frame()
        assert (got.opcode, got.fin, got.rsv, got.masked) == (OP_BINARY, True, 0, False)
        assert got.length_form == form
        assert got.payload == payload


def test_fragmented_text_is_reassembled_with_a_ping_in_the_middle(served: Served) -> None:
    text = "Hé llo wörld"
    raw = text.encode()
    # Split inside the two-byte "é" so UTF-8 is only valid for the whole message.
    cut = raw.index("é".encode()) + 1
    with RawClient(served.port) as client:
        client.handshake()
        client.send(frame(OP_TEXT, raw[:cut], fin=False))
        client.send(frame(OP_PING, b"mid"))
        client.send(frame(OP_CONT, raw[cut:-3], fin=False))
        client.send(frame(OP_CONT, raw[-3:]))
        pong = client.read_frame()
        assert (pong.opcode, pong.payload) == (OP_PONG, b"mid")
        got = client.read_frame()
        assert (got.opcode, got.fin, got.payload.decode()) == (OP_TEXT, True, text)


def test_fragmented_binary_and_empty_fragments(served: Served) -> None:
    with RawClient(served.port) as client:
        client.handshake()
        client.send(
            frame(OP_BINARY, b"ab", fin=False)
            + frame(OP_CONT, b"", fin=False)
            + frame(OP_CONT, b"cd", fin=False)
            + frame(OP_CONT, b"")
        )
        got = client.read_frame()
        assert (got.opcode, got.payload) == (OP_BINARY, b"abcd")
        # Fragmentation state was reset: a plain message works next.
        client.send(frame(OP_TEXT, b"next"))
        assert client.read_frame().payload == b"next"


def test_empty_messages_round_trip(served: Served) -> None:
    with RawClient(served.port) as client:
        client.handshake()
        client.send(frame(OP_TEXT, b""))
        got = client.read_frame()
        assert (got.opcode, got.payload) == (OP_TEXT, b"")
        client.send(frame(OP_BINARY, b""))
        got = client.read_frame()
        assert (got.opcode, got.payload) == (OP_BINARY, b"")


def test_several_frames_in_one_tcp_write_keep_their_order(served: Served) -> None:
    messages = [(OP_TEXT, f"message {i}".encode()) for i in range(20)]
    messages += [(OP_BINARY, bytes([i]) * 300) for i in range(5)]
    with RawClient(served.port) as client:
        client.handshake()
        client.send(b"".join(frame(op, data) for op, data in messages) + frame(OP_PING, b"end"))
        for op, data in messages:
            got = client.read_frame()
            if got.opcode == OP_PONG:  # the pong is written at once, echoes by the app later
                assert got.payload == b"end"
                got = client.read_frame()
            assert (got.opcode, got.payload) == (op, data)


def test_one_frame_written_byte_by_byte_is_still_parsed(served: Served) -> None:
    payload = b"x" * 130 + "ü".encode()  # 16-bit length form, multi-byte UTF-8 at the end
    with RawClient(served.port) as client:
        client.handshake()
        for byte in frame(OP_TEXT, payload):
            client.send(bytes((byte,)))
            time.sleep(0.0005)  # TCP_NODELAY is set: each byte leaves as its own segment
        got = client.read_frame()
        assert (got.opcode, got.payload) == (OP_TEXT, payload)


@pytest.mark.parametrize("payload", [b"", b"hello", bytes(range(125))], ids=["0", "5", "125"])
def test_ping_gets_a_pong_with_the_same_payload(served: Served, payload: bytes) -> None:
    with RawClient(served.port) as client:
        client.handshake()
        client.send(frame(OP_PING, payload))
        got = client.read_frame()
        assert (got.opcode, got.payload, got.fin) == (OP_PONG, payload, True)
        # An unsolicited pong is ignored, the connection stays usable.
        client.send(frame(OP_PONG, b"unasked") + frame(OP_TEXT, b"ok"))
        got = client.read_frame()
        assert (got.opcode, got.payload) == (OP_TEXT, b"ok")


# --------------------------------------------------------------------------- protocol errors


def _big_header(length: int) -> bytes:
    return bytes((0x80 | OP_BINARY, 0x80 | 127)) + length.to_bytes(8, "big") + b"\x01\x02\x03\x04"


PROTOCOL_ERRORS = {
    "unmasked": (frame(OP_TEXT, b"hi", mask=False), 1002),
    "rsv1": (frame(OP_TEXT, b"hi", rsv=4), 1002),
    "rsv2": (frame(OP_TEXT, b"hi", rsv=2), 1002),
    "rsv3": (frame(OP_BINARY, b"hi", rsv=1), 1002),
    "opcode-3": (frame(0x3, b"x"), 1002),
    "opcode-7": (frame(0x7, b""), 1002),
    "opcode-B": (frame(0xB, b"x"), 1002),
    "opcode-F": (frame(0xF, b""), 1002),
    "continuation-without-start": (frame(OP_CONT, b"x"), 1002),
    "text-inside-fragmented": (frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002),
    "binary-inside-fragmented": (frame(OP_TEXT, b"a", fin=False) + frame(OP_BINARY, b"b"), 1002),
    "ping-126-bytes": (frame(OP_PING, b"p" * 126), 1002),
    "pong-200-bytes": (frame(OP_PONG, b"p" * 200), 1002),
    "close-126-bytes": (frame(OP_CLOSE, close_payload(1000, b"r" * 124)), 1002),
    "ping-not-final": (frame(OP_PING, b"p", fin=False), 1002),
    "close-not-final": (frame(OP_CLOSE, close_payload(1000), fin=False), 1002),
    "invalid-utf8": (frame(OP_TEXT, b"ok \xff\xfe"), 1007),
    "truncated-utf8": (frame(OP_TEXT, "é".encode()[:1]), 1007),
    "invalid-utf8-fragmented": (
        frame(OP_TEXT, b"ok ", fin=False) + frame(OP_CONT, b"\xc0\xaf"),
        1007,
    ),
    "over-max-size": (_big_header(DEFAULT_MAX + 1), 1009),
    "over-max-size-64bit": (_big_header(1 << 62), 1009),
    "close-code-1005": (frame(OP_CLOSE, close_payload(1005)), 1002),
    "close-code-1006": (frame(OP_CLOSE, close_payload(1006)), 1002),
    "close-code-1004": (frame(OP_CLOSE, close_payload(1004)), 1002),
    "close-code-1015": (frame(OP_CLOSE, close_payload(1015)), 1002),
    "close-code-999": (frame(OP_CLOSE, close_payload(999)), 1002),
    "close-code-2999": (frame(OP_CLOSE, close_payload(2999)), 1002),
    "close-code-5000": (frame(OP_CLOSE, close_payload(5000)), 1002),
    "close-one-byte": (frame(OP_CLOSE, b"\x03"), 1002),
    "close-reason-invalid-utf8": (frame(OP_CLOSE, close_payload(1000, b"\xff")), 1007),
    # Empty fragments stay under the size limit; their number is bounded too.
    "too-many-fragments": (
        frame(OP_TEXT, b"a", fin=False) + frame(OP_CONT, b"", fin=False) * MAX_FRAGMENTS,
        1009,
    ),
}


@pytest.mark.parametrize(("data", "code"), PROTOCOL_ERRORS.values(), ids=PROTOCOL_ERRORS.keys())
def test_protocol_error_is_answered_with_its_close_code(
    served: Served, data: bytes, code: int
) -> None:
    rid = token()
    with RawClient(served.port) as client:
        client.handshake(f"/record?id={rid}")
        # What follows the bad frame in the same write must be ignored (no pong).
        client.send(data + frame(OP_PING, b"after"))
        got = client.expect_close()
        assert got.close_code == code
    assert served.inbox.get(rid)[0] == code  # the app was told, with the same code
    assert_echo_works(served.port)


def test_protocol_error_after_good_frames_in_the_same_write(served: Served) -> None:
    with RawClient(served.port) as client:
        client.handshake()
        client.send(frame(OP_PING, b"1") + frame(OP_TEXT, b"x", mask=False))
        assert client.read_frame().payload == b"1"  # the pong for the frame before the error
        assert client.expect_close().close_code == 1002


@pytest.fixture(scope="module")
def small_max_port() -> Iterator[int]:
    """A server with ws_max_size=1000, to test the limit on fragmented messages."""
    inbox, gates = Inbox(), Gates()
    config = uvicorn.Config(
        build_app(inbox, gates),
        ws=VoiceWebSocketProtocol,
        ws_max_size=1000,
        lifespan="off",
        log_level="warning",
        log_config=None,
    )
    with serve_config(config) as port:
        yield port


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([frame(OP_BINARY, b"x" * 1000)], None),
        ([frame(OP_BINARY, b"x" * 1001)], 1009),
        ([frame(OP_TEXT, b"x" * 500, fin=False), frame(OP_CONT, b"y" * 500)], None),
        ([frame(OP_TEXT, b"x" * 600, fin=False), frame(OP_CONT, b"y" * 600)], 1009),
        (
            [frame(OP_TEXT, b"x" * 400, fin=False)]
            + [frame(OP_CONT, b"y" * 400, fin=False)]
            + [frame(OP_CONT, b"z" * 400)],
            1009,
        ),
    ],
    ids=["exactly-max", "single-over", "fragments-at-max", "fragments-over", "three-fragments"],
)
def test_message_size_limit_counts_the_whole_fragmented_message(
    small_max_port: int, frames: list[bytes], code: int | None
) -> None:
    with RawClient(small_max_port) as client:
        client.handshake()
        for data in frames:
            client.send(data)
        if code is None:
            got = client.read_frame()
            assert len(got.payload) == 1000
        else:
            assert client.expect_close().close_code == code
    assert_echo_works(small_max_port)


# --------------------------------------------------------------------------- closing


def test_client_close_reaches_the_app_and_the_code_is_echoed(served: Served) -> None:
    rid = token()
    with RawClient(served.port) as client:
        client.handshake(f"/record?id={rid}")
        client.send(frame(OP_TEXT, b"before"))
        assert client.read_frame().payload == b"before"
        client.send(frame(OP_CLOSE, close_payload(4001, "fin ✓".encode())))
        got = client.expect_close()
        assert got.close_code == 4001
    assert served.inbox.get(rid) == (4001, "fin ✓")


def test_empty_client_close_is_answered_with_an_empty_close(served: Served) -> None:
    rid = token()
    with RawClient(served.port) as client:
        client.handshake(f"/record?id={rid}")
        client.send(frame(OP_CLOSE, b""))
        assert client.expect_close().payload == b""
    assert served.inbox.get(rid)[0] == 1005


def test_websockets_client_close_code_reaches_the_app(served: Served) -> None:
    rid = token()
    with ws_connect(served.port, f"/record?id={rid}") as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        ws.close(code=4001, reason="done")
        assert ws.close_code == 4001  # the server's echo
    assert served.inbox.get(rid) == (4001, "done")


def test_server_close_sends_code_and_reason_then_tcp_closes_promptly(served: Served) -> None:
    with RawClient(served.port) as client:
        client.handshake("/server-close")
        got = client.read_frame()
        assert got.opcode == OP_CLOSE
        assert (got.close_code, got.close_reason) == (4000, "bye")
        started = time.monotonic()
        client.send(frame(OP_CLOSE, close_payload(4000)))
        client.expect_eof(timeout=TIMEOUT)
        # The server closes on our reply, not on its 10 s close timeout.
        assert time.monotonic() - started < 1.0


def test_server_close_seen_by_websockets_client(served: Served) -> None:
    with (
        ws_connect(served.port, "/server-close") as ws,
        pytest.raises(ConnectionClosed) as info,
    ):
        ws.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4000, "bye")


def test_long_close_reason_is_cut_to_valid_utf8(served: Served) -> None:
    reason = "é" * 100  # 200 bytes: over the 123 a close frame can carry
    with (
        ws_connect(served.port, f"/server-close?reason={reason}") as ws,
        pytest.raises(ConnectionClosed) as info,
    ):
        ws.recv(timeout=TIMEOUT)
    rcvd = info.value.rcvd
    assert rcvd is not None, "the client rejected the close frame"
    assert rcvd.code == 4000
    assert reason.startswith(rcvd.reason)
    assert 120 <= len(rcvd.reason.encode()) <= 123


def test_close_before_accept_is_http_403(served: Served) -> None:
    with RawClient(served.port) as client:
        client.send(upgrade_request("/deny"))
        status, _, _ = client.read_response()
        assert status == 403
        client.expect_eof()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/crash-before-accept", "Exception in ASGI application"),
        ("/no-accept", "ASGI callable returned without completing the websocket handshake"),
    ],
)
def test_app_failing_before_accept_is_http_500(
    served: Served, server_errors: ErrorLog, path: str, message: str
) -> None:
    server_errors.allowed.add(message)
    with RawClient(served.port) as client:
        client.send(upgrade_request(path))
        status, _, body = client.read_response()
        assert status == 500
        assert body == b"Internal Server Error"
        client.expect_eof()
    assert [r.getMessage() for r in server_errors.records] == [message]


def test_app_crashing_after_accept_closes_with_1011(
    served: Served, server_errors: ErrorLog
) -> None:
    server_errors.allowed.add("Exception in ASGI application")
    with RawClient(served.port) as client:
        client.handshake("/crash-after-accept")
        client.send(frame(OP_TEXT, b"trigger"))
        got = client.read_frame()
        assert (got.opcode, got.close_code) == (OP_CLOSE, 1011)
        client.send(frame(OP_CLOSE, close_payload(1011)))
        client.expect_eof()
    assert len(server_errors.records) == 1


def test_denial_response_is_sent_as_is(served: Served) -> None:
    with RawClient(served.port) as client:
        client.send(upgrade_request("/denial"))
        status, headers, body = client.read_response()
        assert status == 418
        assert headers["x-reason"] == "teapot"
        assert body == b"not a teapot socket"
        client.expect_eof()


def test_denial_response_body_in_several_messages(served: Served) -> None:
    with pytest.raises(InvalidStatus) as info:
        ws_connect(served.port, "/denial-chunked")
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Basic"
    assert response.headers["content-type"] == "text/plain"
    assert response.body == b"part1-part2"


# --------------------------------------------------------------------------- flow control


def test_pull_mode_backpressure_loses_and_reorders_nothing(served: Served) -> None:
    gate = token()
    count = 2000
    messages = [f"msg {i:05d}" for i in range(count)]
    half_sent = threading.Event()
    errors: list[BaseException] = []
    with ws_connect(served.port, f"/gated?id={gate}") as ws:

        def produce() -> None:
            try:
                for i, text in enumerate(messages):
                    ws.send(text)
                    if i == count // 2:
                        half_sent.set()
                ws.send("end")
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                half_sent.set()

        sender = threading.Thread(target=produce, name="fastws-producer", daemon=True)
        sender.start()
        # The app reads nothing until half the messages are on their way (well past the
        # point where the server stops reading the socket), then everything.
        assert half_sent.wait(TIMEOUT)
        served.gates.open(gate)
        assert ws.recv(timeout=TIMEOUT) == f"got {count}"
        sender.join(TIMEOUT)
        assert not sender.is_alive()
    assert errors == []
    assert served.inbox.get(gate) == messages


def test_direct_send_reports_backpressure_and_wait_writable_resumes(served: Served) -> None:
    rid = token()
    # max_queue=1: the client stops reading its socket until recv() is called.
    with ws_connect(served.port, f"/flood?id={rid}", max_queue=1) as ws:
        kind, sent, writable = served.inbox.get(rid)
        assert (kind, writable) == ("unwritable", False)
        assert sent < 2048, "the transport never reported a full write buffer"
        assert served.inbox.box(rid).empty()  # still waiting for the buffer to drain
        for _ in range(sent):
            assert ws.recv(timeout=TIMEOUT) == b"\xab" * 65536
        assert ws.recv(timeout=TIMEOUT) == "drained"
    assert served.inbox.get(rid) == ("writable", True)


# --------------------------------------------------------------------------- direct channel


def test_direct_channel_delivers_buffered_then_live_messages_and_one_close(
    served: Served,
) -> None:
    rid = token()
    with ws_connect(served.port, f"/direct?id={rid}") as ws:
        ws.send("a")
        ws.send(b"xyz")
        ws.send("b")
        ws.send("c")
        # The pong proves the server parsed everything before it (they wait for attach()).
        assert ws.ping(b"sync").wait(TIMEOUT)
        served.gates.open(rid)
        echoes = [ws.recv(timeout=TIMEOUT) for _ in range(4)]
        assert echoes == ["echo:a", b"zyx", "echo:b", "echo:c"]
        ws.send("d")
        assert ws.recv(timeout=TIMEOUT) == "echo:d"
        ws.close(code=4002, reason="client done")
        assert ws.close_code == 4002
    texts, closes, late_send = served.inbox.get(rid)
    assert texts == ["a", "b", "c", "d"]
    assert late_send is False  # send_text after the close reports failure
    # ws.close() returned after the server closed the socket, so connection_lost has run.
    assert closes == [4002]


def test_direct_channel_attach_after_the_peer_left(served: Served) -> None:
    rid = token()
    with ws_connect(served.port, f"/direct?id={rid}") as ws:
        ws.send("early-1")
        ws.send("early-2")
        ws.close(code=4003)  # returns once the server has processed the close and hung up
    served.gates.open(rid)
    texts, closes, late_send = served.inbox.get(rid)
    assert texts == ["early-1", "early-2"]
    assert closes == [4003]
    assert late_send is False


def test_direct_channel_close_reaches_the_client(served: Served) -> None:
    rid = token()
    served.gates.open(rid)
    with ws_connect(served.port, f"/direct?id={rid}") as ws:
        ws.send("one")
        assert ws.recv(timeout=TIMEOUT) == "echo:one"
        ws.send("quit")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4005, "direct bye")
    texts, closes, late_send = served.inbox.get(rid)
    assert texts == ["one", "quit"]
    assert closes == [4005]  # the peer's echo of our code
    assert late_send is False


# --------------------------------------------------------------------------- keepalive


def _keepalive_port(
    inbox: Inbox, gates: Gates, interval: float, timeout: float | None
) -> contextlib.AbstractContextManager[int]:
    config = uvicorn_config(
        build_app(inbox, gates),
        ws_ping_interval=interval,
        ws_ping_timeout=timeout,
        log_level="warning",
        log_config=None,
    )
    return serve_config(config)


def test_keepalive_closes_a_peer_that_never_answers_with_1011() -> None:
    with _keepalive_port(Inbox(), Gates(), 0.1, 0.1) as port, RawClient(port) as client:
        client.handshake()
        started = time.monotonic()
        ping = client.read_frame()
        assert (ping.opcode, len(ping.payload)) == (OP_PING, 4)
        got = client.expect_close()
        assert got.close_code == 1011
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("ping_timeout", [0.1, None], ids=["with-timeout", "no-timeout"])
def test_keepalive_keeps_a_peer_that_answers_pongs(ping_timeout: float | None) -> None:
    interval = 0.1
    window = 0.55
    with (
        _keepalive_port(Inbox(), Gates(), interval, ping_timeout) as port,
        RawClient(port) as client,
    ):
        client.handshake()
        pings = 0
        deadline = time.monotonic() + window
        while time.monotonic() < deadline:
            ping = client.read_frame()
            assert ping.opcode == OP_PING
            pings += 1
            client.send(frame(OP_PONG, ping.payload))
        # About one ping per interval: answered pings must not start extra ping chains (a
        # bug once sent them 0.1 ms apart).
        assert 3 <= pings <= window / interval + 2, pings
        client.send(frame(OP_TEXT, b"alive"))
        got = client.read_frame()
        while got.opcode == OP_PING:
            client.send(frame(OP_PONG, got.payload))
            got = client.read_frame()
        assert (got.opcode, got.payload) == (OP_TEXT, b"alive")


def test_keepalive_with_the_websockets_client_stays_open() -> None:
    with (
        _keepalive_port(Inbox(), Gates(), 0.1, 0.1) as port,
        ws_connect(port, "/echo", ping_interval=None) as ws,
    ):
        # Ten server ping intervals with nothing else on the wire; the client answers them.
        with pytest.raises(TimeoutError):
            ws.recv(timeout=1.0)
        ws.send("alive")
        assert ws.recv(timeout=TIMEOUT) == "alive"


# --------------------------------------------------------------------------- shutdown


def test_server_shutdown_closes_live_connections_with_1012(server_errors: ErrorLog) -> None:
    inbox = Inbox()
    srv = ServerThread(build_app(inbox, Gates())).start()
    server_errors.watch()  # the new server's logging config dropped our handler
    try:
        with ws_connect(srv.port, "/hold") as ws:
            ws.send("hello")
            assert ws.recv(timeout=TIMEOUT) == "hello"
            started = time.monotonic()
            srv.stop(timeout=TIMEOUT)
            assert time.monotonic() - started < 3.0
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=TIMEOUT)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1012
        assert inbox.get("hold") == 1012
    finally:
        srv.stop(timeout=TIMEOUT)


# --------------------------------------------------------------------------- fuzz

_ALLOWED_SERVER_OPS = {OP_TEXT, OP_BINARY, OP_CLOSE, OP_PONG}

_fuzz_frames = st.builds(
    frame,
    st.integers(0, 15),
    st.binary(max_size=140),
    fin=st.booleans(),
    rsv=st.sampled_from([0, 0, 0, 1, 4]),
    mask=st.sampled_from([True, True, True, False]),
)
_fuzz_closes = st.builds(
    lambda code, reason: frame(OP_CLOSE, close_payload(code, reason)),
    st.integers(0, 65535),
    st.binary(max_size=20),
)
_fuzz_chunks = st.lists(
    st.one_of(st.binary(min_size=1, max_size=64), _fuzz_frames, _fuzz_closes),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(chunks=_fuzz_chunks)
def test_random_bytes_never_crash_or_hang_the_server(served: Served, chunks: list[bytes]) -> None:
    with RawClient(served.port) as client:
        client.handshake()
        with contextlib.suppress(OSError):  # the server may hang up mid-write
            for chunk in chunks:
                client.send(chunk)
            client.sock.shutdown(socket.SHUT_WR)
        # Whatever the server wrote must be well-formed frames, ending at most with one close,
        # and the server must end the connection (it saw our EOF) instead of hanging.
        try:
            while True:
                try:
                    got = client.read_frame()
                except EOFError:
                    break
                assert not got.masked and got.rsv == 0 and got.fin
                assert got.opcode in _ALLOWED_SERVER_OPS
                if got.opcode == OP_TEXT:
                    got.payload.decode("utf-8")
                if got.opcode in (OP_CLOSE, OP_PONG):
                    assert len(got.payload) <= 125
                if got.opcode == OP_CLOSE:
                    assert len(got.payload) != 1
                    client.expect_eof()
                    break
        except ConnectionResetError:
            pass  # the server hung up with our unread bytes in its buffer: still an end
    assert_echo_works(served.port)


# --------------------------------------------------------------------------- without a socket


class _Transport(asyncio.Transport):
    """What the protocol writes, kept; the socket side of a unit test."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.buffered = 0  # bytes the kernel would not take (a peer that stopped reading)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


async def _upgraded(
    config: Any, transport: _Transport, path: str, limits: ConnectionLimits | None = None
) -> tuple[Any, Any]:
    """A protocol for ``config`` on ``transport`` that accepted a websocket at ``path``."""
    from uvicorn.server import ServerState

    config.load()
    state = ServerState()
    cls = VoiceWebSocketProtocol.with_limits(limits) if limits else VoiceWebSocketProtocol
    protocol = cls(config=config, server_state=state, app_state={})
    protocol.connection_made(transport)
    protocol.data_received(upgrade_request(path))
    for _ in range(200):
        if transport.written.startswith(b"HTTP/1.1 101"):
            break
        await asyncio.sleep(0.005)
    assert transport.written.startswith(b"HTTP/1.1 101")
    transport.written.clear()
    return protocol, state


@contextlib.asynccontextmanager
async def _accepted(
    received: asyncio.Queue[dict[str, Any]] | None = None, limits: ConnectionLimits | None = None
) -> Any:
    """A protocol that accepted a websocket; its app puts what it receives in ``received``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if received is not None:
                received.put_nowait(event)

    config = uvicorn.Config(
        app, ws=VoiceWebSocketProtocol, log_level="error", ws_ping_interval=None
    )
    transport = _Transport()
    protocol, state = await _upgraded(config, transport, "/echo", limits)
    try:
        yield protocol, transport
    finally:
        protocol.connection_lost(None)
        for task in list(state.tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_frame_budget_allows_a_burst_and_the_average_rate_then_closes_with_1008() -> None:
    pong = frame(OP_PONG, b"")  # unsolicited pongs: ignored, nothing written back
    limits = ConnectionLimits(ws_frames_per_s=200, ws_frame_burst=20)
    async with _accepted(limits=limits) as (protocol, transport):
        protocol.data_received(pong * 20)  # the whole burst at once
        await asyncio.sleep(0.1)  # earns 20 more at 200 a second
        protocol.data_received(pong * 15)
        assert transport.written == b"" and not transport.closed
        protocol.data_received(pong * 30)  # well over what is left
        assert transport.closed
        assert bytes(transport.written[:4]) == bytes((0x80 | OP_CLOSE, 2 + 15)) + struct.pack(
            "!H", 1008
        )


async def test_a_close_the_peer_never_lets_out_is_aborted_after_the_close_timeout() -> None:
    async with _accepted(limits=ConnectionLimits(close_timeout_s=0.05)) as (protocol, transport):
        transport.buffered = 100_000  # the peer stopped reading: our close frame cannot leave
        protocol.close(1000)  # the app hangs up
        for _ in range(200):
            if transport.aborted:
                break
            await asyncio.sleep(0.01)
        assert transport.aborted


async def test_pings_go_unanswered_while_the_peer_does_not_read_our_writes() -> None:
    async with _accepted() as (protocol, transport):
        protocol.pause_writing()  # the transport's buffer is over its high-water mark
        protocol.data_received(frame(OP_PING, b"1") * 50)
        assert transport.written == b""
        protocol.resume_writing()
        protocol.data_received(frame(OP_PING, b"2"))
        assert bytes(transport.written) == bytes((0x80 | OP_PONG, 1)) + b"2"


async def test_a_large_frame_trickling_in_byte_by_byte_arrives_whole() -> None:
    text = "x" * 70_000
    data = frame(OP_TEXT, text.encode())
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    async with _accepted(received) as (protocol, transport):
        for i in range(len(data)):
            protocol.data_received(data[i : i + 1])
        event = await asyncio.wait_for(received.get(), 1)
        assert event == {"type": "websocket.receive", "text": text}
        assert transport.written == b""  # no protocol error on the way


async def test_the_most_fragments_allowed_still_make_a_message() -> None:
    parts = [frame(OP_TEXT, b"a", fin=False)]
    parts += [frame(OP_CONT, b"b", fin=False)] * (MAX_FRAGMENTS - 2)
    parts.append(frame(OP_CONT, b"c"))
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    async with _accepted(received) as (protocol, transport):
        protocol.data_received(b"".join(parts))
        event = await asyncio.wait_for(received.get(), 1)
        assert event["text"] == "a" + "b" * (MAX_FRAGMENTS - 2) + "c"
        assert transport.written == b""


class _CountingTransport(_Transport):
    """A transport that also keeps each write apart, to count socket writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        super().write(data)
        self.writes.append(bytes(data))


def _server_messages(data: bytes) -> list[dict[str, Any]]:
    """The JSON text messages in bytes the server wrote (unmasked frames)."""
    out = []
    i = 0
    while i < len(data):
        b0, n = data[i], data[i + 1] & 0x7F
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        assert b0 == 0x80 | OP_TEXT
        out.append(json.loads(data[i : i + n]))
        i += n
    return out


@contextlib.asynccontextmanager
async def _media_stream(audio: bytes, **options: Any) -> Any:
    """A VoiceServer call on the protocol over a counting transport; its agent queues ``audio``."""
    from voice_runtime.server import VoiceServer
    from voice_runtime.transports.twilio_ws import StreamOptions

    async def on_call(session: Any) -> None:
        await session.put_outbound(audio)
        await session.wait_until_disconnected_async()

    server = VoiceServer(on_call=on_call, stream_options=StreamOptions(**options))
    config = uvicorn_config(server.app, log_level="error", ws_ping_interval=None)
    transport = _CountingTransport()
    protocol, state = await _upgraded(config, transport, "/voice")
    transport.writes.clear()
    try:
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": "MZbatch",
            "start": {"streamSid": "MZbatch", "callSid": "CAbatch", "tracks": ["inbound"]},
        }
        protocol.data_received(frame(OP_TEXT, json.dumps(start).encode()))
        for _ in range(200):
            if transport.writes:
                break
            await asyncio.sleep(0.005)
        yield transport
    finally:
        protocol.connection_lost(None)  # the caller hangs up: the call ends by itself
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=TIMEOUT)


def _audio_of(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(m["media"]["payload"]) for m in messages if "media" in m)


async def test_agent_audio_and_marks_due_at_one_moment_leave_in_one_socket_write() -> None:
    # 200 ms of audio: the 120 ms lead lets the first 3 messages go at once.
    async with _media_stream(b"\xff" * 1600) as transport:
        first = _server_messages(transport.writes[0])
    events = [m["event"] for m in first]
    # Before batching, each message was a write of its own (one frame per write).
    assert events[:3] == ["media", "media", "media"], events
    assert "mark" in events  # the position mark after 100 ms rides in the same write
    assert len(_audio_of(first)) >= 960  # at least the 120 ms lead


async def test_a_long_lead_still_writes_in_bounded_batches() -> None:
    from voice_runtime.transports.twilio_ws import BATCH_MAX

    audio = bytes(range(256)) * 63  # 2 s, all of it within a 10 s lead
    async with _media_stream(audio, lead_ms=10_000) as transport:
        for _ in range(200):
            got = [m for w in transport.writes for m in _server_messages(w)]
            if len(_audio_of(got)) >= len(audio):
                break
            await asyncio.sleep(0.005)
        batches = [_server_messages(w) for w in transport.writes]
    assert _audio_of([m for b in batches for m in b]) == audio  # all of it, in order
    assert len(batches) > 1
    assert max(len(b) for b in batches) <= BATCH_MAX
