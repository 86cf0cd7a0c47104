"""G.711 μ-law and A-law for whole buffers, bit-exact with the stdlib ``audioop`` codec.

Decoding looks up two codes at a time in a 65,536-entry table of sample pairs; encoding is
one lookup in a 65,536-entry table indexed by the int16 sample seen as uint16. The tables
are computed once at import with vectorised numpy from the G.711 segment rules, so no
per-sample Python runs, ever.

PCM16 as ``bytes`` is little-endian (the WAV and wire convention); arrays are native int16.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: Anything the codec accepts as a buffer of bytes.
BytesLike = bytes | bytearray | memoryview

_LE_INT16 = np.dtype("<i2")
_LE_UINT16 = np.dtype("<u2")

# Upper bounds (inclusive) of the eight G.711 segments, on the scaled magnitudes that the
# reference encoder works with: 14-bit for μ-law, 13-bit for A-law.
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], np.int32)
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # largest 14-bit magnitude before the bias is added


def _ulaw_decode_table() -> npt.NDArray[np.int16]:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code & 0x70) >> 4
    magnitude = (((code & 0x0F) << 3) + _ULAW_BIAS) << exponent
    value = np.where(code & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS)
    return value.astype(np.int16)


def _alaw_decode_table() -> npt.NDArray[np.int16]:
    code = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (code & 0x70) >> 4
    mantissa = (code & 0x0F) << 4
    magnitude = np.where(
        segment == 0,
        mantissa + 8,
        (mantissa + 0x108) << np.maximum(segment - 1, 0),
    )
    value = np.where(code & 0x80, magnitude, -magnitude)
    return value.astype(np.int16)


def _all_int16() -> npt.NDArray[np.int32]:
    # Position i holds the int16 whose bit pattern is the uint16 i, so the finished table
    # can be indexed by a uint16 view of the samples without any sign arithmetic.
    return np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)


def _ulaw_encode_table() -> npt.NDArray[np.uint8]:
    scaled = _all_int16() >> 2  # the reference encoder works on 14-bit samples
    negative = scaled < 0
    mask = np.where(negative, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(scaled), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    segment = np.searchsorted(_ULAW_SEG_END, magnitude, side="left").astype(np.int32)
    shift = np.minimum(segment, 7) + 1
    code = (segment << 4) | ((magnitude >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)  # beyond the last segment: full scale
    return (code ^ mask).astype(np.uint8)


def _alaw_encode_table() -> npt.NDArray[np.uint8]:
    scaled = _all_int16() >> 3  # the reference encoder works on 13-bit samples
    positive = scaled >= 0
    mask = np.where(positive, 0xD5, 0x55)
    magnitude = np.where(positive, scaled, -scaled - 1)
    segment = np.searchsorted(_ALAW_SEG_END, magnitude, side="left").astype(np.int32)
    shift = np.where(segment < 2, 1, np.minimum(segment, 7))
    code = (segment << 4) | ((magnitude >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _pair_table(single: npt.NDArray[np.int16]) -> npt.NDArray[np.uint32]:
    # Decoding two codes per lookup halves numpy's per-element indexing cost: entry
    # ``b0 | b1 << 8`` (two code bytes read as little-endian uint16) holds both samples,
    # little-endian, in memory order.
    both = np.arange(65536, dtype=np.uint32)
    bits = single.astype(_LE_INT16).view(_LE_UINT16).astype(np.uint32)
    return (bits[both & 0xFF] | (bits[both >> 8] << 16)).astype("<u4")


_ULAW_DECODE = _ulaw_decode_table()
_ALAW_DECODE = _alaw_decode_table()
_ULAW_DECODE_LE = _ULAW_DECODE.astype(_LE_INT16)
_ALAW_DECODE_LE = _ALAW_DECODE.astype(_LE_INT16)
_ULAW_DECODE_PAIRS = _pair_table(_ULAW_DECODE)
_ALAW_DECODE_PAIRS = _pair_table(_ALAW_DECODE)
_ULAW_ENCODE = _ulaw_encode_table()
_ALAW_ENCODE = _alaw_encode_table()
for _table in (
    _ULAW_DECODE,
    _ALAW_DECODE,
    _ULAW_DECODE_LE,
    _ALAW_DECODE_LE,
    _ULAW_DECODE_PAIRS,
    _ALAW_DECODE_PAIRS,
    _ULAW_ENCODE,
    _ALAW_ENCODE,
):
    _table.flags.writeable = False
del _table


def _byte_planes(single_le: npt.NDArray[np.int16]) -> tuple[bytes, bytes]:
    as_bytes = single_le.view(np.uint8).reshape(256, 2)
    return as_bytes[:, 0].tobytes(), as_bytes[:, 1].tobytes()


# For short buffers (a 20 ms frame) numpy's fixed cost per call dominates; two
# ``bytes.translate`` passes (low and high byte of each sample) interleaved by slice
# assignment are several times faster there, and slower on long buffers.
_SHORT_BUFFER = 1024
_ULAW_LOW, _ULAW_HIGH = _byte_planes(_ULAW_DECODE_LE)
_ALAW_LOW, _ALAW_HIGH = _byte_planes(_ALAW_DECODE_LE)


def _decode_short(data: BytesLike, low: bytes, high: bytes) -> bytes:
    codes = bytes(data)
    out = bytearray(2 * len(codes))
    out[0::2] = codes.translate(low)
    out[1::2] = codes.translate(high)
    return bytes(out)


def _decode_le(
    codes: npt.NDArray[np.uint8], pairs: npt.NDArray[np.uint32], single: npt.NDArray[np.int16]
) -> npt.NDArray[np.int16]:
    """Decode uint8 codes to little-endian int16 samples through the pair table."""
    codes = np.ascontiguousarray(codes)
    even = codes.size & ~1
    out = pairs.take(codes[:even].view(_LE_UINT16)).view(_LE_INT16)
    if even != codes.size:
        out = np.concatenate([out, single.take(codes[even:])])
    return out


def _codes(data: npt.NDArray[np.uint8] | BytesLike) -> npt.NDArray[np.uint8]:
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"G.711 codes must be a uint8 array, got dtype {data.dtype}")
        return data
    return np.frombuffer(data, dtype=np.uint8)


def _pcm_bytes_as_uint16(pcm: BytesLike) -> npt.NDArray[np.uint16]:
    size = memoryview(pcm).nbytes
    if size % 2:
        raise ValueError(
            f"PCM16 input must have an even number of bytes (2 per sample), got {size}"
        )
    return np.frombuffer(pcm, dtype=_LE_UINT16)


def _samples_as_uint16(pcm: npt.NDArray[np.int16] | BytesLike) -> npt.NDArray[np.uint16]:
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16:
            raise TypeError(f"PCM16 samples must be an int16 array, got dtype {pcm.dtype}")
        return pcm.view(np.uint16)
    return _pcm_bytes_as_uint16(pcm)


def ulaw_decode(data: npt.NDArray[np.uint8] | BytesLike) -> npt.NDArray[np.int16]:
    """Decode μ-law codes (bytes or a uint8 array) to int16 samples of the same shape."""
    codes = _codes(data)
    samples = _decode_le(codes.reshape(-1), _ULAW_DECODE_PAIRS, _ULAW_DECODE_LE)
    return samples.astype(np.int16, copy=False).reshape(codes.shape)


def ulaw_encode(pcm: npt.NDArray[np.int16] | BytesLike) -> npt.NDArray[np.uint8]:
    """Encode int16 samples (or little-endian PCM16 bytes) to a uint8 array of μ-law codes."""
    return _ULAW_ENCODE.take(_samples_as_uint16(pcm))


def alaw_decode(data: npt.NDArray[np.uint8] | BytesLike) -> npt.NDArray[np.int16]:
    """Decode A-law codes (bytes or a uint8 array) to int16 samples of the same shape."""
    codes = _codes(data)
    samples = _decode_le(codes.reshape(-1), _ALAW_DECODE_PAIRS, _ALAW_DECODE_LE)
    return samples.astype(np.int16, copy=False).reshape(codes.shape)


def alaw_encode(pcm: npt.NDArray[np.int16] | BytesLike) -> npt.NDArray[np.uint8]:
    """Encode int16 samples (or little-endian PCM16 bytes) to a uint8 array of A-law codes."""
    return _ALAW_ENCODE.take(_samples_as_uint16(pcm))


def ulaw_to_pcm16(data: BytesLike) -> bytes:
    """Decode μ-law bytes to little-endian PCM16 bytes (like ``audioop.ulaw2lin(b, 2)``)."""
    if memoryview(data).nbytes <= _SHORT_BUFFER:
        return _decode_short(data, _ULAW_LOW, _ULAW_HIGH)
    codes = np.frombuffer(data, dtype=np.uint8)
    return _decode_le(codes, _ULAW_DECODE_PAIRS, _ULAW_DECODE_LE).tobytes()


def pcm16_to_ulaw(pcm: BytesLike) -> bytes:
    """Encode little-endian PCM16 bytes to μ-law (like ``audioop.lin2ulaw(pcm, 2)``)."""
    return _ULAW_ENCODE.take(_pcm_bytes_as_uint16(pcm)).tobytes()


def alaw_to_pcm16(data: BytesLike) -> bytes:
    """Decode A-law bytes to little-endian PCM16 bytes (like ``audioop.alaw2lin(b, 2)``)."""
    if memoryview(data).nbytes <= _SHORT_BUFFER:
        return _decode_short(data, _ALAW_LOW, _ALAW_HIGH)
    codes = np.frombuffer(data, dtype=np.uint8)
    return _decode_le(codes, _ALAW_DECODE_PAIRS, _ALAW_DECODE_LE).tobytes()


def pcm16_to_alaw(pcm: BytesLike) -> bytes:
    """Encode little-endian PCM16 bytes to A-law (like ``audioop.lin2alaw(pcm, 2)``)."""
    return _ALAW_ENCODE.take(_pcm_bytes_as_uint16(pcm)).tobytes()


__all__ = [
    "BytesLike",
    "alaw_decode",
    "alaw_encode",
    "alaw_to_pcm16",
    "pcm16_to_alaw",
    "pcm16_to_ulaw",
    "ulaw_decode",
    "ulaw_encode",
    "ulaw_to_pcm16",
]
