"""No dead air: a call whose on_call handler raised or returned ends within about a second."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from conftest import wait_for

from voice_runtime.mock.tts import MockTts
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.types import SessionEvent

SORRY = "Sorry, something went wrong."


def _factory(events: list[SessionEvent]) -> Any:
    def factory() -> VoiceSession:
        return VoiceSession(on_event=events.append)

    return factory


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("speaker", ["error_tts", "goodbye_tts", "none"])
async def test_raising_handler_is_hung_up_after_the_error_message(
    kind: str, speaker: str, caplog: pytest.LogCaptureFixture
) -> None:
    raised_at: list[float] = []
    events: list[SessionEvent] = []
    tts = MockTts(ms_per_char=10)

    if kind == "sync":

        def on_call(session: VoiceSession) -> None:
            raised_at.append(time.monotonic())
            raise RuntimeError("boom")

    else:

        async def on_call(session: VoiceSession) -> None:  # type: ignore[misc]
            raised_at.append(time.monotonic())
            raise RuntimeError("boom")

    kwargs: dict[str, Any] = {}
    if speaker != "none":
        kwargs[speaker] = tts
    server = VoiceServer(
        on_call=on_call, session_factory=_factory(events), error_message=SORRY, **kwargs
    )
    caplog.set_level(logging.INFO, logger="voice_runtime")
    async with serve_in_loop(server.app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice")
        await sim.connect()
        assert await sim.wait_closed(5), "the call stayed open after its handler raised"
        assert raised_at and time.monotonic() - raised_at[0] < 3.0
        if speaker == "none":
            assert tts.spoken == []
        else:
            assert tts.spoken == [SORRY]
            # Everything the message played reached the caller's ear before the hang-up.
            assert len(sim.heard) >= len(tts.audio_for(SORRY))
        assert await wait_for(lambda: server.registry.live_count == 0)
        assert await wait_for(lambda: any(e.kind == "handler_failed" for e in events))
    failed = [e for e in events if e.kind == "handler_failed"]
    assert len(failed) == 1
    assert failed[0].data["error"] == "RuntimeError"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "call handler failed" in errors[0].getMessage()
    assert errors[0].exc_info is not None


async def test_handler_returning_after_queuing_audio_lets_it_play_then_ends() -> None:
    second = bytes([0x11]) * 8000  # 1 s of mu-law

    async def on_call(session: VoiceSession) -> None:
        await session.put_outbound(second)

    server = VoiceServer(on_call=on_call)
    async with serve_in_loop(server.app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice")
        await sim.connect()
        assert await sim.wait_closed(6)
        assert sim.heard.count(0x11) == len(second)
        assert await wait_for(lambda: server.registry.live_count == 0)


async def test_handler_returning_with_nothing_queued_ends_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    returned_at: list[float] = []
    events: list[SessionEvent] = []

    def on_call(session: VoiceSession) -> None:
        returned_at.append(time.monotonic())

    server = VoiceServer(on_call=on_call, session_factory=_factory(events))
    async with serve_in_loop(server.app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice")
        await sim.connect()
        assert await sim.wait_closed(5)
        assert returned_at and time.monotonic() - returned_at[0] < 3.0
        assert await wait_for(lambda: server.registry.live_count == 0)
    assert not [e for e in events if e.kind == "handler_failed"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_handler_returning_after_the_caller_hung_up_is_left_alone() -> None:
    done = threading.Event()

    def on_call(session: VoiceSession) -> None:
        session.wait_until_disconnected(10)
        done.set()

    server = VoiceServer(on_call=on_call)
    async with serve_in_loop(server.app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice")
        await sim.connect()
        await sim.hangup()
        assert await wait_for(done.is_set)
        assert await wait_for(lambda: server.registry.live_count == 0)
