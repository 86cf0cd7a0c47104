"""Regressions: blocking calls on the loop thread, drain, disconnect logging, STT start."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from conftest import wait_for

from voice_runtime import Conversation, VoiceServer
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


async def test_drain_lets_a_handler_finish_its_after_call_work() -> None:
    saved: list[str] = []

    async def on_call(session: VoiceSession) -> None:
        await session.wait_until_disconnected_async()
        await asyncio.sleep(0.3)  # after-call work, e.g. saving the transcript
        saved.append("transcript")

    voice = VoiceServer(on_call=on_call, stt=MockStt, drain_timeout=5.0)
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await wait_for(lambda: voice.registry.live_count == 1)
        drain = asyncio.create_task(voice.drain(3.0))
        await sim.hangup()
        await asyncio.wait_for(drain, 5)
    assert saved == ["transcript"]


async def test_drain_lets_a_sync_handler_finish_its_after_call_work() -> None:
    saved: list[str] = []

    def on_call(session: VoiceSession) -> None:
        session.wait_until_disconnected(10)
        time.sleep(0.3)  # after-call work in the handler's thread
        saved.append("transcript")

    voice = VoiceServer(on_call=on_call, stt=MockStt, drain_timeout=5.0)
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await wait_for(lambda: voice.registry.live_count == 1)
        drain = asyncio.create_task(voice.drain(3.0))
        await sim.hangup()
        await asyncio.wait_for(drain, 5)
        assert saved == ["transcript"]
