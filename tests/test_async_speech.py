"""Async is the core of speech: an ``async def`` handler speaks with no worker thread.

Each built-in TTS implements ``speak_async`` natively (ElevenLabs through ``AsyncElevenLabs``
against the fake server, Azure through its SDK events, the mock and offline engines), and the
blocking ``speak`` runs that coroutine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from test_provider_contract import TTS_PROVIDERS, _tts_harness

from voice_runtime import Conversation, VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing import CallerSimulator
from voice_runtime.testing.server import serve_in_loop

# Threads that stand for a vendor's or an engine's own native threads, not ours: the fake
# Azure SDK fires its events from threads as the native library does, and local synthesis is
# CPU work computed off the loop (the thread ends with the synthesis, not with playback).
ENGINE_THREADS = ("fake-azure-synth", "offline-tts-synth", "espeak-synth")


@pytest.fixture
def started_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the threads started while the test runs."""
    names: list[str] = []
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        names.append(self.name)
        original(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    yield names


@pytest.mark.parametrize("provider", TTS_PROVIDERS)
async def test_async_handler_speaks_with_no_worker_thread(
    provider: str, monkeypatch: pytest.MonkeyPatch, started_threads: list[str]
) -> None:
    results: list[dict[str, Any]] = []
    during: list[str] = []
    async with _tts_harness(provider, monkeypatch) as harness:

        async def on_call(session: VoiceSession) -> None:
            conv = Conversation(session, harness.tts)
            mark = len(started_threads)
            results.append(await conv.say_async("Thanks for calling today."))
            results.append(await conv.say_async("Goodbye."))
            during.extend(started_threads[mark:])
            await conv.hangup_async()

        voice = VoiceServer(on_call=on_call)
        async with serve_in_loop(voice.app) as srv:
            sim = CallerSimulator(srv.ws_url + "/voice")
            async with sim:
                assert await sim.wait_closed(15)
    assert [r["last_spoken"] for r in results] == ["Thanks for calling today.", "Goodbye."]
    assert all("error" not in r and not r["interrupted"] for r in results)
    # The caller heard both sentences in full.
    total = results[0]["audio_ms"] + results[1]["audio_ms"]
    assert total > 0 and sim.heard_ms >= total - 1
    ours = [n for n in during if not n.startswith(ENGINE_THREADS)]
    assert ours == [], ours


async def test_sync_speak_runs_the_same_coroutine_on_the_sessions_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voice_runtime.mock.tts import MockTts

    loops: list[asyncio.AbstractEventLoop] = []
    tts = MockTts()
    native = tts.speak_async

    async def spy(*args: Any) -> dict[str, Any]:
        loops.append(asyncio.get_running_loop())
        return await native(*args)

    monkeypatch.setattr(tts, "speak_async", spy)
    results: list[dict[str, Any]] = []

    def on_call(session: VoiceSession) -> None:  # a sync handler, in its own thread
        results.append(tts.speak("Hello there.", session))
        session.request_disconnect(after_playback=True)

    voice = VoiceServer(on_call=on_call)
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await sim.wait_closed(10)
    assert loops == [asyncio.get_running_loop()]
    assert results[0]["last_spoken"] == "Hello there." and not results[0]["interrupted"]
    assert sim.heard_ms >= results[0]["audio_ms"] - 1


@pytest.mark.parametrize("provider", [*TTS_PROVIDERS, "fallback"])
async def test_sync_speak_on_the_loop_thread_names_an_async_twin_that_exists(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_runtime import LoopThreadError
    from voice_runtime.mock.tts import MockTts
    from voice_runtime.tts import create_tts

    session = VoiceSession()
    session.set_loop(asyncio.get_running_loop())
    async with _tts_harness("mock" if provider == "fallback" else provider, monkeypatch) as h:
        tts = create_tts([h.tts, MockTts()]) if provider == "fallback" else h.tts
        with pytest.raises(LoopThreadError) as info:
            tts.speak("Hello.", session, threading.Event())
    twin = info.value.twin
    assert twin == f"{type(tts).__name__}.speak_async" and f"{twin}()" in str(info.value)
    assert callable(getattr(tts, "speak_async", None))


def test_sync_speak_with_a_mock_session_keeps_the_threads_event_loop() -> None:
    from unittest.mock import MagicMock

    from voice_runtime.mock.tts import MockTts

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # a 0.1.x test's own loop, read back with get_event_loop()
    try:
        session = MagicMock()
        session.is_disconnected = False
        assert MockTts().speak("Hi.", session)["last_spoken"] == "Hi."
        session.send_mark_and_wait.assert_called_once_with("tts_complete", timeout=30.0)
        assert asyncio.get_event_loop() is loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()
