"""Async handlers end to end (say_async / listen_async / hangup_async) and VoiceServer(stt=...)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from conftest import wait_for

from voice_runtime import CallHangupError, Conversation, LoopThreadError, VoiceServer
from voice_runtime.contracts import AsyncTtsProvider, TtsProvider
from voice_runtime.errors import ConfigurationError
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.providers.base import ECHO_TAIL_S
from voice_runtime.session import VoiceSession
from voice_runtime.testing import CallerSimulator
from voice_runtime.testing.server import serve_in_loop


async def test_async_handler_says_listens_and_hangs_up_on_a_served_call() -> None:
    stts: list[MockStt] = []
    heard: list[str | None] = []
    results: list[dict[str, Any]] = []
    ticks = 0

    def make_stt() -> MockStt:
        stts.append(MockStt())
        return stts[-1]

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, MockTts())
        results.append(await conv.say_async("Hello, what is your name?"))
        heard.append(await conv.listen_async(timeout=5))
        results.append(await conv.say_async("Goodbye."))
        await conv.hangup_async()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    voice = VoiceServer(on_call=on_call, stt=make_stt)
    async with serve_in_loop(voice.app) as srv:
        tick_task = asyncio.create_task(ticker())
        sim = CallerSimulator(srv.ws_url + "/voice")
        try:
            async with sim:
                assert await wait_for(lambda: len(results) == 1, 10)
                # What the STT commits during the echo tail after the agent spoke is discarded.
                await asyncio.sleep(ECHO_TAIL_S + 0.1)
                stts[0].inject("Ada")
                assert await sim.wait_closed(10)
        finally:
            tick_task.cancel()
    assert heard == ["Ada"]
    assert [r["last_spoken"] for r in results] == ["Hello, what is your name?", "Goodbye."]
    assert all(
        set(r) >= {"interrupted", "call_disconnected", "heard_ms", "audio_ms"} for r in results
    )
    assert not results[0]["interrupted"] and results[0]["heard_ms"] > 0
    assert sim.heard_ms >= results[0]["audio_ms"] + results[1]["audio_ms"] - 1
    # The loop kept running while the handler waited for the caller to hear it.
    assert ticks > 20
    assert await wait_for(lambda: stts[0].stopped)


async def test_server_stt_by_name_gives_each_call_its_own_provider() -> None:
    stts: list[Any] = []

    async def on_call(session: VoiceSession) -> None:
        stts.append(session.stt)
        await session.wait_until_disconnected_async()

    voice = VoiceServer(on_call=on_call, stt="mock")
    async with serve_in_loop(voice.app) as srv:
        for n in range(1, 3):
            async with CallerSimulator(srv.ws_url + "/voice") as sim:
                assert await wait_for(lambda n=n: len(stts) == n, 5)
                await sim.hangup()
    assert all(isinstance(s, MockStt) for s in stts)
    assert stts[0] is not stts[1]
    assert await wait_for(lambda: all(s.stopped for s in stts))


def test_server_stt_with_an_unknown_name_fails_when_built() -> None:
    with pytest.raises(ValueError, match="nosuch"):
        VoiceServer(stt="nosuch")


async def test_listen_without_stt_fails_at_once_sync_and_async() -> None:
    errors: list[BaseException] = []

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, MockTts())
        t0 = time.monotonic()
        try:
            await conv.listen_async(timeout=30)
        except ConfigurationError as exc:
            errors.append(exc)
        try:
            await asyncio.to_thread(conv.listen, 30)
        except ConfigurationError as exc:
            errors.append(exc)
        assert time.monotonic() - t0 < 5
        await conv.hangup_async()

    voice = VoiceServer(on_call=on_call)
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await sim.wait_closed(10)
    assert len(errors) == 2
    assert all("stt=" in str(e) for e in errors)


class OldStyleTts:
    """A 0.1.x-style third-party provider: a blocking speak() only."""

    def __init__(self) -> None:
        self.on_error = None
        self.inner = MockTts()
        self.threads: list[str] = []

    def speak(
        self, text: str, session: VoiceSession, stop_event: threading.Event | None = None
    ) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        return self.inner.speak(text, session, stop_event)


async def test_say_async_runs_a_provider_without_speak_async_off_the_loop() -> None:
    tts = OldStyleTts()
    assert isinstance(tts, TtsProvider) and not isinstance(tts, AsyncTtsProvider)
    assert isinstance(MockTts(), AsyncTtsProvider)
    results: list[dict[str, Any]] = []

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, tts)
        results.append(await conv.say_async("Hi there."))
        await conv.hangup_async()

    voice = VoiceServer(on_call=on_call)
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await sim.wait_closed(10)
    assert results[0]["last_spoken"] == "Hi there." and not results[0]["interrupted"]
    assert tts.threads and tts.threads[0] != threading.main_thread().name


async def test_say_async_after_hangup_raises_call_hangup() -> None:
    outcome: list[str] = []

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, MockTts())
        await session.wait_until_disconnected_async()
        try:
            await conv.say_async("anyone?")
        except CallHangupError:
            outcome.append("hangup")

    voice = VoiceServer(on_call=on_call, stt=MockStt)
    async with serve_in_loop(voice.app) as srv:
        async with CallerSimulator(srv.ws_url + "/voice") as sim:
            await sim.hangup()
        assert await wait_for(lambda: outcome == ["hangup"], 5)


async def test_loop_thread_errors_name_twins_that_exist() -> None:
    found: list[tuple[str, bool]] = []

    async def on_call(session: VoiceSession) -> None:
        tts = MockTts()
        checks: list[tuple[Any, Any]] = [
            (session, lambda: session.send_mark_and_wait("x", 1)),
            (session, lambda: session.wait_for_ws_connect(1)),
            (session, lambda: session.wait_until_disconnected(1)),
            (session, lambda: next(session.iter_dtmf(1))),
            (tts, lambda: tts.speak("hi", session, threading.Event())),
        ]
        for owner, call in checks:
            try:
                call()
            except LoopThreadError as exc:
                assert exc.twin is not None and f"{exc.twin}()" in str(exc)
                name = exc.twin.rsplit(".", 1)[-1]
                found.append((exc.twin, callable(getattr(owner, name, None))))
        session.request_disconnect()

    voice = VoiceServer(on_call=on_call)
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await sim.wait_closed(10)
    assert len(found) == 5 and all(ok for _, ok in found), found
