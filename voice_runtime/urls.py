"""http(s) ⇄ ws(s) URL conversion, the one place that maps the schemes.

A public base URL (``https://example.com``) and the websocket URL Twilio or a vendor dials
(``wss://example.com``) differ only in scheme; other schemes pass through unchanged.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "http_base",
    "http_scheme",
    "is_local_host",
    "to_http",
    "to_ws",
    "ws_base",
    "ws_scheme",
]

_TO_WS = {"http": "ws", "https": "wss"}
_TO_HTTP = {"ws": "http", "wss": "https"}


def is_local_host(host: str | None) -> bool:
    """True for ``localhost`` (and ``*.localhost``), 127.0.0.0/8 and ::1."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ws_scheme(scheme: str) -> str:
    """``https`` → ``wss``, ``http`` → ``ws``; any other scheme unchanged."""
    return _TO_WS.get(scheme.lower(), scheme)


def http_scheme(scheme: str) -> str:
    """``wss`` → ``https``, ``ws`` → ``http``; any other scheme unchanged."""
    return _TO_HTTP.get(scheme.lower(), scheme)


def to_ws(url: str) -> str:
    """``url`` with an http(s) scheme turned into ws(s); everything else kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=ws_scheme(parts.scheme))) if parts.scheme else url


def to_http(url: str) -> str:
    """``url`` with a ws(s) scheme turned into http(s); everything else kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=http_scheme(parts.scheme))) if parts.scheme else url


def ws_base(url: str) -> str:
    """A base URL as ws(s), stripped, without a trailing slash."""
    return to_ws(url.strip()).rstrip("/")


def http_base(url: str) -> str:
    """A base URL as http(s), stripped, without a trailing slash."""
    return to_http(url.strip()).rstrip("/")
