"""RFC 6455 frames and the upgrade handshake, without sockets (sans-I/O, no asyncio).

What :class:`~voice_runtime.transports.fastws.VoiceWebSocketProtocol` (the asyncio glue)
needs to speak websocket as a server: parse the HTTP upgrade request and check it
(:func:`parse_request`, :func:`handshake_problem`, :func:`accept_key`), build responses and
frames (:func:`http_response`, :func:`frame_header`, :func:`close_payload`), and turn the
client's bytes into messages (:class:`FrameParser`: masking, fragments, size limits, a frame
budget, control frames). Unit tests feed it bytes; a peer that breaks the protocol gets a
:class:`ProtocolError` carrying the close code to answer with.

``benchmarks/bench_wscodec.py`` measured this codec against the sans-I/O ``ServerProtocol``
of the ``websockets`` package on media-sized frames (docs/benchmarks.md): this one is kept
because it costs less CPU per frame each way.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from collections.abc import Callable
from http import HTTPStatus

from voice_runtime import errors

try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - websockets ships the C extension on all our platforms
    _apply_mask = None  # type: ignore[assignment]

__all__ = [
    "FrameParser",
    "ProtocolError",
    "WebSocketProtocolError",
    "Request",
    "accept_key",
    "accept_response",
    "close_payload",
    "frame_header",
    "handshake_problem",
    "http_response",
    "parse_close",
    "parse_request",
    "refusal_response",
    "unmask",
]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)
# Close codes a peer may send (RFC 6455 section 7.4); 1005/1006/1015 never go on the wire.
VALID_CLOSE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
MAX_REQUEST = 16 * 1024
# A message may come in at most this many frames: tiny (even empty) fragments would otherwise
# grow a list without bound while staying under the size limit.
MAX_FRAGMENTS = 1024


class WebSocketProtocolError(errors.ProtocolError):
    """The peer broke RFC 6455 (or its frame budget); ``code`` is the close code to answer with.

    ``kind`` names the event in :func:`~voice_runtime.transports.guard.connection_stats`.
    """

    def __init__(self, code: int, reason: str, kind: str = "protocol_error") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.kind = kind


# The 0.2.0 name, kept importable (a ProtocolError of voice_runtime.errors too).
ProtocolError = WebSocketProtocolError


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte client ``mask`` (RFC 6455 section 5.3)."""
    if _apply_mask is not None:
        return _apply_mask(payload, mask)
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame_header(opcode: int, length: int) -> bytes:
    """The header of one unmasked, final server frame carrying ``length`` bytes."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


def close_payload(code: int, reason: str = "") -> bytes:
    # At most 123 bytes, cut on a character boundary: a split UTF-8 sequence is a 1007 error.
    raw = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + raw


def http_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")]
    lines += [name + b": " + value + b"\r\n" for name, value in headers]
    lines.append(b"\r\n")
    return b"".join(lines) + body


class Request:
    """The parsed upgrade request."""

    __slots__ = ("headers", "method", "target")

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.target = target
        self.headers = headers

    def get(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def parse_request(raw: bytes) -> Request:
    head = raw.decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProtocolError(400, "malformed request line")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(400, "malformed header line")
        headers.append((name.lower().encode("latin-1"), value.strip().encode("latin-1")))
    return Request(parts[0], parts[1], headers)


def handshake_problem(req: Request) -> tuple[int, str] | None:
    """What is wrong with an upgrade request, as (HTTP status, reason), or None."""
    if req.method != "GET":
        return 405, "websocket upgrades use GET"
    upgrade = (req.get(b"upgrade") or b"").lower()
    if b"websocket" not in [t.strip() for t in upgrade.split(b",")]:
        return 400, "missing Upgrade: websocket"
    connection = (req.get(b"connection") or b"").lower()
    if b"upgrade" not in [t.strip() for t in connection.split(b",")]:
        return 400, "missing Connection: Upgrade"
    if req.get(b"sec-websocket-version") != b"13":
        return 426, "unsupported Sec-WebSocket-Version (13 is required)"
    key = req.get(b"sec-websocket-key")
    try:
        ok = key is not None and len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        ok = False
    if not ok:
        return 400, "invalid Sec-WebSocket-Key"
    return None


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def accept_response(
    key: bytes, headers: list[tuple[bytes, bytes]], subprotocol: str | None = None
) -> bytes:
    """The 101 response accepting an upgrade whose ``Sec-WebSocket-Key`` was ``key``."""
    head = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_key(key)),
        *headers,
    ]
    if subprotocol:
        head.append((b"sec-websocket-protocol", subprotocol.encode("latin-1")))
    return http_response(101, head)


def refusal_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A response refusing an upgrade; the connection closes after it."""
    head = list(headers)
    names = {name.lower() for name, _ in head}
    if b"content-type" not in names:
        head.append((b"content-type", b"text/plain; charset=utf-8"))
    if b"content-length" not in names:
        head.append((b"content-length", str(len(body)).encode()))
    head.append((b"connection", b"close"))
    return http_response(status, head, body)


def parse_close(payload: bytes) -> tuple[int, str]:
    """The (code, reason) of a peer's close frame; 1005 when it carries none."""
    if len(payload) == 1:
        raise ProtocolError(1002, "one-byte close payload")
    if not payload:
        return 1005, ""
    code = struct.unpack("!H", payload[:2])[0]
    if code not in VALID_CLOSE and not 3000 <= code <= 4999:
        raise ProtocolError(1002, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(1007, "close reason is not valid UTF-8") from None
    return code, reason


class FrameParser:
    """Client frames in, whole messages and control frames out (no I/O).

    :meth:`feed` takes bytes as they arrive (a frame may span reads) and calls
    ``on_message(opcode, payload)`` for each whole text/binary message and
    ``on_control(opcode, payload)`` for each ping, pong and close; either returns False to
    stop parsing (the rest of the bytes is dropped: the connection is ending). A peer over
    ``frame_rate`` frames a second (after a burst of ``frame_burst``; rate 0: no budget, and
    ``clock`` gives the time in seconds) or breaking RFC 6455 raises :class:`ProtocolError`.
    """

    def __init__(
        self,
        on_message: Callable[[int, bytes], bool],
        on_control: Callable[[int, bytes], bool],
        *,
        max_size: int,
        frame_rate: float = 0.0,
        frame_burst: int = 0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_control = on_control
        self.max_size = max_size
        self._frame_rate = frame_rate
        self._frame_burst = float(frame_burst)
        self._clock = clock or (lambda: 0.0)
        # Token bucket of inbound frames, refilled lazily when it runs dry.
        self._tokens: float = self._frame_burst if frame_rate > 0 else math.inf
        self._refilled_at = self._clock()
        self._buf = bytearray()  # the start of a frame that is not whole yet
        self._need = 0  # how long _buf must get before parsing is worth trying again
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self._fragment_size = 0

    def feed(self, data: bytes) -> None:
        """Parse ``data`` (and what was left over from earlier reads)."""
        buf = self._buf
        if buf:
            # A frame arriving in many small reads is gathered in place (linear, not quadratic)
            # and parsed once it is whole.
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            self._buf = bytearray()
        self._parse_frames(data)

    def _parse_frames(self, data: bytes) -> None:
        i = 0
        end = len(data)
        max_size = self.max_size
        tokens = self._tokens
        on_message = self.on_message
        try:
            while end - i >= 2:
                b0 = data[i]
                b1 = data[i + 1]
                length = b1 & 0x7F
                head = 2
                if length == 126:
                    if end - i < 4:
                        self._need = 4
                        break
                    length = (data[i + 2] << 8) | data[i + 3]
                    head = 4
                elif length == 127:
                    if end - i < 10:
                        self._need = 10
                        break
                    length = int.from_bytes(data[i + 2 : i + 10], "big")
                    head = 10
                if not b1 & 0x80:
                    raise ProtocolError(1002, "client frames must be masked")
                if b0 & 0x70:
                    raise ProtocolError(1002, "reserved bits set without an extension")
                opcode = b0 & 0x0F
                if length > max_size or (
                    opcode == OP_CONT and self._fragment_size + length > max_size
                ):
                    raise ProtocolError(1009, f"message over {max_size} bytes")
                start = i + head + 4
                stop = start + length
                if stop > end:
                    self._need = stop - i
                    break
                tokens -= 1
                if tokens < 0:
                    tokens = self._refill(tokens)
                payload = unmask(data[start:stop], data[start - 4 : start]) if length else b""
                i = stop
                fin = b0 & 0x80
                if opcode in (OP_TEXT, OP_BINARY):
                    if self._fragment_op:
                        raise ProtocolError(1002, "new message inside a fragmented one")
                    if fin:
                        if not on_message(opcode, payload):
                            return
                    else:
                        self._fragment_op = opcode
                        self._fragments = [payload]
                        self._fragment_size = length
                elif opcode == OP_CONT:
                    if not self._fragment_op:
                        raise ProtocolError(1002, "continuation frame without a message")
                    if len(self._fragments) >= MAX_FRAGMENTS:
                        raise ProtocolError(1009, f"message in over {MAX_FRAGMENTS} fragments")
                    self._fragments.append(payload)
                    self._fragment_size += length
                    if fin:
                        op, parts = self._fragment_op, self._fragments
                        self._fragment_op, self._fragments, self._fragment_size = 0, [], 0
                        if not on_message(op, b"".join(parts)):
                            return
                elif opcode in CONTROL_OPS:
                    if not fin or length > 125:
                        raise ProtocolError(1002, "fragmented or oversized control frame")
                    if not self.on_control(opcode, payload):
                        return
                else:
                    raise ProtocolError(1002, f"unknown opcode {opcode:#x}")
            if i < end:
                if end - i < 2:
                    self._need = 2
                self._buf = bytearray(data[i:])
        finally:
            self._tokens = tokens

    def _refill(self, tokens: float) -> float:
        """Add the tokens earned since the last refill; ProtocolError when still in debt."""
        now = self._clock()
        tokens = min(self._frame_burst, tokens + (now - self._refilled_at) * self._frame_rate)
        self._refilled_at = now
        if tokens < 0:
            raise ProtocolError(1008, "too many frames", "frame_budget")
        return tokens
