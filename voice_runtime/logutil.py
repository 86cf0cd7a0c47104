"""Logging where an attacker controls how often, or what, we log.

A peer that sends a million unknown marks must not write a million log lines, and a string it
chose must not reach a log record at any length. :class:`LogLimiter` lets the first few
records of a kind through, then one in N, and counts them all; :func:`clip` shortens any
attacker-supplied string before it goes into a message or an ``extra=`` field.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "MAX_LOGGED_CHARS",
    "CallContextFilter",
    "JsonFormatter",
    "call_log_context",
    "configure_logging",
    "describe_error",
    "set_call_context",
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


def describe_error(exc: BaseException) -> str:
    """``"TypeName: message"`` for a log line's text, the message clipped (it may quote a peer).

    Configuration errors are the package's own sentences (which variable to set): they are
    clipped at 200 characters instead of 64 so the remedy stays readable.
    """
    from voice_runtime.errors import ConfigurationError

    text = str(exc)
    limit = 200 if isinstance(exc, ConfigurationError) else MAX_LOGGED_CHARS
    return f"{type(exc).__name__}: {clip(text, limit)}" if text else type(exc).__name__


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


# The call a log line belongs to; set in each call's tasks and handler threads, so every
# record made there (the package's and the user's) names its call.
_call_context: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "voice_runtime_call", default=("", "")
)


def set_call_context(call_sid: str | None, stream_sid: str | None = None) -> None:
    """Name the current task's (or thread's) call for every later log record in it."""
    # The SIDs come from the peer's start frame: clipped like any peer text.
    _call_context.set((clip(call_sid or ""), clip(stream_sid or "")))


@contextmanager
def call_log_context(call_sid: str | None, stream_sid: str | None = None) -> Iterator[None]:
    """Log records made inside the block carry ``call_sid`` and ``stream_sid``."""
    token = _call_context.set((clip(call_sid or ""), clip(stream_sid or "")))
    try:
        yield
    finally:
        _call_context.reset(token)


class CallContextFilter(logging.Filter):
    """Adds ``call_sid``/``stream_sid`` (of the call being served, or "") and ``call`` (a
    ``" [CA…/MZ…]"`` suffix for format strings) to every record; never drops one.

    Put it on a handler so records of every logger that reach the handler get it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the call context (keeping fields a caller passed in ``extra=``)."""
        call_sid, stream_sid = _call_context.get()
        call_sid = getattr(record, "call_sid", None) or call_sid
        stream_sid = getattr(record, "stream_sid", None) or stream_sid
        record.call_sid = call_sid
        record.stream_sid = stream_sid
        ids = "/".join(x for x in (call_sid, stream_sid) if x)
        record.call = f" [{ids}]" if ids else ""
        return True


# LogRecord attributes that are not extra= fields.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "call",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, call context, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON."""
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(call)s"


def configure_logging(level: str = "info", fmt: str = "text") -> logging.Handler:
    """Log every logger (ours, uvicorn's, the app's) at ``level`` to stderr as text or JSON.

    Returns the installed root handler. Console handlers already on the root logger and
    uvicorn's own are dropped so each line is written once, in one format; other handlers
    stay and get the call context too.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (text or json)")
    handler = logging.StreamHandler()
    handler.addFilter(CallContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        # Console handlers (the CLI's basicConfig, a previous call) are replaced so each
        # line is written once; others (files, the app's own) stay and get the call context.
        if type(old) is logging.StreamHandler and old.stream in (sys.stderr, sys.stdout):
            root.removeHandler(old)
        elif not any(isinstance(f, CallContextFilter) for f in old.filters):
            old.addFilter(CallContextFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(numeric)
    return handler
