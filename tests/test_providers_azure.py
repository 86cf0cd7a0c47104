"""Azure STT and TTS through an SDK-level fake whose objects fire events from their own threads.

The Azure Speech SDK talks Microsoft's closed USP protocol from a native library, so there is
no wire protocol to fake over a socket. Instead :class:`FakeSpeechSdk` stands in for the
``azure.cognitiveservices.speech`` module: push streams collect the audio, recognizers and
synthesizers fire ``recognizing``/``recognized``/``canceled``/``synthesizing``… from their
own ``threading.Thread``, as the native SDK does, following a small script.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import VoiceServer, wait_for

from voice_runtime.audio import tone_ulaw
from voice_runtime.errors import MissingCredentialError
from voice_runtime.testing.fake_azure import (
    SDK_NAME,
    AudioStreamWaveFormat,
    CancellationErrorCode,
    FakeSpeechSdk,
    PropertyId,
    RecognizerPlan,
    ResultReason,
    SpeechSynthesisOutputFormat,
    SynthPlan,
    _recognition_evt,
)


@pytest.fixture
def fake_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSpeechSdk]:
    sdk = FakeSpeechSdk().install(monkeypatch)
    yield sdk
    for rec in sdk.recognizers:
        rec._stop.set()
        if rec.thread is not None:
            rec.thread.join(5)


# ---------------------------------------------------------------------------- helpers


class Collector:
    """Records STT callbacks and lets a coroutine wait for them."""

    def __init__(self) -> None:
        self.committed: list[str] = []
        self.partials: list[str] = []
        self.errors: list[str] = []
        self.threads: set[str] = set()

    def bind(self, stt: Any) -> Any:
        def rec(bucket: list[str]) -> Callable[[str], None]:
            def cb(text: str) -> None:
                self.threads.add(threading.current_thread().name)
                bucket.append(text)

            return cb

        stt.on_committed = rec(self.committed)
        stt.on_recognizing = rec(self.partials)
        stt.on_error = rec(self.errors)
        return stt


def _audio(ms: float) -> bytes:
    return bytes(range(256)) * int(ms * 8 / 256 + 1)


async def _feed(q: asyncio.Queue[bytes | None], audio: bytes, *, pace: float = 0.0) -> None:
    for i in range(0, len(audio), 160):
        q.put_nowait(audio[i : i + 160])
        await asyncio.sleep(pace)


def _make_stt(**kw: Any) -> Any:
    from voice_runtime.providers.azure_stt import AzurePersistentStt

    kw.setdefault("subscription_key", "k")
    kw.setdefault("region", "westeurope")
    kw.setdefault("reconnect_base_delay", 0.01)
    return AzurePersistentStt(**kw)


# ---------------------------------------------------------------------------- STT


async def test_stt_pushes_native_mulaw_and_reports_text_on_the_loop(
    fake_sdk: FakeSpeechSdk,
) -> None:
    fake_sdk.utterances.append(("hyvää huomenta kaikille", 4000))
    col = Collector()
    stt = col.bind(_make_stt(language_code="fi-FI", silence_timeout_ms=900))
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(q)
    audio = _audio(600)
    await _feed(q, audio)
    assert await wait_for(lambda: col.committed == ["hyvää huomenta kaikille"])
    assert col.partials == ["hyvää"]
    # Callbacks ran on the event loop thread, not on the SDK's thread.
    assert col.threads == {threading.current_thread().name}
    rec = fake_sdk.recognizers[0]
    fmt = rec.stream.format
    assert (fmt.samples_per_second, fmt.bits_per_sample, fmt.channels) == (8000, 8, 1)
    assert fmt.wave_stream_format is AudioStreamWaveFormat.MULAW
    assert bytes(rec.stream.data) == audio  # μ-law unchanged
    assert rec.config.speech_recognition_language == "fi-FI"
    assert rec.config.properties[PropertyId.SpeechServiceConnection_EndSilenceTimeoutMs] == "900"
    assert (rec.config.subscription, rec.config.region) == ("k", "westeurope")
    # The blocking start call ran in a worker thread, never on the loop thread.
    assert rec.started_on and threading.current_thread().name not in rec.started_on
    await stt.stop()
    assert rec.stopped_on and threading.current_thread().name not in rec.stopped_on
    assert fake_sdk.live_threads() == []
    assert rec.stream.closed


@pytest.mark.parametrize(
    "code",
    [
        CancellationErrorCode.ConnectionFailure,
        CancellationErrorCode.ServiceTimeout,
        CancellationErrorCode.ServiceError,
        CancellationErrorCode.TooManyRequests,
    ],
)
async def test_stt_reconnects_after_canceled_error_and_keeps_the_words(
    fake_sdk: FakeSpeechSdk, code: CancellationErrorCode
) -> None:
    # The first recognizer dies mid-utterance; the whole utterance must reach the second.
    fake_sdk.recognizer_plans = [RecognizerPlan(cancel_after_bytes=2400, cancel_code=code)]
    fake_sdk.utterances.append(("please call me back", 4800))
    col = Collector()
    stt = col.bind(_make_stt())
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(q)
    audio = _audio(600)
    await _feed(q, audio, pace=0.002)
    assert await wait_for(lambda: col.committed == ["please call me back"])
    assert col.errors == []
    assert len(fake_sdk.recognizers) == 2
    # The new push stream got the unconfirmed audio again, then the rest: nothing lost.
    assert bytes(fake_sdk.recognizers[1].stream.data) == audio
    await stt.stop()
    assert fake_sdk.live_threads() == []


@pytest.mark.parametrize(
    "code",
    [
        CancellationErrorCode.AuthenticationFailure,
        CancellationErrorCode.Forbidden,
        CancellationErrorCode.BadRequest,
    ],
)
async def test_stt_terminal_cancellation_calls_on_error_at_once(
    fake_sdk: FakeSpeechSdk, code: CancellationErrorCode
) -> None:
    fake_sdk.recognizer_plans = [RecognizerPlan(cancel_after_bytes=160, cancel_code=code)]
    col = Collector()
    stt = col.bind(_make_stt())
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(q)
    await _feed(q, _audio(100))
    assert await wait_for(lambda: col.errors == [code.name])
    assert await wait_for(lambda: not stt.running)
    assert len(fake_sdk.recognizers) == 1
    await stt.stop()


async def test_stt_every_restart_failing_ends_in_on_error(fake_sdk: FakeSpeechSdk) -> None:
    fake_sdk.recognizer_plans = [RecognizerPlan(cancel_after_bytes=320)] + [
        RecognizerPlan(fail_start=True) for _ in range(5)
    ]
    col = Collector()
    stt = col.bind(_make_stt(max_reconnects=3))
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(q)
    await _feed(q, _audio(100))
    assert await wait_for(lambda: col.errors == ["reconnect_exhausted_after_3_attempts"])
    assert len(fake_sdk.recognizers) == 4  # the first and three failed attempts
    assert stt.failed
    await stt.stop()


async def test_stt_end_of_call_closes_the_stream_without_reconnecting(
    fake_sdk: FakeSpeechSdk,
) -> None:
    col = Collector()
    stt = col.bind(_make_stt())
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(q)
    await _feed(q, _audio(100))
    assert await wait_for(
        lambda: len(fake_sdk.recognizers) == 1 and len(fake_sdk.recognizers[0].stream.data) > 0
    )
    q.put_nowait(None)
    assert await wait_for(lambda: not stt.running)
    assert fake_sdk.recognizers[0].stream.closed
    assert len(fake_sdk.recognizers) == 1 and col.errors == []
    await stt.stop()


async def test_stt_events_of_a_replaced_recognizer_are_ignored(fake_sdk: FakeSpeechSdk) -> None:
    fake_sdk.recognizer_plans = [RecognizerPlan(cancel_after_bytes=160)]
    col = Collector()
    stt = col.bind(_make_stt())
    q: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(q)
    await _feed(q, _audio(60))
    assert await wait_for(lambda: len(fake_sdk.recognizers) == 2 and stt.connections == 2)
    old = fake_sdk.recognizers[0]
    old.fire_from_thread(
        lambda: old.recognized.fire(_recognition_evt("stale", ResultReason.RecognizedSpeech))
    )
    new = fake_sdk.recognizers[1]
    new.fire_from_thread(
        lambda: new.recognized.fire(_recognition_evt("fresh", ResultReason.RecognizedSpeech))
    )
    assert await wait_for(lambda: col.committed == ["fresh"])
    await stt.stop()


async def test_stt_needs_a_key(monkeypatch: pytest.MonkeyPatch, fake_sdk: FakeSpeechSdk) -> None:
    from voice_runtime.providers.azure_stt import AzurePersistentStt

    monkeypatch.delenv("AZURE_SPEECH_KEY", raising=False)
    keyless = AzurePersistentStt()  # constructs, as in 0.1.x; the key is needed at start()
    with pytest.raises(MissingCredentialError, match="AZURE_SPEECH_KEY"):
        await keyless.start(asyncio.Queue())
    assert fake_sdk.recognizers == []
    monkeypatch.setenv("AZURE_SPEECH_KEY", "from-env")
    monkeypatch.setenv("AZURE_SPEECH_REGION", "northeurope")
    stt = AzurePersistentStt()
    assert stt.region == "northeurope" and stt.language_code == "fi-FI"
    assert stt.silence_timeout_ms == 1500


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from voice_runtime.providers.azure_stt import AzurePersistentStt
    from voice_runtime.providers.azure_tts import AzureTTS

    monkeypatch.setitem(sys.modules, SDK_NAME, None)  # makes the import fail
    with pytest.raises(ImportError, match=r"voice-runtime\[azure\]"):
        AzurePersistentStt(subscription_key="k")
    with pytest.raises(ImportError, match=r"voice-runtime\[azure\]"):
        AzureTTS(subscription_key="k")


# ---------------------------------------------------------------------------- TTS


def _make_tts(**kw: Any) -> Any:
    from voice_runtime.providers.azure_tts import AzureTTS

    kw.setdefault("subscription_key", "k")
    kw.setdefault("region", "westeurope")
    return AzureTTS(**kw)


async def test_tts_streams_mulaw_from_synthesizing_events(
    fake_sdk: FakeSpeechSdk, voice_server: VoiceServer
) -> None:
    fake_sdk.synth_chunk_interval = 0.01
    fake_sdk.audio_for = lambda text: tone_ulaw(523.0, 250.0) + text.encode()[:3]
    tts = _make_tts(voice_name="fi-FI-SelmaNeural")
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        result = await asyncio.to_thread(tts.speak, "Hei, tässä puhuu testi.", s)
        assert result["last_spoken"] == "Hei, tässä puhuu testi."
        assert result["interrupted"] is False and "error" not in result
        assert bytes(sim.heard) == fake_sdk.synth_audio[0]
        synth = fake_sdk.synthesizers[0]
        assert synth.config.output_format is SpeechSynthesisOutputFormat.Raw8Khz8BitMonoMULaw
        assert synth.config.speech_synthesis_voice_name == "fi-FI-SelmaNeural"
        assert synth.audio_config is None
        # The synthesizer is reused by the next utterance.
        await asyncio.to_thread(tts.speak, "Toinen lause.", s)
        assert len(fake_sdk.synthesizers) == 1 and synth.texts == [
            "Hei, tässä puhuu testi.",
            "Toinen lause.",
        ]


async def test_tts_canceled_mid_synthesis_is_an_error_and_does_not_hang(
    fake_sdk: FakeSpeechSdk, voice_server: VoiceServer
) -> None:
    fake_sdk.synth_plan = SynthPlan(
        fail_after_bytes=1600, fail_code=CancellationErrorCode.ServiceTimeout
    )
    tts = _make_tts()
    errors: list[str] = []
    tts.on_error = errors.append
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        t0 = time.monotonic()
        result = await asyncio.to_thread(
            tts.speak, "This one breaks in the middle of the sentence.", s
        )
        assert time.monotonic() - t0 < 3
        assert "ServiceTimeout" in result["error"] and len(errors) == 1
        assert result["audio_ms"] == 200.0
        # The call goes on: the next utterance plays.
        fake_sdk.synth_plan = SynthPlan()
        ok = await asyncio.to_thread(tts.speak, "Fine again.", s)
        assert "error" not in ok
        assert await wait_for(lambda: sim.heard_ms >= 200 + ok["audio_ms"])


async def test_tts_silent_synthesizer_times_out(
    fake_sdk: FakeSpeechSdk, voice_server: VoiceServer
) -> None:
    fake_sdk.synth_plan = SynthPlan(stall_after_bytes=800)
    tts = _make_tts(idle_timeout=0.3)
    errors: list[str] = []
    tts.on_error = errors.append
    s = voice_server.session
    async with voice_server.simulator():
        await s.wait_for_ws_connect_async(5)
        result = await asyncio.to_thread(tts.speak, "Stalls after a little audio.", s)
        assert "no audio" in result["error"] and errors
        assert fake_sdk.synthesizers[0].stops == 1  # the stalled synthesis was stopped


async def test_tts_stop_event_stops_the_synthesizer_and_replaces_it(
    fake_sdk: FakeSpeechSdk, voice_server: VoiceServer
) -> None:
    fake_sdk.synth_chunk_interval = 0.05  # 100 ms of audio every 50 ms
    tts = _make_tts()
    stop = threading.Event()
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        task = asyncio.create_task(asyncio.to_thread(tts.speak, "A long sentence " * 8, s, stop))
        assert await sim.wait_for_heard(300, timeout=5)
        stop.set()
        result = await asyncio.wait_for(task, 5)
        assert result["interrupted"] is True
        assert fake_sdk.synthesizers[0].stops == 1
        await asyncio.to_thread(tts.speak, "Next.", s)
        assert len(fake_sdk.synthesizers) == 2  # the stopped one is not reused


def test_tts_needs_a_key_and_has_the_documented_defaults(
    monkeypatch: pytest.MonkeyPatch, fake_sdk: FakeSpeechSdk
) -> None:
    from voice_runtime.providers.azure_tts import AzureTTS

    for name in ("AZURE_SPEECH_KEY", "AZURE_SPEECH_REGION", "AZURE_TTS_VOICE"):
        monkeypatch.delenv(name, raising=False)
    from voice_runtime.session import VoiceSession

    keyless = AzureTTS()  # constructs, as in 0.1.x; the key is needed to speak
    with pytest.raises(MissingCredentialError, match="AZURE_SPEECH_KEY"):
        keyless.speak("Hello.", VoiceSession())
    assert fake_sdk.synthesizers == []
    tts = AzureTTS(subscription_key="k")
    assert (tts.region, tts.voice_name) == ("westeurope", "fi-FI-NooraNeural")
