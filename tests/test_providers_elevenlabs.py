"""ElevenLabs STT (Scribe realtime) and TTS against local fakes that speak the real protocols."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import VoiceServer, wait_for

from voice_runtime.audio import tone_ulaw
from voice_runtime.errors import MissingCredentialError
from voice_runtime.providers.base import CallerAudioBuffer, backoff_delay
from voice_runtime.providers.elevenlabs_stt import (
    FATAL_ERRORS,
    TERMINAL_ERRORS,
    PersistentSttSession,
)
from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS, strip_riff_header
from voice_runtime.testing.fake_elevenlabs import (
    FakeElevenLabsTts,
    FakeScribeServer,
    ScribePlan,
    ScribeUtterance,
)

KEY = "test-key"


def _audio(ms: float, seed: int = 0) -> bytes:
    """Distinct, non-repeating μ-law bytes, so a lost or repeated frame shows."""
    n = int(ms * 8)
    return bytes((i * 7 + seed + (i // 256) * 13) % 256 for i in range(n))


class Collector:
    def __init__(self) -> None:
        self.committed: list[str] = []
        self.partials: list[str] = []
        self.errors: list[str] = []

    def bind(self, stt: Any) -> Any:
        stt.on_committed = self.committed.append
        stt.on_recognizing = self.partials.append
        stt.on_error = self.errors.append
        return stt


def _stt(server: FakeScribeServer, **kw: Any) -> PersistentSttSession:
    kw.setdefault("reconnect_base_delay", 0.01)
    return PersistentSttSession(api_key=KEY, base_url=server.base_url, **kw)


async def _feed(q: asyncio.Queue[bytes | None], audio: bytes, pace: float = 0.0) -> None:
    for i in range(0, len(audio), 160):
        q.put_nowait(audio[i : i + 160])
        await asyncio.sleep(pace)


def _stt_tasks() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("elevenlabs-stt")]


# ---------------------------------------------------------------------------- STT


async def test_stt_speaks_the_scribe_protocol_with_native_mulaw() -> None:
    utterance = ScribeUtterance("book a table for two", after_bytes=4000)
    async with FakeScribeServer([utterance], api_key=KEY) as server:
        col = Collector()
        stt = col.bind(_stt(server, language_code="fi", model_id="scribe_v2_realtime"))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        audio = _audio(500)
        await _feed(q, audio)
        assert await wait_for(lambda: col.committed == ["book a table for two"])
        assert col.partials == ["book a"]
        conn = server.connections[0]
        assert conn.path == "/v1/speech-to-text/realtime"
        assert conn.param("model_id") == "scribe_v2_realtime"
        assert conn.param("audio_format") == "ulaw_8000"
        assert conn.param("commit_strategy") == "vad"
        assert conn.param("language_code") == "fi"
        assert conn.headers["xi-api-key"] == KEY
        assert bytes(conn.audio) == audio  # μ-law sent unchanged
        first = conn.messages[0]
        assert first["message_type"] == "input_audio_chunk" and first["commit"] is False
        assert first["sample_rate"] == 8000
        await stt.stop()
        assert _stt_tasks() == []
        assert await server.wait_until(lambda: conn.closed)


async def test_stt_drop_mid_utterance_words_still_arrive_after_the_reconnect() -> None:
    speech = _audio(1000, seed=3)
    # The fake transcribes only if the whole utterance reaches one connection.
    utterance = ScribeUtterance("I want to cancel my order", audio=speech, partial_at=None)
    async with FakeScribeServer([utterance], plans=[ScribePlan(drop_after_bytes=4000)]) as server:
        col = Collector()
        stt = col.bind(_stt(server, reconnect_base_delay=0.2))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        # Real-time pacing: part of the utterance arrives while the socket is down.
        await _feed(q, speech + _audio(200, seed=9), pace=0.02)
        assert await wait_for(lambda: col.committed == ["I want to cancel my order"], 5)
        assert col.errors == []
        assert len(server.connections) == 2 and stt.reconnects == 1
        first, second = server.connections
        assert len(first.audio) == 4000
        # The new socket heard the whole stream: the unconfirmed part again, then the rest.
        assert bytes(second.audio) == speech + _audio(200, seed=9)
        await stt.stop()


@pytest.mark.parametrize("error", sorted(FATAL_ERRORS))
async def test_stt_fatal_errors_reconnect(error: str) -> None:
    speech = _audio(600, seed=1)
    utterance = ScribeUtterance("still here", audio=speech, partial_at=None)
    plan = ScribePlan(error=error, error_after_bytes=1600)
    async with FakeScribeServer([utterance], plans=[plan]) as server:
        col = Collector()
        stt = col.bind(_stt(server))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        await _feed(q, speech, pace=0.002)
        assert await wait_for(lambda: col.committed == ["still here"])
        assert col.errors == [] and len(server.connections) == 2
        await stt.stop()


async def test_stt_fatal_error_without_a_close_still_reconnects() -> None:
    speech = _audio(400, seed=2)
    plan = ScribePlan(error="transcriber_error", error_after_bytes=800, close_after_error=False)
    async with FakeScribeServer(
        [ScribeUtterance("ok", audio=speech, partial_at=None)], plans=[plan]
    ) as server:
        col = Collector()
        stt = col.bind(_stt(server))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        await _feed(q, speech, pace=0.002)
        assert await wait_for(lambda: col.committed == ["ok"])
        assert server.connections[0].closed
        await stt.stop()


@pytest.mark.parametrize("error", sorted(TERMINAL_ERRORS))
async def test_stt_terminal_errors_call_on_error_at_once(error: str) -> None:
    plan = ScribePlan(error=error, error_after_bytes=160, close_after_error=False)
    async with FakeScribeServer(plans=[plan]) as server:
        col = Collector()
        stt = col.bind(_stt(server))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        await _feed(q, _audio(100))
        assert await wait_for(lambda: col.errors == [error])
        assert await wait_for(lambda: not stt.running)
        assert server.handshakes == 1 and stt.failed
        assert await server.wait_until(lambda: server.connections[0].closed)
        await _feed(q, _audio(100))  # audio after giving up is drained, not piled up
        assert await wait_for(lambda: q.empty())
        await stt.stop()


async def test_stt_auth_error_from_a_wrong_key() -> None:
    async with FakeScribeServer(api_key="right") as server:
        col = Collector()
        stt = col.bind(PersistentSttSession(api_key="wrong", base_url=server.base_url))
        await stt.start(asyncio.Queue())
        assert await wait_for(lambda: col.errors == ["auth_error"])
        assert server.handshakes == 1
        await stt.stop()


async def test_stt_refused_handshake_401_is_terminal() -> None:
    async with FakeScribeServer(default_plan=ScribePlan(refuse_status=401)) as server:
        col = Collector()
        stt = col.bind(_stt(server))
        await stt.start(asyncio.Queue())
        assert await wait_for(lambda: col.errors == ["auth_error"])
        assert server.handshakes == 1
        await stt.stop()


async def test_stt_every_reconnect_refused_ends_in_on_error() -> None:
    plans = [ScribePlan(drop_after_bytes=1600)]
    async with FakeScribeServer(plans=plans, default_plan=ScribePlan(refuse_status=503)) as server:
        col = Collector()
        stt = col.bind(_stt(server, reconnect_base_delay=0.02))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        t0 = time.monotonic()
        await _feed(q, _audio(300))
        assert await wait_for(lambda: col.errors == ["reconnect_exhausted_after_3_attempts"])
        elapsed = time.monotonic() - t0
        assert server.handshakes == 4 and server.refused == 3  # first + 3 attempts, no more
        # Backoff: 0.02·(1 + 2 + 4) s ± 25 % between the attempts.
        assert elapsed >= 0.75 * 0.14
        assert not stt.running
        await stt.stop()


async def test_stt_a_failed_start_keeps_trying_and_buffers_the_audio() -> None:
    speech = _audio(400, seed=5)
    plans = [ScribePlan(refuse_status=502), ScribePlan(refuse_status=503)]
    async with FakeScribeServer(
        [ScribeUtterance("made it", audio=speech, partial_at=None)], plans=plans
    ) as server:
        col = Collector()
        stt = col.bind(_stt(server))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await _feed(q, speech)  # audio before the first connection exists
        await stt.start(q)
        assert await wait_for(lambda: col.committed == ["made it"])
        assert server.handshakes == 3 and bytes(server.connections[0].audio) == speech
        await stt.stop()


async def test_stt_end_of_call_closes_the_socket_without_reconnect() -> None:
    async with FakeScribeServer() as server:
        col = Collector()
        stt = col.bind(_stt(server))
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        await _feed(q, _audio(200))
        assert await server.wait_for_audio(1600)
        q.put_nowait(None)
        assert await wait_for(lambda: not stt.running)
        assert await server.wait_until(lambda: server.connections[0].closed)
        assert server.handshakes == 1 and col.errors == []
        await stt.stop()
        assert _stt_tasks() == []


async def test_stt_stop_during_backoff_releases_everything() -> None:
    async with FakeScribeServer(default_plan=ScribePlan(refuse_status=503)) as server:
        stt = _stt(server, reconnect_base_delay=30.0)
        await stt.start(asyncio.Queue())
        assert await server.wait_until(lambda: server.handshakes == 1)
        t0 = time.monotonic()
        await stt.stop()
        assert time.monotonic() - t0 < 1.0
        assert _stt_tasks() == []


async def test_stt_words_reach_on_committed_through_a_real_call(voice_server: VoiceServer) -> None:
    speech = _audio(800, seed=4)
    utterance = ScribeUtterance("call me back tomorrow", audio=speech)
    plan = ScribePlan(drop_after_bytes=3200)
    async with FakeScribeServer([utterance], plans=[plan]) as server:
        col = Collector()
        s = voice_server.session
        s.stt_factory = lambda: col.bind(_stt(server))
        async with voice_server.simulator() as sim:
            await s.wait_for_ws_connect_async(5)
            await sim.send_audio(speech)
            await sim.send_silence(200)
            assert await wait_for(lambda: col.committed == ["call me back tomorrow"])
        assert await wait_for(lambda: _stt_tasks() == [])


async def test_stt_needs_a_key_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELEVENLABS_API_KEY", raising=False)
    keyless = PersistentSttSession()  # constructs, as in 0.1.x; the key is needed at start()
    with pytest.raises(MissingCredentialError, match="ELEVENLABS_API_KEY"):
        await keyless.start(asyncio.Queue())
    assert not keyless.running
    monkeypatch.setenv("ELEVENLABS_API_KEY", "env-key")
    monkeypatch.setenv("STT_LANGUAGE_CODE", "de")
    monkeypatch.delenv("STT_MODEL_ID", raising=False)
    stt = PersistentSttSession()
    assert stt.language_code == "de" and stt.model_id == "scribe_v2_realtime"
    assert stt.url.startswith("wss://api.elevenlabs.io/v1/speech-to-text/realtime?")
    assert "env-key" not in stt.url


def test_backoff_grows_doubles_caps_and_jitters() -> None:
    for attempt, nominal in [(0, 1.0), (1, 2.0), (2, 4.0), (6, 30.0)]:
        samples = [backoff_delay(attempt, 1.0, 30.0) for _ in range(200)]
        assert all(0.75 * nominal <= d <= 1.25 * nominal for d in samples)
        assert max(samples) - min(samples) > 0.1 * nominal  # jitter is real


def test_caller_audio_buffer_replays_unconfirmed_audio_and_stays_bounded() -> None:
    buf = CallerAudioBuffer(max_ms=100)  # 800 bytes
    for i in range(4):
        buf.push(bytes([i]) * 160)
    frames = buf.peek(320)
    assert frames == [b"\x00" * 160, b"\x01" * 160]
    buf.ack(2)
    buf.committed()  # the first two frames were transcribed
    buf.ack(1)  # frame 2 sent, not yet confirmed
    buf.rewind()  # the socket died
    assert buf.peek(10_000) == [b"\x02" * 160, b"\x03" * 160]
    for i in range(4, 9):
        buf.push(bytes([i]) * 160)
    assert buf.pending_bytes == 800 and buf.dropped_bytes == 160 * 2
    assert buf.peek(10_000)[0] == b"\x04" * 160


# ---------------------------------------------------------------------------- TTS


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Closes the providers a test opened, even when it fails."""
    with contextlib.ExitStack() as es:
        yield es


def _short_audio(text: str) -> bytes:
    """250 ms of tone whatever the text: the server paces agent audio in real time."""
    return tone_ulaw(400.0, 250.0) + bytes([len(text) % 256])


def _tts(server: FakeElevenLabsTts, **kw: Any) -> ElevenLabsTTS:
    return ElevenLabsTTS(api_key=KEY, voice_id="voice-1", base_url=server.base_url, **kw)


async def test_tts_streams_ulaw_chunks_into_the_call(
    voice_server: VoiceServer, stack: contextlib.ExitStack
) -> None:
    async with FakeElevenLabsTts(api_key=KEY, chunk_bytes=400, audio_for=_short_audio) as server:
        tts = stack.enter_context(_tts(server, model_id="eleven_flash_v2_5", language_code="fi"))
        s = voice_server.session
        async with voice_server.simulator(playback="instant") as sim:
            await s.wait_for_ws_connect_async(5)
            result = await asyncio.to_thread(tts.speak, "Hello from the fake voice.", s)
            assert result["last_spoken"] == "Hello from the fake voice."
            assert result["interrupted"] is False and "error" not in result
            assert bytes(sim.heard) == server.audio_sent[0]
            assert result["audio_ms"] == pytest.approx(len(server.audio_sent[0]) / 8, abs=0.1)
            req = server.requests[0]
            assert req.path == "/v1/text-to-speech/voice-1"  # the SDK's text_to_speech.convert
            assert req.query["output_format"] == ["ulaw_8000"]
            assert req.headers["xi-api-key"] == KEY
            assert req.body["text"] == "Hello from the fake voice."
            assert req.body["model_id"] == "eleven_flash_v2_5"
            assert req.body["language_code"] == "fi"
            await asyncio.to_thread(tts.speak, "Second sentence.", s)
            assert server.connections_opened == 1  # one client, kept alive across speaks


async def test_tts_first_audio_reaches_the_call_before_the_stream_ends(
    voice_server: VoiceServer,
    stack: contextlib.ExitStack,
) -> None:
    # 20 chunks, 50 ms apart: the stream takes about a second to finish.
    async with FakeElevenLabsTts(chunk_bytes=400, chunk_interval_s=0.05) as server:
        tts = stack.enter_context(_tts(server))
        s = voice_server.session
        async with voice_server.simulator() as sim:
            await s.wait_for_ws_connect_async(5)
            t0 = time.monotonic()
            task = asyncio.create_task(asyncio.to_thread(tts.speak, "x" * 17, s))
            assert await wait_for(lambda: len(sim.received) > 0, 5)
            first_audio = time.monotonic() - t0
            assert first_audio < 0.5
            await asyncio.wait_for(task, 10)


async def test_tts_strips_a_riff_header(
    voice_server: VoiceServer, stack: contextlib.ExitStack
) -> None:
    async with FakeElevenLabsTts(riff_header=True, chunk_bytes=7, audio_for=_short_audio) as server:
        tts = stack.enter_context(_tts(server))
        s = voice_server.session
        async with voice_server.simulator(playback="instant") as sim:
            await s.wait_for_ws_connect_async(5)
            await asyncio.to_thread(tts.speak, "Header test.", s)
            assert bytes(sim.heard) == server.audio_sent[0]


def test_strip_riff_header_leaves_plain_audio_alone() -> None:
    assert strip_riff_header(b"\xff\x7f\x00abc") == b"\xff\x7f\x00abc"
    assert strip_riff_header(b"RI") == b"RI"
    assert strip_riff_header(b"") == b""


@pytest.mark.parametrize("status", [401, 429, 500])
async def test_tts_http_errors_become_error_results(
    voice_server: VoiceServer, status: int, stack: contextlib.ExitStack
) -> None:
    async with FakeElevenLabsTts(fail_status=status) as server:
        tts = stack.enter_context(_tts(server))
        errors: list[str] = []
        tts.on_error = errors.append
        s = voice_server.session
        async with voice_server.simulator():
            await s.wait_for_ws_connect_async(5)
            result = await asyncio.to_thread(tts.speak, "Will fail.", s)
            assert f"HTTP {status}" in result["error"]
            assert result["audio_ms"] == 0 and len(errors) == 1


async def test_tts_failing_mid_stream_returns_error_and_the_call_goes_on(
    voice_server: VoiceServer,
    stack: contextlib.ExitStack,
) -> None:
    async with FakeElevenLabsTts(chunk_bytes=400, fail_after_bytes=1200) as server:
        tts = stack.enter_context(_tts(server))
        errors: list[str] = []
        tts.on_error = errors.append
        s = voice_server.session
        async with voice_server.simulator(playback="instant") as sim:
            await s.wait_for_ws_connect_async(5)
            t0 = time.monotonic()
            result = await asyncio.to_thread(tts.speak, "This stream breaks half way.", s)
            assert time.monotonic() - t0 < 3
            assert "error" in result and len(errors) == 1
            assert result["audio_ms"] == 150.0  # the chunks that did arrive were played
            server.fail_after_bytes = None
            ok = await asyncio.to_thread(tts.speak, "Recovered.", s)
            assert "error" not in ok
            assert await wait_for(lambda: sim.heard_ms >= 150 + ok["audio_ms"])


async def test_tts_stalled_stream_times_out(
    voice_server: VoiceServer, stack: contextlib.ExitStack
) -> None:
    async with FakeElevenLabsTts(chunk_bytes=400, stall_after_bytes=800) as server:
        tts = stack.enter_context(_tts(server, read_timeout=0.3))
        errors: list[str] = []
        tts.on_error = errors.append
        s = voice_server.session
        async with voice_server.simulator():
            await s.wait_for_ws_connect_async(5)
            t0 = time.monotonic()
            result = await asyncio.to_thread(tts.speak, "Stalls.", s)
            assert time.monotonic() - t0 < 2
            assert "timed out" in result["error"] and errors


async def test_tts_stop_event_ends_the_http_stream(
    voice_server: VoiceServer, stack: contextlib.ExitStack
) -> None:
    async with FakeElevenLabsTts(chunk_bytes=800, chunk_interval_s=0.05) as server:
        tts = stack.enter_context(_tts(server))
        stop = threading.Event()
        s = voice_server.session
        async with voice_server.simulator() as sim:
            await s.wait_for_ws_connect_async(5)
            task = asyncio.create_task(asyncio.to_thread(tts.speak, "word " * 60, s, stop))
            assert await sim.wait_for_heard(300, timeout=5)
            stop.set()
            result = await asyncio.wait_for(task, 2)
            assert result["interrupted"] is True
            assert result["audio_ms"] < len(server.audio_sent[0]) / 8


def test_tts_needs_a_key_and_has_the_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ELEVENLABS_API_KEY", "ELEVENLABS_VOICE_ID", "ELEVENLABS_MODEL"):
        monkeypatch.delenv(name, raising=False)
    from voice_runtime.session import VoiceSession

    keyless = ElevenLabsTTS()  # constructs, as in 0.1.x; the key is needed to speak
    with pytest.raises(MissingCredentialError, match="ELEVENLABS_API_KEY"):
        keyless.speak("Hello.", VoiceSession())
    tts = ElevenLabsTTS(api_key="k")
    assert tts.voice_id == "21m00Tcm4TlvDq8ikWAM" and tts.model_id == "eleven_multilingual_v2"
    assert tts.base_url == "https://api.elevenlabs.io"


def test_fake_tts_runs_in_its_own_thread_for_sync_code(stack: contextlib.ExitStack) -> None:
    from voice_runtime.session import VoiceSession

    with FakeElevenLabsTts() as server:
        tts = stack.enter_context(_tts(server))
        chunks = list(tts.stream("Threaded."))
        assert b"".join(chunks) == server.audio_sent[0]
        session = VoiceSession()
        session.signal_disconnected()
        assert tts.speak("Nobody listens.", session)["call_disconnected"] is True


def test_fake_scribe_runs_in_its_own_thread() -> None:
    speech = _audio(300, seed=8)
    with FakeScribeServer([ScribeUtterance("threaded", audio=speech)]) as server:

        async def talk() -> list[str]:
            col = Collector()
            stt = col.bind(_stt(server))
            q: asyncio.Queue[bytes | None] = asyncio.Queue()
            await stt.start(q)
            await _feed(q, speech)
            assert await wait_for(lambda: col.committed == ["threaded"])
            await stt.stop()
            return col.committed

        assert asyncio.run(talk()) == ["threaded"]
        # Test controls run on the server's own loop.
        assert server.call(server.wait_for_connections(1)) is True
    assert server.connections[0].closed
