"""User callbacks the transport path fires (on_dtmf, on_event, on_disconnected, on_stt_ready,
session_factory) never block the event loop: sync ones run in a worker thread, in order per
session; async ones run on the loop; called from another thread they run inline (0.1.x)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from abuse_kit import PacedCaller, ServedApp, assert_no_frame_lost, sids, start_frame
from websockets.sync.client import connect as ws_connect

from voice_runtime.session import VoiceSession
from voice_runtime.types import SessionEvent

DIGITS = "0123456789*#0123456789"[:20]


def _dtmf_frame(stream_sid: str, digit: str, seq: int) -> str:
    return json.dumps(
        {
            "event": "dtmf",
            "sequenceNumber": str(seq),
            "streamSid": stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


def test_blocking_callbacks_of_one_call_do_not_delay_another_calls_audio() -> None:
    """20 DTMF digits whose on_dtmf blocks 200 ms each (4 s inline) leave a second live call's
    caller frames flowing; every callback still runs, in order, on_disconnected last."""
    with ServedApp({"ABUSE_CALLBACK_BLOCK_MS": "200"}) as app:
        caller = PacedCaller(f"{app.ws_url}/voice")
        caller.start()
        assert caller.started.wait(10)
        call_sid, stream_sid = sids()
        with ws_connect(f"{app.ws_url}/voice", compression=None, open_timeout=10) as ws:
            ws.send(start_frame(call_sid, stream_sid))
            for seq, digit in enumerate(DIGITS, start=2):
                ws.send(_dtmf_frame(stream_sid, digit, seq))
            ws.send(json.dumps({"event": "stop", "streamSid": stream_sid, "stop": {}}))
        expected = [*DIGITS, "disconnected"]
        deadline = time.monotonic() + 20
        record = app.call_record(call_sid)
        while record.get("callbacks") != expected and time.monotonic() < deadline:
            time.sleep(0.1)
            record = app.call_record(call_sid)
        assert record.get("callbacks") == expected
        caller.stop()
        assert_no_frame_lost(app, caller)
        gap = app.wait_call_record(caller)["max_gap_ms"]
        # Inline, the loop stalled 4 s; the bound leaves room for a loaded 2-core box.
        assert gap < 1000, gap
        assert app.stop() == 0


async def test_on_event_on_the_loop_thread_runs_in_a_worker_in_order() -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    s = VoiceSession(on_event=lambda ev: seen.append((ev.kind, threading.get_ident())))
    s.set_loop(asyncio.get_running_loop())
    for kind in ("a", "b", "c"):
        s.emit_event(SessionEvent(kind, {}))
    assert seen == []  # nothing ran on the loop thread
    assert await s.port.callbacks.drain()
    assert [k for k, _ in seen] == ["a", "b", "c"]
    assert all(ident != loop_thread for _, ident in seen)


async def test_async_callbacks_run_on_the_loop_and_failures_are_logged() -> None:
    seen: list[str] = []

    async def on_dtmf(digit: str) -> None:
        if digit == "1":
            raise RuntimeError("boom")
        seen.append(digit)

    s = VoiceSession(on_dtmf=on_dtmf)
    s.set_loop(asyncio.get_running_loop())
    for d in "123":
        s.signal_dtmf(d)
    assert await s.port.callbacks.drain()
    assert seen == ["2", "3"]


async def test_signal_disconnected_from_another_thread_runs_on_disconnected_inline() -> None:
    ran_on: list[int] = []
    s = VoiceSession(on_disconnected=lambda: ran_on.append(threading.get_ident()))
    s.set_loop(asyncio.get_running_loop())

    def from_worker() -> tuple[list[int], int]:
        s.signal_disconnected()
        return list(ran_on), threading.get_ident()

    ran_when_returned, worker = await asyncio.to_thread(from_worker)
    assert ran_when_returned == [worker]
    assert s.port.callbacks.in_flight == 0
