"""One call-minute of Media Streams traffic through a library's transport, without sockets.

Imported by ``bench_transport.py`` (this package) and run as a script by the baseline venv's
python (the voice-runtime 0.1.15 package), so it may import neither package at module level:
each side brings its own endpoint. The workload is the same for both: 3,000 caller frames
(60 s), 60 s of agent audio queued in 100 ms chunks, and every mark the transport sends
echoed back, as the far end would. The figure is process CPU seconds for the whole minute:
the library's own work per call-minute, with no server framework, kernel or idle wakeups.

:func:`measure_stack` runs the same minute through the whole server stack above the socket:
websocket bytes (masked client frames, as Twilio sends them) go into the uvicorn websocket
protocol the server runs with, through the ASGI app, and the frames it writes are read back
off a fake transport. Only the kernel and the idle wakeups are left out.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

STREAM_SID = "MZ" + "0" * 32
CALL_SID = "CA" + "1" * 32
SECONDS = 60
CALLER_FRAMES = SECONDS * 50
AGENT_CHUNKS = SECONDS * 10  # 100 ms each
AGENT_BYTES = AGENT_CHUNKS * 800


def start_text() -> str:
    """A Twilio ``start`` frame."""
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": STREAM_SID,
            "start": {
                "accountSid": "AC" + "2" * 32,
                "streamSid": STREAM_SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "customParameters": {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )


def media_text(i: int) -> str:
    """Twilio's ``media`` frame number ``i`` (20 ms of caller audio)."""
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(i + 2),
            "media": {
                "track": "inbound",
                "chunk": str(i + 1),
                "timestamp": str(20 * i),
                "payload": base64.b64encode(bytes([i % 256]) * 160).decode("ascii"),
            },
            "streamSid": STREAM_SID,
        }
    )


def load_agent_audio(put: Callable[[bytes], Any]) -> None:
    """Queue the minute's agent audio, 100 ms a chunk, with the library's ``put``."""
    chunk = bytes(800)
    for _ in range(AGENT_CHUNKS):
        put(chunk)


class InboundCounter:
    """An STT that keeps up: takes every caller frame from ``session.inbound`` and counts it."""

    def __init__(self, session: Any) -> None:
        self.got = 0
        self.task = asyncio.ensure_future(self._run(session))

    async def _run(self, session: Any) -> None:
        while await session.inbound.get() is not None:
            self.got += 1


class FarEnd:
    """The Twilio side of one call: caller frames in, agent frames out, marks echoed."""

    def __init__(self) -> None:
        self.inbox: collections.deque[str] = collections.deque([start_text()])
        self.inbox.extend(media_text(i) for i in range(CALLER_FRAMES))
        self.agent_bytes = 0
        self.marks = 0
        self._done = asyncio.Event()

    async def next_text(self) -> str | None:
        """The next frame Twilio sends, or None once the minute is over."""
        # A real receive suspends until the next frame arrives; yield likewise.
        await asyncio.sleep(0)
        if self.inbox:
            return self.inbox.popleft()
        if self.agent_bytes < AGENT_BYTES:
            await self._done.wait()
        return None

    def sent(self, text: str) -> None:
        """Take one frame the transport sent (cheaply: this is not the library's work)."""
        head = text[:40]
        if '"media"' in head:
            start = text.index('"payload"')
            start = text.index('"', start + 9) + 1
            payload = text[start : text.index('"', start)]
            self.agent_bytes += len(payload) * 3 // 4 - payload.count("=")
            if self.agent_bytes >= AGENT_BYTES:
                self._done.set()
        elif '"mark"' in head:
            self.marks += 1
            echo = {"event": "mark", "streamSid": STREAM_SID, "mark": json.loads(text)["mark"]}
            self.inbox.append(json.dumps(echo))


async def measure(run_call: Callable[[FarEnd], Awaitable[Any]]) -> dict[str, Any]:
    """CPU seconds one library spends on one call-minute; the checks it must pass."""
    far = FarEnd()
    t0 = time.process_time()
    frames_in = await run_call(far)
    cpu = time.process_time() - t0
    return {
        "cpu_s": cpu,
        "frames_in": frames_in,
        "agent_bytes": far.agent_bytes,
        "marks": far.marks,
    }


# ------------------------------------------------------------------ the whole stack

REQUEST = (
    b"GET /voice HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)


def client_frame(text: str, opcode: int = 0x1) -> bytes:
    """One masked client frame (an all-zero mask: valid, and the payload stays readable)."""
    data = text.encode("utf-8")
    n = len(data)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + data


class FakeTransport(asyncio.Transport):
    """The socket under a server protocol: hands what the server writes to the far end."""

    def __init__(self, far: FarEnd) -> None:
        super().__init__()
        self.far = far
        self.protocol: Any = None
        self.accepted = False
        self.closed = False
        self._buf = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def is_reading(self) -> bool:
        return not self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        buf = self._buf + bytes(data)
        if not self.accepted:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"upgrade refused: {buf[:60]!r}")
            self.accepted = True
            buf = buf[end + 4 :]
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            head = 2
            if n == 126:
                n, head = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                n, head = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < head + n:
                break
            if buf[0] & 0x0F == 0x1:
                self.far.sent(buf[head : head + n].decode())
            buf = buf[head + n :]
        self._buf = buf


async def measure_stack(app: Any, ws: Any, consumed: Callable[[], int]) -> dict[str, Any]:
    """CPU seconds for one call-minute through uvicorn protocol ``ws`` serving ``app``."""
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(app, ws=ws, ws_per_message_deflate=False, log_level="error")
    config.load()
    far = FarEnd()
    transport = FakeTransport(far)
    protocol = config.ws_protocol_class(  # type: ignore[call-arg,misc]
        config=config, server_state=ServerState(), app_state={}
    )
    transport.set_protocol(protocol)
    t0 = time.process_time()
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    # The app task accepts within a few loop turns; polling keeps the harness out of the way.
    while not transport.accepted:  # noqa: ASYNC110
        await asyncio.sleep(0)
    while True:
        text = await far.next_text()
        if text is None:
            break
        protocol.data_received(client_frame(text))
    protocol.data_received(client_frame("\x03\xe8", 0x8))  # close, 1000
    for _ in range(10_000):
        if transport.closed and consumed() >= CALLER_FRAMES:
            break
        await asyncio.sleep(0)
    cpu = time.process_time() - t0
    return {
        "cpu_s": cpu,
        "frames_in": consumed(),
        "agent_bytes": far.agent_bytes,
        "marks": far.marks,
    }


# ------------------------------------------------------------------ the old package


async def _baseline_call(far: FarEnd) -> int:
    from fastapi import FastAPI, WebSocketDisconnect

    from voice_runtime.session import VoiceSession
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    class Socket:
        headers: dict[str, str] = {}

        async def accept(self) -> None:
            return None

        async def receive_text(self) -> str:
            text = await far.next_text()
            if text is None:
                raise WebSocketDisconnect(1000)
            return text

        async def send_text(self, text: str) -> None:
            far.sent(text)

        async def send_json(self, data: Any) -> None:
            far.sent(json.dumps(data))

        async def close(self, code: int = 1000) -> None:
            return None

    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session)
    endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/voice")
    load_agent_audio(session.outbound.put_nowait)
    counter = InboundCounter(session)
    await endpoint(Socket())
    await asyncio.wait_for(counter.task, 10)
    return counter.got


async def _baseline_stack() -> dict[str, Any]:
    from fastapi import FastAPI

    from voice_runtime.session import VoiceSession
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session)
    load_agent_audio(session.outbound.put_nowait)
    counter = InboundCounter(session)
    result = await measure_stack(app, "auto", lambda: counter.got)
    counter.task.cancel()
    return result


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    # argv: [stack] [repeats]; the best of the repeats, all in this process (warm, like ours).
    args = sys.argv[1:]
    stack = bool(args) and args[0] == "stack"
    repeats = int(args[-1]) if args and args[-1].isdigit() else 1
    results = [
        asyncio.run(_baseline_stack() if stack else measure(_baseline_call)) for _ in range(repeats)
    ]
    result = min(results, key=lambda r: float(r["cpu_s"]))
    sys.stdout.write(json.dumps(result) + "\n")
