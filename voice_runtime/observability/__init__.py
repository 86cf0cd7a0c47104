"""Metrics and traces of a server's calls, read from its call event stream.

:func:`install` is what ``VoiceServer(metrics=..., tracing=...)`` calls: it subscribes
:class:`~voice_runtime.observability.metrics.CallMetrics` (and serves ``/metrics``) when
prometheus-client is installed, and :class:`~voice_runtime.observability.tracing.CallTracer`
when an OpenTelemetry SDK is configured (or a tracer provider is passed). Neither touches
the media path: both are listeners of ``server.events``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from voice_runtime.errors import ConfigurationError

__all__ = ["Observability", "install"]

logger = logging.getLogger(__name__)


@dataclass
class Observability:
    """What :func:`install` set up on a server: its metrics and tracer, each possibly None."""

    metrics: Any = None
    tracer: Any = None


def install(server: Any, *, metrics: bool | None = None, tracing: Any = None) -> Observability:
    """Subscribe metrics and traces to ``server.events`` and add ``/metrics`` to its app.

    ``metrics``: None serves them when prometheus-client is installed, True requires it,
    False never. ``tracing``: None traces when an OpenTelemetry SDK is configured globally,
    True uses the global tracer provider, a tracer provider uses that one, False never.
    """
    from voice_runtime.observability import metrics as _metrics
    from voice_runtime.observability import tracing as _tracing

    found = Observability()
    if metrics or (metrics is None and _metrics.available()):
        watchdog = getattr(server, "watchdog", None)
        lag = (lambda: watchdog.last_lag) if watchdog is not None else None
        found.metrics = _metrics.CallMetrics(lag=lag)
        found.metrics.attach(server.events)
        server.app.add_api_route(
            "/metrics", _metrics.metrics_endpoint(found.metrics), methods=["GET"]
        )
    if tracing is None:
        tracing = _tracing.sdk_configured()
    if tracing is not False:
        try:
            found.tracer = _tracing.CallTracer(None if tracing is True else tracing)
        except ImportError as exc:
            raise ConfigurationError("tracing needs opentelemetry-api") from exc
        found.tracer.attach(server.events)
    return found
