"""Benchmark the media-stream hot paths of this package without sockets.

Run ``python benchmarks/bench_transport.py`` (``--quick`` for a shorter run). A fake ASGI
websocket feeds :class:`~voice_runtime.transports.twilio_ws.MediaStreamCall` Twilio frames
and swallows what it sends, so the figures are this package's own work per frame (parser,
session queues, pacing, encoders), without uvicorn, the websockets library or the kernel.
They are steadier than the live-call benchmark on a busy machine, which makes them the
figures to watch when changing the hot paths.

* inbound: µs per caller ``media`` frame from ``websocket.receive()`` to an STT consumer
  reading it from ``session.inbound``;
* outbound: µs per 20 ms of agent audio from ``session.outbound`` to ``send_text`` (pacing
  allowed to run ahead, so no time is spent sleeping), position marks included, with the
  default outbound message size and with one message per 20 ms;
* parse / encode: the socket-free protocol functions alone;
* CPU per call-minute against the 0.1.15 baseline: the library alone, and the whole server
  stack above the socket (websocket protocol, ASGI app, library) fed masked frames through
  a fake transport, which leaves out only the kernel and idle wakeups.

:func:`run` returns the rows as dicts so a benchmark runner can collect them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from starlette.websockets import WebSocketDisconnect

from voice_runtime.session import VoiceSession
from voice_runtime.transports import twilio_protocol as proto
from voice_runtime.transports.twilio_ws import MediaStreamCall, StreamOptions

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _callminute as cm  # noqa: E402  (benchmarks/ is not a package)

STREAM_SID = cm.STREAM_SID
_media_text = cm.media_text
_start_text = cm.start_text


class _FakeWebSocket:
    """Just enough of Starlette's WebSocket for MediaStreamCall."""

    def __init__(self, messages: list[dict[str, Any]], wait_for: asyncio.Event | None) -> None:
        self._messages = iter(messages)
        self._wait_for = wait_for
        self.sent = 0
        self.application_state = None

    async def receive(self) -> dict[str, Any]:
        # A real receive suspends until the next frame arrives; yield likewise.
        await asyncio.sleep(0)
        msg = next(self._messages, None)
        if msg is None:
            if self._wait_for is not None:
                await self._wait_for.wait()
            return {"type": "websocket.disconnect", "code": 1000}
        return msg

    async def receive_text(self) -> str:
        # MediaStreamCall reads a stand-in websocket (not a Starlette one) with receive_text.
        msg = await self.receive()
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        return str(msg["text"])

    async def send_text(self, text: str) -> None:
        self.sent += 1

    async def send(self, message: dict[str, Any]) -> None:
        self.sent += 1

    async def close(self, code: int = 1000) -> None:
        return None


async def _inbound(frames: int) -> float:
    session = VoiceSession()
    messages = [{"type": "websocket.receive", "text": _start_text()}]
    messages += [{"type": "websocket.receive", "text": _media_text(i)} for i in range(frames)]
    ws = _FakeWebSocket(messages, None)
    counter = cm.InboundCounter(session)
    call = MediaStreamCall(ws, session)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    await call.run()
    await counter.task
    elapsed = time.perf_counter() - t0
    got = counter.got
    if got != frames:
        raise RuntimeError(f"inbound benchmark lost frames: {got}/{frames}")
    return elapsed / frames


async def _outbound(frames: int, frame_bytes: int | None = None) -> float:
    session = VoiceSession()
    done = asyncio.Event()
    ws = _FakeWebSocket([{"type": "websocket.receive", "text": _start_text()}], done)
    chunk = bytes(4000)  # 500 ms: the whole run fits the bounded outbound queue
    # The full run queues minutes of audio at once: lift the byte bound, not the work.
    session.outbound.max_bytes = len(chunk) * (frames // 25)  # type: ignore[attr-defined]
    for _ in range(frames // 25):
        session.put_outbound_sync(chunk)
    if session.stats.outbound_dropped:
        raise RuntimeError("outbound benchmark overflowed the session queue")
    # Pacing far ahead: measure the work per frame, not the sleeping.
    options = StreamOptions(lead_ms=1e9)
    if frame_bytes:
        options = StreamOptions(lead_ms=1e9, frame_bytes=frame_bytes)
    call = MediaStreamCall(ws, session, options=options)  # type: ignore[arg-type]
    runner = asyncio.create_task(call.run())
    t0 = time.perf_counter()
    total = 160 * frames
    # The send loop yields only when it runs dry, so one check per yield costs nothing.
    while session.stats.audio_sent_bytes < total:  # noqa: ASYNC110
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - t0
    done.set()
    await runner
    return elapsed / frames


def _unbounded_inbound(session: VoiceSession) -> None:
    """Lift the inbound bound: the call-minute feeds a minute of caller audio without pacing."""
    session.inbound._maxsize = 0  # type: ignore[attr-defined]
    session.inbound.max_bytes = 0  # type: ignore[attr-defined]


async def _ours_call(far: cm.FarEnd) -> int:
    """One call-minute through this package's transport (no pacing sleeps, like the old one)."""

    class Socket:
        application_state = None

        async def receive(self) -> dict[str, Any]:
            text = await far.next_text()
            if text is None:
                return {"type": "websocket.disconnect", "code": 1000}
            return {"type": "websocket.receive", "text": text}

        async def receive_text(self) -> str:
            text = await far.next_text()
            if text is None:
                raise WebSocketDisconnect(1000)
            return text

        async def send_text(self, text: str) -> None:
            far.sent(text)

        async def close(self, code: int = 1000) -> None:
            return None

    session = VoiceSession()
    _unbounded_inbound(session)
    cm.load_agent_audio(session.put_outbound_sync)
    counter = cm.InboundCounter(session)
    call = MediaStreamCall(Socket(), session, options=StreamOptions(lead_ms=1e9))  # type: ignore[arg-type]
    await call.run()
    await asyncio.wait_for(counter.task, 10)
    return counter.got


async def _ours_stack() -> dict[str, Any]:
    """One call-minute through VoiceWebSocketProtocol and the single-session app."""
    from fastapi import FastAPI

    from voice_runtime.transports.fastws import VoiceWebSocketProtocol
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    session = VoiceSession()
    _unbounded_inbound(session)
    app = FastAPI()
    register_voice_websocket(app, session, options=StreamOptions(lead_ms=1e9))
    cm.load_agent_audio(session.put_outbound_sync)
    counter = cm.InboundCounter(session)
    # A call-minute arrives here in well under a second: lift the per-connection frame budget
    # (issue 12), which would rightly close a real peer that sent frames this fast.
    from voice_runtime.transports.guard import ConnectionLimits

    protocol = VoiceWebSocketProtocol.with_limits(ConnectionLimits(ws_frames_per_s=0))
    result = await cm.measure_stack(app, protocol, lambda: counter.got)
    counter.task.cancel()
    return result


def _baseline_call_minute(python: str, *args: str) -> dict[str, Any] | None:
    """The old package's call-minute, run by its own venv's python; None when absent."""
    if not Path(python).exists():
        return None
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [python, str(HERE / "_callminute.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"baseline call-minute failed: {out.stderr[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pair_row(name: str, ours: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    for who, r in (("ours", ours), ("baseline", base)):
        if r is not None and (
            r["frames_in"] != cm.CALLER_FRAMES or r["agent_bytes"] < cm.AGENT_BYTES
        ):
            raise RuntimeError(f"call-minute lost audio ({who}): {r}")
    return {
        "name": name,
        "ours_cpu_s": ours["cpu_s"],
        "ours_marks": ours["marks"],
        "baseline": "voice-runtime 0.1.15" if base else None,
        "baseline_cpu_s": base["cpu_s"] if base else None,
        "baseline_marks": base["marks"] if base else None,
        "ratio": ours["cpu_s"] / base["cpu_s"] if base else None,
    }


def call_minute_rows(repeats: int) -> list[dict[str, Any]]:
    """CPU per call-minute, this package against the baseline, best of ``repeats``.

    Twice: the library alone (no sockets, no server), and the whole server stack above the
    socket (uvicorn's websocket protocol for the baseline, VoiceWebSocketProtocol for us).
    """
    python = os.environ.get("VR_BASELINE_PYTHON", "/work/baseline-venv/bin/python")
    rows = []
    for name, ours_fn, args in (
        ("library CPU per call-minute (no sockets)", lambda: cm.measure(_ours_call), ()),
        ("server stack CPU per call-minute (no kernel)", _ours_stack, ("stack",)),
    ):
        try:
            ours = min((asyncio.run(ours_fn()) for _ in range(repeats)), key=_cpu)
            base = _baseline_call_minute(python, *args, str(repeats))
            rows.append(_pair_row(name, ours, base))
        except RuntimeError as exc:  # one broken harness must not hide the other rows
            print(f"{name}: not measured: {exc}", file=sys.stderr)
    return rows


def _cpu(result: dict[str, Any]) -> float:
    return float(result["cpu_s"])


def _best(fn: Any, repeats: int) -> float:
    return min(asyncio.run(fn()) for _ in range(repeats))


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure the hot paths; return one row per path."""
    logging.getLogger("voice_runtime").setLevel(logging.ERROR)
    frames = 5_000 if quick else 20_000
    repeats = 3 if quick else 5
    rows: list[dict[str, Any]] = []

    async def inbound() -> float:
        return await _inbound(frames)

    async def outbound() -> float:
        return await _outbound(frames)

    async def outbound_160() -> float:
        return await _outbound(frames, 160)

    rows.append(
        {"name": "inbound media frame (receive -> STT)", "us": _best(inbound, repeats) * 1e6}
    )
    name = "outbound, per 20 ms of audio (default messages)"
    rows.append({"name": name, "us": _best(outbound, repeats) * 1e6})
    name = "outbound, per 20 ms of audio (160 B messages)"
    rows.append({"name": name, "us": _best(outbound_160, repeats) * 1e6})
    parser = proto.MediaStreamParser()
    parser.parse(_start_text())
    text = _media_text(7)
    n = 20_000 if quick else 100_000
    t = min(timeit.repeat(lambda: parser.parse(text), number=n, repeat=repeats)) / n
    rows.append({"name": "parse one media frame", "us": t * 1e6})
    audio = bytes(160)
    t = min(timeit.repeat(lambda: proto.encode_media(STREAM_SID, audio), number=n, repeat=repeats))
    rows.append({"name": "encode one media frame", "us": t / n * 1e6})
    for row in rows:
        row["frames_per_core_s"] = 1e6 / row["us"]
    return rows + call_minute_rows(repeats)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a plain-text table."""
    paths = [r for r in rows if "us" in r]
    out = [f"{'path':<48} {'us/frame':>9} {'frames per core-second':>23}"]
    out += [f"{r['name']:<48} {r['us']:>9.2f} {r['frames_per_core_s']:>23,.0f}" for r in paths]
    for r in rows:
        if "ours_cpu_s" not in r:
            continue
        out.append("")
        out.append(
            f"{r['name']}: ours {r['ours_cpu_s'] * 1e3:.0f} ms ({r['ours_marks']} marks echoed)"
        )
        if r["baseline"]:
            out.append(
                f"  {r['baseline']}: {r['baseline_cpu_s'] * 1e3:.0f} ms "
                f"({r['baseline_marks']} marks); ratio ours/baseline {r['ratio']:.2f}"
            )
    return "\n".join(out)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    args = parser.parse_args()
    print(format_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
