"""Regressions: blocking calls on the loop thread, drain, disconnect logging, STT start."""

from __future__ import annotations

import logging

import pytest

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
