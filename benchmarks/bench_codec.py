"""Benchmark voice_runtime.audio against the stdlib ``audioop`` codec in the same run.

Run ``python benchmarks/bench_codec.py`` (``--quick`` for a shorter run). Machines are
noisy, so read the ratio column (ours / audioop time; below 1 means we are faster) rather
than the absolute times. ``x realtime`` is seconds of audio processed per second of CPU.

:func:`run` returns the rows as dicts so a benchmark runner can collect them.
"""

from __future__ import annotations

import timeit
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from _cli import bench_main  # benchmarks/ is sys.path[0] for scripts and run.py

from voice_runtime.audio import (
    FRAME_BYTES,
    StreamResampler,
    alaw_to_pcm16,
    mix_frames,
    pcm16_to_alaw,
    pcm16_to_ulaw,
    tone_pcm16,
    ulaw_to_pcm16,
)


def _load_audioop() -> ModuleType | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:  # Python 3.13+ without the audioop-lts backport
            return None
    return audioop


def _seconds_per_call(fn: Callable[[], object], budget: float) -> float:
    """Best-of-5 seconds per call, each repeat running about ``budget / 5`` seconds."""
    timer = timeit.Timer(fn)
    number, elapsed = timer.autorange()
    per_repeat = max(1, int(number * (budget / 5) / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=5, number=per_repeat)) / per_repeat


def _row(
    name: str,
    audio_s: float,
    ours: Callable[[], object],
    baseline: Callable[[], object] | None,
    baseline_name: str,
    budget: float,
) -> dict[str, Any]:

    ours_s = _seconds_per_call(ours, budget)
    base_s = _seconds_per_call(baseline, budget) if baseline is not None else None
    return {
        "name": name,
        "audio_seconds": audio_s,
        "ours_us": ours_s * 1e6,
        "baseline": baseline_name if baseline is not None else None,
        "baseline_us": base_s * 1e6 if base_s is not None else None,
        "ratio": ours_s / base_s if base_s else None,
        "x_realtime": audio_s / ours_s,
    }


def _stream_resample(in_rate: int, out_rate: int, signal: np.ndarray) -> Callable[[], object]:
    chunk = in_rate // 50  # 20 ms
    pieces = [signal[i : i + chunk] for i in range(0, signal.size, chunk)]

    def go() -> None:
        resampler = StreamResampler(in_rate, out_rate)
        for piece in pieces:
            resampler.process(piece)
        resampler.flush()

    return go


def _ratecv_stream(
    audioop: ModuleType, in_rate: int, out_rate: int, signal: np.ndarray
) -> Callable[[], object]:
    chunk = (in_rate // 50) * 2
    raw = signal.astype("<i2").tobytes()
    pieces = [raw[i : i + chunk] for i in range(0, len(raw), chunk)]

    def go() -> None:
        state = None
        for piece in pieces:
            _, state = audioop.ratecv(piece, 2, 1, in_rate, out_rate, state)

    return go


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Time the codecs, mixing and resampling; return one dict per measurement."""
    audioop = _load_audioop()
    budget = 0.05 if quick else 0.25
    rng = np.random.default_rng(7)
    rows: list[dict[str, Any]] = []

    for seconds, label in ((10.0, "10 s"), (1.0, "1 s"), (FRAME_BYTES / 8000, "frame")):
        n = int(seconds * 8000)
        pcm = rng.normal(0, 6000, n).clip(-32768, 32767).astype("<i2").tobytes()
        ulaw = pcm16_to_ulaw(pcm)
        alaw = pcm16_to_alaw(pcm)
        cases: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
            (
                f"ulaw encode {label}",
                lambda pcm=pcm: pcm16_to_ulaw(pcm),
                (lambda pcm=pcm: audioop.lin2ulaw(pcm, 2)) if audioop else None,
            ),
            (
                f"ulaw decode {label}",
                lambda ulaw=ulaw: ulaw_to_pcm16(ulaw),
                (lambda ulaw=ulaw: audioop.ulaw2lin(ulaw, 2)) if audioop else None,
            ),
            (
                f"alaw encode {label}",
                lambda pcm=pcm: pcm16_to_alaw(pcm),
                (lambda pcm=pcm: audioop.lin2alaw(pcm, 2)) if audioop else None,
            ),
            (
                f"alaw decode {label}",
                lambda alaw=alaw: alaw_to_pcm16(alaw),
                (lambda alaw=alaw: audioop.alaw2lin(alaw, 2)) if audioop else None,
            ),
        ]
        for name, ours, base in cases:
            rows.append(_row(name, seconds, ours, base, "audioop", budget))

    caller = rng.integers(0, 256, FRAME_BYTES, dtype=np.uint8).tobytes()
    agent = rng.integers(0, 256, FRAME_BYTES, dtype=np.uint8).tobytes()

    def audioop_mix() -> bytes:
        assert audioop is not None
        summed = audioop.add(audioop.ulaw2lin(caller, 2), audioop.ulaw2lin(agent, 2), 2)
        return audioop.lin2ulaw(summed, 2)

    rows.append(
        _row(
            "mix_frames frame",
            FRAME_BYTES / 8000,
            lambda: mix_frames(caller, agent),
            audioop_mix if audioop else None,
            "audioop",
            budget,
        )
    )

    stream_seconds = 2.0 if quick else 10.0
    for in_rate, out_rate in ((24000, 8000), (8000, 16000)):
        signal = tone_pcm16(440, stream_seconds * 1000, sample_rate=in_rate)
        rows.append(
            _row(
                f"resample {in_rate // 1000}k->{out_rate // 1000}k 20 ms chunks",
                stream_seconds,
                _stream_resample(in_rate, out_rate, signal),
                _ratecv_stream(audioop, in_rate, out_rate, signal) if audioop else None,
                "audioop.ratecv (linear)",
                budget,
            )
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Render rows from :func:`run` as a fixed-width text table."""
    header = (
        f"{'case':<34} {'ours µs':>11} {'baseline µs':>12} {'ours/base':>10} {'x realtime':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        base = f"{r['baseline_us']:.2f}" if r["baseline_us"] is not None else "n/a"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "n/a"
        lines.append(
            f"{r['name']:<34} {r['ours_us']:>11.2f} {base:>12} {ratio:>10} "
            f"{r['x_realtime']:>12,.0f}"
        )
    baselines = sorted({r["baseline"] for r in rows if r["baseline"]})
    lines.append(f"baselines: {', '.join(baselines) or 'none (audioop not importable)'}")
    return "\n".join(lines)


def main() -> None:
    """Command-line entry: run the benchmark and print the table."""
    bench_main(__doc__, run, format_table, "shorter timing budget")


if __name__ == "__main__":
    main()
