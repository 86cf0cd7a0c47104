"""The answering-machine beep detector: tones in noise are found, speech and DTMF are not."""

from __future__ import annotations

import numpy as np
import pytest

from voice_runtime.audio import pcm16_to_ulaw, tone_pcm16
from voice_runtime.audio.beep import BeepDetector, goertzel_power

RNG_SEED = 18


def _noise(rng: np.random.Generator, ms: float, dbfs: float) -> np.ndarray:
    return rng.normal(0.0, 32768.0 * 10 ** (dbfs / 20), int(ms * 8))


def _tone_in_noise(freq: float, tone_ms: float, snr_db: float, seed: int = RNG_SEED) -> bytes:
    """600 ms noise, the tone (at -20 dBFS) over the noise, 600 ms noise; as μ-law."""
    rng = np.random.default_rng(seed)
    noise_db = -20.0 - snr_db
    tone = tone_pcm16(freq, tone_ms, -20.0).astype(np.float64)
    signal = np.concatenate(
        [
            _noise(rng, 600, noise_db),
            tone + _noise(rng, tone_ms, noise_db),
            _noise(rng, 600, noise_db),
        ]
    )
    return pcm16_to_ulaw(np.clip(signal, -32768, 32767).astype(np.int16).tobytes())


def _feed(detector: BeepDetector, ulaw: bytes, chunk: int = 160) -> None:
    for i in range(0, len(ulaw), chunk):
        detector.feed_ulaw(ulaw[i : i + chunk])


@pytest.mark.parametrize("freq", [440.0, 777.0, 1000.0, 1400.0, 2000.0])
@pytest.mark.parametrize("snr_db", [20.0, 6.0])
def test_a_beep_in_noise_is_found_once_with_its_frequency_and_end(
    freq: float, snr_db: float
) -> None:
    detector = BeepDetector()
    _feed(detector, _tone_in_noise(freq, 400.0, snr_db))
    assert len(detector.beeps) == 1, detector.beeps
    beep = detector.beeps[0]
    assert abs(beep.freq_hz - freq) <= 20.0
    assert 340.0 <= beep.duration_ms <= 420.0
    assert 960.0 <= beep.end_ms <= 1020.0  # the tone ends 1000 ms in


def test_chunk_size_does_not_change_the_result() -> None:
    audio = _tone_in_noise(1000.0, 300.0, 10.0)
    whole, odd = BeepDetector(), BeepDetector()
    whole.feed_ulaw(audio)
    _feed(odd, audio, chunk=37)
    assert whole.beeps == odd.beeps and len(whole.beeps) == 1


def test_short_blips_dtmf_and_noise_are_not_beeps() -> None:
    detector = BeepDetector()
    rng = np.random.default_rng(RNG_SEED)
    blip = tone_pcm16(1000.0, 80.0, -20.0)  # shorter than min_beep_ms
    dtmf = tone_pcm16(770.0, 400.0, -23.0).astype(np.int32) + tone_pcm16(1336.0, 400.0, -23.0)
    parts = [blip, np.clip(dtmf, -32768, 32767), _noise(rng, 2000, -25.0)]
    for part in parts:
        detector.feed_pcm(np.asarray(part).clip(-32768, 32767).astype(np.int16))
    assert detector.beeps == []


@pytest.mark.parametrize("voice", ["espeak", "piper"])
def test_speech_is_not_a_beep(voice: str) -> None:
    pytest.importorskip("espeakng_loader")
    if voice == "piper":
        pytest.importorskip("piper")
    from voice_runtime.offline import synthesize_ulaw

    greeting = synthesize_ulaw(
        "Hello, you have reached the voicemail of Sam. Ooooh, aaaah, mmmm. I can't take "
        "your call right now, please leave your name and number after the tone.",
        voice,
    )
    detector = BeepDetector()
    _feed(detector, greeting)
    assert detector.beeps == []
    # The same greeting followed by a beep: exactly the beep is found.
    _feed(detector, pcm16_to_ulaw(tone_pcm16(1000.0, 500.0, -18.0).tobytes()) + b"\xff" * 800)
    assert [round(b.freq_hz) for b in detector.beeps] == [1000]


def test_a_long_tone_is_reported_after_max_beep_ms() -> None:
    detector = BeepDetector(max_beep_ms=600.0)
    found = detector.feed_pcm(tone_pcm16(900.0, 3000.0, -20.0, fade_ms=0.0))
    assert found is not None and found.duration_ms == 600.0
    assert len(detector.beeps) == 1  # not reported again when it finally ends
    detector.feed_ulaw(b"\xff" * 1600)
    assert len(detector.beeps) == 1


def test_the_frame_power_is_the_goertzel_power() -> None:
    detector = BeepDetector()
    rng = np.random.default_rng(RNG_SEED)
    frame = rng.normal(0, 3000, 160)
    window = np.hanning(162)[1:-1]
    proj = frame @ detector._bank.T
    n = detector.freqs.size
    closed_form = proj[:n] ** 2 + proj[n:] ** 2
    for i in (0, 17, n - 1):
        reference = goertzel_power(frame * window, float(detector.freqs[i]))
        assert closed_form[i] == pytest.approx(reference, rel=1e-9)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_hz"):
        BeepDetector(min_hz=3000.0, max_hz=2000.0)
    with pytest.raises(ValueError, match="max_beep_ms"):
        BeepDetector(min_beep_ms=500.0, max_beep_ms=100.0)
