"""Small frozen values shared by the session, transports and providers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """Encoding of one audio stream."""

    encoding: str = "audio/x-mulaw"
    sample_rate: int = 8000
    channels: int = 1

    def bytes_per_ms(self) -> float:
        """Bytes of this format per millisecond of audio."""
        width = 1 if self.encoding in ("audio/x-mulaw", "audio/x-alaw") else 2
        return self.sample_rate * width * self.channels / 1000.0


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What the ``start`` message of a media stream told us about the call."""

    call_sid: str
    stream_sid: str
    account_sid: str | None = None
    tracks: tuple[str, ...] = ("inbound",)
    custom_parameters: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    media_format: MediaFormat = field(default_factory=MediaFormat)

    @property
    def caller_number(self) -> str | None:
        """The caller's number when the stream's parameters carry it."""
        for key in ("caller_number", "From", "from", "caller"):
            value = self.custom_parameters.get(key)
            if value:
                return value
        return None


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """A lifecycle event of a call (status callback, machine detection, stream events)."""

    kind: str
    data: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)


__all__ = ["CallInfo", "MediaFormat", "SessionEvent"]
