"""G.711 codec and PCM helpers: bit-exact with audioop, vectorised mixing, framing, levels."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voice_runtime.audio import (
    FRAME_BYTES,
    FRAME_INTERVAL,
    SAMPLE_RATE,
    SILENCE_FRAME,
    alaw_decode,
    alaw_encode,
    alaw_to_pcm16,
    duration_ms,
    float_to_pcm16,
    frames,
    mix_frames,
    pcm16_from_bytes,
    pcm16_to_alaw,
    pcm16_to_bytes,
    pcm16_to_float,
    pcm16_to_ulaw,
    rms_dbfs,
    silence_ulaw,
    tone_pcm16,
    tone_ulaw,
    ulaw_decode,
    ulaw_encode,
    ulaw_to_pcm16,
)

with warnings.catch_warnings():
    # The stdlib codec is the oracle; on 3.11/3.12 importing it warns about its removal.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_PCM16 = np.arange(-32768, 32768, dtype=np.int16)
ALL_PCM16_BYTES = ALL_PCM16.astype("<i2").tobytes()
ALL_CODES = bytes(range(256))


def test_constants_describe_the_call_leg() -> None:
    assert FRAME_BYTES == 160
    assert FRAME_INTERVAL == 0.020
    assert SAMPLE_RATE == 8000
    assert SILENCE_FRAME == b"\xff" * 160


@pytest.mark.parametrize(
    ("ours", "reference"),
    [(pcm16_to_ulaw, audioop.lin2ulaw), (pcm16_to_alaw, audioop.lin2alaw)],
    ids=["ulaw", "alaw"],
)
def test_encode_matches_audioop_for_every_int16(ours, reference) -> None:
    assert ours(ALL_PCM16_BYTES) == reference(ALL_PCM16_BYTES, 2)


@pytest.mark.parametrize(
    ("ours", "reference"),
    [(ulaw_to_pcm16, audioop.ulaw2lin), (alaw_to_pcm16, audioop.alaw2lin)],
    ids=["ulaw", "alaw"],
)
def test_decode_matches_audioop_for_every_code(ours, reference) -> None:
    assert ours(ALL_CODES) == reference(ALL_CODES, 2)
    # Short and long buffers take different paths; odd lengths end on a single code.
    long = ALL_CODES * 40
    assert ours(long) == reference(long, 2)
    assert ours(long[:-1]) == reference(long[:-1], 2)
    assert ours(long[:7]) == reference(long[:7], 2)


@pytest.mark.parametrize(
    ("encode", "decode", "ref_encode", "ref_decode"),
    [
        (ulaw_encode, ulaw_decode, audioop.lin2ulaw, audioop.ulaw2lin),
        (alaw_encode, alaw_decode, audioop.lin2alaw, audioop.alaw2lin),
    ],
    ids=["ulaw", "alaw"],
)
def test_array_variants_match_audioop(encode, decode, ref_encode, ref_decode) -> None:
    codes = encode(ALL_PCM16)
    assert codes.dtype == np.uint8
    assert codes.tobytes() == ref_encode(ALL_PCM16_BYTES, 2)
    # A strided view must encode the same as its contiguous copy.
    assert np.array_equal(encode(ALL_PCM16[::3]), encode(ALL_PCM16[::3].copy()))

    decoded = decode(np.frombuffer(ALL_CODES, dtype=np.uint8))
    assert decoded.dtype == np.int16
    assert decoded.astype("<i2").tobytes() == ref_decode(ALL_CODES, 2)
    assert np.array_equal(decode(ALL_CODES), decoded)  # bytes in, same samples out
    grid = np.frombuffer(ALL_CODES, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(decode(grid), decoded.reshape(16, 16))  # shape is kept
    assert np.array_equal(decode(grid[:, ::3]), decoded.reshape(16, 16)[:, ::3])


@given(st.binary(max_size=3000))
def test_decoding_any_buffer_matches_audioop(codes: bytes) -> None:
    # Odd lengths take the single-code path for the last byte.
    assert ulaw_to_pcm16(codes) == audioop.ulaw2lin(codes, 2)
    assert alaw_to_pcm16(codes) == audioop.alaw2lin(codes, 2)
    assert ulaw_decode(codes).astype("<i2").tobytes() == audioop.ulaw2lin(codes, 2)


def test_codec_accepts_bytearray_and_memoryview() -> None:
    pcm = tone_pcm16(440, 20).astype("<i2").tobytes()
    expected = audioop.lin2ulaw(pcm, 2)
    assert pcm16_to_ulaw(bytearray(pcm)) == expected
    assert pcm16_to_ulaw(memoryview(pcm)) == expected
    assert ulaw_to_pcm16(memoryview(expected)) == audioop.ulaw2lin(expected, 2)


@pytest.mark.parametrize("encode", [pcm16_to_ulaw, pcm16_to_alaw, ulaw_encode, alaw_encode])
def test_odd_length_pcm_is_rejected_with_a_clear_message(encode) -> None:
    with pytest.raises(ValueError, match="even number of bytes"):
        encode(b"\x00\x01\x02")


def test_wrong_array_dtypes_are_rejected() -> None:
    with pytest.raises(TypeError, match="int16"):
        ulaw_encode(np.zeros(4, dtype=np.int32))
    with pytest.raises(TypeError, match="uint8"):
        ulaw_decode(np.zeros(4, dtype=np.int16))


def test_empty_buffers_give_empty_results() -> None:
    assert pcm16_to_ulaw(b"") == b""
    assert ulaw_to_pcm16(b"") == b""
    assert alaw_decode(b"").size == 0


def _reference_mix(caller: bytes, agent: bytes) -> bytes:
    summed = audioop.add(audioop.ulaw2lin(caller, 2), audioop.ulaw2lin(agent, 2), 2)
    return audioop.lin2ulaw(summed, 2)


def test_mix_frames_matches_audioop_on_random_frames() -> None:
    rng = np.random.default_rng(20240611)
    for _ in range(200):
        caller = rng.integers(0, 256, FRAME_BYTES, dtype=np.uint8).tobytes()
        agent = rng.integers(0, 256, FRAME_BYTES, dtype=np.uint8).tobytes()
        assert mix_frames(caller, agent) == _reference_mix(caller, agent)


def test_mix_frames_matches_audioop_for_every_code_pair() -> None:
    # 65,536 pairs cover loud sums that clip as well as quiet ones.
    caller = np.repeat(np.arange(256, dtype=np.uint8), 256).tobytes()
    agent = np.tile(np.arange(256, dtype=np.uint8), 256).tobytes()
    assert mix_frames(caller, agent) == _reference_mix(caller, agent)


def test_mix_frames_pads_the_shorter_buffer_with_silence() -> None:
    caller = tone_ulaw(440, 20)
    agent = tone_ulaw(700, 10)
    mixed = mix_frames(caller, agent)
    assert len(mixed) == FRAME_BYTES
    assert mixed == mix_frames(caller, agent + b"\xff" * 80)
    assert mix_frames(agent, caller) == mixed


@given(st.binary(max_size=400))
def test_ulaw_decode_encode_is_stable(codes: bytes) -> None:
    once = ulaw_to_pcm16(codes)
    assert ulaw_to_pcm16(pcm16_to_ulaw(once)) == once


@given(st.binary(max_size=400))
def test_alaw_decode_encode_is_stable(codes: bytes) -> None:
    once = alaw_to_pcm16(codes)
    assert alaw_to_pcm16(pcm16_to_alaw(once)) == once


@given(st.binary(min_size=1, max_size=320), st.binary(min_size=1, max_size=320))
def test_mix_is_commutative_and_as_long_as_the_longer_input(a: bytes, b: bytes) -> None:
    mixed = mix_frames(a, b)
    assert mixed == mix_frames(b, a)
    assert len(mixed) == max(len(a), len(b))


@given(st.lists(st.integers(-32768, 32767), max_size=200))
def test_encode_error_is_within_one_quantisation_step(values: list[int]) -> None:
    pcm = np.array(values, dtype=np.int16)
    error = np.abs(ulaw_decode(ulaw_encode(pcm)).astype(np.int32) - pcm)
    # μ-law steps grow with the magnitude: 8 near zero, 1024 in the top segment.
    assert np.all(error <= np.maximum(8, np.abs(pcm.astype(np.int32)) // 16 + 132))


# -- PCM helpers -----------------------------------------------------------------------


def test_pcm16_bytes_roundtrip_is_little_endian() -> None:
    samples = np.array([1, -2, 32767, -32768], dtype=np.int16)
    raw = pcm16_to_bytes(samples)
    assert raw == b"\x01\x00\xfe\xff\xff\x7f\x00\x80"
    assert np.array_equal(pcm16_from_bytes(raw), samples)
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_from_bytes(b"\x00")


def test_float_conversion_clips_and_roundtrips() -> None:
    assert np.array_equal(
        float_to_pcm16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])),
        np.array([-32768, -32768, 0, 16384, 32767, 32767], dtype=np.int16),
    )
    assert np.array_equal(float_to_pcm16(pcm16_to_float(ALL_PCM16)), ALL_PCM16)


def test_rms_dbfs_levels() -> None:
    assert rms_dbfs(np.full(100, -32768, dtype=np.int16)) == pytest.approx(0.0)
    assert rms_dbfs(np.zeros(160, dtype=np.int16)) == -math.inf
    assert rms_dbfs(b"") == -math.inf
    half = np.full(100, 16384, dtype=np.int16)
    assert rms_dbfs(half.tobytes()) == pytest.approx(-6.02, abs=0.01)


def test_frames_cut_and_pad_the_last_frame_with_silence() -> None:
    data = bytes(range(200)) * 2  # 400 bytes: two whole frames and 80 bytes
    cut = frames(data)
    assert [len(f) for f in cut] == [160, 160, 160]
    assert b"".join(cut)[:400] == data
    assert cut[-1][80:] == b"\xff" * 80
    assert [len(f) for f in frames(data, pad=False)] == [160, 160, 80]
    assert [len(f) for f in frames(data, size=100)] == [100] * 4
    assert frames(b"") == []
    with pytest.raises(ValueError):
        frames(data, size=0)


def test_durations_and_silence() -> None:
    assert duration_ms(b"\xff" * 160) == 20.0
    assert duration_ms(b"\xff" * 4) == 0.5
    assert silence_ulaw(20) == SILENCE_FRAME
    assert silence_ulaw(0) == b""
    assert len(silence_ulaw(1000)) == 8000
    with pytest.raises(ValueError):
        silence_ulaw(-1)


def test_tone_has_the_asked_length_level_and_frequency() -> None:
    tone = tone_ulaw(440, 1000, level_dbfs=-20.0)
    assert len(tone) == 8000
    samples = ulaw_decode(tone)
    # The fades take a little energy; G.711 quantisation adds a little noise.
    assert rms_dbfs(samples[400:-400]) == pytest.approx(-20.0, abs=0.3)
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / samples.size
    assert peak_hz == pytest.approx(440, abs=2)
    # Soft edges: the first and last samples are near zero.
    assert abs(int(samples[0])) < 100 and abs(int(samples[-1])) < 300
