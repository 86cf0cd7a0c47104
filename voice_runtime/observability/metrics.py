"""Prometheus metrics of a server's calls, fed from its call event stream.

:class:`CallMetrics` subscribes to an :class:`~voice_runtime.events.EventBus` and turns call
events into counters, gauges and histograms; nothing on the media path updates a metric.
Labels are low-cardinality codes (reasons, vendors, roles, parts): never a call SID, a phone
number or call content. Per-call counters (frames, drops, bad frames, marks) are added when
the call ends, from its ``call_ended`` event.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the
workers start (prometheus-client's multiprocess mode); each worker writes its values there and
``/metrics`` in any worker reports the sum over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from voice_runtime import events as ev

if TYPE_CHECKING:
    from voice_runtime.events import CallEvent, EventBus

__all__ = ["CONTENT_TYPE", "CallMetrics", "available"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_FAST_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
_DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_TOKEN_KINDS = (
    "input_audio",
    "input_text",
    "output_audio",
    "output_text",
    "cached_input",
)
# A label value is a short code; anything longer is cut (a vendor's error code, say).
_MAX_LABEL = 40


def available() -> bool:
    """True when prometheus-client is installed (the ``metrics`` extra)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _label(value: Any) -> str:
    text = str(value or "unknown")
    return text[:_MAX_LABEL]


class CallMetrics:
    """The server's metrics (``voice_runtime_*``), fed by :meth:`on_event`.

    ``registry``: where the metrics live (a new ``CollectorRegistry`` by default, so several
    servers in one process do not clash). ``lag`` returns the event loop's latest lag in
    seconds (the server's watchdog); it is sampled at each call's start and end and at scrape.
    """

    def __init__(
        self, registry: Any = None, *, lag: Callable[[], float] | None = None, prefix: str = ""
    ) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as exc:
            raise ImportError(
                'metrics need prometheus-client: pip install "voice-runtime[metrics]"'
            ) from exc
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lag = lag
        p = prefix + "voice_runtime_"
        r = self.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return Counter(p + name, doc, labels, registry=r)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
        ) -> Any:
            return Histogram(p + name, doc, labels, registry=r, buckets=buckets)

        self.live_calls = Gauge(
            p + "live_calls",
            "Calls with a live media stream.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.draining = Gauge(
            p + "draining", "1 while the server drains.", registry=r, multiprocess_mode="liveall"
        )
        self.loop_lag = Gauge(
            p + "event_loop_lag_seconds",
            "Latest event loop lag measured by the watchdog.",
            registry=r,
            multiprocess_mode="max",
        )
        self.calls_started = counter("calls_started_total", "Media streams that started.")
        self.calls_ended = counter("calls_ended_total", "Calls ended, by reason.", ("reason",))
        self.call_duration = histogram(
            "call_duration_seconds", "Duration of calls.", _DURATION_BUCKETS
        )
        self.frames_in = counter("frames_in_total", "Caller media frames received.")
        self.frames_out = counter("frames_out_total", "Agent media messages sent.")
        self.frames_dropped = counter(
            "frames_dropped_total", "Audio chunks dropped, by direction.", ("direction",)
        )
        self.bad_frames = counter(
            "bad_frames_total", "Unusable inbound messages, by reason.", ("reason",)
        )
        self.marks = counter("marks_total", "Marks sent and echoed.", ("state",))
        self.clears = counter("clears_total", "Agent audio cleared.")
        self.barge_ins = counter("barge_ins_total", "Caller barge-ins, by source.", ("source",))
        self.dtmf = counter("dtmf_digits_total", "DTMF digits received.")
        self.transcripts = counter("transcripts_total", "Transcripts committed.", ("vendor",))
        self.mark_rtt = histogram(
            "mark_round_trip_seconds",
            "From sending the first mark of a response to its echo (playback included).",
            _FAST_BUCKETS,
        )
        self.turn_latency = histogram(
            "turn_latency_seconds",
            "End of caller speech to the first agent audio the caller heard (mark echo).",
            _LATENCY_BUCKETS,
        )
        self.turn_part = histogram(
            "turn_latency_part_seconds",
            "Parts of the turn latency: speech end to transcript (to_commit), to first audio "
            "queued (to_queued), first audio queued to heard (queued_to_heard).",
            _LATENCY_BUCKETS,
            ("part",),
        )
        self.first_heard = histogram(
            "first_audio_heard_seconds",
            "From the start of the call to the first agent audio heard (the greeting).",
            _LATENCY_BUCKETS,
        )
        self.provider_connects = counter(
            "provider_connects_total",
            "Vendor connections opened, by outcome (reconnects have attempt > 0).",
            ("vendor", "role", "outcome"),
        )
        self.provider_reconnects = counter(
            "provider_reconnects_total", "Vendor reconnections.", ("vendor", "role")
        )
        self.provider_connect_time = histogram(
            "provider_connect_seconds",
            "Time to open a vendor connection.",
            _FAST_BUCKETS,
            ("vendor", "role"),
        )
        self.provider_errors = counter(
            "provider_errors_total", "Provider errors, by vendor.", ("vendor", "role", "reason")
        )
        self.tokens = counter(
            "realtime_tokens_total",
            "Realtime agent tokens, by vendor and kind.",
            ("vendor", "kind"),
        )
        self.tool_calls = counter("tool_calls_total", "Agent tool runs, by outcome.", ("outcome",))
        self.tool_time = histogram("tool_call_seconds", "Duration of tool runs.", _FAST_BUCKETS)
        self._handlers: dict[str, Callable[[CallEvent], None]] = {
            ev.CALL_STARTED: self._started,
            ev.CALL_ENDED: self._ended,
            ev.AGENT_AUDIO_HEARD: self._heard,
            ev.TURN_LATENCY: self._turn,
            ev.CLEAR: lambda e: self.clears.inc(),
            ev.BARGE_IN: lambda e: self.barge_ins.labels(_label(e.data.get("source"))).inc(),
            ev.DTMF: lambda e: self.dtmf.inc(),
            ev.TRANSCRIPT_COMMITTED: lambda e: self.transcripts.labels(
                _label(e.data.get("vendor"))
            ).inc(),
            ev.PROVIDER_CONNECT: self._connect,
            ev.ERROR: self._error,
            ev.USAGE: self._usage,
            ev.TOOL_CALL: self._tool,
            ev.DRAINING: lambda e: self.draining.set(1),
        }

    # ------------------------------------------------------------------ wiring

    def attach(self, bus: EventBus) -> Callable[[], None]:
        """Subscribe to ``bus``; returns the unsubscribe function."""
        return bus.subscribe(self.on_event)

    def on_event(self, event: CallEvent) -> None:
        """Update the metrics an event concerns (the bus calls this)."""
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format (all workers' in multiprocess mode)."""
        from prometheus_client import CollectorRegistry, generate_latest

        self._sample_lag()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ handlers

    def _sample_lag(self) -> None:
        if self._lag is not None:
            self.loop_lag.set(self._lag())

    def _started(self, event: CallEvent) -> None:
        self.calls_started.inc()
        self.live_calls.inc()
        self._sample_lag()

    def _ended(self, event: CallEvent) -> None:
        d = event.data
        self.live_calls.dec()
        self.calls_ended.labels(_label(d.get("reason"))).inc()
        self.call_duration.observe(float(d.get("duration_s", 0.0)))
        self.frames_in.inc(d.get("frames_in", 0))
        self.frames_out.inc(d.get("frames_out", 0))
        self.frames_dropped.labels("inbound").inc(d.get("inbound_dropped", 0))
        self.frames_dropped.labels("outbound").inc(d.get("outbound_dropped", 0))
        for reason, n in (d.get("bad_frames") or {}).items():
            self.bad_frames.labels(_label(reason)).inc(n)
        self.marks.labels("sent").inc(d.get("marks_sent", 0))
        self.marks.labels("echoed").inc(d.get("marks_echoed", 0))
        self._sample_lag()

    def _heard(self, event: CallEvent) -> None:
        d = event.data
        rtt = d.get("mark_rtt_ms")
        if rtt is not None:
            self.mark_rtt.observe(rtt / 1000.0)
        since = d.get("since_start_ms")
        if since is not None:
            self.first_heard.observe(since / 1000.0)

    def _turn(self, event: CallEvent) -> None:
        d = event.data
        self.turn_latency.observe(d["total_ms"] / 1000.0)
        for key, part in (
            ("to_commit_ms", "to_commit"),
            ("to_queued_ms", "to_queued"),
            ("queued_to_heard_ms", "queued_to_heard"),
        ):
            value = d.get(key)
            if value is not None:
                self.turn_part.labels(part).observe(value / 1000.0)

    def _connect(self, event: CallEvent) -> None:
        d = event.data
        vendor, role = _label(d.get("vendor")), _label(d.get("role"))
        ok = bool(d.get("ok", True))
        self.provider_connects.labels(vendor, role, "ok" if ok else "failed").inc()
        if d.get("attempt", 0):
            self.provider_reconnects.labels(vendor, role).inc()
        if ok and d.get("duration_ms") is not None:
            self.provider_connect_time.labels(vendor, role).observe(d["duration_ms"] / 1000.0)

    def _error(self, event: CallEvent) -> None:
        d = event.data
        self.provider_errors.labels(
            _label(d.get("vendor")), _label(d.get("role")), _label(d.get("reason"))
        ).inc()

    def _usage(self, event: CallEvent) -> None:
        d = event.data
        vendor = _label(d.get("vendor"))
        self.tokens.labels(vendor, "input").inc(d.get("input_tokens", 0))
        self.tokens.labels(vendor, "output").inc(d.get("output_tokens", 0))
        for kind in _TOKEN_KINDS:
            n = d.get(kind + "_tokens", 0)
            if n:
                self.tokens.labels(vendor, kind).inc(n)

    def _tool(self, event: CallEvent) -> None:
        d = event.data
        self.tool_calls.labels("ok" if d.get("ok") else "failed").inc()
        if d.get("duration_ms") is not None:
            self.tool_time.observe(d["duration_ms"] / 1000.0)


def metrics_endpoint(metrics: CallMetrics) -> Callable[[], Any]:
    """A FastAPI endpoint serving ``metrics`` (rendered off the event loop)."""
    import asyncio

    from fastapi import Response

    async def endpoint() -> Response:
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    return endpoint
