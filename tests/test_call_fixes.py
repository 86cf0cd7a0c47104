"""Regressions: blocking calls on the loop thread, drain, disconnect logging, STT start."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import wait_for

from voice_runtime import Conversation, LoopThreadError, VoiceServer, digits, voicemail
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.session import VoiceSession
from voice_runtime.testing import CallerSimulator
from voice_runtime.testing.server import serve_in_loop


async def test_an_app_hangup_logs_disconnect_requested_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def on_call(session: VoiceSession) -> None:
        # The app hangs up; the runtime's end-after-handler asks again when this returns.
        await Conversation(session, MockTts()).hangup_async()

    voice = VoiceServer(on_call=on_call, stt=MockStt)
    with caplog.at_level(logging.INFO, logger="voice_runtime.session"):
        async with (
            serve_in_loop(voice.app) as srv,
            CallerSimulator(srv.ws_url + "/voice") as sim,
        ):
            assert await sim.wait_closed(10)
    lines = [r for r in caplog.records if r.getMessage() == "disconnect requested"]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_drain_lets_a_handler_finish_its_after_call_work(kind: str) -> None:
    saved: list[str] = []

    async def async_handler(session: VoiceSession) -> None:
        await session.wait_until_disconnected_async()
        await asyncio.sleep(0.3)  # after-call work, e.g. saving the transcript
        saved.append("transcript")

    def sync_handler(session: VoiceSession) -> None:
        session.wait_until_disconnected(10)
        time.sleep(0.3)  # after-call work in the handler's thread
        saved.append("transcript")

    on_call = async_handler if kind == "async" else sync_handler
    voice = VoiceServer(on_call=on_call, stt=MockStt, drain_timeout=5.0)
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await wait_for(lambda: voice.registry.live_count == 1)
        drain = asyncio.create_task(voice.drain(3.0))
        await sim.hangup()
        await asyncio.wait_for(drain, 5)
    assert saved == ["transcript"]


async def test_blocking_methods_raise_at_once_on_the_loop_thread_naming_their_twins() -> None:
    outcomes: dict[str, str] = {}

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, MockTts())
        control = session.control
        checks: dict[str, tuple[Any, Callable[[], Any]]] = {
            "listen": (conv, lambda: conv.listen(timeout=5)),
            "say": (conv, lambda: conv.say("hi")),
            "gather_digits": (conv, lambda: conv.gather_digits(1, timeout=5)),
            "leave_voicemail": (conv, lambda: conv.leave_voicemail("hi", timeout=5)),
            "warm_transfer": (conv, lambda: conv.warm_transfer(voice, "+15550001111")),
            "digits.gather_digits": (digits, lambda: digits.gather_digits(session, 1, timeout=5)),
            "voicemail.leave_voicemail": (
                voicemail,
                lambda: voicemail.leave_voicemail(session, "hi", MockTts(), timeout=5),
            ),
            "control.transfer": (control, lambda: control.transfer("+15550001111")),
            "control.send_digits": (control, lambda: control.send_digits("1")),
            "control.start_recording": (control, lambda: control.start_recording()),
            "control.stop_recording": (control, lambda: control.stop_recording("RE1")),
        }
        for name, (owner, call) in checks.items():
            t0 = time.monotonic()
            try:
                call()
            except LoopThreadError as exc:
                assert exc.twin is not None and f"{exc.twin}()" in str(exc), exc
                twin = getattr(owner, exc.twin.rsplit(".", 1)[-1], None)
                fast = time.monotonic() - t0 < 1.0
                outcomes[name] = "ok" if callable(twin) and fast else f"bad twin {exc.twin}"
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                outcomes[name] = f"{type(exc).__name__}: {exc}"
            else:
                outcomes[name] = "returned"
        with pytest.raises(LoopThreadError, match="session_for_call"):
            voice.session_for_call("CA00000000000000000000000000000000", timeout=5)
        conv.hangup()  # never blocked (0.1.x: request_disconnect): it works on the loop

    voice = VoiceServer(on_call=on_call, stt=MockStt)
    async with (
        serve_in_loop(voice.app) as srv,
        CallerSimulator(srv.ws_url + "/voice") as sim,
    ):
        assert await sim.wait_closed(10)
    assert outcomes and set(outcomes.values()) == {"ok"}, outcomes


async def test_a_slow_stt_factory_stalls_no_call_and_loses_no_audio() -> None:
    built: list[MockStt] = []
    frames = b"\xff" * 160 * 25  # 0.5 s of caller audio, sent while the STT is being built

    def slow_stt() -> MockStt:
        if built:
            time.sleep(0.5)  # a model load, for every call but the first
        built.append(MockStt())
        return built[-1]

    async def on_call(session: VoiceSession) -> None:
        await session.wait_until_disconnected_async()

    voice = VoiceServer(on_call=on_call, stt=slow_stt)
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with (
        serve_in_loop(voice.app) as srv,
        CallerSimulator(srv.ws_url + "/voice") as first,
    ):
        assert await wait_for(lambda: len(built) == 1)
        stop = asyncio.Event()
        ticks = asyncio.create_task(ticker(stop))
        talking = asyncio.create_task(first.send_audio(b"\xff" * 160 * 50))  # paced, 1 s
        async with CallerSimulator(srv.ws_url + "/voice") as second:
            await second.send_audio(frames, realtime=False)
            assert await wait_for(lambda: len(built) == 2 and built[1].frames >= 25, 5)
            stop.set()
            await ticks
            await talking
    # The loop kept running while the second call's STT was built in a worker thread.
    assert max(gaps) < 0.3, max(gaps)
