"""The app that abuse tests serve in a second process (see abuse_kit.ServedApp).

Every call's caller audio is counted and hashed, readable at ``GET /test/calls/{call_sid}``
(with the session's stats and the caller audio it holds queued), so a test can check that a
legitimate call lost no frame while an attack ran; call slots and refusals by reason are at
``GET /test/admission``. A call whose SID starts with ``CAstall`` never reads its caller audio
(a stalled consumer) until it ends. Knobs come from the environment: ABUSE_MAX_CALLS (default
20), ABUSE_SMS_GATE=1 (a sync ``on_sms`` that blocks until ``POST /test/sms/release``;
``GET /test/sms`` counts them), and the usual TWILIO_* / VOICE_*
variables (signatures, public URL).
"""

from __future__ import annotations

import dataclasses
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
        self.sessions: dict[str, VoiceSession] = {}

    async def handle(self, session: VoiceSession) -> None:
        sid = session.call_sid or ""
        digest = hashlib.sha256()
        record = {"bytes": 0, "sha256": digest.hexdigest(), "ended": False}
        with self._lock:
            self.calls[sid] = record
            self.sessions[sid] = session
        if sid.startswith("CAstall"):
            await session.wait_until_disconnected_async()
            record["ended"] = True
            return
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
    record = dict(counter.calls.get(call_sid, {"bytes": 0, "sha256": "", "ended": False}))
    session = counter.sessions.get(call_sid)
    if session is not None:
        record["stats"] = dataclasses.asdict(session.stats)
        record["queued_bytes"] = sum(len(f) for f in session.inbound._queue if f)  # type: ignore[attr-defined]
    return record


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
