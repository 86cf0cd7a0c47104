"""The segmenter's speech onset, which barge-in is built on: gaps and the speech ratio.

A scripted VAD stands in for Silero so each window's probability is exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from voice_runtime.audio.vad import SpeechSegmenter, SpeechStart

WINDOW = 256  # samples at 8 kHz: 32 ms


class ScriptedVad:
    """One scripted probability per window of samples fed."""

    sample_rate = 8000
    window_samples = WINDOW
    threshold = 0.5

    def __init__(self, probabilities: list[float]) -> None:
        self.script = list(probabilities)
        self.fill = 0

    def process(self, samples: np.ndarray) -> list[float]:
        self.fill += samples.size
        out = []
        while self.fill >= WINDOW and self.script:
            self.fill -= WINDOW
            out.append(self.script.pop(0))
        return out

    def reset(self) -> None:
        self.fill = 0


def onsets(probabilities: list[float], **kwargs: float) -> list[SpeechStart]:
    seg = SpeechSegmenter(ScriptedVad(probabilities), pad_ms=0, **kwargs)  # type: ignore[arg-type]
    events = seg.process(np.zeros(WINDOW * len(probabilities), dtype=np.int16))
    return [e for e in events if isinstance(e, SpeechStart)]


S, Q = 0.9, 0.1  # speech, quiet


def test_without_gap_tolerance_a_dip_restarts_the_onset() -> None:
    # 10 windows = 320 ms of speech needed; a one-window dip after 8 restarts the count.
    assert onsets([S] * 8 + [Q] + [S] * 9, min_speech_ms=320) == []
    assert len(onsets([S] * 8 + [Q] + [S] * 10, min_speech_ms=320)) == 1


def test_a_short_dip_is_bridged_when_gaps_are_allowed() -> None:
    # 100 ms is 3 windows: two quiet windows are a dip, the third a pause.
    found = onsets([S] * 5 + [Q] * 2 + [S] * 3, min_speech_ms=320, max_gap_ms=100)
    assert len(found) == 1 and found[0].start == 0.0
    assert onsets([S] * 5 + [Q] * 3 + [S] * 6, min_speech_ms=320, max_gap_ms=100) == []


def test_the_speech_ratio_rejects_mostly_quiet_runs() -> None:
    choppy = [S, Q, Q] * 4
    assert len(onsets(choppy, min_speech_ms=320, max_gap_ms=100)) == 1
    assert onsets(choppy, min_speech_ms=320, max_gap_ms=100, min_speech_ratio=0.5) == []


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError):
        onsets([], max_gap_ms=-1)
    with pytest.raises(ValueError):
        onsets([], min_speech_ratio=1.5)
