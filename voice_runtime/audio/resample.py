"""Sample-rate conversion with libsoxr: a stateful per-stream resampler and a one-shot call.

Both run libsoxr in float32 and round back to int16 the same way, so a stream fed in
chunks and closed with ``last=True`` (or :meth:`StreamResampler.flush`) yields the same
samples as :func:`resample` over the whole signal.

Latency: libsoxr's streaming engine works on blocks, so at "HQ" a stream of 20 ms chunks
gets output in bursts of roughly 60–100 ms, and the first output arrives after a few
chunks. Nothing is lost: :meth:`StreamResampler.flush` returns the tail. For live audio
(realtime agents, streamed TTS) ``StreamResampler(..., low_latency=True)`` uses a windowed-sinc
FIR instead whenever one rate is an integer multiple of the other (24k→8k, 8k→16k, ...):
every chunk comes out at once, about 1.5 ms late.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

from voice_runtime.audio.codec import BytesLike
from voice_runtime.audio.pcm import as_pcm16, float_to_pcm16

#: Rates the runtime meets in practice (telephony, STT, TTS and realtime agents).
SUPPORTED_RATES: tuple[int, ...] = (8000, 16000, 22050, 24000, 48000)

_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")
_FULL_SCALE = np.float32(32768.0)


def _check(in_rate: int, out_rate: int, quality: str) -> None:
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
    if quality.upper() not in _QUALITIES:
        raise ValueError(f"quality must be one of {', '.join(_QUALITIES)}, got {quality!r}")


def _to_float(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.float32]:
    return samples.astype(np.float32) / _FULL_SCALE


class StreamResampler:
    """Resample one continuous PCM16 stream chunk by chunk, keeping the filter state.

    Use one instance per stream (per call leg). Not thread-safe: feed it from one thread.
    Equal rates make it a passthrough with no delay.
    """

    def __init__(
        self, in_rate: int, out_rate: int, quality: str = "HQ", *, low_latency: bool = False
    ) -> None:
        _check(in_rate, out_rate, quality)
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.quality = quality.upper()
        self._stream: Any = None
        if low_latency and self.in_rate != self.out_rate and _integer_ratio(in_rate, out_rate):
            self._stream = _FirStream(self.in_rate, self.out_rate)
        elif self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype="float32", quality=self.quality
            )

    @property
    def passthrough(self) -> bool:
        """True when input and output rates are equal and samples pass unchanged."""
        return self._stream is None

    def process(
        self, pcm16: npt.NDArray[np.int16] | BytesLike, last: bool = False
    ) -> npt.NDArray[np.int16]:
        """Resample the next chunk; ``last=True`` also returns the buffered tail and resets."""
        samples = as_pcm16(pcm16)
        if samples.ndim != 1:
            raise ValueError(f"StreamResampler takes mono 1-D samples, got shape {samples.shape}")
        if self._stream is None:
            return samples.copy()
        out = self._stream.resample_chunk(_to_float(samples), last=last)
        if last:
            # libsoxr accepts ``last`` once per signal; clearing lets the object start over.
            self._stream.clear()
        return float_to_pcm16(out)

    def flush(self) -> npt.NDArray[np.int16]:
        """End the stream: return the samples still inside the filter and reset the state."""
        return self.process(np.empty(0, dtype=np.int16), last=True)

    def reset(self) -> None:
        """Drop buffered samples and start a fresh stream with the same rates."""
        if self._stream is not None:
            self._stream.clear()

    def __repr__(self) -> str:
        return f"StreamResampler({self.in_rate}, {self.out_rate}, quality={self.quality!r})"


def resample(
    pcm: npt.NDArray[np.int16] | BytesLike,
    in_rate: int,
    out_rate: int,
    quality: str = "HQ",
) -> npt.NDArray[np.int16]:
    """Resample a whole PCM16 signal (1-D mono, or 2-D ``(frames, channels)``) at once."""
    _check(in_rate, out_rate, quality)
    samples = as_pcm16(pcm)
    if samples.ndim not in (1, 2):
        raise ValueError(f"expected 1-D or 2-D samples, got shape {samples.shape}")
    if in_rate == out_rate:
        return samples.copy()
    if samples.shape[0] == 0:
        return samples.copy()
    out = soxr.resample(_to_float(samples), in_rate, out_rate, quality=quality.upper())
    return float_to_pcm16(out)


def _integer_ratio(in_rate: int, out_rate: int) -> bool:
    hi, lo = max(in_rate, out_rate), min(in_rate, out_rate)
    return hi % lo == 0


class _FirStream:
    """Integer-ratio resampling with a Kaiser-windowed sinc FIR and kept history.

    Quacks like ``soxr.ResampleStream`` (``resample_chunk``, ``clear``) so StreamResampler
    can use either. Output follows input with a delay of half the filter (about 1.5 ms).
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.down = in_rate // out_rate if in_rate > out_rate else 1
        self.up = out_rate // in_rate if out_rate > in_rate else 1
        factor = max(self.down, self.up)
        taps = 24 * factor + 1
        n = np.arange(taps) - (taps - 1) / 2.0
        cutoff = 0.45 / factor  # cycles per sample at the filter's (higher) rate
        h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, 8.0)
        h *= self.up / h.sum()
        self._h = h.astype(np.float32)
        self._history = np.zeros(taps - 1, dtype=np.float32)
        self._phase = 0

    def resample_chunk(
        self, x: npt.NDArray[np.float32], last: bool = False
    ) -> npt.NDArray[np.float32]:
        if self.up > 1:
            stuffed = np.zeros(len(x) * self.up, dtype=np.float32)
            stuffed[:: self.up] = x
            x = stuffed
        buf = np.concatenate((self._history, x))
        y = np.convolve(buf, self._h, mode="valid")  # one output per new input sample
        self._history = buf[len(buf) - len(self._history) :]
        if self.down > 1:
            out = y[self._phase :: self.down]
            self._phase = (self._phase - len(x)) % self.down
            y = out
        if last:
            tail = np.convolve(
                np.concatenate((self._history, np.zeros(len(self._history), np.float32))),
                self._h,
                mode="valid",
            )[: len(self._history) // 2]
            if self.down > 1:
                tail = tail[self._phase :: self.down]
            y = np.concatenate((y, tail))
        return y.astype(np.float32, copy=False)

    def clear(self) -> None:
        self._history[:] = 0
        self._phase = 0


__all__ = ["SUPPORTED_RATES", "StreamResampler", "resample"]
