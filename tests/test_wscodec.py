"""The sans-I/O websocket codec, fed bytes with plain calls (no socket, no event loop)."""

from __future__ import annotations

import os

import pytest

from voice_runtime.transports.wscodec import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameParser,
    ProtocolError,
    accept_key,
    accept_response,
    close_payload,
    frame_header,
    handshake_problem,
    parse_close,
    parse_request,
    refusal_response,
    unmask,
)


def frame(payload: bytes, opcode: int = OP_TEXT, *, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame as a browser or Twilio would send it."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, m | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + unmask(payload, mask)


class Sink:
    def __init__(self, max_size: int = 1 << 16, **budget: object) -> None:
        self.messages: list[tuple[int, bytes]] = []
        self.controls: list[tuple[int, bytes]] = []
        self.keep_going = True
        self.parser = FrameParser(self._message, self._control, max_size=max_size, **budget)  # type: ignore[arg-type]

    def _message(self, opcode: int, payload: bytes) -> bool:
        self.messages.append((opcode, payload))
        return self.keep_going

    def _control(self, opcode: int, payload: bytes) -> bool:
        self.controls.append((opcode, payload))
        return opcode != OP_CLOSE


def test_frames_split_across_reads_and_glued_together_parse_the_same() -> None:
    texts = [b'{"event":"media"}' * n for n in (1, 10, 5000)]  # 7-, 16- and 64-bit lengths
    wire = b"".join(frame(t) for t in texts)
    whole, bytewise = Sink(max_size=1 << 20), Sink(max_size=1 << 20)
    whole.parser.feed(wire)
    for i in range(len(wire)):
        bytewise.parser.feed(wire[i : i + 1])
    assert whole.messages == bytewise.messages == [(OP_TEXT, t) for t in texts]


def test_fragments_join_and_controls_pass_between_them() -> None:
    sink = Sink()
    sink.parser.feed(
        frame(b"hel", fin=False)
        + frame(b"ping!", OP_PING)
        + frame(b"lo", 0x0, fin=False)
        + frame(b"", 0x0)
        + frame(b"\x00\x01", OP_BINARY)
    )
    assert sink.messages == [(OP_TEXT, b"hello"), (OP_BINARY, b"\x00\x01")]
    assert sink.controls == [(OP_PING, b"ping!")]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(b"x", masked=False), 1002),  # clients must mask
        (bytes((0xC1, 0x80)) + b"\x00" * 4, 1002),  # RSV1 without an extension
        (frame(b"x", 0x3), 1002),  # unknown opcode
        (frame(b"x", 0x0), 1002),  # continuation without a message
        (frame(b"p" * 126, OP_PING), 1002),  # oversized control frame
        (frame(b"x" * 2000), 1009),  # over max_size
    ],
    # Named: the frames carry random masks, and ids must match across pytest-xdist workers.
    ids=["unmasked", "rsv1", "unknown-opcode", "stray-continuation", "big-control", "too-big"],
)
def test_a_peer_breaking_the_protocol_gets_the_close_code_to_answer(wire: bytes, code: int) -> None:
    sink = Sink(max_size=1000)
    with pytest.raises(ProtocolError) as err:
        sink.parser.feed(wire)
    assert err.value.code == code and sink.messages == []


def test_too_many_fragments_is_refused() -> None:
    sink = Sink()
    with pytest.raises(ProtocolError) as err:
        sink.parser.feed(frame(b"", fin=False) + frame(b"", 0x0, fin=False) * 1100)
    assert err.value.code == 1009


def test_the_frame_budget_allows_a_burst_then_a_rate() -> None:
    now = [0.0]
    sink = Sink(frame_rate=10.0, frame_burst=5, clock=lambda: now[0])
    sink.parser.feed(frame(b"x") * 5)
    with pytest.raises(ProtocolError) as err:
        sink.parser.feed(frame(b"x"))
    assert (err.value.code, err.value.kind) == (1008, "frame_budget")
    fresh = Sink(frame_rate=10.0, frame_burst=5, clock=lambda: now[0])
    fresh.parser.feed(frame(b"x") * 5)
    now[0] = 0.3  # 0.3 s later, three more frames are fine, a fourth is not
    fresh.parser.feed(frame(b"x") * 3)
    with pytest.raises(ProtocolError):
        fresh.parser.feed(frame(b"x"))
    assert len(fresh.messages) == 8


def test_a_callback_returning_false_stops_parsing() -> None:
    sink = Sink()
    sink.parser.feed(frame(b"a") + frame(b"\x03\xe8", OP_CLOSE) + frame(b"after close"))
    assert sink.messages == [(OP_TEXT, b"a")] and len(sink.controls) == 1
    stopper = Sink()
    stopper.keep_going = False
    stopper.parser.feed(frame(b"a") + frame(b"b"))
    assert stopper.messages == [(OP_TEXT, b"a")]


def test_close_payloads_both_ways() -> None:
    assert parse_close(close_payload(1000, "bye")) == (1000, "bye")
    assert parse_close(b"") == (1005, "")
    # A reason is cut to 123 bytes on a character boundary.
    assert len(close_payload(1000, "é" * 100)) <= 125
    parse_close(close_payload(1000, "é" * 100))
    for bad, code in ((b"\x03", 1002), (b"\x03\xed", 1002), (b"\x03\xe8\xff", 1007)):
        with pytest.raises(ProtocolError) as err:
            parse_close(bad)
        assert err.value.code == code


def test_server_frame_headers() -> None:
    assert frame_header(OP_TEXT, 5) == b"\x81\x05"
    assert frame_header(OP_TEXT, 300) == b"\x81\x7e\x01\x2c"
    assert frame_header(OP_BINARY, 70000) == b"\x82\x7f" + (70000).to_bytes(8, "big")


def test_the_upgrade_handshake() -> None:
    req = parse_request(
        b"GET /voice?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
    )
    assert req.target == "/voice?x=1" and handshake_problem(req) is None
    # The worked example of RFC 6455 section 1.3.
    assert accept_key(req.get(b"sec-websocket-key") or b"") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    accepted = accept_response(b"dGhlIHNhbXBsZSBub25jZQ==", [(b"server", b"x")], "audio")
    assert accepted.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in accepted
    assert accepted.endswith(b"sec-websocket-protocol: audio\r\n\r\n")
    refused = refusal_response(403, [], b"no")
    assert refused.startswith(b"HTTP/1.1 403 Forbidden\r\n") and refused.endswith(b"\r\n\r\nno")
    assert b"content-length: 2\r\n" in refused and b"connection: close\r\n" in refused
    old = parse_request(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade")
    assert handshake_problem(old) == (426, "unsupported Sec-WebSocket-Version (13 is required)")
    with pytest.raises(ProtocolError):
        parse_request(b"NONSENSE")
