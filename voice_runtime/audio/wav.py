"""WAV files: G.711 μ-law (format 7) by hand, PCM16 through the stdlib ``wave`` module.

:func:`read_wav` understands PCM (8/16/24/32-bit), IEEE float, A-law and μ-law, including
WAVE_FORMAT_EXTENSIBLE headers; PCM and float come back as PCM16. :class:`WavAudio`
carries its format and turns into the call-leg format with :meth:`WavAudio.to_ulaw_8k_mono`.
"""

from __future__ import annotations

import os
import struct
import wave
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Literal

import numpy as np
import numpy.typing as npt

from voice_runtime.audio.codec import BytesLike, alaw_decode, ulaw_decode, ulaw_encode
from voice_runtime.audio.pcm import as_pcm16, float_to_pcm16, pcm16_to_bytes
from voice_runtime.audio.resample import resample

WavEncoding = Literal["ulaw", "alaw", "pcm16"]
StrPath = str | os.PathLike[str]

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_ALAW = 0x0006
WAVE_FORMAT_MULAW = 0x0007
WAVE_FORMAT_EXTENSIBLE = 0xFFFE

_ENCODINGS: tuple[str, ...] = ("ulaw", "alaw", "pcm16")
_CALL_RATE = 8000
# A size field of all ones marks a file whose writer could not seek back (a stream or a
# crash before close): readers take the data up to the end of the file.
_UNKNOWN_SIZE = 0xFFFFFFFF
_G711_HEADER_BYTES = 12 + (8 + 18) + 8


@dataclass(frozen=True)
class WavAudio:
    """Audio read from a WAV file: the encoded bytes plus the format they are in."""

    encoding: WavEncoding
    sample_rate: int
    channels: int
    data: bytes

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be one of {_ENCODINGS}, got {self.encoding!r}")
        if self.sample_rate <= 0 or self.channels <= 0:
            raise ValueError(
                f"sample_rate and channels must be positive, got "
                f"{self.sample_rate} Hz, {self.channels} channel(s)"
            )
        if len(self.data) % self.block_align:
            raise ValueError(
                f"data length {len(self.data)} is not a multiple of the frame size "
                f"{self.block_align}"
            )

    @property
    def sample_width(self) -> int:
        """Bytes per sample of one channel (1 for G.711, 2 for PCM16)."""
        return 2 if self.encoding == "pcm16" else 1

    @property
    def block_align(self) -> int:
        """Bytes per frame (one sample of every channel)."""
        return self.sample_width * self.channels

    @property
    def num_frames(self) -> int:
        """Number of sample frames."""
        return len(self.data) // self.block_align

    @property
    def duration_s(self) -> float:
        """Duration in seconds."""
        return self.num_frames / self.sample_rate

    def samples(self) -> npt.NDArray[np.int16]:
        """Decode to int16 samples shaped ``(frames, channels)``."""
        if self.encoding == "ulaw":
            flat = ulaw_decode(self.data)
        elif self.encoding == "alaw":
            flat = alaw_decode(self.data)
        else:
            flat = as_pcm16(self.data)
        return flat.reshape(-1, self.channels)

    def to_ulaw_8k_mono(self) -> bytes:
        """Return the audio as 8 kHz mono μ-law bytes: decoded, downmixed and resampled."""
        if self.encoding == "ulaw" and self.sample_rate == _CALL_RATE and self.channels == 1:
            return self.data
        samples = self.samples()
        if self.channels == 1:
            mono = samples[:, 0]
        else:
            mono = np.rint(samples.mean(axis=1)).astype(np.int16)
        if self.sample_rate != _CALL_RATE:
            mono = resample(mono, self.sample_rate, _CALL_RATE)
        return ulaw_encode(np.ascontiguousarray(mono)).tobytes()


def _g711_header(format_tag: int, sample_rate: int, channels: int, data_size: int) -> bytes:
    if data_size == _UNKNOWN_SIZE:
        riff_size = _UNKNOWN_SIZE
    else:
        riff_size = _G711_HEADER_BYTES - 8 + data_size + (data_size & 1)
    fmt = struct.pack(
        "<HHIIHHH",
        format_tag,
        channels,
        sample_rate,
        sample_rate * channels,  # byte rate: one byte per sample
        channels,  # block align
        8,  # bits per sample
        0,  # cbSize: no extra format bytes
    )
    return (
        struct.pack("<4sI4s", b"RIFF", riff_size, b"WAVE")
        + struct.pack("<4sI", b"fmt ", len(fmt))
        + fmt
        + struct.pack("<4sI", b"data", data_size)
    )


class UlawWavWriter:
    """Write a μ-law WAV incrementally; the header gets its final sizes on :meth:`close`.

    Until closed the size fields say "unknown" (all ones), so even a file left behind by a
    crash can be read up to its last written byte.
    """

    def __init__(self, path: StrPath, *, sample_rate: int = _CALL_RATE, channels: int = 1) -> None:
        self.path = Path(path)
        self.sample_rate = sample_rate
        self.channels = channels
        self._file: BinaryIO | None = None
        self._bytes_written = 0
        self._closed = False

    @property
    def bytes_written(self) -> int:
        """Bytes of audio data written so far."""
        return self._bytes_written

    @property
    def duration_s(self) -> float:
        """Seconds of audio written so far."""
        return self._bytes_written / (self.sample_rate * self.channels)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def open(self) -> UlawWavWriter:
        """Create the file (and its parent folders) and write a provisional header."""
        if self._closed:
            raise ValueError("UlawWavWriter is closed")
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._file.write(
                _g711_header(WAVE_FORMAT_MULAW, self.sample_rate, self.channels, _UNKNOWN_SIZE)
            )
        return self

    def write(self, data: BytesLike) -> None:
        """Append μ-law bytes."""
        if self._file is None:
            state = "closed" if self._closed else "not open"
            raise ValueError(f"UlawWavWriter is {state}")
        self._file.write(data)
        self._bytes_written += memoryview(data).nbytes

    def close(self) -> None:
        """Write the final header (an odd data size gets its pad byte) and close; idempotent."""
        if self._file is None:
            self._closed = True
            return
        f, self._file = self._file, None
        self._closed = True
        try:
            size = self._bytes_written
            if size % 2:
                f.write(b"\x00")  # RIFF chunks are word aligned; the pad is not in the size
            f.seek(0)
            f.write(_g711_header(WAVE_FORMAT_MULAW, self.sample_rate, self.channels, size))
        finally:
            f.close()

    def __enter__(self) -> UlawWavWriter:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def write_ulaw_wav(path: StrPath, ulaw: BytesLike, *, sample_rate: int = _CALL_RATE) -> None:
    """Write mono μ-law bytes as a WAV file (format 7, 8-bit, 18-byte fmt chunk)."""
    with UlawWavWriter(path, sample_rate=sample_rate) as writer:
        writer.write(ulaw)


def write_pcm16_wav(
    path: StrPath,
    pcm: npt.NDArray[np.int16] | BytesLike,
    rate: int,
    channels: int | None = None,
) -> None:
    """Write PCM16 as a WAV file; a 2-D ``(frames, channels)`` array sets the channel count.

    Bytes (or a 1-D array) are taken as interleaved samples; ``channels`` defaults to 1.
    """
    samples = as_pcm16(pcm)
    if samples.ndim == 2:
        if channels is not None and channels != samples.shape[1]:
            raise ValueError(
                f"channels={channels} does not match the array's {samples.shape[1]} columns"
            )
        channels = samples.shape[1]
    elif samples.ndim != 1:
        raise ValueError(f"expected 1-D or 2-D samples, got shape {samples.shape}")
    channels = channels or 1
    if samples.size % channels:
        raise ValueError(f"{samples.size} samples do not divide into {channels} channels")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16_to_bytes(np.ascontiguousarray(samples)))


def write_stereo_call_wav(path: StrPath, caller_ulaw: BytesLike, agent_ulaw: BytesLike) -> None:
    """Write a call as 8 kHz PCM16 stereo: caller left, agent right, shorter leg padded."""
    caller = ulaw_decode(caller_ulaw)
    agent = ulaw_decode(agent_ulaw)
    stereo = np.zeros((max(caller.size, agent.size), 2), dtype=np.int16)
    stereo[: caller.size, 0] = caller
    stereo[: agent.size, 1] = agent
    write_pcm16_wav(path, stereo, _CALL_RATE)


def read_wav(path: StrPath) -> WavAudio:
    """Read a WAV file; PCM of any width and float become PCM16, G.711 stays encoded."""
    return parse_wav(Path(path).read_bytes())


def parse_wav(blob: bytes) -> WavAudio:
    """Parse the bytes of a whole WAV file (see :func:`read_wav`)."""
    if len(blob) < 12 or blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    fmt: bytes | None = None
    data: bytes | None = None
    pos = 12
    while pos + 8 <= len(blob) and (fmt is None or data is None):
        chunk_id, size = struct.unpack_from("<4sI", blob, pos)
        start = pos + 8
        end = len(blob) if size == _UNKNOWN_SIZE else min(start + size, len(blob))
        if chunk_id == b"fmt ":
            fmt = blob[start:end]
        elif chunk_id == b"data":
            data = blob[start:end]
        pos = end + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise ValueError("WAV file has no valid fmt chunk")
    if data is None:
        raise ValueError("WAV file has no data chunk")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(fmt) < 26:
            raise ValueError("WAVE_FORMAT_EXTENSIBLE fmt chunk is too short")
        (tag,) = struct.unpack_from("<H", fmt, 24)  # first field of the sub-format GUID
    if channels <= 0 or rate <= 0 or block_align <= 0:
        raise ValueError(f"invalid WAV format: {channels} channel(s), {rate} Hz")
    data = data[: len(data) - len(data) % block_align]  # drop a torn last frame

    if tag in (WAVE_FORMAT_MULAW, WAVE_FORMAT_ALAW):
        if bits != 8:
            raise ValueError(f"G.711 WAV must have 8 bits per sample, got {bits}")
        encoding: WavEncoding = "ulaw" if tag == WAVE_FORMAT_MULAW else "alaw"
        return WavAudio(encoding, rate, channels, data)
    if tag == WAVE_FORMAT_PCM:
        samples = _pcm_to_int16(data, bits, block_align // channels)
    elif tag == WAVE_FORMAT_IEEE_FLOAT and bits in (32, 64):
        samples = float_to_pcm16(np.frombuffer(data, dtype=f"<f{bits // 8}"))
    else:
        raise ValueError(f"unsupported WAV format tag 0x{tag:04x} with {bits} bits per sample")
    return WavAudio("pcm16", rate, channels, pcm16_to_bytes(samples))


def _pcm_to_int16(data: bytes, bits: int, width: int) -> npt.NDArray[np.int16]:
    if bits == 16 and width == 2:
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    if bits == 8 and width == 1:
        unsigned = np.frombuffer(data, dtype=np.uint8).astype(np.int16)
        return ((unsigned - 128) << 8).astype(np.int16)
    if bits == 24 and width == 3:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        value = (value << 8) >> 16  # sign-extend 24 bits, keep the top 16
        return value.astype(np.int16)
    if bits == 32 and width == 4:
        return (np.frombuffer(data, dtype="<i4") >> 16).astype(np.int16)
    raise ValueError(f"unsupported PCM WAV: {bits} bits in {width}-byte samples")


__all__ = [
    "WAVE_FORMAT_ALAW",
    "WAVE_FORMAT_MULAW",
    "WAVE_FORMAT_PCM",
    "UlawWavWriter",
    "WavAudio",
    "WavEncoding",
    "parse_wav",
    "read_wav",
    "write_pcm16_wav",
    "write_stereo_call_wav",
    "write_ulaw_wav",
]
