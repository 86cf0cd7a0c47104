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
extra to install (``pip install "voice-runtime[azure]"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from voice_runtime.config import settings
from voice_runtime.errors import MissingCredentialError
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import CallerAudioBuffer, EchoGate, backoff_delay

logger = logging.getLogger(__name__)

SDK_MODULE = "azure.cognitiveservices.speech"
INSTALL_HINT = 'pip install "voice-runtime[azure]"'
HEALTHY_AFTER_S = 5.0
#: CancellationErrorCode names that no reconnect can fix.
TERMINAL_CODES = frozenset({"AuthenticationFailure", "Forbidden", "BadRequest"})

__all__ = ["AzurePersistentStt", "import_speech_sdk"]


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


class AzurePersistentStt:
    """Azure continuous recognition for the whole call, reconnecting without losing audio."""

    capabilities = Capabilities(native_ulaw=True, interim_results=True, streaming=True)

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
        echo_tail_s: float = 0.4,
        sdk_call_timeout: float = 10.0,
    ) -> None:
        cfg = settings()
        key = subscription_key or cfg.azure_speech_key
        if not key:
            raise MissingCredentialError("AZURE_SPEECH_KEY", "Azure Speech key")
        self._sdk = import_speech_sdk()
        self._key = key
        self.region = region or cfg.azure_speech_region
        self.endpoint = endpoint
        self.language_code = language_code
        self.silence_timeout_ms = silence_timeout_ms
        self.max_reconnects = max_reconnects
        self.reconnect_base_delay = reconnect_base_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.sdk_call_timeout = sdk_call_timeout

        self.on_committed: Callable[[str], None] | None = None
        self.on_recognizing: Callable[[str], None] | None = None
        self.on_error: Callable[[str], None] | None = None

        self.connections = 0
        self.reconnects = 0
        self.failed = False
        self._echo = EchoGate(echo_tail_s)
        self._buffer = CallerAudioBuffer(buffer_ms)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: _Recognition | None = None
        self._generation = 0
        self._healthy = False
        self._ended: asyncio.Future[tuple[str, str]] | None = None
        self._input_ended = False
        self._stopping = False
        self._pump_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public API

    @property
    def running(self) -> bool:
        """True while the provider is connected or reconnecting (False once it gave up)."""
        return self._run_task is not None and not self._run_task.done()

    def set_speaking(self, speaking: bool) -> None:
        """Tell the provider whether the agent is speaking (echo discard)."""
        self._echo.set_speaking(speaking)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start reading caller audio and recognizing; returns at once."""
        if self._run_task is not None:
            raise RuntimeError("AzurePersistentStt.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._pump_task = asyncio.create_task(self._pump(inbound_queue), name="azure-stt-pump")
        self._run_task = asyncio.create_task(self._run(), name="azure-stt")

    async def stop(self) -> None:
        """Stop recognition, close the push stream and end every task; idempotent."""
        self._stopping = True
        tasks = [t for t in (self._run_task, self._pump_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        current, self._current = self._current, None
        if current is not None:
            await self._teardown(current)
        self._buffer.clear()

    # ------------------------------------------------------------------ audio in

    async def _pump(self, inbound: asyncio.Queue[bytes | None]) -> None:
        while True:
            frame = await inbound.get()
            if frame is None:
                self._input_ended = True
                current = self._current
                if current is not None:
                    # End of stream: the SDK sends its last result, then stops the session.
                    with contextlib.suppress(Exception):
                        current.push.close()
                else:
                    self._finish_current("end_of_input", "")
                return
            if self.failed:
                continue
            self._buffer.push(frame)
            self._flush()

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

    async def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stopping and not self._input_ended:
            if not first:
                if attempt >= self.max_reconnects:
                    self._give_up(f"reconnect_exhausted_after_{attempt}_attempts")
                    return
                delay = backoff_delay(attempt, self.reconnect_base_delay, self.reconnect_max_delay)
                logger.info(
                    "reconnecting Azure STT",
                    extra={"attempt": attempt + 1, "delay_s": round(delay, 3)},
                )
                await asyncio.sleep(delay)
                attempt += 1
                self.reconnects += 1
            first = False
            kind, reason = await self._recognize_once()
            if self._healthy:
                attempt = 0
            if kind in ("stopped", "end_of_input") or self._stopping:
                return
            if kind == "terminal":
                self._give_up(reason)
                return
            logger.warning("Azure STT recognition lost", extra={"reason": reason})

    async def _recognize_once(self) -> tuple[str, str]:
        """Open a recognizer, feed it until it ends, tear it down; return why it ended."""
        loop = asyncio.get_running_loop()
        self._generation += 1
        self._healthy = False
        self._ended = loop.create_future()
        self._buffer.rewind()
        opening = loop.run_in_executor(None, self._open, self._generation)
        try:
            current = await asyncio.wait_for(asyncio.shield(opening), self.sdk_call_timeout)
        except asyncio.CancelledError:
            opening.add_done_callback(_stop_late)
            raise
        except Exception as exc:
            opening.add_done_callback(_stop_late)
            logger.warning("Azure STT failed to start", extra={"error": type(exc).__name__})
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
        sdk = self._sdk
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
            self._emit(self.on_committed, text)
        elif kind == "canceled":
            reason, code, _details = args
            if reason == "Error":
                logger.warning("Azure STT canceled", extra={"error_code": code})
                terminal = code in TERMINAL_CODES
                self._finish_current("terminal" if terminal else "fatal", code or "error")
            elif reason == "EndOfStream":
                self._finish_current("stopped", "end_of_stream")
        elif kind == "stopped":
            if self._input_ended:
                self._finish_current("stopped", "session_stopped")
            else:
                self._finish_current("fatal", "session_stopped")

    def _finish_current(self, kind: str, reason: str) -> None:
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

    # ------------------------------------------------------------------ callbacks

    def _give_up(self, reason: str) -> None:
        self.failed = True
        self._buffer.clear()
        logger.error("Azure STT gave up", extra={"reason": reason})
        self._emit(self.on_error, reason)

    @staticmethod
    def _emit(callback: Callable[[str], None] | None, text: str) -> None:
        if callback is None:
            return
        try:
            callback(text)
        except Exception:
            logger.exception("STT callback failed")
