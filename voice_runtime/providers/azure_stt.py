"""Azure Speech continuous recognition from the call's μ-law, through the Speech SDK.

:class:`AzurePersistentStt` pushes the caller's μ-law 8 kHz frames unchanged into a
``PushAudioInputStream`` (``bits_per_sample=8``, ``MULAW``) and runs continuous
recognition: ``recognizing`` → ``on_recognizing``, ``recognized`` → ``on_committed``,
both through the shared echo discard.

Threading: the SDK fires its events on its own native threads. Each handler only copies the
event's fields and hands them to the event loop with ``call_soon_threadsafe``; everything
else happens on the loop. The SDK's blocking calls (``start_…().get()``,
``stop_continuous_recognition``) run in worker threads via ``asyncio.to_thread``, never on
the loop thread.

Faults: ``canceled`` with reason ``Error`` reconnects (a new recognizer and push stream) with
exponential backoff like the ElevenLabs STT; caller audio that arrives meanwhile, and the
audio of the utterance in progress, is kept (bounded) and pushed into the new stream.
Authentication, quota (``Forbidden``) and bad-request errors call ``on_error`` at once;
exhausted attempts call ``on_error`` too.

The SDK is imported when the provider is constructed; without it the ImportError names the
extra to install (``pip install "voice-runtime[azure]"``). The key is read at construction
(argument, else AZURE_SPEECH_KEY); without one the provider constructs with a warning and
``start()`` raises :class:`~voice_runtime.errors.MissingCredentialError`.

The 0.1.x module constants ``AZURE_SPEECH_KEY`` and ``AZURE_SPEECH_REGION`` read the current
setting; a value set on this module is used by providers constructed afterwards, unless an
argument is given. ``ECHO_DISCARD_WINDOW_S`` (0.4 s) is read each time the agent stops
speaking, unless ``echo_tail_s`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
import time
from types import ModuleType
from typing import Any

from voice_runtime.config import ModuleConstants, settings
from voice_runtime.credentials import CREDENTIAL_VARIABLES, require_credential, resolve_credential
from voice_runtime.logutil import clip, describe_error
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import HEALTHY_AFTER_S, EndKind, ReconnectingStt

logger = logging.getLogger(__name__)

SDK_MODULE = "azure.cognitiveservices.speech"
INSTALL_HINT = 'pip install "voice-runtime[azure]"'
#: CancellationErrorCode names that no reconnect can fix.
TERMINAL_CODES = frozenset({"AuthenticationFailure", "Forbidden", "BadRequest"})

ECHO_DISCARD_WINDOW_S = 0.4
"""Seconds after the agent stops speaking during which recognized text is dropped as echo."""

__all__ = ["ECHO_DISCARD_WINDOW_S", "AzurePersistentStt", "import_speech_sdk"]

_KEY_WHAT = "Azure Speech key"
_CONSTANTS = ModuleConstants(
    __name__,
    {"AZURE_SPEECH_KEY": "azure_speech_key", "AZURE_SPEECH_REGION": "azure_speech_region"},
)


def import_speech_sdk() -> ModuleType:
    """Import the Azure Speech SDK or raise an ImportError naming the ``azure`` extra."""
    try:
        return importlib.import_module(SDK_MODULE)
    except ImportError as exc:
        raise ImportError(
            f"the Azure Speech SDK is needed for the Azure providers; install it with: "
            f"{INSTALL_HINT}",
            name=SDK_MODULE,
        ) from exc


def __getattr__(name: str) -> Any:
    # ``speechsdk`` was this module's import of the SDK in 0.1.x, and tests patch it.
    if name == "speechsdk":
        return import_speech_sdk()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sdk_now() -> Any:
    """The SDK to use now: a test's patch of this module's ``speechsdk`` wins."""
    return globals().get("speechsdk") or import_speech_sdk()


def _echo_window() -> float:
    return ECHO_DISCARD_WINDOW_S  # the module global now, so a patch of it takes effect


def _name(value: Any) -> str:
    """The member name of an SDK enum value (``CancellationReason.Error`` → ``Error``)."""
    return str(getattr(value, "name", value)).rsplit(".", 1)[-1]


class _Recognition:
    """One recognizer with its push stream; events tagged with its generation."""

    __slots__ = ("generation", "opened", "push", "recognizer")

    def __init__(self, generation: int, recognizer: Any, push: Any) -> None:
        self.generation = generation
        self.recognizer = recognizer
        self.push = push
        self.opened = time.monotonic()


def _stop_recognition(current: _Recognition) -> None:
    """Close the push stream and stop the recognizer (blocking: worker threads only)."""
    with contextlib.suppress(Exception):
        current.push.close()
    with contextlib.suppress(Exception):
        current.recognizer.stop_continuous_recognition_async().get()


def _stop_late(opening: asyncio.Future[_Recognition]) -> None:
    """Stop a recognizer whose start finished after we stopped waiting for it."""
    if opening.cancelled() or opening.exception() is not None:
        return
    threading.Thread(
        target=_stop_recognition, args=(opening.result(),), name="azure-stt-late-stop", daemon=True
    ).start()


class AzurePersistentStt(ReconnectingStt):
    """Azure continuous recognition for the whole call, reconnecting without losing audio."""

    capabilities = Capabilities(native_ulaw=True, interim_results=True, streaming=True)
    _task_name = "azure-stt"
    _logger = logger
    _connect_after_input_end = False  # once the caller hung up, no new recognizer opens

    def __init__(
        self,
        subscription_key: str | None = None,
        region: str | None = None,
        language_code: str = "fi-FI",
        silence_timeout_ms: int = 1500,
        *,
        endpoint: str | None = None,
        max_reconnects: int = 3,
        reconnect_base_delay: float = 1.0,
        reconnect_max_delay: float = 30.0,
        buffer_ms: float = 20_000.0,
        echo_tail_s: float | None = None,
        sdk_call_timeout: float = 10.0,
    ) -> None:
        cfg = settings()
        key = resolve_credential(
            subscription_key,
            CREDENTIAL_VARIABLES["azure"],
            what=_KEY_WHAT,
            required=False,
            lookup=lambda name: _CONSTANTS.value(name, cfg),
        )
        super().__init__(
            max_reconnects=max_reconnects,
            reconnect_base_delay=reconnect_base_delay,
            reconnect_max_delay=reconnect_max_delay,
            buffer_ms=buffer_ms,
            echo_tail_s=_echo_window if echo_tail_s is None else echo_tail_s,
        )
        _sdk_now()  # without the SDK, fail here with the install hint
        self._key = key
        self.region = region or _CONSTANTS.value("AZURE_SPEECH_REGION", cfg)
        self.endpoint = endpoint
        self.language_code = language_code
        self.silence_timeout_ms = silence_timeout_ms
        self.sdk_call_timeout = sdk_call_timeout
        self._current: _Recognition | None = None
        self._generation = 0
        self._ended: asyncio.Future[tuple[EndKind, str]] | None = None

    def _check_credentials(self) -> None:
        require_credential(self._key, CREDENTIAL_VARIABLES["azure"], what=_KEY_WHAT)

    # ------------------------------------------------------------------ audio in

    def _close_input(self) -> None:
        current = self._current
        if current is not None:
            # End of stream: the SDK sends its last result, then stops the session.
            with contextlib.suppress(Exception):
                current.push.close()
        else:
            self._finish_current("end_of_input", "")

    def _flush(self) -> None:
        """Write buffered audio into the live push stream (cheap; safe on the loop)."""
        current = self._current
        buffer = self._buffer
        if current is None or buffer.pending_bytes == 0:
            return
        frames = buffer.peek(buffer.pending_bytes)
        try:
            current.push.write(b"".join(frames))
        except Exception:
            logger.warning("Azure push stream write failed; reconnecting", exc_info=True)
            self._finish_current("fatal", "push_write_failed")
            return
        buffer.ack(len(frames))

    # ------------------------------------------------------------------ recognizers

    async def _session_once(self) -> tuple[EndKind, str]:
        """Open a recognizer, feed it until it ends, tear it down; return why it ended."""
        kind, reason = await self._recognize_once()
        if kind == "fatal" and not self._stopping:
            logger.warning("Azure STT recognition lost: %s", clip(reason), extra={"reason": reason})
        return kind, reason

    async def _recognize_once(self) -> tuple[EndKind, str]:
        """One recognizer from start to teardown; why it ended."""
        loop = asyncio.get_running_loop()
        self._generation += 1
        self._ended = loop.create_future()
        opening = loop.run_in_executor(None, self._open, self._generation)
        try:
            current = await asyncio.wait_for(asyncio.shield(opening), self.sdk_call_timeout)
        except asyncio.CancelledError:
            opening.add_done_callback(_stop_late)
            raise
        except Exception as exc:
            opening.add_done_callback(_stop_late)
            logger.warning(
                "Azure STT failed to start: %s",
                describe_error(exc),
                extra={"error": type(exc).__name__},
            )
            return "fatal", f"start_failed: {type(exc).__name__}"
        if self._ended.done():
            # Canceled before the start call returned.
            self._current = current
            kind, reason = self._ended.result()
        else:
            self._current = current
            self.connections += 1
            self._flush()
            if self._input_ended:
                with contextlib.suppress(Exception):
                    current.push.close()
            kind, reason = await self._ended
        if time.monotonic() - current.opened >= HEALTHY_AFTER_S:
            self._healthy = True
        if self._current is current:
            self._current = None
        await self._teardown(current)
        return kind, reason

    def _open(self, generation: int) -> _Recognition:
        """Build and start a recognizer (worker thread: the start call blocks)."""
        sdk = _sdk_now()
        fmt = sdk.audio.AudioStreamFormat(
            samples_per_second=8000,
            bits_per_sample=8,
            channels=1,
            wave_stream_format=sdk.audio.AudioStreamWaveFormat.MULAW,
        )
        push = sdk.audio.PushAudioInputStream(stream_format=fmt)
        if self.endpoint:
            config = sdk.SpeechConfig(subscription=self._key, endpoint=self.endpoint)
        else:
            config = sdk.SpeechConfig(subscription=self._key, region=self.region)
        config.speech_recognition_language = self.language_code
        config.set_property(
            sdk.PropertyId.SpeechServiceConnection_EndSilenceTimeoutMs,
            str(self.silence_timeout_ms),
        )
        recognizer = sdk.SpeechRecognizer(
            speech_config=config, audio_config=sdk.audio.AudioConfig(stream=push)
        )
        self._connect_events(recognizer, generation)
        recognizer.start_continuous_recognition_async().get()
        return _Recognition(generation, recognizer, push)

    def _connect_events(self, recognizer: Any, generation: int) -> None:
        loop = self._loop
        assert loop is not None

        def post(*args: Any) -> None:
            # SDK thread: hand over plain values, never touch provider state here.
            try:
                loop.call_soon_threadsafe(self._on_event, generation, *args)
            except RuntimeError:
                pass  # the loop is closed: the call is over

        def on_recognizing(evt: Any) -> None:
            post("partial", evt.result.text or "")

        def on_recognized(evt: Any) -> None:
            post("final", evt.result.text or "")

        def on_canceled(evt: Any) -> None:
            details = evt.cancellation_details
            post(
                "canceled",
                _name(details.reason),
                _name(getattr(details, "code", "")),
                str(getattr(details, "error_details", "") or ""),
            )

        def on_stopped(evt: Any) -> None:
            post("stopped")

        recognizer.recognizing.connect(on_recognizing)
        recognizer.recognized.connect(on_recognized)
        recognizer.canceled.connect(on_canceled)
        recognizer.session_stopped.connect(on_stopped)

    def _on_event(self, generation: int, kind: str, *args: str) -> None:
        """Handle one SDK event on the loop; events of replaced recognizers are ignored."""
        if generation != self._generation or self._stopping:
            return
        if kind == "partial":
            self._healthy = True
            text = args[0].strip()
            if text and self._echo.allow_partial():
                self._emit(self.on_recognizing, text)
        elif kind == "final":
            self._buffer.committed()
            text = args[0].strip()
            if not text:
                return  # NoMatch
            self._healthy = True
            if not self._echo.allow_committed():
                logger.info("recognized text discarded as echo")
                return
            self._committed(text)
        elif kind == "canceled":
            reason, code, _details = args
            if reason == "Error":
                logger.warning("Azure STT canceled: %s", clip(code), extra={"error_code": code})
                terminal = code in TERMINAL_CODES
                self._finish_current("terminal" if terminal else "fatal", code or "error")
            elif reason == "EndOfStream":
                self._finish_current("stopped", "end_of_stream")
        elif kind == "stopped":
            if self._input_ended:
                self._finish_current("stopped", "session_stopped")
            else:
                self._finish_current("fatal", "session_stopped")

    def _finish_current(self, kind: EndKind, reason: str) -> None:
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result((kind, reason))

    async def _teardown(self, current: _Recognition) -> None:
        """Stop a recognizer and close its stream in a worker thread, within a deadline."""
        try:
            await asyncio.wait_for(
                asyncio.to_thread(_stop_recognition, current), self.sdk_call_timeout
            )
        except TimeoutError:
            logger.warning("Azure recognizer did not stop in time")

    async def _disconnect(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            await self._teardown(current)
