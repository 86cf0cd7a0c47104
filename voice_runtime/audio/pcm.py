"""PCM16 and μ-law helpers: conversions, levels, durations, framing and test signals."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from voice_runtime.audio.codec import BytesLike, ulaw_encode

SAMPLE_RATE = 8000  # the call leg: G.711 at 8 kHz, mono
FRAME_BYTES = 160  # one 20 ms μ-law frame
FRAME_INTERVAL = 0.020  # seconds per frame
ULAW_SILENCE_BYTE = 0xFF  # μ-law code for a zero sample
SILENCE_FRAME = b"\xff" * FRAME_BYTES
_FULL_SCALE = 32768.0


def pcm16_from_bytes(data: BytesLike) -> npt.NDArray[np.int16]:
    """View little-endian PCM16 bytes as int16 samples (read-only; copied only if needed)."""
    size = memoryview(data).nbytes
    if size % 2:
        raise ValueError(
            f"PCM16 input must have an even number of bytes (2 per sample), got {size}"
        )
    samples = np.frombuffer(data, dtype="<i2")
    return samples.astype(np.int16, copy=False)


def pcm16_to_bytes(samples: npt.NDArray[np.int16]) -> bytes:
    """Serialise int16 samples as little-endian PCM16 bytes."""
    if samples.dtype != np.int16:
        raise TypeError(f"PCM16 samples must be an int16 array, got dtype {samples.dtype}")
    return samples.astype("<i2", copy=False).tobytes()


def as_pcm16(pcm: npt.NDArray[np.int16] | BytesLike) -> npt.NDArray[np.int16]:
    """Accept int16 samples or little-endian PCM16 bytes and return int16 samples."""
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16:
            raise TypeError(f"PCM16 samples must be an int16 array, got dtype {pcm.dtype}")
        return pcm
    return pcm16_from_bytes(pcm)


def pcm16_to_float(samples: npt.NDArray[np.int16] | BytesLike) -> npt.NDArray[np.float32]:
    """Scale int16 samples to float32 in [-1.0, 1.0)."""
    return as_pcm16(samples).astype(np.float32) / np.float32(_FULL_SCALE)


def float_to_pcm16(samples: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Scale float samples in [-1.0, 1.0] to int16, rounding and clipping out-of-range values."""
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * np.float32(_FULL_SCALE))
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def rms_dbfs(pcm: npt.NDArray[np.int16] | BytesLike) -> float:
    """RMS level in dBFS (full-scale square wave = 0 dB, sine = -3 dB); ``-inf`` for silence."""
    samples = as_pcm16(pcm)
    if samples.size == 0:
        return -math.inf
    mean_square = float(np.mean(np.square(samples, dtype=np.float64)))
    if mean_square == 0.0:
        return -math.inf
    return 10.0 * math.log10(mean_square / (_FULL_SCALE * _FULL_SCALE))


def duration_ms(ulaw: BytesLike) -> float:
    """Duration in milliseconds of 8 kHz mono μ-law audio (one byte per sample)."""
    return memoryview(ulaw).nbytes / 8.0


def frames(data: BytesLike, size: int = FRAME_BYTES, pad: bool = True) -> list[bytes]:
    """Cut μ-law audio into ``size``-byte frames; a short last frame is padded with silence.

    With ``pad=False`` the short last frame is returned as it is.
    """
    if size <= 0:
        raise ValueError(f"frame size must be positive, got {size}")
    buf = bytes(data)
    out = [buf[i : i + size] for i in range(0, len(buf), size)]
    if pad and out and len(out[-1]) < size:
        out[-1] = out[-1].ljust(size, b"\xff")
    return out


def silence_ulaw(ms: float) -> bytes:
    """μ-law silence (8 kHz mono) lasting ``ms`` milliseconds, rounded to whole samples."""
    if ms < 0:
        raise ValueError(f"duration must not be negative, got {ms}")
    return bytes([ULAW_SILENCE_BYTE]) * round(ms * SAMPLE_RATE / 1000)


def tone_pcm16(
    freq: float,
    ms: float,
    level_dbfs: float = -20.0,
    *,
    sample_rate: int = SAMPLE_RATE,
    fade_ms: float = 5.0,
) -> npt.NDArray[np.int16]:
    """A sine tone as int16 samples whose RMS level is ``level_dbfs``, with soft edges.

    Raised-cosine fades of ``fade_ms`` at both ends avoid the click of a hard start/stop.
    """
    if ms < 0:
        raise ValueError(f"duration must not be negative, got {ms}")
    n = round(ms * sample_rate / 1000)
    t = np.arange(n, dtype=np.float64) / sample_rate
    peak = math.sqrt(2.0) * 10.0 ** (level_dbfs / 20.0)
    wave = peak * np.sin(2.0 * math.pi * freq * t)
    fade = min(round(fade_ms * sample_rate / 1000), n // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, math.pi, fade, endpoint=False))
        wave[:fade] *= ramp
        wave[n - fade :] *= ramp[::-1]
    return float_to_pcm16(wave)


def tone_ulaw(freq: float, ms: float, level_dbfs: float = -20.0) -> bytes:
    """A soft sine tone as 8 kHz mono μ-law bytes (RMS level ``level_dbfs``)."""
    return ulaw_encode(tone_pcm16(freq, ms, level_dbfs)).tobytes()


__all__ = [
    "FRAME_BYTES",
    "FRAME_INTERVAL",
    "SAMPLE_RATE",
    "SILENCE_FRAME",
    "ULAW_SILENCE_BYTE",
    "as_pcm16",
    "duration_ms",
    "float_to_pcm16",
    "frames",
    "pcm16_from_bytes",
    "pcm16_to_bytes",
    "pcm16_to_float",
    "rms_dbfs",
    "silence_ulaw",
    "tone_pcm16",
    "tone_ulaw",
]
