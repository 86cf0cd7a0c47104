"""What a provider and call control must look like (Protocols, no implementation).

The session, the providers and the server layer meet here, so none of them imports another
to learn a shape. ``voice_runtime.providers`` and the top level re-export
:class:`SttProvider` and :class:`TtsProvider` (their 0.1.x homes).

Every provider (vendors, offline engines, mocks) follows the same behaviour:

* STT: ``on_committed(text)`` for each final utterance, ``on_recognizing(text)`` for partial
  text (or speech onset), ``on_error(message)`` when the provider gives up; while the agent
  speaks (``set_speaking(True)``) and for 0.4 s after, committed text is discarded as echo
  and partial text is not reported. ``start(inbound)`` returns at once; ``stop()`` releases
  every task and socket.
* TTS: ``speak(text, session, stop_event=None)`` streams μ-law audio into the session and
  returns when the caller has heard it (the ``tts_complete`` mark, up to 30 s). The result
  dict always has ``last_spoken``, ``interrupted``, ``call_disconnected``, ``heard_ms`` and
  ``audio_ms``; ``error`` is added only when synthesis failed (``on_error`` is called too).
  ``speak_async`` (optional, :class:`AsyncTtsProvider`) is its awaitable twin with the same
  result. Every built-in provider implements ``speak_async`` natively (no thread waits while
  the caller listens) and its ``speak`` runs that coroutine;
  :func:`voice_runtime.providers.base.speak_async` speaks with any provider from a coroutine
  and runs a provider without one (0.1.x style) in a thread of its own.
* Call control (``session.control``): hang up, transfer, DTMF and recording of the live call;
  sync methods block, each has an ``*_async`` twin.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

__all__ = [
    "AsyncTtsProvider",
    "CallControlProtocol",
    "SmsTransport",
    "SttProvider",
    "TtsProvider",
]


@runtime_checkable
class SttProvider(Protocol):
    """Structural interface of speech-to-text providers."""

    on_committed: Callable[[str], None] | None
    on_recognizing: Callable[[str], None] | None
    on_error: Callable[[str], None] | None

    def set_speaking(self, speaking: bool) -> None:
        """Tell the provider whether the agent is speaking (echo discard)."""
        ...

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start consuming caller μ-law frames; return at once."""
        ...

    async def stop(self) -> None:
        """Stop and release every task and socket."""
        ...


@runtime_checkable
class TtsProvider(Protocol):
    """Structural interface of text-to-speech providers."""

    on_error: Callable[[str], None] | None

    def speak(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = ...,
    ) -> dict[str, Any]:
        """Speak ``text`` on the call; return the result dict described in the module doc."""
        ...


@runtime_checkable
class AsyncTtsProvider(TtsProvider, Protocol):
    """A TTS provider that can also be awaited (every built-in one; optional for others)."""

    async def speak_async(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = ...,
    ) -> dict[str, Any]:
        """Awaitable twin of :meth:`speak`: the same audio and the same result dict."""
        ...


@runtime_checkable
class SmsTransport(Protocol):
    """Structural interface of what ``get_sms_transport()`` returns (Twilio's is a module)."""

    def send_sms(
        self,
        to: str,
        body: str,
        *,
        media_urls: Sequence[str] | None = ...,
        messaging_service_sid: str | None = ...,
        status_callback: str | None = ...,
        from_: str | None = ...,
    ) -> dict[str, str]:
        """Send a message; return ``{"message_sid", "status", "to"}``."""
        ...

    async def send_sms_async(
        self,
        to: str,
        body: str,
        *,
        media_urls: Sequence[str] | None = ...,
        messaging_service_sid: str | None = ...,
        status_callback: str | None = ...,
        from_: str | None = ...,
    ) -> dict[str, str]:
        """Async twin of :meth:`send_sms`."""
        ...


@runtime_checkable
class CallControlProtocol(Protocol):
    """Structural interface of ``session.control`` (Twilio's is ``transports.call_control``)."""

    def hangup(self, *, after_playback: bool = False) -> None:
        """End the call (after the queued audio played, when asked)."""
        ...

    def transfer(self, target: str, *, caller_id: str | None = None) -> str:
        """Transfer the call to ``target``; return the new call's SID or status."""
        ...

    async def transfer_async(self, target: str, *, caller_id: str | None = None) -> str:
        """Async twin of :meth:`transfer`."""
        ...

    def send_digits(self, digits: str) -> str:
        """Play DTMF ``digits`` on the call."""
        ...

    async def send_digits_async(self, digits: str) -> str:
        """Async twin of :meth:`send_digits`."""
        ...

    def start_recording(self, **options: Any) -> str:
        """Start recording the call; return the recording SID."""
        ...

    async def start_recording_async(self, **options: Any) -> str:
        """Async twin of :meth:`start_recording`."""
        ...

    def stop_recording(self, recording_sid: str | None = None) -> None:
        """Stop a recording (the last one started when None)."""
        ...

    async def stop_recording_async(self, recording_sid: str | None = None) -> None:
        """Async twin of :meth:`stop_recording`."""
        ...
