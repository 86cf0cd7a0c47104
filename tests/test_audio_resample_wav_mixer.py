"""Resampling, WAV files and the AudioMixer (recording without ffplay, monitoring with a fake)."""

from __future__ import annotations

import itertools
import logging
import os
import stat
import struct
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from voice_runtime.audio import (
    FRAME_BYTES,
    SILENCE_FRAME,
    SUPPORTED_RATES,
    AudioMixer,
    StreamResampler,
    UlawWavWriter,
    WavAudio,
    frames,
    mix_frames,
    parse_wav,
    read_wav,
    resample,
    rms_dbfs,
    tone_pcm16,
    tone_ulaw,
    ulaw_decode,
    write_pcm16_wav,
    write_stereo_call_wav,
    write_ulaw_wav,
)

MIXER_THREAD = "voice-runtime-audio-mixer"


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    windowed = samples.astype(np.float64) * np.hanning(samples.size)
    spectrum = np.abs(np.fft.rfft(windowed))
    return float(np.argmax(spectrum) * rate / samples.size)


def _stream(resampler: StreamResampler, signal: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, pos, chunks = [], 0, itertools.cycle(sizes)
    while pos < signal.size:
        n = next(chunks)
        out.append(resampler.process(signal[pos : pos + n]))
        pos += n
    out.append(resampler.flush())
    return np.concatenate(out)


# -- resampling ------------------------------------------------------------------------


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24000, 8000), (8000, 16000), (22050, 8000)])
def test_streaming_in_chunks_equals_one_shot(in_rate: int, out_rate: int) -> None:
    signal = tone_pcm16(440, 700, -12.0, sample_rate=in_rate)
    one_shot = resample(signal, in_rate, out_rate)
    for sizes in ([in_rate // 50], [37, 1000, 1, 480]):  # 20 ms frames, then ragged chunks
        streamed = _stream(StreamResampler(in_rate, out_rate), signal, sizes)
        assert streamed.size == one_shot.size
        assert np.max(np.abs(streamed.astype(np.int32) - one_shot)) <= 1


@pytest.mark.parametrize(("in_rate", "out_rate"), list(itertools.permutations(SUPPORTED_RATES, 2)))
def test_every_rate_pair_keeps_length_frequency_and_level(in_rate: int, out_rate: int) -> None:
    signal = tone_pcm16(440, 500, -12.0, sample_rate=in_rate)
    resampler = StreamResampler(in_rate, out_rate)
    out = _stream(resampler, signal, [in_rate // 50])
    assert abs(out.size - signal.size * out_rate / in_rate) <= 3
    assert out.dtype == np.int16
    core = out[out.size // 10 : -out.size // 10]
    assert _peak_hz(core, out_rate) == pytest.approx(440, abs=8)
    assert rms_dbfs(core) == pytest.approx(rms_dbfs(signal[signal.size // 10 :]), abs=0.5)


def test_equal_rates_pass_through_unchanged() -> None:
    signal = tone_pcm16(300, 100)
    resampler = StreamResampler(8000, 8000)
    assert resampler.passthrough
    assert np.array_equal(resampler.process(signal), signal)
    assert resampler.flush().size == 0
    assert np.array_equal(resample(signal, 16000, 16000), signal)


def test_resampler_takes_bytes_and_starts_over_after_flush() -> None:
    signal = tone_pcm16(440, 300, sample_rate=16000)
    resampler = StreamResampler(16000, 8000)
    first = _stream(resampler, signal, [320])
    second = np.concatenate([resampler.process(signal.astype("<i2").tobytes()), resampler.flush()])
    assert np.array_equal(first, second)
    with pytest.raises(ValueError, match="even number of bytes"):
        resampler.process(b"\x00\x00\x00")


def test_resampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamResampler(0, 8000)
    with pytest.raises(ValueError, match="quality"):
        StreamResampler(8000, 16000, quality="best")
    with pytest.raises(ValueError):
        StreamResampler(8000, 16000).process(np.zeros((4, 2), dtype=np.int16))


def test_one_shot_resamples_stereo_arrays() -> None:
    left = tone_pcm16(440, 200, sample_rate=16000)
    stereo = np.column_stack([left, np.zeros_like(left)])
    out = resample(stereo, 16000, 8000)
    assert out.shape == (left.size // 2, 2)
    assert np.all(out[:, 1] == 0)
    assert np.array_equal(out[:, 0], resample(left, 16000, 8000))


# -- WAV -------------------------------------------------------------------------------


def _g711_header_fields(raw: bytes) -> dict[str, object]:
    riff, riff_size, wave_id = struct.unpack_from("<4sI4s", raw, 0)
    fmt_id, fmt_size = struct.unpack_from("<4sI", raw, 12)
    tag, channels, rate, byte_rate, align, bits, cb_size = struct.unpack_from("<HHIIHHH", raw, 20)
    data_id, data_size = struct.unpack_from("<4sI", raw, 38)
    return {
        "riff": riff,
        "riff_size": riff_size,
        "wave": wave_id,
        "fmt": fmt_id,
        "fmt_size": fmt_size,
        "tag": tag,
        "channels": channels,
        "rate": rate,
        "byte_rate": byte_rate,
        "align": align,
        "bits": bits,
        "cb_size": cb_size,
        "data": data_id,
        "data_size": data_size,
    }


def _assert_ulaw_wav_header(path: Path) -> int:
    raw = path.read_bytes()
    h = _g711_header_fields(raw)
    assert (h["riff"], h["wave"], h["fmt"], h["data"]) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert (h["fmt_size"], h["tag"], h["channels"], h["rate"]) == (18, 7, 1, 8000)
    assert (h["byte_rate"], h["align"], h["bits"], h["cb_size"]) == (8000, 1, 8, 0)
    data_size = int(h["data_size"])  # type: ignore[call-overload]
    assert h["riff_size"] == len(raw) - 8
    assert len(raw) == 46 + data_size + data_size % 2
    return data_size


def test_ulaw_wav_roundtrip_and_header(tmp_path: Path) -> None:
    audio = tone_ulaw(440, 500)
    path = tmp_path / "sub" / "tone.wav"
    write_ulaw_wav(path, audio)
    assert _assert_ulaw_wav_header(path) == len(audio)
    back = read_wav(path)
    assert back == WavAudio("ulaw", 8000, 1, audio)
    assert back.duration_s == pytest.approx(0.5)
    assert back.to_ulaw_8k_mono() == audio


def test_odd_length_ulaw_wav_is_padded_and_reads_back(tmp_path: Path) -> None:
    audio = tone_ulaw(440, 20)[:151]
    path = tmp_path / "odd.wav"
    write_ulaw_wav(path, audio)
    assert _assert_ulaw_wav_header(path) == 151
    assert read_wav(path).data == audio


def test_ulaw_writer_incremental_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "inc.wav"
    chunks = frames(tone_ulaw(500, 300))
    with UlawWavWriter(path) as writer:
        for chunk in chunks:
            writer.write(chunk)
        assert writer.bytes_written == len(chunks) * FRAME_BYTES
    assert writer.closed
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"\xff")
    assert read_wav(path).data == b"".join(chunks)


def test_header_of_an_unfinished_recording_reads_to_end_of_file() -> None:
    # An unclosed UlawWavWriter leaves "unknown" sizes: readers take the data to EOF.
    fmt = struct.pack("<HHIIHHH", 7, 1, 8000, 8000, 1, 8, 0)
    audio = tone_ulaw(440, 40)
    blob = (
        struct.pack("<4sI4s", b"RIFF", 0xFFFFFFFF, b"WAVE")
        + struct.pack("<4sI", b"fmt ", 18)
        + fmt
        + struct.pack("<4sI", b"data", 0xFFFFFFFF)
        + audio
    )
    assert parse_wav(blob).data == audio


def test_pcm16_stereo_roundtrip(tmp_path: Path) -> None:
    left = tone_pcm16(440, 250, sample_rate=16000)
    right = tone_pcm16(1000, 250, -30.0, sample_rate=16000)
    stereo = np.column_stack([left, right])
    path = tmp_path / "stereo.wav"
    write_pcm16_wav(path, stereo, 16000)
    with wave.open(str(path), "rb") as w:  # the stdlib agrees on the format
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 16000)
        assert w.getnframes() == left.size
    back = read_wav(path)
    assert (back.encoding, back.sample_rate, back.channels) == ("pcm16", 16000, 2)
    assert np.array_equal(back.samples(), stereo)
    assert back.duration_s == pytest.approx(0.25)

    mono_ulaw = back.to_ulaw_8k_mono()
    assert len(mono_ulaw) == pytest.approx(2000, abs=3)
    assert _peak_hz(ulaw_decode(mono_ulaw)[200:-200], 8000) == pytest.approx(440, abs=10)


def test_pcm16_wav_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="channels"):
        write_pcm16_wav(tmp_path / "x.wav", np.zeros((10, 2), dtype=np.int16), 8000, 1)
    with pytest.raises(ValueError, match="divide"):
        write_pcm16_wav(tmp_path / "x.wav", np.zeros(3, dtype=np.int16), 8000, 2)


def test_stereo_call_wav_puts_caller_left_and_agent_right(tmp_path: Path) -> None:
    caller = tone_ulaw(440, 300)
    agent = tone_ulaw(900, 100)
    path = tmp_path / "call.wav"
    write_stereo_call_wav(path, caller, agent)
    back = read_wav(path)
    assert (back.encoding, back.sample_rate, back.channels) == ("pcm16", 8000, 2)
    samples = back.samples()
    assert samples.shape == (len(caller), 2)
    assert np.array_equal(samples[:, 0], ulaw_decode(caller))
    assert np.array_equal(samples[: len(agent), 1], ulaw_decode(agent))
    assert np.all(samples[len(agent) :, 1] == 0)


def test_read_wav_converts_other_pcm_widths(tmp_path: Path) -> None:
    samples = tone_pcm16(440, 50, -6.0)
    path = tmp_path / "24.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(3)
        w.setframerate(8000)
        as32 = samples.astype(np.int32) << 8
        w.writeframes(as32.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes())
    assert np.array_equal(read_wav(path).samples()[:, 0], samples)

    floats = (samples.astype(np.float32) / 32768).astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    blob = (
        struct.pack("<4sI4s", b"RIFF", 4 + 24 + 8 + len(floats), b"WAVE")
        + struct.pack("<4sI", b"fmt ", 16)
        + fmt
        + struct.pack("<4sI", b"data", len(floats))
        + floats
    )
    assert np.array_equal(parse_wav(blob).samples()[:, 0], samples)


def test_read_wav_rejects_what_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="RIFF"):
        parse_wav(b"not a wav file")
    fmt = struct.pack("<HHIIHH", 0x55, 1, 8000, 1000, 1, 0)  # MPEG layer 3
    blob = struct.pack("<4sI4s", b"RIFF", 36, b"WAVE") + struct.pack("<4sI", b"fmt ", 16) + fmt
    blob += struct.pack("<4sI", b"data", 0)
    with pytest.raises(ValueError, match="unsupported"):
        parse_wav(blob)


# -- AudioMixer ------------------------------------------------------------------------


@pytest.fixture
def no_ffplay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def fake_ffplay(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Put an ``ffplay`` on PATH that copies its stdin to a file (or exits at once)."""

    def install(script_body: str) -> Path:
        bin_dir = tmp_path / "fake-bin"
        bin_dir.mkdir()
        out = tmp_path / "played.raw"
        script = bin_dir / "ffplay"
        script.write_text(f"#!/bin/sh\n{script_body}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
        monkeypatch.setenv("FAKE_FFPLAY_OUT", str(out))
        return out

    return install


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def _expected_mix(caller: list[bytes], agent: list[bytes]) -> bytes:
    out = []
    for c, a in itertools.zip_longest(caller, agent):
        out.append(mix_frames(c, a) if c is not None and a is not None else c or a)
    return b"".join(out)


def _assert_silence_after(data: bytes, prefix: bytes) -> None:
    assert data[: len(prefix)] == prefix
    tail = data[len(prefix) :]
    assert len(tail) % FRAME_BYTES == 0
    assert tail == SILENCE_FRAME * (len(tail) // FRAME_BYTES)


def _mixer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == MIXER_THREAD]


def test_mixer_records_without_ffplay_and_stops_its_thread(
    tmp_path: Path, no_ffplay: None, caplog: pytest.LogCaptureFixture
) -> None:
    caller = frames(tone_ulaw(440, 400))  # 20 frames
    agent = frames(tone_ulaw(700, 250))  # 12.5 frames -> 13, last padded
    path = tmp_path / "rec" / "call.wav"
    mixer = AudioMixer(path, monitor=True)
    for frame in caller:
        mixer.write_caller(frame)
    mixer.write_agent(b"".join(agent)[: 250 * 8])  # a partial frame, sealed at shutdown

    with caplog.at_level(logging.WARNING, logger="voice_runtime.audio.mixer"):
        mixer.start()
    assert "ffplay not found" in caplog.text
    assert not mixer.monitoring
    assert mixer.running
    mixer.shutdown()

    assert not mixer.running
    assert _mixer_threads() == []
    data_size = _assert_ulaw_wav_header(path)
    assert data_size == mixer.stats.recorded_bytes
    recording = read_wav(path).data
    # Queued before start, the legs pair up frame by frame; idle ticks add only silence.
    _assert_silence_after(recording, _expected_mix(caller, agent))
    assert mixer.stats.caller_frames == 20 and mixer.stats.agent_frames == 13

    mixer.shutdown()  # idempotent: the file stays as it was
    assert read_wav(path).data == recording
    mixer.write_caller(caller[0])  # ignored after shutdown
    with pytest.raises(RuntimeError, match="restarted"):
        mixer.start()


def test_mixer_joins_agent_chunks_of_any_size_without_gaps(tmp_path: Path) -> None:
    agent = tone_ulaw(500, 300)  # 2400 bytes, fed in 100-byte chunks
    path = tmp_path / "agent.wav"
    mixer = AudioMixer(path, monitor=False)
    for i in range(0, len(agent), 100):
        mixer.write_agent(agent[i : i + 100])
    mixer.start()
    mixer.shutdown()
    _assert_silence_after(read_wav(path).data, agent)


def test_mixer_writes_the_stereo_call(tmp_path: Path) -> None:
    caller = frames(tone_ulaw(440, 200))
    agent = frames(tone_ulaw(900, 100))
    mono, stereo = tmp_path / "mono.wav", tmp_path / "stereo.wav"
    mixer = AudioMixer(mono, monitor=False, stereo_path=stereo)
    for c in caller:
        mixer.write_caller(c)
    for a in agent:
        mixer.write_agent(a)
    with mixer:
        pass
    back = read_wav(stereo)
    assert (back.encoding, back.sample_rate, back.channels) == ("pcm16", 8000, 2)
    samples = back.samples()
    n_caller, n_agent = len(caller) * FRAME_BYTES, len(agent) * FRAME_BYTES
    assert np.array_equal(samples[:n_caller, 0], ulaw_decode(b"".join(caller)))
    assert np.array_equal(samples[:n_agent, 1], ulaw_decode(b"".join(agent)))
    assert np.all(samples[n_agent:, 1] == 0) and np.all(samples[n_caller:, 0] == 0)
    assert back.num_frames == read_wav(mono).num_frames


def test_mixer_queues_are_bounded_and_count_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caller = frames(tone_ulaw(440, 160))  # 8 frames into a queue of 5
    path = tmp_path / "bounded.wav"
    mixer = AudioMixer(path, monitor=False, max_queue_frames=5)
    with caplog.at_level(logging.WARNING, logger="voice_runtime.audio.mixer"):
        for frame in caller:
            mixer.write_caller(frame)
    assert mixer.stats.caller_dropped == 3
    assert caplog.text.count("queue full") == 1  # one warning, then only counting
    mixer.start()
    mixer.shutdown()
    _assert_silence_after(read_wav(path).data, b"".join(caller[3:]))


def test_mixer_without_outputs_starts_no_thread(no_ffplay: None) -> None:
    mixer = AudioMixer(monitor=False)
    mixer.start()
    assert not mixer.running and _mixer_threads() == []
    mixer.write_caller(SILENCE_FRAME)
    mixer.shutdown()


def test_mixer_monitor_default_comes_from_voice_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICE_MONITOR", "1")
    assert AudioMixer().monitor is True
    assert AudioMixer(monitor=False).monitor is False
    monkeypatch.delenv("VOICE_MONITOR")
    assert AudioMixer().monitor is False


def test_mixer_plays_the_mix_through_ffplay(tmp_path: Path, fake_ffplay) -> None:
    played = fake_ffplay('exec cat > "$FAKE_FFPLAY_OUT"')
    caller = frames(tone_ulaw(440, 100))
    agent = frames(tone_ulaw(800, 100))
    mixer = AudioMixer(monitor=True)
    for c, a in zip(caller, agent, strict=True):
        mixer.write_caller(c)
        mixer.write_agent(a)
    mixer.start()
    assert mixer.monitoring
    expected = _expected_mix(caller, agent)
    _wait_for(lambda: played.exists() and played.stat().st_size >= len(expected))
    mixer.shutdown()
    assert not mixer.monitoring
    assert played.read_bytes()[: len(expected)] == expected


def test_mixer_keeps_recording_when_ffplay_dies(
    tmp_path: Path, fake_ffplay, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ffplay("exit 0")
    path = tmp_path / "rec.wav"
    mixer = AudioMixer(path, monitor=True)
    with caplog.at_level(logging.WARNING, logger="voice_runtime.audio.mixer"):
        mixer.start()
        _wait_for(lambda: not mixer.monitoring)
    assert "ffplay pipe closed" in caplog.text
    assert mixer.running
    tone = tone_ulaw(440, 40)
    mixer.write_caller(tone)
    mixer.shutdown()
    data = read_wav(path).data
    assert len(data) % FRAME_BYTES == 0
    assert tone in data


@pytest.mark.parametrize(
    ("in_rate", "out_rate"), [(24000, 8000), (16000, 8000), (8000, 16000), (8000, 24000)]
)
def test_low_latency_resampler_outputs_every_chunk_and_matches_soxr(
    in_rate: int, out_rate: int
) -> None:
    t = np.arange(in_rate) / in_rate
    x = (np.sin(2 * np.pi * 440 * t) * 10000).astype(np.int16)
    stream = StreamResampler(in_rate, out_rate, low_latency=True)
    step = in_rate // 50
    chunks = [stream.process(x[i : i + step]) for i in range(0, len(x), step)]
    assert {len(c) for c in chunks} == {out_rate // 50}  # no chunk is held back
    y = np.concatenate(chunks).astype(float)
    ref = resample(x, in_rate, out_rate).astype(float)
    factor = max(in_rate // out_rate, out_rate // in_rate)
    delay = (24 * factor // 2) // (in_rate // out_rate if in_rate > out_rate else 1)
    assert np.abs(y[delay:] - ref[: len(ref) - delay]).max() < 0.01 * 10000


def test_low_latency_downsampling_removes_what_the_lower_rate_cannot_carry() -> None:
    t = np.arange(24000) / 24000
    tone = (np.sin(2 * np.pi * 6000 * t) * 10000).astype(np.int16)  # above 4 kHz Nyquist
    stream = StreamResampler(24000, 8000, low_latency=True)
    y = np.concatenate([stream.process(tone[i : i + 480]) for i in range(0, 24000, 480)])
    assert np.sqrt(np.mean(y[200:].astype(float) ** 2)) < 100
