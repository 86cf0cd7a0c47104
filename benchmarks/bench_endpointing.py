"""Benchmark end-of-turn detection: does the offline STT cut callers off, and at what cost?

Run ``python benchmarks/bench_endpointing.py`` (needs the ``offline`` extra). Each sample is
one caller turn spoken by the offline Piper voice: finished sentences, and sentences with a
pause in the middle after an unfinished part (a trailing "and"/"but"/"because", a phone
number read out in groups, a filler). Silence is appended so every turn can end.

The caller audio is cut by the same Silero segmenter and joined by the same
:class:`~voice_runtime.turns.TurnJoiner` the offline STT uses, on the stream clock, with
Whisper transcribing synchronously (so the latency below is the endpointing wait alone; the
transcription time is reported on its own). Per configuration:

* ``too early``: turns that were committed in pieces (the caller was cut off mid-sentence);
* ``too late``: turns whose final commit came more than ``LATE_MS`` after the speech ended;
* ``median wait``: stream milliseconds from the end of the caller's speech to the commit.

The baseline ("before") is the fixed 500 ms silence the offline STT used; "fixed 1200 ms"
is the naive fix (a longer timer for every turn); "adaptive" is the lexical end of turn;
"+prosody" adds the rising-pause cue (``EndOfTurn(prosody=True)``).

Two sets of turns, reported apart: "lexical" (the Piper turns above) and "rising": turns
spoken by eSpeak NG, whose unfinished first part ends in a comma (eSpeak makes it a
continuation rise; Whisper drops the comma, so no lexical cue is left) and finished
sentences and a question spoken by eSpeak (which end falling, or rise as a question).
The per-frame cost of the pitch tracker is printed below the table.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from _cli import bench_main  # benchmarks/ is sys.path[0] for scripts and run.py

from voice_runtime.audio import resample, ulaw_decode
from voice_runtime.audio.vad import SileroVad, SpeechSegmenter, SpeechStart, UtteranceEnd
from voice_runtime.turns import EndOfTurn, TurnJoiner

LATE_MS = 1000.0
RATE = 8000
FRAME = 160
TAIL_MS = 3000  # silence after each turn

# (parts, pauses between them in ms): one caller turn each, spoken by Piper.
SAMPLES: list[tuple[list[str], list[int]]] = [
    (["I would like to order a pizza and", "a large lemonade."], [900]),
    (["My phone number is five five five", "one two three four."], [800]),
    (["I want to fly to Boston but", "only on a Friday."], [1000]),
    (["Can you check my order because", "it has not arrived yet."], [900]),
    (["The code is one two three", "four five six."], [800]),
    (["I need a table for four people at", "seven tonight."], [900]),
    (["Well, um", "I lost my credit card."], [1000]),
    (["My account number is", "four four two one."], [900]),
    (["The weather is nice today."], []),
    (["Can you help me with my bill?"], []),
    (["Yes, please."], []),
    (["I think so."], []),
    (["Thank you very much."], []),
    (["I want to cancel my subscription."], []),
]
QUICK = [0, 1, 6, 8, 10, 11]
# The "rising" set, spoken by eSpeak NG: a comma before the pause and no lexical cue.
RISING: list[tuple[list[str], list[int]]] = [
    (["I need a table for two,", "at seven tonight."], [900]),
    (["Send it to my office,", "not to my home."], [900]),
    (["I have a question about my order,", "it never arrived."], [900]),
    (["Tomorrow morning,", "around nine."], [900]),
    (["Let me check my calendar,", "one moment."], [900]),
    (["I want to fly to Boston,", "next Friday."], [900]),
    (["I would like a pizza,", "with extra cheese."], [900]),
    (["My name is John Smith,", "from Denver."], [900]),
    (["I need a table for two."], []),
    (["Send it to my office."], []),
    (["Tomorrow morning."], []),
    (["I want to fly to Boston."], []),
    (["Thank you very much."], []),
    (["Can you help me with my bill?"], []),
]
RISING_QUICK = [0, 3, 5, 8, 10, 13]

CONFIGS: list[tuple[str, float, EndOfTurn | None]] = [
    ("before: fixed 500 ms", 500.0, None),
    ("fixed 1200 ms", 1200.0, None),
    ("adaptive 500/1600 ms", 500.0, EndOfTurn(500.0, 1600.0, prosody=False)),
    ("+prosody 500/1600 ms", 500.0, EndOfTurn(500.0, 1600.0, prosody=True)),
]


@dataclass
class Turn:
    """One sample turn as μ-law audio, with where its last part starts and its speech ends."""

    parts: list[str]
    audio: bytes
    last_start_s: float
    speech_end_s: float


def _speech_end(pcm: np.ndarray) -> float:
    """Seconds from the clip start to the end of its last loud 20 ms frame (about -40 dBFS)."""
    frames = pcm[: pcm.size // FRAME * FRAME].astype(np.float64).reshape(-1, FRAME)
    loud = np.flatnonzero(np.sqrt((frames**2).mean(axis=1)) > 300.0)
    return (int(loud[-1]) + 1) * FRAME / RATE if loud.size else 0.0


def build_turns(
    indices: list[int],
    samples: list[tuple[list[str], list[int]]] = SAMPLES,
    voice: str = "piper",
) -> list[Turn]:
    """Speak every sample with ``voice`` and lay out its parts and pauses."""
    from voice_runtime.offline import synthesize_ulaw

    turns = []
    for i in indices:
        parts, pauses = samples[i]
        audio = bytearray(b"\xff" * 2400)  # 300 ms lead-in
        last_start = 0.0
        for n, text in enumerate(parts):
            clip = synthesize_ulaw(text, voice)
            last_start = len(audio) / RATE
            end = last_start + _speech_end(ulaw_decode(clip))
            audio += clip
            if n < len(pauses):
                audio += b"\xff" * (pauses[n] * 8)
        audio += b"\xff" * (TAIL_MS * 8)
        turns.append(Turn(parts, bytes(audio), last_start, end))
    return turns


class _Whisper:
    """Whisper with a cache (the same audio recurs across configurations) and a timer."""

    def __init__(self) -> None:
        from voice_runtime.offline.whisper import WhisperEngine

        self.engine = WhisperEngine()
        self.cache: dict[bytes, str] = {}
        self.seconds: list[float] = []

    def __call__(self, pcm: np.ndarray) -> str:
        key = pcm.tobytes()
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.engine.transcribe(resample(pcm, RATE, 16000))
            self.seconds.append(time.perf_counter() - t0)
        return self.cache[key]


def commits(
    turn: Turn, silence_ms: float, policy: EndOfTurn | None, whisper: _Whisper
) -> list[tuple[float, str]]:
    """(stream seconds, text) of every commit for ``turn``, as the offline STT decides them."""
    segmenter = SpeechSegmenter(SileroVad(RATE), min_silence_ms=silence_ms)
    joiner = TurnJoiner(policy)
    out: list[tuple[float, str]] = []
    pcm = ulaw_decode(turn.audio)
    for i in range(0, pcm.size, FRAME):
        for event in segmenter.process(pcm[i : i + FRAME]):
            if isinstance(event, SpeechStart):
                joiner.speech_started()
            elif isinstance(event, UtteranceEnd):
                audio = joiner.audio_for(event.pcm)
                text = joiner.transcribed(audio, whisper(audio), event.end, RATE)
                if text:
                    out.append((segmenter.position, text))
        due = None
        if not segmenter.speech_pending:
            due = joiner.due(segmenter.position, segmenter.in_speech)
        if due:
            out.append((segmenter.position, due))
    for event in segmenter.flush():
        if isinstance(event, UtteranceEnd):
            audio = joiner.audio_for(event.pcm)
            text = joiner.transcribed(audio, whisper(audio), event.end, RATE) or joiner.flush()
            out.append((segmenter.position, text))
    held = joiner.flush()
    if held:
        out.append((segmenter.position, held))
    return out


def pitch_cost_us() -> tuple[float, float]:
    """Microseconds per 20 ms frame of 8 kHz speech: the streaming tracker fed frame by frame,
    and :func:`pitch_track` on a whole utterance (what the end of turn runs); best of 5."""
    from voice_runtime.audio.pitch import PitchTracker, pitch_track
    from voice_runtime.offline import synthesize_ulaw

    pcm = ulaw_decode(synthesize_ulaw("I would like to order a pizza and a lemonade.", "piper"))
    frames = pcm.size // FRAME
    stream, batch = [], []
    for _ in range(5):
        tracker = PitchTracker(RATE)
        t0 = time.perf_counter()
        for i in range(0, pcm.size, FRAME):
            tracker.process(pcm[i : i + FRAME])
        stream.append((time.perf_counter() - t0) * 1e6 / frames)
        t0 = time.perf_counter()
        pitch_track(pcm, RATE)
        batch.append((time.perf_counter() - t0) * 1e6 / frames)
    return min(stream), min(batch)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One row per configuration and set: too-early and too-late counts, median, p90 waits."""
    sets = [
        ("lexical", build_turns(QUICK if quick else list(range(len(SAMPLES))))),
        (
            "rising",
            build_turns(
                RISING_QUICK if quick else list(range(len(RISING))), RISING, voice="espeak"
            ),
        ),
    ]
    whisper = _Whisper()
    rows = []
    for (name, silence_ms, policy), (set_name, turns) in itertools.product(CONFIGS, sets):
        early = late = 0
        waits: list[float] = []
        for turn in turns:
            got = commits(turn, silence_ms, policy, whisper)
            if not got:
                late += 1
                continue
            if any(t < turn.last_start_s for t, _ in got):
                early += 1
            wait_ms = (got[-1][0] - turn.speech_end_s) * 1000.0
            waits.append(wait_ms)
            if wait_ms > LATE_MS:
                late += 1
        rows.append(
            {
                "config": name,
                "set": set_name,
                "turns": len(turns),
                "too_early": early,
                "too_late": late,
                "median_wait_ms": round(statistics.median(waits), 0) if waits else None,
                "p90_wait_ms": round(float(np.percentile(waits, 90)), 0) if waits else None,
                "median_transcribe_ms": round(statistics.median(whisper.seconds) * 1000, 0),
            }
        )
    stream_us, batch_us = pitch_cost_us()
    for row in rows:
        row["pitch_us_per_frame"] = round(stream_us, 1)
        row["pitch_batch_us_per_frame"] = round(batch_us, 1)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table."""
    head = (
        f"{'configuration':<24}{'set':>8}{'turns':>6}{'too early':>10}{'too late':>10}"
        f"{'median wait':>13}{'p90 wait':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['config']:<24}{r['set']:>8}{r['turns']:>6}{r['too_early']:>10}{r['too_late']:>10}"
            f"{r['median_wait_ms']:>10.0f} ms{r['p90_wait_ms']:>7.0f} ms"
        )
    lines.append(
        f"(too late: > {LATE_MS:.0f} ms after the speech ended; waits on the stream clock, "
        f"plus Whisper's median {rows[0]['median_transcribe_ms']:.0f} ms per transcription)\n"
        f"pitch tracker per 20 ms frame at 8 kHz: {rows[0]['pitch_us_per_frame']:.0f} µs "
        f"streaming, {rows[0]['pitch_batch_us_per_frame']:.0f} µs on a whole utterance"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    bench_main(__doc__, run, format_table, "six samples per set instead of fourteen")
