"""Pitch (F0) tracking and the final pitch contour of an utterance (sans-I/O, numpy).

:class:`PitchTracker` takes caller PCM16 at 8 or 16 kHz (any chunk size) and gives one F0
value per 20 ms frame (0.0 when the frame is unvoiced); :func:`pitch_track` does the same
for a whole buffer. :func:`final_contour` reads the last voiced ~400 ms of a track and says
whether the utterance ends with a *rise* (a continuation rise: "I'd like a pizza, ...") or a
*fall* (finality), which the end-of-turn heuristic uses as a prosodic cue
(:class:`voice_runtime.turns.EndOfTurn`'s ``prosody``).

How: YIN (de Cheveigné and Kawahara, 2002). Per frame, the difference function
``d(tau) = sum (x[j] - x[j + tau])^2`` over a 20 ms integration window is computed from an
FFT cross-correlation and running energies (all frames at once, no per-sample Python loop),
normalised by its cumulative mean; the first local minimum under ``threshold`` is the period
(refined by parabolic interpolation). A frame is voiced when that minimum is clear (under
``voicing``) and the frame is louder than ``min_dbfs``.

The contour is made robust to the tracker's octave errors (a halved or doubled F0 at creaky
ends and weak onsets): values are taken in semitones, folded by an octave when they sit more
than ``fold_st`` from the utterance's median, median filtered, and the rise is measured from
the tail's lowest point to its end (a fall-rise), with a positive least-squares slope
(semitones per second) over that stretch, so one stray frame does not decide it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from voice_runtime.audio.pcm import as_pcm16

__all__ = ["Contour", "PitchTracker", "ends_rising", "final_contour", "pitch_track"]

ContourKind = Literal["rise", "fall", "level", "unknown"]
_FULL_SCALE = 32768.0


@dataclass(frozen=True)
class Contour:
    """How an utterance's pitch ends: its kind, the change over the tail and how much of it
    was voiced."""

    kind: ContourKind
    change_st: float  # fitted change over the tail, semitones (positive: rising)
    slope_st_per_s: float
    voiced_ms: float  # voiced frames the decision is based on

    @property
    def rising(self) -> bool:
        """True for a continuation rise."""
        return self.kind == "rise"


class _Yin:
    """The per-frame YIN computation shared by the streaming and batch trackers."""

    def __init__(
        self, sample_rate: int, min_hz: float, max_hz: float, threshold: float, voicing: float
    ) -> None:
        if sample_rate not in (8000, 16000):
            raise ValueError("the pitch tracker takes 8000 or 16000 Hz audio")
        if not 40.0 <= min_hz < max_hz <= sample_rate / 4:
            raise ValueError("need 40 <= min_hz < max_hz <= sample_rate / 4")
        if not 0 < threshold <= voicing < 1:
            raise ValueError("need 0 < threshold <= voicing < 1")
        self.rate = sample_rate
        self.hop = sample_rate // 50  # 20 ms frames
        self.window = self.hop  # integration window: 20 ms holds a period down to 50 Hz
        self.tau_min = max(2, int(sample_rate / max_hz))
        self.tau_max = int(math.ceil(sample_rate / min_hz))
        self.span = self.window + self.tau_max + 1  # samples one frame looks at
        self.nfft = 1 << (self.span + self.window - 1).bit_length()
        self.threshold = threshold
        self.voicing = voicing
        self._taus = np.arange(self.tau_max + 1, dtype=np.float64)

    def f0(
        self, frames: npt.NDArray[np.float64], min_rms: float
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """F0 in Hz for each row of ``frames`` (shape n x span; 0.0 where unvoiced) and the
        RMS level of each frame."""
        n = frames.shape[0]
        if n == 0:
            return np.zeros(0), np.zeros(0)
        w, tmax = self.window, self.tau_max
        head = np.fft.rfft(frames[:, :w], self.nfft, axis=1)
        spec = np.fft.rfft(frames, self.nfft, axis=1) * np.conj(head)
        corr = np.fft.irfft(spec, self.nfft, axis=1)[:, : tmax + 1]
        sq = np.concatenate([np.zeros((n, 1)), np.cumsum(frames * frames, axis=1)], axis=1)
        energy = sq[:, w : w + tmax + 1] - sq[:, : tmax + 1]  # sum of x^2 over [tau, tau + w)
        diff = np.maximum(energy[:, :1] + energy - 2.0 * corr, 0.0)
        cum = np.cumsum(diff[:, 1:], axis=1)
        cmnd = np.ones_like(diff)
        cmnd[:, 1:] = diff[:, 1:] * self._taus[1:] / np.maximum(cum, 1e-12)
        lo = self.tau_min
        mid = cmnd[:, lo:tmax]
        # First local minimum under the threshold; else the global minimum in range.
        local = (mid <= cmnd[:, lo - 1 : tmax - 1]) & (mid <= cmnd[:, lo + 1 : tmax + 1])
        under = local & (mid < self.threshold)
        first = np.where(under.any(axis=1), under.argmax(axis=1), mid.argmin(axis=1)) + lo
        rows = np.arange(n)
        best = cmnd[rows, first]
        # Parabolic interpolation between the neighbours of the chosen lag.
        a, b, c = cmnd[rows, first - 1], best, cmnd[rows, first + 1]
        den = a - 2.0 * b + c
        shift = np.where(den > 1e-12, 0.5 * (a - c) / np.where(den > 1e-12, den, 1.0), 0.0)
        tau = first + np.clip(shift, -0.5, 0.5)
        rms = np.sqrt(energy[:, 0] / w)
        # A minimum at the edge of the lag range is no period (creak, a subharmonic): unvoiced.
        voiced = (best < self.voicing) & (rms >= min_rms) & (first < tmax - 1)
        return np.where(voiced, self.rate / tau, 0.0), rms


def _frames_of(x: npt.NDArray[np.float64], hop: int, span: int) -> npt.NDArray[np.float64]:
    """Rows of ``span`` samples every ``hop`` (a strided view; only whole frames)."""
    count = (x.size - span) // hop + 1 if x.size >= span else 0
    if count <= 0:
        return np.zeros((0, span))
    return np.lib.stride_tricks.as_strided(
        x, shape=(count, span), strides=(x.strides[0] * hop, x.strides[0]), writeable=False
    )


class PitchTracker:
    """Streaming F0 per 20 ms frame of PCM16 audio; keeps the last ``keep_ms`` of the track.

    Not thread-safe: feed it from one thread. A frame's value is known once the audio
    ``min_hz`` allows for (one longest period) after it has arrived, so the track lags the
    input by about 17 ms at the default 60 Hz.
    """

    def __init__(
        self,
        sample_rate: int = 8000,
        *,
        min_hz: float = 60.0,
        max_hz: float = 400.0,
        threshold: float = 0.15,
        voicing: float = 0.35,
        min_dbfs: float = -50.0,
        keep_ms: float = 3000.0,
    ) -> None:
        self._yin = _Yin(sample_rate, min_hz, max_hz, threshold, voicing)
        self._min_rms = _FULL_SCALE * 10.0 ** (min_dbfs / 20.0)
        self._buf = np.zeros(0)
        self._keep = max(1, int(keep_ms / 20.0))
        self._track: list[float] = []
        self.frames = 0  # frames analysed so far

    @property
    def sample_rate(self) -> int:
        """The input rate in Hz."""
        return self._yin.rate

    def process(self, pcm: npt.NDArray[np.int16] | bytes) -> npt.NDArray[np.float64]:
        """Feed PCM16 samples; the F0 (Hz, 0.0 unvoiced) of every frame completed by them."""
        yin = self._yin
        x = np.concatenate([self._buf, as_pcm16(pcm).astype(np.float64)])
        frames = _frames_of(x, yin.hop, yin.span)
        f0, _ = yin.f0(frames, self._min_rms)
        self._buf = x[f0.size * yin.hop :].copy()
        self.frames += f0.size
        self._track.extend(f0.tolist())
        if len(self._track) > 2 * self._keep:
            del self._track[: -self._keep]
        return f0

    @property
    def track(self) -> npt.NDArray[np.float64]:
        """The F0 of the last ``keep_ms`` of frames, oldest first."""
        return np.asarray(self._track[-self._keep :], dtype=np.float64)

    def contour(self, **kwargs: Any) -> Contour:
        """:func:`final_contour` of the track so far."""
        return final_contour(self.track, **kwargs)

    def reset(self) -> None:
        """Forget the audio and the track (a new utterance)."""
        self._buf = np.zeros(0)
        self._track.clear()


def pitch_track(
    pcm: npt.NDArray[np.int16] | bytes,
    sample_rate: int = 8000,
    *,
    min_hz: float = 60.0,
    max_hz: float = 400.0,
    threshold: float = 0.15,
    voicing: float = 0.35,
    min_dbfs: float = -50.0,
    max_drop_db: float | None = 15.0,
) -> npt.NDArray[np.float64]:
    """F0 per 20 ms frame of a whole buffer (Hz, 0.0 where unvoiced).

    With ``max_drop_db``, voiced frames more than that many dB below the median voiced level
    count as unvoiced: the fading last frames of an utterance are where YIN errs most.
    """
    yin = _Yin(sample_rate, min_hz, max_hz, threshold, voicing)
    x = as_pcm16(pcm).astype(np.float64)
    count = -(-x.size // yin.hop)  # the last partial frame counts too
    x = np.concatenate([x, np.zeros(yin.span)])
    frames = _frames_of(x, yin.hop, yin.span)[:count]
    f0, rms = yin.f0(frames, _FULL_SCALE * 10.0 ** (min_dbfs / 20.0))
    voiced = f0 > 0
    if max_drop_db is not None and voiced.any():
        floor = float(np.median(rms[voiced])) * 10.0 ** (-max_drop_db / 20.0)
        f0 = np.where(rms >= floor, f0, 0.0)
    return f0


def _running_median(x: npt.NDArray[np.float64], width: int) -> npt.NDArray[np.float64]:
    """Running median of odd ``width``; the window shrinks at the edges, so a stray first or
    last frame is voted down by its neighbours instead of being repeated as padding."""
    if x.size < 3 or width < 3:
        return x
    half = width // 2
    padded = np.concatenate([np.full(half, np.nan), x, np.full(half, np.nan)])
    view = np.lib.stride_tricks.sliding_window_view(padded, width)
    return np.asarray(np.nanmedian(view, axis=1), dtype=np.float64)


def final_contour(
    f0: npt.ArrayLike,
    *,
    tail_ms: float = 300.0,
    rise_st: float = 1.5,
    fall_st: float = 2.0,
    min_voiced_ms: float = 120.0,
    fold_st: float = 7.0,
    median_frames: int = 5,
    frame_ms: float = 20.0,
) -> Contour:
    """Whether the last voiced ``tail_ms`` of a pitch track rises, falls or stays level.

    ``f0`` is one value per frame (0 or NaN: unvoiced), as :func:`pitch_track` gives it. The
    tail is the last ``tail_ms`` of *voiced* frames (unvoiced gaps, such as the silence
    after the utterance, are skipped). A continuation rise in English is usually a
    fall-rise on the last stressed syllable, so it rises when the end (median of the last
    three frames) sits at least ``rise_st`` semitones above the tail's lowest point (and above
    the tail's median, with a rising slope from that point on); it
    falls when the end sits ``fall_st`` or more below the tail's start. Under
    ``min_voiced_ms`` of voiced frames it is "unknown".
    """
    values = np.nan_to_num(np.asarray(f0, dtype=np.float64), nan=0.0)
    where = np.flatnonzero(values > 0)
    need = max(3, int(math.ceil(min_voiced_ms / frame_ms)))
    if where.size < need:
        return Contour("unknown", 0.0, 0.0, where.size * frame_ms)
    st = 12.0 * np.log2(values[where] / 100.0)
    ref = float(np.median(st))
    # Octave errors: a frame an octave off the speaker's register goes back by an octave.
    octaves = np.round((st - ref) / 12.0)
    st = np.where(np.abs(st - ref) > fold_st, st - 12.0 * octaves, st)
    st = _running_median(st, median_frames)
    keep = max(need, int(round(tail_ms / frame_ms)))
    st, t = st[-keep:], where[-keep:] * (frame_ms / 1000.0)
    end = float(np.median(st[-3:]))
    low = int(np.argmin(st[:-1]))
    rise = end - float(st[low])
    seg = slice(low, None) if st.size - low >= 3 else slice(None)
    ts, ys = t[seg] - t[seg].mean(), st[seg]
    slope = float(np.dot(ts, ys - ys.mean()) / max(float(np.dot(ts, ts)), 1e-12))
    drop = end - float(np.median(st[:3]))
    voiced_ms = st.size * frame_ms
    if rise >= rise_st and slope > 0 and end > float(np.median(st)):
        return Contour("rise", rise, slope, voiced_ms)
    if drop <= -fall_st:
        return Contour("fall", drop, slope, voiced_ms)
    return Contour("level", drop, slope, voiced_ms)


def ends_rising(pcm: npt.NDArray[np.int16] | bytes, sample_rate: int = 8000, **kwargs: Any) -> bool:
    """True when the utterance ``pcm`` ends with a continuation rise (see :func:`final_contour`)."""
    return final_contour(pitch_track(pcm, sample_rate), **kwargs).rising
