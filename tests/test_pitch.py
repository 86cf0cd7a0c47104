"""Issue 18 item 8, the prosodic cue: a pitch tracker and the rising/falling end of an utterance.

Synthetic voiced glides (a harmonic-rich tone whose F0 moves on a log scale) check the tracker
and the contour; clips of the offline eSpeak NG voice check what a real synthetic voice does
with a trailing comma (a continuation rise) and a full stop (a fall).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from voice_runtime.audio.pitch import (
    PitchTracker,
    ends_rising,
    final_contour,
    pitch_track,
)


def _voice(f0: npt.ArrayLike, rate: int = 8000, level: float = 8000.0) -> npt.NDArray[np.int16]:
    """A voiced sound following the per-sample F0 ``f0``: a fundamental and six harmonics."""
    f = np.asarray(f0, dtype=np.float64)
    phase = 2.0 * np.pi * np.cumsum(f) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    return (x / np.abs(x).max() * level).astype(np.int16)


def _glide(start_hz: float, end_hz: float, seconds: float = 0.6, rate: int = 8000) -> np.ndarray:
    return _voice(np.geomspace(start_hz, end_hz, int(seconds * rate)), rate)


def _silence(seconds: float, rate: int = 8000) -> npt.NDArray[np.int16]:
    return np.zeros(int(seconds * rate), dtype=np.int16)


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("hz", [75.0, 120.0, 210.0, 350.0])
def test_a_steady_voice_is_tracked_within_one_percent(rate: int, hz: float) -> None:
    track = pitch_track(_voice(np.full(rate, hz), rate), rate)
    assert track.size == 50  # one value per 20 ms frame
    voiced = track[track > 0]
    assert voiced.size >= 45
    assert np.median(voiced) == pytest.approx(hz, rel=0.01)


def test_silence_and_noise_are_unvoiced() -> None:
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(8000) * 3000).astype(np.int16)
    assert not pitch_track(_silence(1.0)).any()
    assert (pitch_track(noise) > 0).mean() < 0.1
    assert final_contour(pitch_track(noise)).kind == "unknown"
    assert not ends_rising(noise)


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize(
    ("start", "end", "kind"),
    [
        (120, 180, "rise"),
        (220, 320, "rise"),
        (180, 120, "fall"),
        (100, 70, "fall"),
        (150, 150, "level"),
    ],
)
def test_glides_read_as_rise_fall_or_level(rate: int, start: float, end: float, kind: str) -> None:
    audio = np.concatenate([_glide(start, end, rate=rate), _silence(0.5, rate)])
    contour = final_contour(pitch_track(audio, rate))
    assert contour.kind == kind, contour
    assert ends_rising(audio, rate) is (kind == "rise")


def test_a_fall_then_a_rise_at_the_end_is_a_continuation_rise() -> None:
    """English continuation rises are fall-rises on the last syllable."""
    audio = np.concatenate([_glide(130, 95, 0.4), _glide(95, 125, 0.2), _silence(0.3)])
    assert final_contour(pitch_track(audio)).kind == "rise"
    # ...and a rise early on that falls at the end is a fall.
    audio = np.concatenate([_glide(100, 140, 0.4), _glide(140, 100, 0.4), _silence(0.3)])
    assert final_contour(pitch_track(audio)).kind == "fall"


def test_octave_errors_do_not_flip_the_contour() -> None:
    """Frames at double or half the F0 (the tracker's typical errors) are folded back."""
    frames = np.geomspace(180, 120, 30)  # a falling contour, one value per 20 ms frame
    spoiled = frames.copy()
    spoiled[[5, 12, 20]] *= 2.0  # doubled
    spoiled[[8, 25]] /= 2.0  # halved
    spoiled[-4:] *= 2.0  # a run at the very end: no median filter votes that down
    assert final_contour(frames).kind == "fall"
    assert final_contour(spoiled).kind == "fall"
    assert final_contour(spoiled, fold_st=100.0).kind == "rise"  # unfolded, it would flip
    rising = np.geomspace(110, 160, 30)
    rising[[3, 17]] /= 2.0
    rising[-4:] /= 2.0
    assert final_contour(rising).kind == "rise"
    assert final_contour(rising, fold_st=100.0).kind != "rise"


def test_too_little_voicing_is_unknown() -> None:
    assert final_contour([0, 0, 150, 160, 0, 0]).kind == "unknown"
    assert final_contour([]).kind == "unknown"


def test_the_streaming_tracker_matches_the_batch_one_for_any_chunking() -> None:
    audio = np.concatenate([_glide(110, 170, 0.8), _glide(170, 120, 0.6)])
    batch = pitch_track(audio, max_drop_db=None)
    tracker = PitchTracker()
    rng = np.random.default_rng(3)
    got = []
    i = 0
    while i < audio.size:
        n = int(rng.integers(1, 700))
        got.extend(tracker.process(audio[i : i + n]).tolist())
        i += n
    assert tracker.frames == len(got)
    # The tracker waits for one longest period after a frame; the rest matches exactly.
    assert np.allclose(got, batch[: len(got)])
    assert len(got) >= batch.size - 1
    assert tracker.contour().kind == "fall"
    tracker.reset()
    assert tracker.track.size == 0
    tracker.process(audio.tobytes())  # PCM16 bytes are accepted too
    assert tracker.track.size > 0


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        PitchTracker(44100)
    with pytest.raises(ValueError):
        PitchTracker(min_hz=300, max_hz=200)
    with pytest.raises(ValueError):
        PitchTracker(threshold=0.5, voicing=0.2)
    with pytest.raises(TypeError):
        pitch_track(np.zeros(10, dtype=np.float32))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- offline voice

COMMA_TESTS = [
    "Let me check my calendar",
    "I have a question about my order",
    "I want to fly to Boston",
    "I need a table for two",
    "Tomorrow morning",
    "Okay",
]


def test_espeak_rises_at_a_comma_and_falls_at_a_full_stop() -> None:
    """What the offline voice really does: a comma ends rising, a full stop never does."""
    pytest.importorskip("espeakng_loader")
    from voice_runtime.audio import ulaw_decode
    from voice_runtime.offline import synthesize_ulaw

    def contour(text: str) -> str:
        return final_contour(pitch_track(ulaw_decode(synthesize_ulaw(text, "espeak")))).kind

    commas = [contour(text + ",") for text in COMMA_TESTS]
    stops = [contour(text + ".") for text in COMMA_TESTS]
    assert commas.count("rise") >= len(COMMA_TESTS) - 1, commas
    assert "rise" not in stops and stops.count("fall") >= len(COMMA_TESTS) - 2, stops
