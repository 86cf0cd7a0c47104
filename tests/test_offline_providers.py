"""Issue 3: the offline providers behind the real Media Streams transport, and the demo."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import VoiceServer, single_session_server, wait_for

from voice_runtime.audio import pcm16_to_ulaw, read_wav, ulaw_decode
from voice_runtime.offline import synthesize_ulaw
from voice_runtime.providers.offline_stt import OfflineStt
from voice_runtime.providers.offline_tts import OfflineTts
from voice_runtime.stt import create_stt
from voice_runtime.testing.metrics import word_accuracy
from voice_runtime.transports.twilio_ws import StreamOptions
from voice_runtime.tts import create_tts

SENTENCES = [
    "Please call me back tomorrow morning.",
    "I would like to change my delivery address.",
    "The weather is nice today.",
    "Can you send me the invoice by email?",
]


async def _transcripts(server: VoiceServer, audio: list[bytes]) -> list[str]:
    """Send each utterance (with line silence between) and collect what the STT committed."""
    stt = OfflineStt()
    server.session.stt_factory = lambda: stt
    got: list[str] = []
    async with server.simulator(silence_when_idle=False) as sim:
        await server.session.wait_for_ws_connect_async(5)
        for clip in audio:
            stt.on_committed = got.append
            before = len(got)
            # Timing does not matter to the VAD: send fast, with 0.8 s of line silence after.
            await sim.send_audio(clip + b"\xff" * 6400, realtime=False)
            assert await wait_for(lambda n=before: len(got) > n, timeout=20)
    return got


@pytest.mark.timeout(180)
async def test_offline_stt_transcribes_piper_speech_through_the_transport(
    voice_server: VoiceServer,
) -> None:
    clips = [synthesize_ulaw(s, "piper") for s in SENTENCES]
    heard = await _transcripts(voice_server, clips)
    accuracy = word_accuracy(zip(SENTENCES, heard, strict=True))
    assert accuracy >= 0.85, (accuracy, heard)


@pytest.mark.parametrize("kind", ["silence", "noise"])
async def test_offline_stt_commits_nothing_for_silence_or_noise(
    voice_server: VoiceServer, kind: str
) -> None:
    if kind == "silence":
        audio = b"\xff" * 80_000  # 10 s
    else:
        rng = np.random.default_rng(7)
        noise = (rng.standard_normal(80_000) * 0.03 * 32767).astype(np.int16)
        audio = pcm16_to_ulaw(noise.tobytes())
    stt = OfflineStt()
    voice_server.session.stt_factory = lambda: stt
    recognizing: list[str] = []
    stt.on_recognizing = recognizing.append
    session = voice_server.session
    async with voice_server.simulator(silence_when_idle=False) as sim:
        await session.wait_for_ws_connect_async(5)
        await sim.send_audio(audio, realtime=False)
        await sim.send_audio(b"\xff" * 8000, realtime=False)
        frames = -(-len(audio) // 160) + 8000 // 160  # the last one may be short
        # Every frame reached the STT and went through its VAD...
        assert await wait_for(
            lambda: session.stats.inbound_frames == frames and session.inbound.empty(), 20
        )
        await stt.stop()  # ...and whatever transcription that started has finished.
    assert stt.committed == [] and recognizing == []


async def test_offline_tts_round_trip_through_the_call() -> None:
    """What the agent says with the offline TTS, the offline STT hears back."""
    # The server sends the audio as it is made and the caller plays it at once: this test is
    # about the words, not the pace (real-time playback is other tests' subject).
    async with single_session_server(options=StreamOptions(lead_ms=60_000)) as server:
        s = server.session
        tts = create_tts("offline", voice="piper")
        text = "Your appointment is confirmed for Friday at ten."
        async with server.simulator(playback="instant") as sim:
            await s.wait_for_ws_connect_async(5)
            result = await asyncio.to_thread(tts.speak, text, s)
            assert result["last_spoken"] == text and not result["interrupted"]
            assert result["heard_ms"] == result["audio_ms"] > 1000
            heard = bytes(sim.heard)
        assert len(heard) / 8 == pytest.approx(result["audio_ms"], abs=1)
        # Feed the caller's recording to the offline STT, as a second call would.
        back = await _transcripts(server, [heard])
    assert word_accuracy([(text, back[0])]) >= 0.85, back


def test_offline_tts_streams_first_audio_before_synthesis_ends() -> None:
    tts = OfflineTts(voice="espeak")
    chunks = list(
        tts.stream_ulaw("This sentence is long enough to need several audio buffers. " * 3)
    )
    assert len(chunks) > 3
    assert all(isinstance(c, bytes) and c for c in chunks)


def test_factories_know_the_offline_providers() -> None:
    assert isinstance(create_stt("offline"), OfflineStt)
    assert isinstance(create_tts("offline", voice="espeak"), OfflineTts)
    with pytest.raises(ValueError, match="unknown offline voice"):
        create_tts("offline", voice="robot")


@pytest.mark.timeout(120)
def test_demo_holds_a_spoken_conversation(tmp_path: Path) -> None:
    from voice_runtime.demo import run_demo

    result = run_demo(
        engine="offline", out=None, record=tmp_path / "call.wav", timeout=60, virtual_time=True
    )
    said = [t.text for t in result.turns if t.speaker == "agent"]
    heard = [t.text for t in result.turns if t.speaker == "caller"]
    assert said[0].startswith("Hello!")
    assert len(heard) == 2 and "alex" in heard[0].lower()
    assert "alex" in said[1].lower()  # the agent answered from what it heard
    assert said[-1].endswith("Goodbye!") and "booked" in said[-1]
    assert len(result.latencies_ms) == 2
    for turn in result.turn_timings:  # each stage of a turn follows the one before it
        assert turn["committed_ms"] is not None and turn["first_sent_ms"] is not None
        assert turn["first_heard_ms"] is not None
        assert turn["committed_ms"] <= turn["first_sent_ms"] <= turn["first_heard_ms"] + 1
    wav = read_wav(tmp_path / "call.wav")
    assert wav.channels == 2 and wav.duration_s > 5
    caller, agent = wav.samples()[:, 0], wav.samples()[:, 1]
    assert np.abs(caller).max() > 1000 and np.abs(agent).max() > 1000


def test_mock_demo_runs_fast(tmp_path: Path) -> None:
    from voice_runtime.demo import run_demo

    result = run_demo(engine="mock", out=None, record=None, timeout=30, virtual_time=True)
    assert [t.speaker for t in result.turns] == ["agent", "caller", "agent", "caller", "agent"]


def test_ulaw_decode_of_silence_is_zero() -> None:
    assert not ulaw_decode(b"\xff" * 10).any()
