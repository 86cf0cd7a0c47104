"""Benchmark the offline engines: eSpeak, Piper, faster-whisper and Silero VAD on this machine.

Run ``python benchmarks/bench_offline.py`` (``--quick`` for fewer repeats); it needs the
``offline`` extra. The baseline is real time, measured in the same run as the work: the
real-time factor (RTF) is compute seconds per second of audio, so below 1 is faster than
real time and 1/RTF is how many streams one core-set could keep up with. ``first chunk``
is the time from the call to the first audio a caller could start playing.

:func:`run` returns the rows as dicts so a benchmark runner can collect them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from _cli import bench_main  # benchmarks/ is sys.path[0] for scripts and run.py

from voice_runtime.audio.resample import resample
from voice_runtime.audio.vad import SileroVad, SpeechSegmenter

PARAGRAPH = (
    "Thank you for calling the support line. Your call is important to us. "
    "Please hold while we look up your account, this should only take a moment. "
    "If you would like a call back instead, say call back at any time."
)


FRAME = 160  # 20 ms at 8 kHz


class _Tts(Protocol):
    def synthesize_stream(self, text: str) -> Iterator[tuple[np.ndarray, int]]: ...


def _time_tts(engine: _Tts, text: str, repeats: int) -> tuple[float, float, float]:
    """Best-of-``repeats`` (total seconds, first-chunk seconds, audio seconds)."""
    best_total = best_first = float("inf")
    audio_s = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        first = None
        samples = 0
        rates = set()
        for chunk, chunk_rate in engine.synthesize_stream(text):
            if first is None:
                first = time.perf_counter() - started
            samples += chunk.size
            rates.add(chunk_rate)
        total = time.perf_counter() - started
        best_total = min(best_total, total)
        best_first = min(best_first, first if first is not None else total)
        audio_s = samples / rates.pop()
    return best_total, best_first, audio_s


def _tts_row(name: str, engine: _Tts, load_s: float, repeats: int) -> dict[str, Any]:
    total, first, audio_s = _time_tts(engine, PARAGRAPH, repeats)
    return {
        "name": name,
        "audio_s": audio_s,
        "compute_s": total,
        "rtf": total / audio_s,
        "first_chunk_ms": first * 1000,
        "load_s": load_s,
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure every engine; return one dict per row of the table."""
    from voice_runtime.offline.espeak import EspeakEngine
    from voice_runtime.offline.piper import PiperEngine
    from voice_runtime.offline.whisper import WhisperEngine

    repeats = 2 if quick else 5
    rows: list[dict[str, Any]] = []

    started = time.perf_counter()
    espeak = EspeakEngine()
    espeak.synthesize("Warm up.")
    rows.append(_tts_row("espeak tts", espeak, time.perf_counter() - started, repeats))

    started = time.perf_counter()
    piper = PiperEngine()
    piper.preload()
    piper.synthesize("Warm up.")
    rows.append(_tts_row("piper tts", piper, time.perf_counter() - started, repeats))

    started = time.perf_counter()
    whisper = WhisperEngine()
    whisper.preload()
    load_s = time.perf_counter() - started
    speech, rate = piper.synthesize(PARAGRAPH)
    speech_16k = resample(speech, rate, 16000)
    whisper.transcribe(speech_16k[:16000])  # warm-up
    for seconds in (3.0, 10.0):
        clip = speech_16k[: int(seconds * 16000)]
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            whisper.transcribe(clip)
            best = min(best, time.perf_counter() - began)
        rows.append(
            {
                "name": f"whisper stt {seconds:.0f} s",
                "audio_s": clip.size / 16000,
                "compute_s": best,
                "rtf": best / (clip.size / 16000),
                "first_chunk_ms": None,
                "load_s": load_s,
            }
        )

    speech_8k = resample(speech, rate, 8000)
    started = time.perf_counter()
    segmenter = SpeechSegmenter(SileroVad(8000))
    load_s = time.perf_counter() - started
    best = float("inf")
    for _ in range(repeats):
        segmenter.reset()
        began = time.perf_counter()
        for offset in range(0, speech_8k.size, FRAME):
            segmenter.process(speech_8k[offset : offset + FRAME])
        best = min(best, time.perf_counter() - began)
    rows.append(
        {
            "name": "silero segmenter 8k",
            "audio_s": speech_8k.size / 8000,
            "compute_s": best,
            "rtf": best / (speech_8k.size / 8000),
            "first_chunk_ms": None,
            "load_s": load_s,
        }
    )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render the rows as a fixed-width text table."""
    header = (
        f"{'engine':<22}{'audio s':>9}{'compute s':>11}{'RTF':>9}{'x realtime':>12}"
        f"{'first chunk':>13}{'load s':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        first = "" if row["first_chunk_ms"] is None else f"{row['first_chunk_ms']:.1f} ms"
        lines.append(
            f"{row['name']:<22}{row['audio_s']:>9.2f}{row['compute_s']:>11.4f}"
            f"{row['rtf']:>9.4f}{1 / row['rtf']:>12.1f}{first:>13}{row['load_s']:>9.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    """Command-line entry: run the benchmark and print the table."""
    bench_main(__doc__, run, format_table, "fewer repeats")


if __name__ == "__main__":
    main()
