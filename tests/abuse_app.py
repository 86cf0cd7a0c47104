"""The app that abuse tests serve in a second process (see abuse_kit.ServedApp).

Every call's caller audio is counted and hashed, readable at ``GET /test/calls/{call_sid}``
(with the session's stats, the caller audio it holds queued and the longest gap between two
caller frames), so a test can check that a legitimate call lost no frame while an attack ran;
call slots and refusals by reason are at ``GET /test/admission``, the server's
connection-level event counts at ``GET /test/connection-stats``. A call whose SID starts with
``CAstall`` never reads its caller audio (a stalled consumer) until it ends.

Knobs from the environment: ABUSE_MAX_CALLS (default 20), ABUSE_DRAIN_TIMEOUT (5),
ABUSE_START_TIMEOUT (stream start timeout, 10), ABUSE_LEAD_MS (how far ahead agent audio is
sent, 120), ABUSE_PLAY_MS (agent audio every call plays, 0), ABUSE_SMS_BLOCK_MS (an ``on_sms``
that blocks this long), ABUSE_SMS_GATE=1 (a sync ``on_sms`` that blocks until
``POST /test/sms/release``; ``GET /test/sms`` counts them), ABUSE_CALLBACK_BLOCK_MS (sync
``on_dtmf``/``on_event``/``on_disconnected`` that block this long; the record's ``callbacks``
lists them in the order they ran), ABUSE_WS_SNDBUF (the kernel send
buffer of each websocket, bytes), and the usual TWILIO_* / VOICE_* variables (signatures,
public URL). A call whose ``start`` carries the parameter ``abuse_play_ms`` gets that much
agent audio, and one with ``abuse_hangup_after_s`` is hung up by the app after that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Response

from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.transports.fastws import EXTENSION
from voice_runtime.transports.guard import connection_stats
from voice_runtime.transports.twilio_ws import StreamOptions

PLAY_MS = int(os.environ.get("ABUSE_PLAY_MS", "0"))
SMS_BLOCK_MS = os.environ.get("ABUSE_SMS_BLOCK_MS")
CALLBACK_BLOCK_MS = os.environ.get("ABUSE_CALLBACK_BLOCK_MS")


class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, VoiceSession] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}

    async def handle(self, session: VoiceSession) -> None:
        sid = session.call_sid or ""
        digest = hashlib.sha256()
        # max_gap_ms: the longest wait between two caller frames here (a stalled loop shows).
        record = {"bytes": 0, "sha256": digest.hexdigest(), "ended": False, "max_gap_ms": 0.0}
        with self._lock:
            self.calls[sid] = record
            self.sessions[sid] = session
        if sid.startswith("CAstall"):
            await session.wait_until_disconnected_async()
            record["ended"] = True
            return
        side = asyncio.create_task(_act(session))
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
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side
            record["sha256"] = digest.hexdigest()
            record["ended"] = True


async def _act(session: VoiceSession) -> None:
    """What the call's parameters ask the app to do: play audio, hang up."""
    params = session.call_info.custom_parameters if session.call_info else {}
    play_ms = int(params.get("abuse_play_ms", PLAY_MS))
    for _ in range(play_ms // 100):
        await session.put_outbound(b"\xff" * 800)  # 100 ms of mu-law silence
    hangup = params.get("abuse_hangup_after_s")
    if hangup is not None:
        await asyncio.sleep(float(hangup))
        session.request_disconnect()


class _SendBuffer:
    """ASGI middleware: sets SO_SNDBUF on websocket sockets (ABUSE_WS_SNDBUF)."""

    def __init__(self, app: Any, size: int) -> None:
        self.app = app
        self.size = size

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        stream = (scope.get("extensions") or {}).get(EXTENSION, {}).get("stream")
        if scope["type"] == "websocket" and stream is not None:
            sock = stream.transport.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.size)
        await self.app(scope, receive, send)


def blocking_sms(sms: Any) -> None:
    """An ``on_sms`` handler that blocks its thread for ABUSE_SMS_BLOCK_MS (a slow CRM)."""
    time.sleep(float(SMS_BLOCK_MS or 0) / 1000)


def blocking_callbacks_session() -> VoiceSession:
    """A session whose sync callbacks block for ABUSE_CALLBACK_BLOCK_MS and log their order."""
    log: list[str] = []
    block_s = float(CALLBACK_BLOCK_MS or 0) / 1000

    def note(entry: str) -> None:
        time.sleep(block_s)
        log.append(entry)

    session = VoiceSession(
        on_dtmf=note,
        on_event=lambda event: note(event.kind),
        on_disconnected=lambda: note("disconnected"),
    )
    session.callback_log = log  # type: ignore[attr-defined]
    return session


counter = _Counter()
app = FastAPI()
if os.environ.get("ABUSE_WS_SNDBUF"):
    app.add_middleware(_SendBuffer, size=int(os.environ["ABUSE_WS_SNDBUF"]))


@app.get("/test/calls/{call_sid}")
async def call_record(call_sid: str) -> dict[str, Any]:
    """What this server received on one call."""
    record = dict(counter.calls.get(call_sid, {"bytes": 0, "sha256": "", "ended": False}))
    session = counter.sessions.get(call_sid)
    if session is not None:
        record["stats"] = dataclasses.asdict(session.stats)
        record["queued_bytes"] = sum(len(f) for f in session.inbound._queue if f)  # type: ignore[attr-defined]
        record["callbacks"] = list(getattr(session, "callback_log", []))
    return record


@app.post("/test/place")
async def place(async_amd: bool = False) -> dict[str, str]:
    """Place a call with ``voice.place_call_async`` (TWILIO_* point at a fake REST API)."""
    options: dict[str, Any] = {}
    if async_amd:
        options = {"machine_detection": "Enable", "async_amd": True}
    session = await voice.place_call_async("+15550002222", **options)
    sid = session.call_sid or ""
    got = counter.events.setdefault(sid, [])
    session.on_event = lambda event: got.append({"kind": event.kind, **event.data})
    return {"call_sid": sid}


@app.get("/test/events/{call_sid}")
async def call_events(call_sid: str) -> list[dict[str, Any]]:
    """The session events of a call placed with ``/test/place``."""
    return list(counter.events.get(call_sid, []))


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


@app.get("/test/big")
async def big(kb: int = 1024) -> Response:
    """A response of ``kb`` KiB (for peers that do not read)."""
    return Response(b"x" * (kb * 1024), media_type="application/octet-stream")


@app.get("/test/connection-stats")
async def stats() -> dict[str, int]:
    """Connection-level events (refusals, timeouts, aborts, budget closes) so far."""
    return connection_stats()


voice = VoiceServer(
    app=app,
    on_call=counter.handle,
    on_sms=(
        sms_gate.on_sms
        if os.environ.get("ABUSE_SMS_GATE") == "1"
        else blocking_sms
        if SMS_BLOCK_MS
        else None
    ),
    session_factory=blocking_callbacks_session if CALLBACK_BLOCK_MS else VoiceSession,
    max_calls=int(os.environ.get("ABUSE_MAX_CALLS", "20")),
    drain_timeout=float(os.environ.get("ABUSE_DRAIN_TIMEOUT", "5")),
    stream_options=StreamOptions(
        start_timeout_s=float(os.environ.get("ABUSE_START_TIMEOUT", "10")),
        lead_ms=float(os.environ.get("ABUSE_LEAD_MS", "120")),
    ),
)
