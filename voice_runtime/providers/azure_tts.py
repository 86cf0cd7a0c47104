"""Azure Speech synthesis into the call as native μ-law, through the Speech SDK.

:class:`AzureTTS` asks for ``Raw8Khz8BitMonoMULaw`` (headerless μ-law 8 kHz) and streams the
audio of the synthesizer's ``synthesizing`` events into the call as they fire. The events
come on SDK threads; they only hand the bytes to the loop ``speak_async`` awaits on
(``call_soon_threadsafe``), which queues them into the session: no thread of ours waits, and
nothing blocks an SDK thread or the event loop. The blocking ``speak`` runs ``speak_async``.
One synthesizer is reused across ``speak()`` calls; one that was stopped mid-way is replaced,
so its late events cannot leak into the next utterance.

The key is read at construction (argument, else AZURE_SPEECH_KEY); a provider built without
one logs a warning and raises :class:`~voice_runtime.errors.MissingCredentialError` from the
first ``speak()``. The 0.1.x module constants ``AZURE_SPEECH_KEY``, ``AZURE_SPEECH_REGION`` and
``AZURE_TTS_VOICE`` read the current setting; a value set on this module is used by providers
constructed afterwards, unless an argument is given.

``speak()`` returns the shared result dict (see :mod:`voice_runtime.providers`);
``stop_event`` is checked every 50 ms and stops the synthesis; a synthesis that is canceled
or falls silent for ``idle_timeout`` seconds becomes ``error`` plus ``on_error``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from voice_runtime._sync import call_on_loop
from voice_runtime.config import ModuleConstants, settings
from voice_runtime.credentials import CREDENTIAL_VARIABLES, require_credential, resolve_credential
from voice_runtime.errors import ProviderConnectionError, ProviderError
from voice_runtime.providers import Capabilities
from voice_runtime.providers.azure_stt import TERMINAL_CODES, _name, import_speech_sdk
from voice_runtime.providers.base import SpeakFromAsync, nothing_to_say, play_chunks_async

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

POLL_S = 0.05

__all__ = ["AzureTTS"]

_KEY_WHAT = "Azure Speech key"
_CONSTANTS = ModuleConstants(
    __name__,
    {
        "AZURE_SPEECH_KEY": "azure_speech_key",
        "AZURE_SPEECH_REGION": "azure_speech_region",
        "AZURE_TTS_VOICE": "azure_tts_voice",
    },
)


def __getattr__(name: str) -> Any:
    # ``speechsdk`` was this module's import of the SDK in 0.1.x, and tests patch it.
    if name == "speechsdk":
        return import_speech_sdk()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sdk_now() -> Any:
    """The SDK to use now: a test's patch of this module's ``speechsdk`` wins."""
    return globals().get("speechsdk") or import_speech_sdk()


class _Synth:
    """A synthesizer and the loop queue its events currently feed."""

    __slots__ = ("blocking", "dirty", "synthesizer", "target")

    def __init__(self, synthesizer: Any, *, blocking: bool = False) -> None:
        self.synthesizer = synthesizer
        self.target: tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[Any, ...]]] | None = None
        self.dirty = False
        # A stand-in SDK (a test's MagicMock) may never fire synthesis_completed: wait on
        # the future's get() instead, as 0.1.x did.
        self.blocking = blocking

    def post(self, item: tuple[Any, ...]) -> None:
        """Hand an event to the awaiting loop (any thread; inline on the loop's own)."""
        target = self.target
        if target is not None:
            loop, events = target
            call_on_loop(loop, events.put_nowait, item)


class AzureTTS(SpeakFromAsync):
    """Streams Azure neural speech (Raw8Khz8BitMonoMULaw) into a call."""

    capabilities = Capabilities(native_ulaw=True, streaming=True)

    def __init__(
        self,
        subscription_key: str | None = None,
        region: str | None = None,
        voice_name: str | None = None,
        *,
        endpoint: str | None = None,
        idle_timeout: float = 10.0,
        mark_timeout: float = 30.0,
    ) -> None:
        cfg = settings()
        key = resolve_credential(
            subscription_key,
            CREDENTIAL_VARIABLES["azure"],
            what=_KEY_WHAT,
            required=False,
            lookup=lambda name: _CONSTANTS.value(name, cfg),
        )
        _sdk_now()  # without the SDK, fail here with the install hint
        self._key = key
        self.region = region or _CONSTANTS.value("AZURE_SPEECH_REGION", cfg)
        self.voice_name = voice_name or _CONSTANTS.value("AZURE_TTS_VOICE", cfg)
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.mark_timeout = mark_timeout
        self.on_error: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._idle: list[_Synth] = []  # synthesizers not speaking now, reused

    def _acquire(self) -> _Synth:
        """An idle synthesizer, or a new one (concurrent calls each get their own)."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._new_synthesizer()

    def _release(self, synth: _Synth) -> None:
        if synth.dirty:
            self._retire(synth)
            return
        with self._lock:
            self._idle.append(synth)

    def _new_synthesizer(self) -> _Synth:
        sdk = _sdk_now()
        if self.endpoint:
            config = sdk.SpeechConfig(subscription=self._key, endpoint=self.endpoint)
        else:
            config = sdk.SpeechConfig(subscription=self._key, region=self.region)
        config.speech_synthesis_voice_name = self.voice_name
        config.set_speech_synthesis_output_format(
            sdk.SpeechSynthesisOutputFormat.Raw8Khz8BitMonoMULaw
        )
        synthesizer = sdk.SpeechSynthesizer(speech_config=config, audio_config=None)
        synth = _Synth(synthesizer, blocking=not isinstance(sdk, ModuleType))

        # These run on SDK threads: copy the data and hand it over, nothing more.
        def on_audio(evt: Any) -> None:
            data = evt.result.audio_data
            if data:
                synth.post(("audio", bytes(data)))

        def on_done(evt: Any) -> None:
            synth.post(("done",))

        def on_canceled(evt: Any) -> None:
            details = evt.result.cancellation_details
            synth.post(
                (
                    "canceled",
                    _name(getattr(details, "reason", "")),
                    _name(getattr(details, "error_code", "")),
                    str(getattr(details, "error_details", "") or ""),
                )
            )

        synthesizer.synthesizing.connect(on_audio)
        synthesizer.synthesis_completed.connect(on_done)
        synthesizer.synthesis_canceled.connect(on_canceled)
        return synth

    @staticmethod
    def _retire(synth: _Synth) -> None:
        synth.target = None
        for signal in ("synthesizing", "synthesis_completed", "synthesis_canceled"):
            try:
                getattr(synth.synthesizer, signal).disconnect_all()
            except Exception:
                logger.debug("disconnecting a synthesizer signal failed", exc_info=True)

    async def _chunks(
        self, synth: _Synth, text: str, stop_event: threading.Event | None
    ) -> AsyncIterator[bytes]:
        """Start the synthesis and yield its audio until done, stopped, failed or silent."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        synth.target = (loop, events)
        finished = False
        try:
            future = synth.synthesizer.speak_text_async(text)  # its events do the work
            if synth.blocking:
                future.get()  # a stand-in SDK (a test's MagicMock) answers at once
                events.put_nowait(("done",))
            last = loop.time()
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), POLL_S)
                except TimeoutError:
                    if stop_event is not None and stop_event.is_set():
                        return
                    if loop.time() - last > self.idle_timeout:
                        raise ProviderConnectionError(
                            f"no audio for {self.idle_timeout:.0f}s", provider="azure"
                        ) from None
                    continue
                last = loop.time()
                kind = item[0]
                if kind == "audio":
                    yield item[1]
                elif kind == "done":
                    finished = True
                    return
                else:
                    finished = True
                    _, reason, code, _details = item
                    raise ProviderError(
                        f"synthesis canceled ({reason}: {code or 'no code'})",
                        provider="azure",
                        retryable=code not in TERMINAL_CODES,
                        code=code or None,
                    )
        finally:
            synth.target = None
            if not finished:
                # Stopped or abandoned mid-way: late events must not reach the next utterance.
                synth.dirty = True
                try:
                    synth.synthesizer.stop_speaking_async()  # returns a future; not awaited
                except Exception:
                    logger.debug("stop_speaking_async failed", exc_info=True)

    async def speak_async(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Synthesise ``text`` into the call and await until the caller heard it (no thread)."""
        if not text.strip():
            return nothing_to_say(text, session)
        require_credential(self._key, CREDENTIAL_VARIABLES["azure"], what=_KEY_WHAT)
        synth: _Synth | None = None
        try:
            synth = self._acquire()
        except Exception as exc:
            chunks: Any = _raise(exc)
        else:
            chunks = self._chunks(synth, text, stop_event)
        try:
            return await play_chunks_async(
                text,
                session,
                chunks,
                stop_event,
                on_error=self.on_error,
                provider="azure",
                mark_timeout=self.mark_timeout,
            )
        finally:
            if synth is not None:
                self._release(synth)


async def _raise(exc: BaseException) -> AsyncIterator[bytes]:
    """An iterator that fails with ``exc`` (so setup errors take the shared error path)."""
    raise exc
    yield b""  # pragma: no cover - makes this a generator
