"""The realtime agent protocol every vendor implements, and the options they share.

An agent is one speech-to-speech session with a vendor. It lives on one event loop (the
call's). All its methods are coroutines that are idempotent and harmless after
:meth:`RealtimeAgent.close`: calling ``close`` twice, pushing audio after the vendor hung
up, or cancelling when nothing is playing does nothing and raises nothing. Only
:meth:`RealtimeAgent.start` raises, when the vendor cannot be reached or refuses the
session (:class:`~voice_runtime.errors.ProviderError`, with ``retryable`` set for
connection trouble).

Audio in and out is μ-law 8 kHz, the call leg's format; each vendor module converts when
its vendor needs something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from voice_runtime.realtime.events import AgentEvent
from voice_runtime.realtime.tools import Tool, ToolRegistry, ToolSpec

__all__ = ["AgentOptions", "RealtimeAgent"]

_MODALITIES = frozenset({"audio", "text"})


@dataclass(frozen=True)
class AgentOptions:
    """What to ask of the vendor session; ``None`` leaves the vendor's default.

    * ``output_modalities``: ``("audio",)`` (speech plus its transcript) or ``("text",)``.
    * ``server_vad``: the vendor detects turns (and barge-in); when False the host calls
      ``commit()`` at the end of each caller turn.
    * ``greeting``: what the agent says first; None waits for the caller.
    * ``base_url``: override of the vendor endpoint (``ws(s)://`` or ``http(s)://``), for
      proxies, regional hosts and local fakes.
    * ``extra``: vendor-specific fields merged (deeply) into the session configuration.
    """

    instructions: str | None = None
    voice: str | None = None
    temperature: float | None = None
    output_modalities: tuple[str, ...] = ("audio",)
    server_vad: bool = True
    tools: tuple[ToolSpec, ...] = ()
    base_url: str | None = None
    model: str | None = None
    greeting: str | None = None
    language: str | None = None
    transcribe_input: bool = True
    vad_threshold: float | None = None
    silence_duration_ms: int | None = None
    prefix_padding_ms: int | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        mods = tuple(self.output_modalities)
        if not mods or not set(mods) <= _MODALITIES:
            raise ValueError(f"output_modalities must be 'audio' and/or 'text', got {mods!r}")
        object.__setattr__(self, "output_modalities", mods)
        object.__setattr__(self, "tools", _specs(self.tools))
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be within 0..2, got {self.temperature}")

    @property
    def audio_out(self) -> bool:
        """True when the agent should speak (audio output requested)."""
        return "audio" in self.output_modalities

    def replace(self, **changes: Any) -> AgentOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _specs(tools: Any) -> tuple[ToolSpec, ...]:
    if isinstance(tools, ToolRegistry):
        return tools.specs()
    items: Iterable[Any] = tools or ()
    return tuple(t.spec if isinstance(t, Tool) else t for t in items)


@runtime_checkable
class RealtimeAgent(Protocol):
    """One speech-to-speech session with a vendor (see the module docstring for the rules)."""

    @property
    def options(self) -> AgentOptions:
        """What the session was configured with (instructions, voice, tools, greeting)."""
        ...

    @property
    def provider(self) -> str:
        """The vendor's slug (``openai``, ``gemini``, ...)."""
        ...

    @property
    def supports_truncate(self) -> bool:
        """True when the vendor can be told how much of an item the caller heard."""
        ...

    @property
    def closed(self) -> bool:
        """True once the session has ended (closed by us or by the vendor)."""
        ...

    async def start(self) -> None:
        """Connect and configure the session; raises ProviderError when that fails."""
        ...

    async def push_audio(self, ulaw: bytes) -> None:
        """Send caller audio (μ-law 8 kHz)."""
        ...

    async def commit(self) -> None:
        """End the caller's turn now and ask for a response (client-side turn detection)."""
        ...

    async def cancel(self) -> None:
        """Stop the response being generated, if any."""
        ...

    async def update_instructions(self, instructions: str) -> None:
        """Change the system instructions for the rest of the call."""
        ...

    async def send_text(self, text: str) -> None:
        """Add a user text turn (e.g. a DTMF choice) and ask for a response."""
        ...

    async def send_tool_result(
        self, call_id: str, output: str, *, name: str | None = None, is_error: bool = False
    ) -> None:
        """Answer a :class:`~voice_runtime.realtime.events.ToolCall`."""
        ...

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Tell the vendor the caller heard only ``audio_end_ms`` of an assistant item."""
        ...

    async def close(self) -> None:
        """End the session and release its socket."""
        ...

    def events(self) -> AsyncIterator[AgentEvent]:
        """The session's events, ending after SessionClosed."""
        ...
