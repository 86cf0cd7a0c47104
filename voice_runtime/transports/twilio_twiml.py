"""TwiML for Twilio calls: connect a call to a Media Streams websocket, transfer, play digits.

Pure builders (no REST, no settings): they validate their input and return the XML text.
Re-exported by :mod:`voice_runtime.transports.twilio_call`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from voice_runtime.transports.xml_text import xml_safe
from voice_runtime.urls import is_local_host, ws_scheme

if TYPE_CHECKING:
    from twilio.twiml.voice_response import VoiceResponse

TWIML_MAX_CHARS = 4000
"""Twilio's limit on inline TwiML passed to a call (the SDK documents 4000 characters)."""

_DIGITS = re.compile(r"[0-9*#wW]+")

__all__ = [
    "TWIML_MAX_CHARS",
    "build_digits_twiml",
    "build_route_stream_xml",
    "build_stream_twiml",
    "build_stream_xml",
    "build_transfer_twiml",
]


def _ws_base(stream_url: str) -> str:
    """Turn a public base URL into the websocket base Twilio dials (https→wss, http→ws)."""
    if not isinstance(stream_url, str) or not stream_url.strip():
        raise ValueError("stream_url must be a non-empty URL")
    parts = urlsplit(stream_url.strip())
    scheme = ws_scheme(parts.scheme) if parts.scheme in ("https", "wss", "http", "ws") else None
    if scheme is None or not parts.netloc:
        raise ValueError("stream_url must be an https://, http://, wss:// or ws:// URL")
    if parts.query or parts.fragment:
        # Twilio drops query strings from <Stream url>; data belongs in parameters=.
        raise ValueError("stream_url must not carry a query or fragment; use parameters=")
    if scheme == "ws" and not is_local_host(parts.hostname):
        # Twilio dials only wss://; an http:// public URL (a tunnel's, or a proxy that ends
        # TLS) still means wss:// outside local testing.
        scheme = "wss"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def _stream_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in "?#"):
        raise ValueError("path must start with '/' and carry no query or fragment")
    return "/" + path.strip("/") if path.strip("/") else "/"


def _checked_parameters(parameters: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if parameters is None:
        return []
    items = list(parameters.items())
    for name, value in items:
        if not isinstance(name, str) or not name.strip():
            raise ValueError("parameter names must be non-blank strings")
        if not isinstance(value, str):
            raise ValueError("parameter values must be strings")
    return items


def _connect_stream(
    response: VoiceResponse,
    ws_url: str,
    *,
    parameters: Mapping[str, str] | None,
    status_callback: str | None,
    name: str | None,
) -> None:
    """Append ``<Connect><Stream url=…>`` (with ``<Parameter>`` children) to ``response``."""
    pairs = _checked_parameters(parameters)
    connect = response.connect()
    stream = connect.stream(url=ws_url, name=name, status_callback=status_callback)
    for key, value in pairs:
        # Caller-supplied values (From, inbound_parameters) must not break the document.
        stream.parameter(name=xml_safe(key), value=xml_safe(value))


def _voice_response() -> VoiceResponse:
    from twilio.twiml.voice_response import VoiceResponse

    return VoiceResponse()


def build_stream_twiml(
    stream_url: str,
    *,
    parameters: Mapping[str, str] | None = None,
    status_callback: str | None = None,
    name: str | None = None,
    path: str = "/voice",
) -> str:
    """Return TwiML that connects the call to this server's Media Streams websocket.

    ``stream_url`` is the public base URL (https→wss, http→ws; wss/ws kept); the stream
    URL is ``{ws base}{path}``. ``parameters`` become ``<Parameter>`` elements (they arrive
    in the ``start`` message's ``customParameters``).
    """
    response = _voice_response()
    url = _ws_base(stream_url) + _stream_path(path)
    _connect_stream(
        response, url, parameters=parameters, status_callback=status_callback, name=name
    )
    return response.to_xml()


build_stream_xml = build_stream_twiml
"""Alias of :func:`build_stream_twiml`."""


def _route_url(stream_url: str, route_token: str, path: str) -> str:
    if not isinstance(route_token, str) or not route_token:
        raise ValueError("route_token must be a non-empty string")
    return f"{_ws_base(stream_url)}{_stream_path(path).rstrip('/')}/{quote(route_token, safe='')}"


def build_route_stream_xml(
    stream_url: str,
    route_token: str,
    *,
    parameters: Mapping[str, str] | None = None,
    status_callback: str | None = None,
    name: str | None = None,
    path: str = "/voice",
) -> str:
    """Return TwiML whose stream URL is ``{ws base}{path}/{route_token}`` (token URL-quoted)."""
    response = _voice_response()
    _connect_stream(
        response,
        _route_url(stream_url, route_token, path),
        parameters=parameters,
        status_callback=status_callback,
        name=name,
    )
    return response.to_xml()


def _check_twiml(twiml: object) -> str:
    text = str(twiml) if not isinstance(twiml, str) else twiml
    if not text.strip():
        raise ValueError("twiml must not be empty")
    if len(text) > TWIML_MAX_CHARS:
        raise ValueError(
            f"twiml is {len(text)} characters; Twilio accepts at most {TWIML_MAX_CHARS}"
        )
    return text


def build_transfer_twiml(target: str, *, caller_id: str | None = None) -> str:
    """Return ``<Dial>`` TwiML for ``target``: a ``<Sip>`` for ``sip:`` URIs, else ``<Number>``."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError("target must be a non-blank phone number or sip: URI")
    response = _voice_response()
    dial = response.dial(caller_id=caller_id)
    if target.strip().lower().startswith("sip:"):
        dial.sip(target.strip())
    else:
        dial.number(target.strip())
    return response.to_xml()


def build_digits_twiml(
    digits: str,
    stream_url: str,
    *,
    route_token: str | None = None,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """Return TwiML that plays DTMF ``digits`` then reconnects the media stream."""
    if not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
        raise ValueError("digits may hold only 0-9, *, # and the pauses w (0.5 s) and W (1 s)")
    response = _voice_response()
    response.play(digits=digits)
    url = (
        _route_url(stream_url, route_token, "/voice")
        if route_token is not None
        else _ws_base(stream_url) + "/voice"
    )
    _connect_stream(response, url, parameters=parameters, status_callback=None, name=None)
    return response.to_xml()
