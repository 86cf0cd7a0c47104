"""The typed events every realtime agent emits, whatever its vendor.

Each event is a small frozen dataclass. Agents translate their vendor's wire messages into
these; the bridge and consumer callbacks only ever see these. Audio is always μ-law 8 kHz
(the call leg's format), so a consumer never resamples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})

__all__ = [
    "AgentError",
    "AgentEvent",
    "AgentFailover",
    "AssistantAudio",
    "AssistantText",
    "AssistantTurnEnd",
    "SessionClosed",
    "SessionOpened",
    "ToolCall",
    "ToolCallCancelled",
    "Usage",
    "UserSpeechStarted",
    "UserSpeechStopped",
    "UserTranscript",
]


@dataclass(frozen=True, slots=True)
class SessionOpened:
    """The vendor session is connected and configured."""

    provider: str
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The vendor session ended; no event follows this one from the same agent."""

    provider: str
    reason: str = "closed"
    code: int | None = None


@dataclass(frozen=True, slots=True)
class UserSpeechStarted:
    """The vendor heard the caller start speaking (the barge-in signal).

    ``interrupted_item_id`` names the assistant item the vendor says was cut off, when it
    says so (Gemini ``interrupted``, ElevenLabs ``interruption``);
    ``interrupted_response_id`` the response the vendor cancels (OpenAI-style server VAD),
    whose audio still in flight must not be played.
    """

    item_id: str | None = None
    audio_start_ms: float | None = None
    interrupted_item_id: str | None = None
    interrupted_response_id: str | None = None


@dataclass(frozen=True, slots=True)
class UserSpeechStopped:
    """The vendor heard the caller stop speaking."""

    item_id: str | None = None
    audio_end_ms: float | None = None


@dataclass(frozen=True, slots=True)
class UserTranscript:
    """Text of what the caller said: a partial (``final=False``) or the final transcript."""

    text: str
    final: bool
    item_id: str | None = None


@dataclass(frozen=True, slots=True)
class AssistantText:
    """Assistant text: a delta (``final=False``) or the whole text of the item (``final=True``).

    In audio mode this is the transcript of what the assistant says.
    """

    text: str
    final: bool = False
    item_id: str | None = None


@dataclass(frozen=True, slots=True)
class AssistantAudio:
    """A chunk of assistant speech as μ-law 8 kHz mono bytes.

    ``received_at`` is the event loop's clock when the vendor frame arrived (for latency
    measurements); it takes no part in equality.
    """

    audio: bytes
    item_id: str | None = None
    response_id: str | None = None
    received_at: float = field(default=0.0, compare=False)

    @property
    def duration_ms(self) -> float:
        """Milliseconds of audio in this chunk."""
        return len(self.audio) / 8.0


@dataclass(frozen=True, slots=True)
class AssistantTurnEnd:
    """The assistant finished a response.

    ``status`` is completed, cancelled, failed or incomplete.
    """

    response_id: str | None = None
    item_id: str | None = None
    status: str = "completed"


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asks for a server-side tool to run; answer with ``send_tool_result``."""

    call_id: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    raw_arguments: str = ""
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallCancelled:
    """The vendor withdrew tool calls (e.g. the caller interrupted); drop their results."""

    call_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage normalised across vendors; add two with ``+``.

    ``input_tokens``/``output_tokens`` are totals; the ``*_audio_*``/``*_text_*`` fields
    split them where the vendor reports the split (zero where it does not).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    input_audio_tokens: int = 0
    input_text_tokens: int = 0
    output_audio_tokens: int = 0
    output_text_tokens: int = 0
    cached_input_tokens: int = 0
    provider: str = ""

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: object) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        provider = self.provider if self.provider == other.provider else ""
        if not self.provider:
            provider = other.provider
        elif not other.provider:
            provider = self.provider
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            input_audio_tokens=self.input_audio_tokens + other.input_audio_tokens,
            input_text_tokens=self.input_text_tokens + other.input_text_tokens,
            output_audio_tokens=self.output_audio_tokens + other.output_audio_tokens,
            output_text_tokens=self.output_text_tokens + other.output_text_tokens,
            cached_input_tokens=self.cached_input_tokens + other.cached_input_tokens,
            provider=provider,
        )

    def as_dict(self) -> dict[str, int | str]:
        """The figures as a plain dict (for logs and billing records)."""
        return {
            "provider": self.provider,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "input_audio_tokens": self.input_audio_tokens,
            "input_text_tokens": self.input_text_tokens,
            "output_audio_tokens": self.output_audio_tokens,
            "output_text_tokens": self.output_text_tokens,
            "cached_input_tokens": self.cached_input_tokens,
        }


@dataclass(frozen=True, slots=True)
class AgentError:
    """A vendor error. ``fatal`` means the session is gone; otherwise it carries on."""

    message: str
    fatal: bool = False
    code: str | None = None
    retryable: bool = False
    provider: str = ""


@dataclass(frozen=True, slots=True)
class AgentFailover:
    """A fallback client replaced a failed vendor session with the next provider's."""

    from_provider: str
    to_provider: str
    reason: str = ""


AgentEvent = (
    SessionOpened
    | SessionClosed
    | UserSpeechStarted
    | UserSpeechStopped
    | UserTranscript
    | AssistantText
    | AssistantAudio
    | AssistantTurnEnd
    | ToolCall
    | ToolCallCancelled
    | Usage
    | AgentError
    | AgentFailover
)
