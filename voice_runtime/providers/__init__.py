"""Speech provider contracts: :class:`SttProvider` and :class:`TtsProvider`.

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
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

__all__ = ["Capabilities", "SttProvider", "TtsProvider"]


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do, declared as data."""

    native_ulaw: bool = False
    interim_results: bool = False
    streaming: bool = True
    needs_network: bool = True


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
