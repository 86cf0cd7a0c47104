"""The app that abuse tests serve in a second process (see abuse_kit.ServedApp).

Every call's caller audio is counted and hashed, readable at ``GET /test/calls/{call_sid}``,
so a test can check that a legitimate call lost no frame while an attack ran; call slots and
refusals by reason are at ``GET /test/admission``. Knobs come from the environment:
ABUSE_MAX_CALLS (default 20), ABUSE_PLAY_MS (agent audio each call plays, default 0),
ABUSE_SMS_BLOCK_MS (an ``on_sms`` that blocks this long, default none), and the usual
TWILIO_* / VOICE_* variables (signatures, public URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from typing import Any

from fastapi import FastAPI

from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession

PLAY_MS = int(os.environ.get("ABUSE_PLAY_MS", "0"))
SMS_BLOCK_MS = os.environ.get("ABUSE_SMS_BLOCK_MS")


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, dict[str, Any]] = {}

    async def handle(self, session: VoiceSession) -> None:
        sid = session.call_sid or ""
        digest = hashlib.sha256()
        # max_gap_ms: the longest wait between two caller frames here (a stalled loop shows).
        record = {"bytes": 0, "sha256": digest.hexdigest(), "ended": False, "max_gap_ms": 0.0}
        with self._lock:
            self.calls[sid] = record
        player = asyncio.ensure_future(play(session, PLAY_MS)) if PLAY_MS else None
        last = None
        try:
            while (frame := await session.inbound.get()) is not None:
                now = time.monotonic()
                if last is not None:
                    record["max_gap_ms"] = max(record["max_gap_ms"], (now - last) * 1000)
                last = now
                digest.update(frame)
                record["bytes"] += len(frame)
            record["sha256"] = digest.hexdigest()
        finally:
            if player is not None:
                player.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await player
            record["sha256"] = digest.hexdigest()
            record["ended"] = True


async def play(session: VoiceSession, ms: int) -> None:
    """Queue ``ms`` of agent audio (mu-law silence) for the caller, 100 ms at a time."""
    for _ in range(ms // 100):
        await session.put_outbound(b"\xff" * 800)


def blocking_sms(sms: Any) -> None:
    """An ``on_sms`` handler that blocks its thread for ABUSE_SMS_BLOCK_MS (a slow CRM)."""
    time.sleep(float(SMS_BLOCK_MS or 0) / 1000)


counter = _Counter()
app = FastAPI()


@app.get("/test/calls/{call_sid}")
async def call_record(call_sid: str) -> dict[str, Any]:
    """What this server received on one call."""
    return counter.calls.get(call_sid, {"bytes": 0, "sha256": "", "ended": False})


@app.get("/test/admission")
async def admission() -> dict[str, Any]:
    """This server's call slots and refusals."""
    return {
        "live_calls": voice.registry.live_count,
        "reserved": voice.registry.reserved_count,
        "refusals": voice.refusals,
    }


voice = VoiceServer(
    app=app,
    on_call=counter.handle,
    max_calls=int(os.environ.get("ABUSE_MAX_CALLS", "20")),
    drain_timeout=float(os.environ.get("ABUSE_DRAIN_TIMEOUT", "5")),
    on_sms=blocking_sms if SMS_BLOCK_MS else None,
)
