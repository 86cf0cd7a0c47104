"""Answering-machine beep detection on the caller's audio (sans-I/O).

:class:`BeepDetector` takes caller audio (μ-law bytes or PCM16 samples, any chunk size) and
reports a :class:`Beep` when a steady single tone ends: the "please leave a message after the
tone" beep. It needs no network and no AMD, so a voicemail drop can fall back on it when
Twilio's machine detection is off, undecided or late.

How: the audio is cut into 20 ms frames (Hann window); for each frame the Goertzel power of
a bank of candidate frequencies (``min_hz``..``max_hz`` every ``step_hz``) is computed, all
at once as one matrix product (the closed form of the Goertzel recurrence: the same number,
without a per-sample Python loop; :func:`goertzel_power` is the textbook recurrence for one
frequency). A frame is *tonal* when the strongest candidate holds at least ``min_purity`` of
the frame's energy (a pure tone scores about 1.0; speech spreads its energy over many
harmonics, noise over the whole band) and the frame is louder than ``min_dbfs``. A beep is a
run of tonal frames at one frequency (within ``tolerance_hz``) lasting at least
``min_beep_ms``; it is reported when the tone stops (so speech starts after it), or once it
has lasted ``max_beep_ms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from voice_runtime.audio.codec import ulaw_decode
from voice_runtime.audio.pcm import SAMPLE_RATE, as_pcm16

__all__ = ["Beep", "BeepDetector", "goertzel_power"]

_FRAME = 160  # 20 ms at 8 kHz
_FULL_SCALE_ENERGY = 32768.0**2  # mean square of a full-scale square wave


@dataclass(frozen=True)
class Beep:
    """A detected beep: its frequency, length and where it ended (ms into the fed audio)."""

    freq_hz: float
    duration_ms: float
    end_ms: float


def goertzel_power(samples: npt.ArrayLike, freq_hz: float, sample_rate: int = SAMPLE_RATE) -> float:
    """Power of ``freq_hz`` in ``samples`` by the Goertzel recurrence (reference, one frequency)."""
    x = np.asarray(samples, dtype=np.float64)
    coeff = 2.0 * math.cos(2.0 * math.pi * freq_hz / sample_rate)
    s1 = s2 = 0.0
    for value in x.tolist():  # reference implementation: clarity over speed
        s1, s2 = value + coeff * s1 - s2, s1
    return s1 * s1 + s2 * s2 - coeff * s1 * s2


class BeepDetector:
    """Finds an answering machine's beep in caller audio; feed it, read :class:`Beep` back.

    Not thread-safe: feed it from one thread (the session's loop, via an inbound tap).
    """

    def __init__(
        self,
        *,
        min_hz: float = 300.0,
        max_hz: float = 2500.0,
        step_hz: float = 20.0,
        min_purity: float = 0.6,
        min_dbfs: float = -45.0,
        min_beep_ms: float = 160.0,
        max_beep_ms: float = 2000.0,
        tolerance_hz: float = 40.0,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        if not 0 < min_hz < max_hz < sample_rate / 2:
            raise ValueError("need 0 < min_hz < max_hz < sample_rate / 2")
        if step_hz <= 0 or not 0 < min_purity <= 1 or min_beep_ms <= 0:
            raise ValueError("step_hz, min_purity (0..1] and min_beep_ms must be positive")
        if max_beep_ms < min_beep_ms:
            raise ValueError("max_beep_ms must be at least min_beep_ms")
        self.min_purity = min_purity
        self.min_energy = _FULL_SCALE_ENERGY * 10.0 ** (min_dbfs / 10.0)
        self.min_frames = math.ceil(min_beep_ms / 20.0)
        self.max_frames = max(self.min_frames, math.floor(max_beep_ms / 20.0))
        self.tolerance_hz = tolerance_hz
        self.freqs = np.arange(min_hz, max_hz + step_hz / 2, step_hz)
        window = np.hanning(_FRAME + 2)[1:-1]  # no zero end points: every sample counts
        t = np.arange(_FRAME) / sample_rate
        phase = 2.0 * np.pi * self.freqs[:, None] * t[None, :]
        # The windowed DFT rows at each candidate frequency: one matrix product per frame.
        self._bank = np.concatenate([np.cos(phase) * window, np.sin(phase) * window])
        self._window_sq = window**2
        # A pure tone on a candidate frequency scores purity 1.0 with this normalisation.
        self._norm = float(window.sum() ** 2 / (2.0 * self._window_sq.sum()))
        self._pending = np.zeros(0, dtype=np.float64)
        self._frames_seen = 0
        self._run = 0
        self._run_freq = 0.0
        self.beeps: list[Beep] = []

    @property
    def position_ms(self) -> float:
        """Milliseconds of audio analysed so far."""
        return self._frames_seen * 20.0

    def reset(self) -> None:
        """Forget buffered audio, the current tone and the beeps found."""
        self._pending = np.zeros(0, dtype=np.float64)
        self._frames_seen = 0
        self._run = 0
        self.beeps.clear()

    def feed_ulaw(self, data: bytes) -> Beep | None:
        """Analyse μ-law caller audio; the beep that ended in it, if any."""
        return self.feed_pcm(ulaw_decode(data))

    def feed_pcm(self, samples: npt.NDArray[np.int16] | bytes) -> Beep | None:
        """Analyse 8 kHz PCM16 caller audio; the beep that ended in it, if any."""
        pcm = as_pcm16(samples).astype(np.float64)
        buf = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        whole = buf.size // _FRAME * _FRAME
        self._pending = buf[whole:].copy()
        if whole == 0:
            return None
        found: Beep | None = None
        frames = buf[:whole].reshape(-1, _FRAME)
        tonal, peak = self._classify(frames)
        for is_tonal, freq in zip(tonal.tolist(), peak.tolist(), strict=True):
            self._frames_seen += 1
            beep = self._step(is_tonal, freq)
            if beep is not None:
                self.beeps.append(beep)
                found = beep
        return found

    def _classify(
        self, frames: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
        proj = frames @ self._bank.T  # (frames, 2 * freqs): cosine then sine parts
        n = self.freqs.size
        power = proj[:, :n] ** 2 + proj[:, n:] ** 2
        best = power.argmax(axis=1)
        energy = (frames**2) @ self._window_sq
        loud = energy / self._window_sq.sum() >= self.min_energy
        purity = power[np.arange(len(frames)), best] / np.maximum(energy * self._norm, 1e-9)
        return loud & (purity >= self.min_purity), self.freqs[best]

    def _step(self, tonal: bool, freq: float) -> Beep | None:
        if tonal and self._run and abs(freq - self._run_freq) <= self.tolerance_hz:
            self._run += 1
            if self._run == self.max_frames:
                # A very long tone: report it now rather than wait for its end.
                return self._beep(end_frames=self._frames_seen)
            return None
        beep = None
        if self.min_frames <= self._run < self.max_frames:
            beep = self._beep(end_frames=self._frames_seen - 1)  # it ended before this frame
        self._run, self._run_freq = (1, freq) if tonal else (0, 0.0)
        return beep

    def _beep(self, end_frames: int) -> Beep:
        return Beep(freq_hz=self._run_freq, duration_ms=self._run * 20.0, end_ms=end_frames * 20.0)
