"""OpenTelemetry traces of a server's calls, built from its call event stream.

:class:`CallTracer` subscribes to an :class:`~voice_runtime.events.EventBus` and records

* a ``call`` span per call (from the stream's start to its end),
* a ``turn`` span per turn (caller speech to the first agent audio heard) with the children
  ``listen`` (the caller speaking), ``stt`` (speech end to committed transcript),
  ``response`` (transcript to the first agent audio queued) and ``heard`` (queued to the
  mark echo that says the caller heard it); a ``greeting`` span for the first audio heard
  before the caller said anything,
* a ``tool_call`` span per agent tool run and a ``provider.connect`` span per vendor
  connection,

with the event stream's own timings (spans are written when their end is known, with their
real start and end times). Barge-ins, clears and errors are span events of the call span.
Attributes carry codes and numbers only, never call content or phone numbers.

The OpenTelemetry API is a core dependency and does nothing until an SDK is configured; the
``metrics`` extra installs the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime import events as ev

if TYPE_CHECKING:
    from collections.abc import Callable

    from voice_runtime.events import CallEvent, EventBus

__all__ = ["CallTracer", "sdk_configured"]

# Calls whose end never came are forgotten beyond this many (a bound, not a policy).
_MAX_CALLS = 100_000


def sdk_configured() -> bool:
    """True when an OpenTelemetry SDK tracer provider is set globally."""
    try:
        from opentelemetry import trace
    except ImportError:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def _ns(wall: float) -> int:
    return int(wall * 1e9)


@dataclass
class _Turn:
    speech_start: float | None = None
    speech_end: float | None = None
    commit: float | None = None
    queued: float | None = None


@dataclass
class _CallTrace:
    span: Any
    context: Any
    turn: _Turn
    queued: float | None = None  # wall time the current response's first audio was queued


class CallTracer:
    """Writes the spans of calls from their events; ``tracer_provider`` defaults to the global."""

    def __init__(self, tracer_provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.tracer = trace.get_tracer("voice_runtime", tracer_provider=tracer_provider)
        self._calls: dict[str, _CallTrace] = {}
        self._handlers: dict[str, Callable[[CallEvent, _CallTrace], None]] = {
            ev.CALLER_SPEECH_STARTED: self._speech_started,
            ev.CALLER_SPEECH_ENDED: self._speech_ended,
            ev.TRANSCRIPT_COMMITTED: self._committed,
            ev.AGENT_AUDIO_QUEUED: self._queued,
            ev.AGENT_AUDIO_HEARD: self._heard,
            ev.TURN_LATENCY: self._turn_done,
            ev.TOOL_CALL: self._tool,
            ev.PROVIDER_CONNECT: self._connect,
            ev.BARGE_IN: self._span_event,
            ev.CLEAR: self._span_event,
            ev.ERROR: self._span_event,
            ev.DTMF: self._span_event,
        }

    def attach(self, bus: EventBus) -> Callable[[], None]:
        """Subscribe to ``bus``; returns the unsubscribe function."""
        return bus.subscribe(self.on_event)

    def on_event(self, event: CallEvent) -> None:
        """Record what ``event`` says (the bus calls this)."""
        kind = event.kind
        if kind == ev.CALL_STARTED:
            self._start(event)
            return
        call = self._calls.get(event.call_sid)
        if call is None:
            return
        if kind == ev.CALL_ENDED:
            self._end(event, call)
            return
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(event, call)

    # ------------------------------------------------------------------ the call

    def _start(self, event: CallEvent) -> None:
        if len(self._calls) >= _MAX_CALLS:
            self._calls.pop(next(iter(self._calls)))
        span = self.tracer.start_span(
            "call",
            start_time=_ns(event.wall),
            attributes={
                "twilio.call_sid": event.call_sid,
                "twilio.stream_sid": event.stream_sid or "",
            },
        )
        context = self._trace.set_span_in_context(span)
        self._calls[event.call_sid] = _CallTrace(span, context, _Turn())

    def _end(self, event: CallEvent, call: _CallTrace) -> None:
        del self._calls[event.call_sid]
        d = event.data
        span = call.span
        span.set_attribute("voice_runtime.end_reason", str(d.get("reason", "")))
        for key in ("frames_in", "frames_out", "inbound_dropped", "outbound_dropped", "clears"):
            if key in d:
                span.set_attribute(f"voice_runtime.{key}", int(d[key]))
        span.end(end_time=_ns(event.wall))

    def _child(
        self,
        name: str,
        parent: Any,
        start: float,
        end: float,
        *,
        failed: bool = False,
        **attrs: Any,
    ) -> None:
        span = self.tracer.start_span(
            name, context=parent, start_time=_ns(start), attributes=attrs or None
        )
        if failed:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end(end_time=_ns(max(start, end)))

    def _span_event(self, event: CallEvent, call: _CallTrace) -> None:
        # Numbers and codes only: the digit and any text stay out of the trace.
        attrs = {
            k: v for k, v in event.redacted().data.items() if isinstance(v, (str, bool, int, float))
        }
        call.span.add_event(event.kind, attributes=attrs, timestamp=_ns(event.wall))

    # ------------------------------------------------------------------ turns

    def _speech_started(self, event: CallEvent, call: _CallTrace) -> None:
        turn = call.turn
        if turn.speech_end is None:
            turn.speech_start = event.wall

    def _speech_ended(self, event: CallEvent, call: _CallTrace) -> None:
        turn = call.turn
        turn.speech_end, turn.commit, turn.queued = event.wall, None, None

    def _committed(self, event: CallEvent, call: _CallTrace) -> None:
        turn = call.turn
        if turn.speech_end is None:
            turn.speech_end = event.wall
        if turn.commit is None:
            turn.commit = event.wall

    def _queued(self, event: CallEvent, call: _CallTrace) -> None:
        call.queued = event.wall
        turn = call.turn
        if turn.speech_end is not None and turn.queued is None:
            turn.queued = event.wall

    def _heard(self, event: CallEvent, call: _CallTrace) -> None:
        if "since_start_ms" in event.data and call.turn.speech_end is None:
            start = call.queued if call.queued is not None else event.wall
            self._child("greeting", call.context, start, event.wall)

    def _turn_done(self, event: CallEvent, call: _CallTrace) -> None:
        turn, call.turn = call.turn, _Turn()
        end = turn.speech_end
        if end is None:
            return
        heard = event.wall
        begin = turn.speech_start if turn.speech_start is not None else end
        span = self.tracer.start_span(
            "turn",
            context=call.context,
            start_time=_ns(begin),
            attributes={
                "voice_runtime.turn_latency_ms": float(event.data.get("total_ms", 0.0)),
            },
        )
        parent = self._trace.set_span_in_context(span)
        if turn.speech_start is not None:
            self._child("listen", parent, turn.speech_start, end)
        commit = turn.commit
        if commit is not None:
            self._child("stt", parent, end, commit)
        queued = turn.queued
        if queued is not None:
            self._child("response", parent, commit if commit is not None else end, queued)
            self._child("heard", parent, queued, heard)
        span.end(end_time=_ns(max(begin, heard)))

    # ------------------------------------------------------------------ tools and providers

    def _tool(self, event: CallEvent, call: _CallTrace) -> None:
        d = event.data
        duration = float(d.get("duration_ms", 0.0)) / 1000.0
        self._child(
            "tool_call",
            call.context,
            event.wall - duration,
            event.wall,
            failed=not d.get("ok"),
            **{"voice_runtime.tool": str(d.get("tool", "")), "voice_runtime.ok": bool(d.get("ok"))},
        )

    def _connect(self, event: CallEvent, call: _CallTrace) -> None:
        d = event.data
        duration = float(d.get("duration_ms", 0.0)) / 1000.0
        self._child(
            "provider.connect",
            call.context,
            event.wall - duration,
            event.wall,
            **{
                "voice_runtime.vendor": str(d.get("vendor", "")),
                "voice_runtime.role": str(d.get("role", "")),
                "voice_runtime.attempt": int(d.get("attempt", 0)),
                "voice_runtime.ok": bool(d.get("ok", True)),
            },
            failed=not d.get("ok", True),
        )
