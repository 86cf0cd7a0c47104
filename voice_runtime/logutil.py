"""Logging where an attacker controls how often, or what, we log.

A peer that sends a million unknown marks must not write a million log lines, and a string it
chose must not reach a log record at any length. :class:`LogLimiter` lets the first few
records of a kind through, then one in N, and counts them all; :func:`clip` shortens any
attacker-supplied string before it goes into a message or an ``extra=`` field.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

__all__ = [
    "MAX_LOGGED_CHARS",
    "LogLimiter",
    "PeerTextFilter",
    "clip",
    "guard_server_logs",
    "log_limited",
    "log_limiter",
    "redacting_ws_logger",
]

#: Handshake headers whose values are credentials.
SECRET_HEADERS = frozenset(
    {"authorization", "xi-api-key", "x-api-key", "api-key", "x-goog-api-key"}
)

MAX_LOGGED_CHARS = 64


def clip(value: Any, limit: int = MAX_LOGGED_CHARS) -> str:
    """``value`` as a string of at most ``limit`` characters, control characters escaped."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    # Escaping can only lengthen the text; clip again so the bound holds.
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


class LogLimiter:
    """Lets the first ``first`` events of a kind be logged, then one in ``every``; counts all.

    ``allow(kind)`` counts the event and says whether to log it; ``counts`` has every kind's
    total. Thread-safe.
    """

    def __init__(self, first: int = 5, every: int = 1000) -> None:
        self.first = first
        self.every = every
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def allow(self, kind: str) -> bool:
        """Count one ``kind`` event; True when this one should be logged."""
        with self._lock:
            self.counts[kind] += 1
            n = self.counts[kind]
        return n <= self.first or (n - self.first) % self.every == 0

    def count(self, kind: str) -> int:
        """How many ``kind`` events were seen."""
        with self._lock:
            return self.counts[kind]


_process_limiter = LogLimiter()


def log_limiter() -> LogLimiter:
    """The process-wide limiter (per-connection code may keep its own)."""
    return _process_limiter


class _RedactingAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Hides credential header values in the handshake lines websockets logs at DEBUG."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) == 2 and isinstance(args[0], str) and args[0].lower() in SECRET_HEADERS:
            args = (args[0], "[redacted]")
        super().log(level, msg, *args, **kwargs)


def redacting_ws_logger(name: str) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """A logger for ``websockets`` connections that never writes a credential header's value.

    websockets logs every handshake header at DEBUG (``> xi-api-key: …``); pass this as the
    ``logger=`` of ``connect()``/``serve()`` wherever a header carries a secret.
    """
    return _RedactingAdapter(logging.getLogger(name), {})


def log_limited(
    logger: logging.Logger,
    kind: str,
    msg: str,
    *args: Any,
    level: int = logging.WARNING,
    extra: dict[str, Any] | None = None,
    limiter: LogLimiter | None = None,
) -> bool:
    """Log ``msg`` at ``level`` through ``limiter`` (default: the process-wide one) as ``kind``.

    Counts every call; logs the first few and then one in N, each record carrying
    ``log_kind`` and ``seen`` (the count so far). Returns whether it logged.
    """
    lim = _process_limiter if limiter is None else limiter
    if not lim.allow(kind):
        return False
    fields = {"log_kind": kind, "seen": lim.count(kind)}
    if extra:
        fields.update(extra)
    logger.log(level, msg, *args, extra=fields, stacklevel=2)
    return True


class PeerTextFilter(logging.Filter):
    """A filter for loggers of code we do not own that log what peers send (uvicorn's).

    Clips every string argument to :data:`MAX_LOGGED_CHARS`, control characters escaped (a
    request path can be kilobytes), and sends records below ERROR that a peer can repeat at
    will (an invalid request, an access line of a refused request) through the process-wide
    limiter, keyed by logger, message and, for access lines, the status code. Access lines of
    successful requests, lifecycle lines and errors pass unlimited.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Clip the record's arguments; False when the limiter drops it."""
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(clip(a) if isinstance(a, str) else a for a in args)
        if record.levelno >= logging.ERROR:
            return True
        if record.name == "uvicorn.access":
            status = args[-1] if isinstance(args, tuple) and args else None
            if not isinstance(status, int) or status < 400:
                return True
            kind = f"uvicorn.access:{status}"
        elif record.levelno == logging.WARNING:  # its INFO lines are the server's lifecycle
            kind = f"{record.name}:{record.msg}"
        else:
            return True
        return _process_limiter.allow(kind)


def guard_server_logs() -> None:
    """Put a :class:`PeerTextFilter` on uvicorn's loggers (idempotent)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        target = logging.getLogger(name)
        if not any(isinstance(f, PeerTextFilter) for f in target.filters):
            target.addFilter(PeerTextFilter())
