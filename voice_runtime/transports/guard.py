"""Connection-level limits of the served HTTP/websocket server.

uvicorn's HTTP protocols wait for a request's headers and body for as long as the peer likes,
and accept connections until the process runs out of file descriptors: a few hundred peers
trickling a byte every few seconds (slowloris) would hold every fd. :class:`ConnectionLimits`
bounds that, and :func:`guarded_http_protocol` applies it to uvicorn's HTTP protocol class:

- the request line and headers must arrive within ``header_timeout_s`` (408, then close) and
  stay under ``max_header_bytes`` (431);
- a request body must be complete within ``body_timeout_s`` after its headers;
- a connection opened while ``max_connections`` are open gets 503 and is closed at once;
- a response the peer stops reading (the write buffer stays over its high-water mark for
  ``send_timeout_s``) aborts the connection.

The websocket side (:class:`~voice_runtime.transports.fastws.VoiceWebSocketProtocol`) reads
the close timeout and the per-connection frame budget from the same object. Every refusal,
timeout and abort is counted in :func:`connection_stats` and logged through a
:class:`~voice_runtime.logutil.LogLimiter`, so an attacker cannot flood the log either.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

from voice_runtime.logutil import LogLimiter, clip

__all__ = [
    "ConnectionLimits",
    "abort",
    "close_within",
    "connection_cap",
    "connection_stats",
    "guarded_http_protocol",
    "note",
]

logger = logging.getLogger(__name__)

# Connections the default cap leaves for webhooks and probes on top of two per call.
_CAP_HEADROOM = 64
# Without a known max_calls (a bare uvicorn_config), the default cap.
_DEFAULT_CAP = 1000

_events = LogLimiter(first=5, every=1000)


def connection_stats() -> dict[str, int]:
    """How many connection-level events of each kind this process saw (refusals, timeouts)."""
    with _events._lock:
        return dict(_events.counts)


def note(kind: str, message: str, level: int = logging.INFO, **extra: Any) -> None:
    """Count one connection event of ``kind``; log ``message`` for the first few, then rarely."""
    if _events.allow(kind):
        # Reasons and addresses may carry what a peer sent: never more than a clipped string.
        extra = {k: v if isinstance(v, int | float | None) else clip(v) for k, v in extra.items()}
        extra["kind"] = kind
        extra["count"] = _events.count(kind)
        logger.log(level, message, extra=extra)


@dataclass(frozen=True)
class ConnectionLimits:
    """Bounds on every connection the server accepts (documented in docs/security.md).

    ``header_timeout_s``: the request line and headers must arrive within this, counted from
    the connection (or from the first byte of a later request on a kept-alive one).
    ``body_timeout_s``: a request body must be complete within this after its headers.
    ``max_header_bytes``: the most a request line and headers may take.
    ``max_connections``: open connections (HTTP and websocket) beyond which a new one gets 503
    and is closed; None: ``2 * max_calls + 64`` (capped at half the fd soft limit).
    ``send_timeout_s``: an HTTP response whose bytes stop leaving (the peer does not read) for
    this long aborts the connection.
    ``close_timeout_s``: a close that has not completed within this (the peer does not answer
    a websocket close, or does not read, so our buffered bytes never leave) ends with an abort:
    the fd and the call's slot are freed.
    ``ws_ping_interval_s``/``ws_ping_timeout_s``: websocket keepalive (None: off); a peer
    that does not answer a ping in time is closed with 1011.
    ``ws_frames_per_s``/``ws_frame_burst``: a websocket peer may send ``ws_frame_burst``
    frames at once and ``ws_frames_per_s`` on average (Twilio sends about 60); beyond that the
    connection is closed with 1008. 0 turns the budget off.
    """

    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int | None = None
    send_timeout_s: float = 30.0
    close_timeout_s: float = 5.0
    ws_ping_interval_s: float | None = 20.0
    ws_ping_timeout_s: float | None = 20.0
    ws_frames_per_s: float = 500.0
    ws_frame_burst: int = 2000

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "send_timeout_s", "close_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("ws_ping_interval_s", "ws_ping_timeout_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive seconds or None, got {value!r}")
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, got {self.max_header_bytes}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        if not (math.isfinite(self.ws_frames_per_s) and self.ws_frames_per_s >= 0):
            raise ValueError(f"ws_frames_per_s must be >= 0, got {self.ws_frames_per_s!r}")
        if self.ws_frame_burst < 1:
            raise ValueError(f"ws_frame_burst must be at least 1, got {self.ws_frame_burst}")


def _fd_soft_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def connection_cap(limits: ConnectionLimits, max_calls: int | None = None) -> int:
    """The connection limit ``limits`` gives a server of ``max_calls`` calls."""
    if limits.max_connections is not None:
        cap = limits.max_connections
    else:
        cap = 2 * max_calls + _CAP_HEADROOM if max_calls else _DEFAULT_CAP
        soft = _fd_soft_limit()
        if soft is not None:
            # Each call also has vendor sockets, and the process has files: keep half the fds.
            cap = min(cap, max(1, soft // 2))
    if max_calls is not None and cap <= max_calls:
        logger.warning(
            "the connection limit is not above max_calls: calls may be refused before it",
            extra={"max_connections": cap, "max_calls": max_calls},
        )
    return cap


def close_within(transport: asyncio.Transport, bound: float) -> asyncio.TimerHandle | None:
    """Close ``transport``; abort it if its buffered bytes have not left after ``bound`` s.

    ``transport.close()`` waits for the write buffer to drain, forever when the peer does not
    read. Returns the abort timer (cancel it in ``connection_lost``), or None when the close is
    immediate.
    """
    transport.close()
    if transport.get_write_buffer_size() == 0:
        return None
    return asyncio.get_running_loop().call_later(bound, abort, transport)


def abort(transport: asyncio.WriteTransport) -> None:
    """Abort a transport whose close did not complete in time, and count it."""
    note("close_timeout", "connection aborted: its close did not complete in time")
    transport.abort()


_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 19\r\nconnection: close\r\n\r\nService Unavailable"
)
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
    b"connection: close\r\n\r\n"
)


class _HttpGuard:
    """Mixed into uvicorn's HTTP protocol class: header/body deadlines, a connection cap.

    It only reads what uvicorn's h11 and httptools protocols both have (``cycle`` with
    ``more_body``, ``flow``, ``connections``, ``transport``) and overrides the asyncio
    callbacks and ``handle_websocket_upgrade``.
    """

    limits: ConnectionLimits = ConnectionLimits()
    max_connections: int = _DEFAULT_CAP
    # uvicorn's attributes (set by the protocol class this is mixed into).
    cycle: Any
    flow: Any
    connections: set[Any]
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    _guard_timer: asyncio.TimerHandle | None = None
    _guard_waiting = ""  # "headers", "body" or "" (nothing armed)
    _guard_cycle: Any = None  # the request whose headers were last seen
    _guard_bytes = 0  # bytes received while waiting for headers
    _guard_abort: asyncio.TimerHandle | None = None
    _guard_stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Refuse the connection when the cap is reached, else start the header deadline."""
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:
            note(
                "connection_limit",
                "connection refused: too many open connections",
                logging.WARNING,
                max_connections=self.max_connections,
            )
            self.transport.write(_REFUSED)
            self._guard_close()
            return
        self._guard_arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadlines, then let uvicorn clean up."""
        self._guard_disarm()
        for timer in (self._guard_abort, self._guard_stall):
            if timer is not None:
                timer.cancel()
        self._guard_abort = self._guard_stall = None
        super().connection_lost(exc)  # type: ignore[misc]

    def pause_writing(self) -> None:
        """The peer is not taking our bytes: it has ``send_timeout_s`` to start again."""
        super().pause_writing()  # type: ignore[misc]
        if self._guard_stall is None:
            self._guard_stall = self.loop.call_later(self.limits.send_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        """Our bytes leave again."""
        if self._guard_stall is not None:
            self._guard_stall.cancel()
            self._guard_stall = None
        super().resume_writing()  # type: ignore[misc]

    def _stalled(self) -> None:
        self._guard_stall = None
        # uvicorn's response task waits for the buffer to drain, forever if nobody reads it.
        note("send_timeout", "connection aborted: the peer stopped reading the response")
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        """Feed uvicorn's parser; track header size and when headers and body are done."""
        if self.transport.is_closing():
            return
        if not self._guard_waiting:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                # A new request begins on a kept-alive connection: its headers get a deadline.
                self._guard_arm("headers")
        if self._guard_waiting == "headers":
            self._guard_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        self._guard_progress()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        """The request became a websocket: the deadlines are the websocket protocol's now."""
        self._guard_disarm()
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _guard_progress(self) -> None:
        cycle = self.cycle
        waiting = self._guard_waiting
        if cycle is not None and cycle is not self._guard_cycle:
            self._guard_cycle = cycle  # headers of a new request arrived
            self._guard_disarm()
            if cycle.more_body and not self.transport.is_closing():
                self._guard_arm("body")
        elif waiting == "headers" and self._guard_bytes > self.limits.max_header_bytes:
            note("header_too_large", "request refused: headers too large")
            self.transport.write(_TOO_LARGE)
            self._guard_close()
        elif waiting == "body" and (cycle is None or not cycle.more_body):
            self._guard_disarm()

    def _guard_arm(self, what: str) -> None:
        self._guard_disarm()
        self._guard_waiting = what
        self._guard_bytes = 0
        limits = self.limits
        delay = limits.header_timeout_s if what == "headers" else limits.body_timeout_s
        self._guard_timer = self.loop.call_later(delay, self._guard_expired)

    def _guard_disarm(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
            self._guard_timer = None
        self._guard_waiting = ""

    def _guard_expired(self) -> None:
        self._guard_timer = None
        waiting = self._guard_waiting
        self._guard_waiting = ""
        if self.transport.is_closing():
            return
        if waiting == "body":
            if self.flow is not None and self.flow.read_paused:
                # uvicorn stopped reading because the app is slow to take the body: the
                # peer is not to blame, so the deadline starts over.
                self._guard_arm("body")
                return
            note("body_timeout", "request closed: its body did not arrive in time")
        else:
            note("header_timeout", "request closed: its headers did not arrive in time")
            self.transport.write(_TIMED_OUT)
        self._guard_close()

    def _guard_close(self) -> None:
        self._guard_disarm()
        self._guard_abort = close_within(self.transport, self.limits.close_timeout_s)


def guarded_http_protocol(
    base: type[asyncio.Protocol], limits: ConnectionLimits, max_connections: int
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol ``base`` that enforces ``limits``."""
    return type(
        f"Guarded{base.__name__}",
        (_HttpGuard, base),
        {"limits": limits, "max_connections": max_connections, "__module__": __name__},
    )
