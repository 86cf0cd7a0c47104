"""The offline extra: eSpeak and Piper synthesis, Whisper transcription, Silero segmentation.

These run the real engines on the models bundled by the offline extra (the suite is run
with it installed). Models load once per module; no test may touch the network.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from voice_runtime.audio.resample import resample
from voice_runtime.audio.vad import SileroVad, SpeechSegmenter, SpeechStart, UtteranceEnd
from voice_runtime.offline import require_offline
from voice_runtime.offline.espeak import EspeakEngine
from voice_runtime.offline.piper import PiperEngine
from voice_runtime.offline.whisper import WhisperEngine, model_dir
from voice_runtime.testing.metrics import word_accuracy, word_errors, words

SENTENCES = [
    "Please call me back tomorrow morning.",
    "The quick brown fox jumps over the lazy dog.",
    "I would like to book a table for two people.",
    "Thank you for calling, how can I help you today?",
    "The meeting has been moved to next week.",
]
LONG_SENTENCE = (
    "This rather long sentence keeps going for a while, so that the engine has to produce "
    "several buffers of audio before it reaches the final word of the text."
)
FRAME = 160  # 20 ms at 8 kHz


@pytest.fixture(scope="module", autouse=True)
def _offline_only() -> Iterator[None]:
    """Refuse any socket connection beyond loopback and keep the model hub offline."""
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def _check(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else address
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise AssertionError(f"offline engine tried to reach {address!r}")

    def connect(sock: socket.socket, address: object) -> None:
        _check(sock, address)
        original_connect(sock, address)

    def connect_ex(sock: socket.socket, address: object) -> int:
        _check(sock, address)
        return original_connect_ex(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", connect)
        patch.setattr(socket.socket, "connect_ex", connect_ex)
        yield


@pytest.fixture(scope="module")
def espeak() -> EspeakEngine:
    return EspeakEngine()


@pytest.fixture(scope="module")
def piper() -> PiperEngine:
    engine = PiperEngine()
    engine.preload()
    return engine


@pytest.fixture(scope="module")
def whisper() -> WhisperEngine:
    engine = WhisperEngine(cpu_threads=2)
    engine.preload()
    return engine


@pytest.fixture(scope="module")
def piper_sentences_8k(piper: PiperEngine) -> list[np.ndarray]:
    """The first three sentences spoken by Piper, at the call leg's 8 kHz."""
    out = []
    for text in SENTENCES[:3]:
        audio, rate = piper.synthesize(text)
        out.append(resample(audio, rate, 8000))
    return out


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))


def _segment(segmenter: SpeechSegmenter, pcm: np.ndarray) -> list[SpeechStart | UtteranceEnd]:
    events: list[SpeechStart | UtteranceEnd] = []
    for start in range(0, pcm.size, FRAME):
        events.extend(segmenter.process(pcm[start : start + FRAME]))
    return events


def test_word_error_helper() -> None:
    assert word_errors("the quick brown fox", "the quick brown fox") == (0, 4)
    assert word_errors("the quick brown fox", "a quick fox jumps") == (3, 4)
    assert word_accuracy([("one two", "one"), ("three four", "three four")]) == 0.75


def test_require_offline_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r'pip install "voice-runtime\[offline\]"'):
        require_offline("voice_runtime_no_such_engine")


# --- eSpeak ---------------------------------------------------------------------------


def test_espeak_sentence_has_plausible_length(espeak: EspeakEngine) -> None:
    audio, rate = espeak.synthesize(LONG_SENTENCE)
    expected = len(words(LONG_SENTENCE)) / 175 * 60
    assert rate == 22050
    assert audio.dtype == np.int16
    assert 0.6 * expected < audio.size / rate < 1.6 * expected
    assert _rms(audio) > 1000


def test_espeak_rate_changes_duration(espeak: EspeakEngine) -> None:
    fast = EspeakEngine(rate_wpm=350)
    slow_audio, _ = espeak.synthesize(LONG_SENTENCE)
    fast_audio, _ = fast.synthesize(LONG_SENTENCE)
    assert fast_audio.size < 0.7 * slow_audio.size


def test_espeak_streams_many_chunks(espeak: EspeakEngine) -> None:
    chunks = list(espeak.synthesize_stream(LONG_SENTENCE))
    whole, rate = espeak.synthesize(LONG_SENTENCE)
    assert len(chunks) > 10
    assert {chunk_rate for _, chunk_rate in chunks} == {rate}
    streamed = sum(chunk.size for chunk, _ in chunks)
    # eSpeak adds a little random variation, so compare lengths, not samples.
    assert abs(streamed - whole.size) < 0.05 * whole.size
    assert max(chunk.size for chunk, _ in chunks) <= 0.1 * rate


def test_espeak_stop_event_aborts_and_frees_the_engine(espeak: EspeakEngine) -> None:
    stop = threading.Event()
    received = []
    for chunk, _ in espeak.synthesize_stream(LONG_SENTENCE * 5, stop=stop):
        received.append(chunk)
        stop.set()
    assert len(received) == 1

    stream = espeak.synthesize_stream(LONG_SENTENCE * 5)
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "espeak-synth"]

    done = threading.Event()
    result: list[np.ndarray] = []

    def speak() -> None:
        result.append(espeak.synthesize("Still working.")[0])
        done.set()

    threading.Thread(target=speak, daemon=True).start()
    assert done.wait(10), "engine still locked after an aborted stream"
    assert result[0].size > 0.3 * espeak.sample_rate


def test_espeak_concurrent_callers_get_whole_sentences(espeak: EspeakEngine) -> None:
    reference = espeak.synthesize(LONG_SENTENCE)[0].size
    results: dict[int, int] = {}

    def speak(index: int) -> None:
        results[index] = espeak.synthesize(LONG_SENTENCE)[0].size

    threads = [threading.Thread(target=speak, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == [0, 1, 2, 3]
    for size in results.values():
        assert abs(size - reference) < 0.05 * reference


def test_espeak_unknown_voice_is_rejected() -> None:
    with pytest.raises(ValueError, match="no voice"):
        EspeakEngine(voice="xx-no-such-voice")
    with pytest.raises(ValueError, match="rate_wpm"):
        EspeakEngine(rate_wpm=10)


def test_espeak_empty_text_gives_no_audio(espeak: EspeakEngine) -> None:
    audio, rate = espeak.synthesize("   ")
    assert audio.size == 0
    assert rate == 22050


# --- Piper ----------------------------------------------------------------------------


def test_piper_sentence_has_plausible_length(piper: PiperEngine) -> None:
    audio, rate = piper.synthesize(LONG_SENTENCE)
    expected = len(words(LONG_SENTENCE)) / 170 * 60
    assert rate == 22050
    assert audio.dtype == np.int16
    assert 0.6 * expected < audio.size / rate < 1.6 * expected
    assert _rms(audio) > 1000


def test_piper_streams_one_chunk_per_sentence_first_one_early(piper: PiperEngine) -> None:
    text = " ".join(SENTENCES[:4])
    arrivals = []
    sizes = []
    started = time.perf_counter()
    for chunk, rate in piper.synthesize_stream(text):
        arrivals.append(time.perf_counter() - started)
        sizes.append(chunk.size)
        assert rate == 22050
    assert len(sizes) == 4
    assert all(size > 0.5 * 22050 for size in sizes)
    # Sentences are synthesised one by one, so the first is usable long before the last.
    assert arrivals[0] < 0.6 * arrivals[-1]


def test_piper_stop_event_ends_the_stream(piper: PiperEngine) -> None:
    stop = threading.Event()
    received = []
    for chunk, _ in piper.synthesize_stream(" ".join(SENTENCES), stop=stop):
        received.append(chunk)
        stop.set()
    assert len(received) == 1


def test_piper_unknown_voice_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown Piper voice"):
        PiperEngine(voice="nobody")


# --- Whisper --------------------------------------------------------------------------


def test_whisper_uses_the_bundled_model_and_never_downloads() -> None:
    assert (model_dir() / "model.bin").is_file()
    with pytest.raises(ValueError, match="not available offline"):
        WhisperEngine(model="base.en")


def test_whisper_empty_input(whisper: WhisperEngine) -> None:
    assert whisper.transcribe(np.zeros(0, dtype=np.int16)) == ""


@pytest.mark.parametrize("engine_name", ["piper", "espeak"])
def test_round_trip_text_speech_text(
    engine_name: str, request: pytest.FixtureRequest, whisper: WhisperEngine
) -> None:
    engine = request.getfixturevalue(engine_name)
    pairs = []
    for text in SENTENCES:
        audio, rate = engine.synthesize(text)
        pairs.append((text, whisper.transcribe(resample(audio, rate, 16000))))
    assert word_accuracy(pairs) >= 0.85, pairs


@pytest.mark.parametrize("level_dbfs", [None, -60.0, -30.0, -20.0])
def test_silence_and_noise_yield_no_text(level_dbfs: float | None, whisper: WhisperEngine) -> None:
    if level_dbfs is None:
        pcm = np.zeros(10 * 8000, dtype=np.int16)
    else:
        rng = np.random.default_rng(1234)
        noise = rng.standard_normal(10 * 8000) * (32768 * 10 ** (level_dbfs / 20))
        pcm = np.clip(noise, -32768, 32767).astype(np.int16)
    segmenter = SpeechSegmenter(SileroVad(8000))
    events = _segment(segmenter, pcm) + segmenter.flush()
    texts = [
        whisper.transcribe(resample(event.pcm, 8000, 16000))
        for event in events
        if isinstance(event, UtteranceEnd)
    ]
    assert events == []
    assert " ".join(texts) == ""


def test_segmenter_cuts_one_utterance_per_sentence(
    piper_sentences_8k: list[np.ndarray], whisper: WhisperEngine
) -> None:
    gap = np.zeros(8000, dtype=np.int16)  # 1 s between sentences
    parts, onsets, ends, position = [], [], [], 0
    for sentence in piper_sentences_8k:
        parts += [gap, sentence]
        onsets.append((position + gap.size) / 8000)
        position += gap.size + sentence.size
        ends.append(position / 8000)
    parts.append(gap)
    stream = np.concatenate(parts)

    segmenter = SpeechSegmenter(SileroVad(8000), min_speech_ms=250, min_silence_ms=500, pad_ms=200)
    events = _segment(segmenter, stream)

    assert [event.kind for event in events] == ["speech_start", "utterance_end"] * 3
    starts = [e for e in events if isinstance(e, SpeechStart)]
    utterances = [e for e in events if isinstance(e, UtteranceEnd)]
    for start, utterance, onset, end in zip(starts, utterances, onsets, ends, strict=True):
        assert onset - 0.1 <= start.start <= onset + 0.3
        assert 0.2 <= start.detected_at - start.start <= 0.4
        assert utterance.start == start.start
        assert end - 0.4 <= utterance.end <= end + 0.3
        assert not utterance.forced
        assert utterance.sample_rate == 8000
        assert utterance.duration == pytest.approx(utterance.end - utterance.start + 0.4, abs=0.01)
    assert not segmenter.in_speech

    pairs = [
        (text, whisper.transcribe(resample(u.pcm, 8000, 16000)))
        for text, u in zip(SENTENCES[:3], utterances, strict=True)
    ]
    assert word_accuracy(pairs) >= 0.85, pairs


def test_segmenter_flush_and_max_length(piper_sentences_8k: list[np.ndarray]) -> None:
    speech = piper_sentences_8k[1]  # about 2.7 s without a long pause
    lead = np.zeros(4000, dtype=np.int16)

    segmenter = SpeechSegmenter(SileroVad(8000))
    events = _segment(segmenter, np.concatenate([lead, speech[: speech.size // 2]]))
    assert [e.kind for e in events] == ["speech_start"]
    assert segmenter.in_speech
    (cut,) = segmenter.flush()
    assert isinstance(cut, UtteranceEnd)
    assert cut.duration > 0.5
    assert not segmenter.in_speech
    assert segmenter.position == 0.0

    capped = SpeechSegmenter(SileroVad(8000), max_utterance_ms=1000)
    events = _segment(capped, np.concatenate([lead, speech, lead, lead]))
    kinds = [e.kind for e in events]
    assert kinds[0] == "speech_start"
    assert kinds.count("speech_start") == kinds.count("utterance_end") >= 2
    forced = [e for e in events if isinstance(e, UtteranceEnd) and e.forced]
    assert forced
    assert all(e.end - e.start == pytest.approx(1.0, abs=0.04) for e in forced)


def test_vad_probabilities_do_not_depend_on_chunking(piper_sentences_8k: list[np.ndarray]) -> None:
    pcm = np.concatenate(piper_sentences_8k[:2])
    vad = SileroVad(8000)
    assert vad.window_samples == 256
    whole = vad.process(pcm)
    assert len(whole) == pcm.size // 256
    assert max(whole) > 0.9
    assert min(whole) < 0.1

    vad.reset()
    rng = np.random.default_rng(5)
    pieces: list[float] = []
    position = 0
    while position < pcm.size:
        size = int(rng.integers(1, 700))
        pieces += vad.process(pcm[position : position + size])
        position += size
    assert pieces == pytest.approx(whole, abs=1e-5)
    assert vad.pending_samples == pcm.size % 256
    assert vad.process(pcm[:0]) == []


def test_vad_accepts_bytes_and_checks_its_arguments() -> None:
    vad = SileroVad(16000, threshold=0.6)
    assert vad.window_samples == 512
    assert vad.window_ms == 32.0
    assert len(vad.process(np.zeros(1024, dtype=np.int16).tobytes())) == 2
    assert not vad.is_speech(0.59)
    with pytest.raises(ValueError):
        SileroVad(22050)
    with pytest.raises(ValueError):
        SileroVad(8000, threshold=1.5)
    with pytest.raises(TypeError):
        vad.process(np.zeros(512, dtype=np.float32))
