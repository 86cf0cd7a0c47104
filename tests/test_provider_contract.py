"""One behaviour for every provider: the same cases run against each STT and TTS.

Vendors run against their fakes (ElevenLabs over real sockets, Azure through the SDK-level
fake); the mocks and, when installed, the offline engines run as they are. A case that a
provider cannot be driven into (a mock has no way to fail) is skipped with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import VoiceServer, wait_for

from voice_runtime.audio import tone_ulaw
from voice_runtime.testing.fake_azure import (
    CancellationErrorCode,
    CancellationReason,
    FakeSpeechSdk,
    ResultReason,
    SynthPlan,
    _canceled_evt,
    _recognition_evt,
)
from voice_runtime.testing.fake_elevenlabs import FakeElevenLabsTts, FakeScribeServer

RESULT_KEYS = {"last_spoken", "interrupted", "call_disconnected", "heard_ms", "audio_ms"}
SHORT_TEXT = "Thanks for calling today."
LONG_TEXT = (
    "Let me read you the whole list of our opening hours, one day after another, "
    "starting on Monday and going on until the end of the week, slowly and clearly."
)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


OFFLINE = _has("voice_runtime.providers.offline_tts") and _has("espeakng_loader")
OFFLINE_STT = _has("voice_runtime.providers.offline_stt") and _has("faster_whisper")
TTS_PROVIDERS = ["mock", "elevenlabs", "azure"] + (["offline"] if OFFLINE else [])
STT_PROVIDERS = ["mock", "elevenlabs", "azure"] + (["offline"] if OFFLINE_STT else [])


def _tone(text: str) -> bytes:
    """About 15 ms of tone per character (short runs; the server paces in real time)."""
    return tone_ulaw(440.0, max(200.0, 15.0 * len(text)), level_dbfs=-22.0)


# ---------------------------------------------------------------------------- TTS harnesses


@dataclass
class TtsHarness:
    tts: Any
    fail: Callable[[], None] | None = None  # make the next speak() fail, if possible
    heal: Callable[[], None] | None = None


@contextlib.asynccontextmanager
async def _tts_harness(name: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[TtsHarness]:
    if name == "mock":
        from voice_runtime.mock.tts import MockTts

        yield TtsHarness(MockTts(ms_per_char=15.0))
    elif name == "elevenlabs":
        from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

        async with FakeElevenLabsTts(audio_for=_tone, chunk_bytes=400) as server:

            def fail() -> None:
                server.fail_after_bytes = 800

            def heal() -> None:
                server.fail_after_bytes = None

            with ElevenLabsTTS(api_key="k", base_url=server.base_url) as tts:
                yield TtsHarness(tts, fail, heal)
    elif name == "azure":
        from voice_runtime.providers.azure_tts import AzureTTS

        sdk = FakeSpeechSdk(audio_for=_tone, synth_chunk_bytes=400).install(monkeypatch)

        def fail_azure() -> None:
            sdk.synth_plan = SynthPlan(fail_after_bytes=800)

        def heal_azure() -> None:
            sdk.synth_plan = SynthPlan()

        yield TtsHarness(AzureTTS(subscription_key="k", region="r"), fail_azure, heal_azure)
    elif name == "offline":
        from voice_runtime.providers.offline_tts import OfflineTts

        yield TtsHarness(OfflineTts("espeak"))
    else:
        raise AssertionError(name)


@pytest.fixture(params=TTS_PROVIDERS)
async def tts_harness(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TtsHarness]:
    async with _tts_harness(request.param, monkeypatch) as harness:
        yield harness


async def _speak(tts: Any, text: str, session: Any, stop: threading.Event | None = None) -> Any:
    return await asyncio.to_thread(tts.speak, text, session, stop)


# ---------------------------------------------------------------------------- TTS cases


async def test_tts_result_has_the_shared_keys_and_the_caller_heard_it_all(
    tts_harness: TtsHarness, voice_server: VoiceServer
) -> None:
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        result = await _speak(tts_harness.tts, SHORT_TEXT, s)
        assert set(result) == RESULT_KEYS
        assert result["last_spoken"] == SHORT_TEXT
        assert result["interrupted"] is False and result["call_disconnected"] is False
        assert result["audio_ms"] > 0 and result["heard_ms"] == result["audio_ms"]
        # speak() returned once the caller had heard every byte of it.
        assert sim.heard_ms == pytest.approx(result["audio_ms"], abs=0.2)


async def test_tts_stop_event_interrupts_and_reports_the_words_heard(
    tts_harness: TtsHarness, voice_server: VoiceServer
) -> None:
    s = voice_server.session
    stop = threading.Event()
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        task = asyncio.create_task(_speak(tts_harness.tts, LONG_TEXT, s, stop))
        assert await sim.wait_for_heard(400, timeout=10)
        stop.set()
        heard_at_stop = sim.heard_ms
        t0 = time.monotonic()
        result = await asyncio.wait_for(task, 5)
        assert time.monotonic() - t0 < 1.0
        assert set(result) == RESULT_KEYS
        assert result["interrupted"] is True and result["call_disconnected"] is False
        words = LONG_TEXT.split()
        spoken = result["last_spoken"].split()
        assert spoken == words[: len(spoken)] and len(spoken) < len(words)
        assert 0 < result["heard_ms"] < result["audio_ms"] or result["audio_ms"] == 0
        # Playback stopped too, not only the synthesis.
        assert await sim.wait_idle(quiet_s=0.2, timeout=5)
        assert sim.heard_ms - heard_at_stop < 300


async def test_tts_failure_returns_error_calls_on_error_and_the_call_goes_on(
    tts_harness: TtsHarness, voice_server: VoiceServer
) -> None:
    if tts_harness.fail is None:
        pytest.skip("this provider has no failure to inject")
    errors: list[str] = []
    tts_harness.tts.on_error = errors.append
    s = voice_server.session
    async with voice_server.simulator():
        await s.wait_for_ws_connect_async(5)
        tts_harness.fail()
        t0 = time.monotonic()
        result = await _speak(tts_harness.tts, LONG_TEXT, s)
        assert time.monotonic() - t0 < 5
        assert set(result) == RESULT_KEYS | {"error"}
        assert result["error"] and len(errors) == 1
        assert tts_harness.heal is not None
        tts_harness.heal()
        ok = await _speak(tts_harness.tts, SHORT_TEXT, s)
        assert "error" not in ok and ok["last_spoken"] == SHORT_TEXT


async def test_tts_caller_hanging_up_mid_sentence_ends_speak(
    tts_harness: TtsHarness, voice_server: VoiceServer
) -> None:
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        task = asyncio.create_task(_speak(tts_harness.tts, LONG_TEXT, s))
        assert await sim.wait_for_heard(300, timeout=10)
        await sim.hangup()
        result = await asyncio.wait_for(task, 5)
    assert set(result) == RESULT_KEYS
    assert result["call_disconnected"] is True
    assert result["last_spoken"] != LONG_TEXT
    # Speaking into a call that has ended returns at once.
    again = await asyncio.wait_for(_speak(tts_harness.tts, SHORT_TEXT, s), 2)
    assert again["call_disconnected"] is True and again["audio_ms"] == 0


# ---------------------------------------------------------------------------- STT harnesses


@dataclass
class SttHarness:
    stt: Any
    commit: Callable[[str], Awaitable[None]]  # make the provider commit this text
    partial: Callable[[str], Awaitable[None]] | None = None
    fail: Callable[[], Awaitable[None]] | None = None
    exact: bool = True  # False: the text comes from a real recognizer
    queue: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)


@contextlib.asynccontextmanager
async def _stt_harness(name: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SttHarness]:
    if name == "mock":
        from voice_runtime.mock.stt import MockStt

        mock = MockStt()

        async def commit_mock(text: str) -> None:
            mock.inject(text)

        yield SttHarness(mock, commit_mock)
    elif name == "elevenlabs":
        from voice_runtime.providers.elevenlabs_stt import PersistentSttSession

        async with FakeScribeServer() as server:
            stt = PersistentSttSession(api_key="k", base_url=server.base_url)

            async def commit_el(text: str) -> None:
                assert await server.wait_for_connections(1)
                await server.commit_now(text)

            async def partial_el(text: str) -> None:
                assert await server.wait_for_connections(1)
                await server.send_partial(text)

            async def fail_el() -> None:
                assert await server.wait_for_connections(1)
                await server.send({"message_type": "auth_error", "error": "bad key"})

            yield SttHarness(stt, commit_el, partial_el, fail_el)
    elif name == "azure":
        from voice_runtime.providers.azure_stt import AzurePersistentStt

        sdk = FakeSpeechSdk().install(monkeypatch)
        az = AzurePersistentStt(subscription_key="k", region="r")

        async def recognizer() -> Any:
            assert await wait_for(lambda: az.connections >= 1)
            return sdk.recognizers[-1]

        async def commit_az(text: str) -> None:
            rec = await recognizer()
            evt = _recognition_evt(text, ResultReason.RecognizedSpeech)
            await asyncio.to_thread(rec.fire_from_thread, lambda: rec.recognized.fire(evt))

        async def partial_az(text: str) -> None:
            rec = await recognizer()
            evt = _recognition_evt(text, ResultReason.RecognizingSpeech)
            await asyncio.to_thread(rec.fire_from_thread, lambda: rec.recognizing.fire(evt))

        async def fail_az() -> None:
            rec = await recognizer()
            evt = _canceled_evt(
                CancellationReason.Error, CancellationErrorCode.AuthenticationFailure
            )
            await asyncio.to_thread(rec.fire_from_thread, lambda: rec.canceled.fire(evt))

        try:
            yield SttHarness(az, commit_az, partial_az, fail_az)
        finally:
            for rec in sdk.recognizers:
                rec._stop.set()
    elif name == "offline":
        from voice_runtime.audio import pcm16_to_ulaw, resample
        from voice_runtime.offline.espeak import EspeakEngine
        from voice_runtime.providers.offline_stt import OfflineStt

        off = OfflineStt()
        engine = EspeakEngine()
        harness = SttHarness(off, _never, exact=False)

        async def speak_into(text: str) -> None:
            pcm, rate = engine.synthesize(text)
            ulaw = pcm16_to_ulaw(resample(pcm, rate, 8000).tobytes())
            ulaw += b"\xff" * 8000  # a second of silence ends the utterance
            for i in range(0, len(ulaw), 160):
                harness.queue.put_nowait(ulaw[i : i + 160])
                await asyncio.sleep(0)

        harness.commit = speak_into
        harness.partial = speak_into
        yield harness
    else:
        raise AssertionError(name)


async def _never(text: str) -> None:
    raise AssertionError("replaced")


@pytest.fixture(params=STT_PROVIDERS)
async def stt_harness(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[SttHarness]:
    async with _stt_harness(request.param, monkeypatch) as harness:
        try:
            yield harness
        finally:
            await harness.stt.stop()


class Collector:
    def __init__(self, stt: Any) -> None:
        self.committed: list[str] = []
        self.partials: list[str] = []
        self.errors: list[str] = []
        self.threads: set[int] = set()
        stt.on_committed = self._rec(self.committed)
        stt.on_recognizing = self._rec(self.partials)
        stt.on_error = self._rec(self.errors)

    def _rec(self, bucket: list[str]) -> Callable[[str], None]:
        def cb(text: str) -> None:
            self.threads.add(threading.get_ident())
            bucket.append(text)

        return cb


def _matches(harness: SttHarness, got: list[str], text: str) -> bool:
    if harness.exact:
        return got == [text]
    # A real recognizer on synthetic speech: most of the words are enough.
    if len(got) != 1:
        return False
    want, heard = _words(text), _words(got[0])
    return len(want & heard) * 2 >= len(want)


def _words(text: str) -> set[str]:
    return {w.strip(",.?!").lower() for w in text.split()}


# ---------------------------------------------------------------------------- STT cases


async def test_stt_committed_text_reaches_on_committed_on_the_loop(stt_harness: SttHarness) -> None:
    col = Collector(stt_harness.stt)
    await stt_harness.stt.start(stt_harness.queue)
    await stt_harness.commit("Hello, I need help with my bill.")
    assert await wait_for(
        lambda: _matches(stt_harness, col.committed, "Hello, I need help with my bill."), 15
    )
    assert col.errors == []
    assert col.threads == {threading.get_ident()}


async def test_stt_echo_is_discarded_while_speaking_and_just_after(stt_harness: SttHarness) -> None:
    stt = stt_harness.stt
    col = Collector(stt)
    await stt.start(stt_harness.queue)
    stt.set_speaking(True)
    await stt_harness.commit("Hello echo while speaking.")
    # Every provider discards through the shared EchoGate; wait until this one has.
    assert await wait_for(lambda: stt._echo.discarded == 1, 15)
    stt.set_speaking(False)
    if stt_harness.exact:
        await stt_harness.commit("Hello echo tail.")  # within 0.4 s of the agent stopping
        assert await wait_for(lambda: stt._echo.discarded == 2)
    await asyncio.sleep(0.45)  # the echo tail is a time window
    await stt_harness.commit("Hello from the caller.")
    assert await wait_for(
        lambda: _matches(stt_harness, col.committed, "Hello from the caller."), 15
    )


async def test_stt_partial_text_is_reported_but_not_while_speaking(stt_harness: SttHarness) -> None:
    if stt_harness.partial is None:
        pytest.skip("this provider has no interim results")
    stt = stt_harness.stt
    col = Collector(stt)
    await stt.start(stt_harness.queue)
    stt.set_speaking(True)
    await stt_harness.partial("Hello while speaking")
    if stt_harness.exact:
        await stt_harness.commit("Hello barrier")  # in order behind the partial
        assert await wait_for(lambda: stt._echo.discarded == 1)
    else:
        assert await wait_for(lambda: stt._echo.discarded == 1, 15)
    assert col.partials == []
    stt.set_speaking(False)
    await stt_harness.partial("Hello there")
    assert await wait_for(lambda: len(col.partials) == 1, 15)
    if stt_harness.exact:
        assert col.partials == ["Hello there"]


async def test_stt_terminal_failure_calls_on_error(stt_harness: SttHarness) -> None:
    if stt_harness.fail is None:
        pytest.skip("this provider has no failure to inject")
    col = Collector(stt_harness.stt)
    await stt_harness.stt.start(stt_harness.queue)
    await stt_harness.fail()
    assert await wait_for(lambda: len(col.errors) == 1)
    assert col.threads == {threading.get_ident()}


async def test_stt_stop_releases_every_task_and_is_idempotent(stt_harness: SttHarness) -> None:
    before = set(asyncio.all_tasks())
    col = Collector(stt_harness.stt)
    await stt_harness.stt.start(stt_harness.queue)
    for _ in range(10):
        stt_harness.queue.put_nowait(b"\xff" * 160)
    await stt_harness.commit("Hello before stop.")
    assert await wait_for(lambda: len(col.committed) == 1, 15)
    await stt_harness.stt.stop()
    await stt_harness.stt.stop()
    assert [t.get_name() for t in asyncio.all_tasks() - before] == []


async def test_stt_end_of_call_ends_its_tasks_without_an_error(stt_harness: SttHarness) -> None:
    before = set(asyncio.all_tasks())
    col = Collector(stt_harness.stt)
    await stt_harness.stt.start(stt_harness.queue)
    await stt_harness.commit("Hello and goodbye.")
    assert await wait_for(lambda: len(col.committed) == 1, 15)
    stt_harness.queue.put_nowait(None)
    assert await wait_for(lambda: not (asyncio.all_tasks() - before), 5)
    assert col.errors == []
