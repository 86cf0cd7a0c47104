"""The app that abuse tests serve in a second process (see abuse_kit.ServedApp).

Every call's caller audio is counted and hashed, readable at ``GET /test/calls/{call_sid}``,
so a test can check that a legitimate call lost no frame while an attack ran; call slots and
refusals by reason are at ``GET /test/admission``. Knobs come from the environment:
ABUSE_MAX_CALLS (default 20), ABUSE_SMS_GATE=1 (a sync ``on_sms`` that blocks until
``POST /test/sms/release``; ``GET /test/sms`` counts them), and the usual TWILIO_* / VOICE_*
variables (signatures, public URL).
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

from fastapi import FastAPI

from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, dict[str, Any]] = {}

    async def handle(self, session: VoiceSession) -> None:
        sid = session.call_sid or ""
        digest = hashlib.sha256()
        record = {"bytes": 0, "sha256": digest.hexdigest(), "ended": False}
        with self._lock:
            self.calls[sid] = record
        try:
            while (frame := await session.inbound.get()) is not None:
                digest.update(frame)
                record["bytes"] += len(frame)
            record["sha256"] = digest.hexdigest()
        finally:
            record["sha256"] = digest.hexdigest()
            record["ended"] = True


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


class _SmsGate:
    """A blocking SMS handler: each one waits until the test opens the gate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate = threading.Event()
        self.entered = 0
        self.running = 0
        self.max_running = 0

    def on_sms(self, sms: Any) -> str:
        with self._lock:
            self.entered += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.gate.wait(20)
            return "got it"
        finally:
            with self._lock:
                self.running -= 1


sms_gate = _SmsGate()


@app.get("/test/sms")
async def sms_state() -> dict[str, int]:
    """How many gated SMS handlers have started, run now, and ran at once at most."""
    return {
        "entered": sms_gate.entered,
        "running": sms_gate.running,
        "max_running": sms_gate.max_running,
    }


@app.post("/test/sms/release")
async def sms_release() -> dict[str, bool]:
    """Let every gated SMS handler return."""
    sms_gate.gate.set()
    return {"released": True}


voice = VoiceServer(
    app=app,
    on_call=counter.handle,
    on_sms=sms_gate.on_sms if os.environ.get("ABUSE_SMS_GATE") == "1" else None,
    max_calls=int(os.environ.get("ABUSE_MAX_CALLS", "20")),
    drain_timeout=float(os.environ.get("ABUSE_DRAIN_TIMEOUT", "5")),
)
