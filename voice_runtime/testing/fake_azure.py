"""A stand-in for the Azure Speech SDK module, for testing code that uses it without Azure.

The Azure Speech SDK talks Microsoft's closed USP protocol from a native library, so there is
no wire protocol to fake over a socket. :class:`FakeSpeechSdk` stands in for the
``azure.cognitiveservices.speech`` module instead: push streams collect the audio, and
recognizers and synthesizers fire ``recognizing``/``recognized``/``canceled``/
``synthesizing``… from their own ``threading.Thread``, as the native SDK does, following a
small script (:class:`RecognizerPlan`, :class:`SynthPlan`).
"""

from __future__ import annotations

import enum
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from voice_runtime.audio import tone_ulaw

SDK_NAME = "azure.cognitiveservices.speech"

# ---------------------------------------------------------------------------- the fake SDK


class CancellationReason(enum.Enum):
    Error = 1
    EndOfStream = 2
    CancelledByUser = 3


class CancellationErrorCode(enum.Enum):
    NoError = 0
    AuthenticationFailure = 1
    BadRequest = 2
    TooManyRequests = 3
    Forbidden = 4
    ConnectionFailure = 5
    ServiceTimeout = 6
    ServiceError = 7
    ServiceUnavailable = 8
    RuntimeError = 9


class ResultReason(enum.Enum):
    RecognizingSpeech = 2
    RecognizedSpeech = 3
    NoMatch = 0
    SynthesizingAudio = 8
    SynthesizingAudioCompleted = 9


class PropertyId(enum.Enum):
    SpeechServiceConnection_EndSilenceTimeoutMs = 3201


class SpeechSynthesisOutputFormat(enum.Enum):
    Riff16Khz16BitMonoPcm = 2
    Raw8Khz8BitMonoMULaw = 7


class AudioStreamWaveFormat(enum.Enum):
    PCM = 1
    ALAW = 6
    MULAW = 7


class _Signal:
    """EventSignal: handlers run on whichever thread fires."""

    def __init__(self) -> None:
        self._handlers: list[Callable[[Any], None]] = []
        self._lock = threading.Lock()

    def connect(self, handler: Callable[[Any], None]) -> None:
        with self._lock:
            self._handlers.append(handler)

    def disconnect_all(self) -> None:
        with self._lock:
            self._handlers.clear()

    def fire(self, evt: Any) -> None:
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler(evt)


class _ResultFuture:
    def __init__(self, fn: Callable[[], Any] | None = None) -> None:
        self._fn = fn

    def get(self) -> Any:
        return self._fn() if self._fn is not None else None


class _AudioStreamFormat:
    def __init__(
        self,
        samples_per_second: int | None = None,
        bits_per_sample: int = 16,
        channels: int = 1,
        wave_stream_format: AudioStreamWaveFormat = AudioStreamWaveFormat.PCM,
    ) -> None:
        self.samples_per_second = samples_per_second
        self.bits_per_sample = bits_per_sample
        self.channels = channels
        self.wave_stream_format = wave_stream_format


class _PushStream:
    def __init__(self, stream_format: _AudioStreamFormat | None = None) -> None:
        self.format = stream_format
        self.data = bytearray()
        self.closed = False
        self.cond = threading.Condition()

    def write(self, buffer: bytes) -> None:
        with self.cond:
            self.data.extend(buffer)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class _AudioConfig:
    def __init__(self, stream: _PushStream | None = None, **kwargs: Any) -> None:
        self.stream = stream


class _SpeechConfig:
    def __init__(
        self, subscription: str | None = None, region: str | None = None, **kw: Any
    ) -> None:
        self.subscription = subscription
        self.region = region
        self.endpoint = kw.get("endpoint")
        self.speech_recognition_language: str | None = None
        self.speech_synthesis_voice_name: str | None = None
        self.output_format: SpeechSynthesisOutputFormat | None = None
        self.properties: dict[Any, str] = {}

    def set_property(self, prop: Any, value: str) -> None:
        self.properties[prop] = value

    def set_speech_synthesis_output_format(self, fmt: SpeechSynthesisOutputFormat) -> None:
        self.output_format = fmt


@dataclass
class RecognizerPlan:
    """What the n-th recognizer does."""

    fail_start: bool = False
    cancel_after_bytes: int | None = None
    cancel_code: CancellationErrorCode = CancellationErrorCode.ConnectionFailure


@dataclass
class SynthPlan:
    fail_after_bytes: int | None = None
    fail_code: CancellationErrorCode = CancellationErrorCode.ServiceError
    stall_after_bytes: int | None = None


def _recognition_evt(text: str, reason: ResultReason) -> Any:
    return SimpleNamespace(result=SimpleNamespace(text=text, reason=reason))


def _canceled_evt(reason: CancellationReason, code: CancellationErrorCode) -> Any:
    details = SimpleNamespace(reason=reason, code=code, error_details=f"{code.name} (fake)")
    return SimpleNamespace(cancellation_details=details, result=SimpleNamespace(text=""))


class _Recognizer:
    def __init__(
        self, sdk: FakeSpeechSdk, speech_config: _SpeechConfig, audio_config: _AudioConfig
    ) -> None:
        self.sdk = sdk
        self.config = speech_config
        assert audio_config.stream is not None
        self.stream = audio_config.stream
        self.index = len(sdk.recognizers)
        self.plan = (
            sdk.recognizer_plans[self.index]
            if self.index < len(sdk.recognizer_plans)
            else RecognizerPlan()
        )
        self.recognizing = _Signal()
        self.recognized = _Signal()
        self.canceled = _Signal()
        self.session_started = _Signal()
        self.session_stopped = _Signal()
        self.speech_start_detected = _Signal()
        self.speech_end_detected = _Signal()
        self.thread: threading.Thread | None = None
        self.started_on: list[str] = []
        self.stopped_on: list[str] = []
        self._stop = threading.Event()
        self._done = False
        sdk.recognizers.append(self)

    def start_continuous_recognition_async(self) -> _ResultFuture:
        self.started_on.append(threading.current_thread().name)

        def start() -> None:
            if self.plan.fail_start:
                raise RuntimeError("fake: start failed")
            self.thread = threading.Thread(
                target=self._work, name=f"fake-azure-rec-{self.index}", daemon=True
            )
            self.thread.start()

        return _ResultFuture(start)

    def stop_continuous_recognition_async(self) -> _ResultFuture:
        self.stopped_on.append(threading.current_thread().name)

        def stop() -> None:
            self._stop.set()
            with self.stream.cond:
                self.stream.cond.notify_all()
            if self.thread is not None and self.thread is not threading.current_thread():
                self.thread.join(5)

        return _ResultFuture(stop)

    def fire_from_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on a fresh SDK-like thread (for tests that trigger events by hand)."""
        t = threading.Thread(target=fn, name="fake-azure-trigger", daemon=True)
        t.start()
        t.join(5)

    def _work(self) -> None:
        sdk = self.sdk
        self.session_started.fire(SimpleNamespace(session_id=f"s{self.index}"))
        seen = 0
        segment = 0
        partial_sent = False
        while not self._stop.is_set():
            with self.stream.cond:
                while (
                    len(self.stream.data) == seen
                    and not self.stream.closed
                    and not self._stop.is_set()
                ):
                    self.stream.cond.wait(0.05)
                new = len(self.stream.data) - seen
                closed = self.stream.closed and new == 0
            if self._stop.is_set():
                break
            if closed:
                self.canceled.fire(
                    _canceled_evt(CancellationReason.EndOfStream, CancellationErrorCode.NoError)
                )
                self.session_stopped.fire(SimpleNamespace(session_id=f"s{self.index}"))
                return
            seen += new
            segment += new
            cancel_at = self.plan.cancel_after_bytes
            if cancel_at is not None and seen >= cancel_at:
                self.canceled.fire(_canceled_evt(CancellationReason.Error, self.plan.cancel_code))
                self.session_stopped.fire(SimpleNamespace(session_id=f"s{self.index}"))
                return
            with sdk.lock:
                utt = sdk.utterances[0] if sdk.utterances else None
            if utt is None:
                continue
            text, after = utt
            if not partial_sent and segment >= after // 2:
                partial_sent = True
                words = text.split()
                self.recognizing.fire(
                    _recognition_evt(
                        " ".join(words[: max(1, len(words) // 2)]), ResultReason.RecognizingSpeech
                    )
                )
            if segment >= after:
                with sdk.lock:
                    if sdk.utterances and sdk.utterances[0] == utt:
                        sdk.utterances.pop(0)
                self.recognized.fire(_recognition_evt(text, ResultReason.RecognizedSpeech))
                segment = 0
                partial_sent = False
        self.session_stopped.fire(SimpleNamespace(session_id=f"s{self.index}"))


class _Synthesizer:
    def __init__(
        self, sdk: FakeSpeechSdk, speech_config: _SpeechConfig, audio_config: Any = None
    ) -> None:
        self.sdk = sdk
        self.config = speech_config
        self.audio_config = audio_config
        self.synthesizing = _Signal()
        self.synthesis_started = _Signal()
        self.synthesis_completed = _Signal()
        self.synthesis_canceled = _Signal()
        self.synthesis_word_boundary = _Signal()
        self.texts: list[str] = []
        self.stops = 0
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []
        sdk.synthesizers.append(self)

    def speak_text_async(self, text: str) -> _ResultFuture:
        self.texts.append(text)
        self._stop.clear()
        t = threading.Thread(target=self._work, args=(text,), name="fake-azure-synth", daemon=True)
        self.threads.append(t)
        t.start()
        return _ResultFuture(lambda: t.join(10))

    def stop_speaking_async(self) -> _ResultFuture:
        self.stops += 1
        self._stop.set()
        return _ResultFuture()

    def _work(self, text: str) -> None:
        sdk = self.sdk
        plan = sdk.synth_plan
        audio = sdk.audio_for(text)
        sdk.synth_audio.append(audio)
        self.synthesis_started.fire(SimpleNamespace(result=SimpleNamespace(audio_data=b"")))
        sent = 0
        for i in range(0, len(audio), sdk.synth_chunk_bytes):
            if self._stop.is_set():
                self.synthesis_canceled.fire(
                    self._canceled(
                        CancellationReason.CancelledByUser, CancellationErrorCode.NoError
                    )
                )
                return
            if plan.fail_after_bytes is not None and sent >= plan.fail_after_bytes:
                self.synthesis_canceled.fire(
                    self._canceled(CancellationReason.Error, plan.fail_code)
                )
                return
            if plan.stall_after_bytes is not None and sent >= plan.stall_after_bytes:
                self._stop.wait(10)
                return
            chunk = audio[i : i + sdk.synth_chunk_bytes]
            self.synthesizing.fire(
                SimpleNamespace(
                    result=SimpleNamespace(audio_data=chunk, reason=ResultReason.SynthesizingAudio)
                )
            )
            sent += len(chunk)
            if sdk.synth_chunk_interval:
                time.sleep(sdk.synth_chunk_interval)
        self.synthesis_completed.fire(
            SimpleNamespace(
                result=SimpleNamespace(
                    audio_data=audio, reason=ResultReason.SynthesizingAudioCompleted
                )
            )
        )

    @staticmethod
    def _canceled(reason: CancellationReason, code: CancellationErrorCode) -> Any:
        details = SimpleNamespace(
            reason=reason, error_code=code, error_details=f"{code.name} (fake)"
        )
        return SimpleNamespace(result=SimpleNamespace(audio_data=b"", cancellation_details=details))


def _default_synth_audio(text: str) -> bytes:
    return tone_ulaw(523.0, max(200.0, 60.0 * len(text)), level_dbfs=-22.0)


@dataclass(eq=False)
class FakeSpeechSdk:
    """A stand-in for the ``azure.cognitiveservices.speech`` module, with a script."""

    utterances: list[tuple[str, int]] = field(default_factory=list)  # (text, after_bytes)
    recognizer_plans: list[RecognizerPlan] = field(default_factory=list)
    synth_plan: SynthPlan = field(default_factory=SynthPlan)
    synth_chunk_bytes: int = 800
    synth_chunk_interval: float = 0.0
    audio_for: Callable[[str], bytes] = _default_synth_audio
    recognizers: list[_Recognizer] = field(default_factory=list)
    synthesizers: list[_Synthesizer] = field(default_factory=list)
    synth_audio: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def module(self) -> types.ModuleType:
        """The module object to put in ``sys.modules``."""
        mod = types.ModuleType(SDK_NAME)
        mod.audio = SimpleNamespace(  # type: ignore[attr-defined]
            AudioStreamFormat=_AudioStreamFormat,
            PushAudioInputStream=_PushStream,
            AudioConfig=_AudioConfig,
            AudioStreamWaveFormat=AudioStreamWaveFormat,
        )
        mod.AudioStreamWaveFormat = AudioStreamWaveFormat  # type: ignore[attr-defined]
        mod.SpeechConfig = _SpeechConfig  # type: ignore[attr-defined]
        mod.PropertyId = PropertyId  # type: ignore[attr-defined]
        mod.ResultReason = ResultReason  # type: ignore[attr-defined]
        mod.CancellationReason = CancellationReason  # type: ignore[attr-defined]
        mod.CancellationErrorCode = CancellationErrorCode  # type: ignore[attr-defined]
        mod.SpeechSynthesisOutputFormat = SpeechSynthesisOutputFormat  # type: ignore[attr-defined]
        mod.SpeechRecognizer = lambda speech_config, audio_config: _Recognizer(  # type: ignore[attr-defined]
            self, speech_config, audio_config
        )
        mod.SpeechSynthesizer = lambda speech_config, audio_config=None: _Synthesizer(  # type: ignore[attr-defined]
            self, speech_config, audio_config
        )
        return mod

    def install(self, monkeypatch: Any) -> FakeSpeechSdk:
        """Make ``import azure.cognitiveservices.speech`` return this fake (undone by the patcher).

        ``monkeypatch`` is pytest's fixture, or anything with its ``setitem``.
        """
        monkeypatch.setitem(sys.modules, SDK_NAME, self.module())
        return self

    def live_threads(self) -> list[threading.Thread]:
        """Recognizer threads still running."""
        return [r.thread for r in self.recognizers if r.thread is not None and r.thread.is_alive()]
