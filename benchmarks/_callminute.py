"""One call-minute of Media Streams traffic through a library's transport, without sockets.

Imported by ``bench_transport.py`` (this package) and run as a script by the baseline venv's
python (the voice-runtime 0.1.15 package), so it may import neither package at module level:
each side brings its own endpoint. The workload is the same for both: 3,000 caller frames
(60 s), 60 s of agent audio queued in 100 ms chunks, and every mark the transport sends
echoed back, as the far end would. The figure is process CPU seconds for the whole minute:
the library's own work per call-minute, with no server framework, kernel or idle wakeups.
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
    chunk = bytes(800)
    for _ in range(AGENT_CHUNKS):
        session.outbound.put_nowait(chunk)
    got = 0

    async def consume() -> None:
        nonlocal got
        while await session.inbound.get() is not None:
            got += 1

    consumer = asyncio.ensure_future(consume())
    await endpoint(Socket())
    await asyncio.wait_for(consumer, 10)
    return got


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(measure(_baseline_call))
    sys.stdout.write(json.dumps(result) + "\n")
