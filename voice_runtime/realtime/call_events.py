"""What a realtime agent's events mean on the call event stream (:mod:`voice_runtime.events`).

The bridge hands every agent event to :func:`publish`; barge-ins, tool runs and the agent's
start are published by the bridge where it knows their outcome and timing.
"""

from __future__ import annotations

import time
from typing import Any

from voice_runtime import events as ev
from voice_runtime.realtime.events import (
    AgentError,
    AgentFailover,
    Usage,
    UserSpeechStarted,
    UserSpeechStopped,
    UserTranscript,
)

__all__ = ["call_events_of", "connected", "publish", "tool_ran"]


def call_events_of(session: Any) -> ev.CallEvents | None:
    """The session's call event publisher, or None (duck-typed sessions have none)."""
    events = getattr(getattr(session, "port", None), "events", None)
    return events if isinstance(events, ev.CallEvents) else None


def connected(events: ev.CallEvents | None, provider: str, start: Any, t0: float) -> None:
    """The agent's ``start()`` (a done future, begun at ``t0``) connected or failed."""
    if events is not None:
        events.emit(
            ev.PROVIDER_CONNECT,
            vendor=provider,
            role="agent",
            ok=not start.cancelled() and start.exception() is None,
            attempt=0,
            duration_ms=(time.monotonic() - t0) * 1000.0,
        )


def tool_ran(events: ev.CallEvents | None, provider: str, name: str, result: Any) -> None:
    """A tool run ended with ``result`` (a ToolResult)."""
    if events is not None:
        events.emit(
            ev.TOOL_CALL,
            tool=name,
            ok=not result.is_error,
            duration_ms=result.duration_ms,
            vendor=provider,
        )


def publish(
    events: ev.CallEvents | None, event: Any, provider: str, *, played_ms: float = 0.0
) -> None:
    """Publish what ``event`` (an agent event, or ``"barge_in"``) says about the call."""
    if events is None or not events.active:
        return
    if event == "barge_in":
        events.emit(ev.BARGE_IN, source="agent", agent_played_ms=played_ms)
        return
    kind = type(event)
    if kind is UserSpeechStarted:
        events.emit(ev.CALLER_SPEECH_STARTED, source="agent", vendor=provider)
    elif kind is UserSpeechStopped:
        events.emit(ev.CALLER_SPEECH_ENDED, source="agent", vendor=provider)
    elif kind is UserTranscript:
        if event.final and event.text:
            events.emit(ev.TRANSCRIPT_COMMITTED, vendor=provider, text=event.text)
    elif kind is Usage:
        u: Usage = event
        events.emit(
            ev.USAGE,
            vendor=u.provider or provider,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            input_audio_tokens=u.input_audio_tokens,
            input_text_tokens=u.input_text_tokens,
            output_audio_tokens=u.output_audio_tokens,
            output_text_tokens=u.output_text_tokens,
            cached_input_tokens=u.cached_input_tokens,
        )
    elif kind is AgentError:
        err: AgentError = event
        # The code, never the message: a vendor's message may quote the caller.
        events.emit(
            ev.ERROR,
            vendor=err.provider or provider,
            role="agent",
            reason=err.code or ("fatal" if err.fatal else "error"),
            fatal=err.fatal,
        )
    elif kind is AgentFailover:
        fo: AgentFailover = event
        events.emit(ev.ERROR, vendor=fo.from_provider, role="agent", reason="failover")
        # The next provider took over on a connection of its own.
        events.emit(ev.PROVIDER_CONNECT, vendor=fo.to_provider, role="agent", ok=True, attempt=1)
