"""Twilio REST for calls: TwiML for Media Streams, placing, updating, ending and listing calls.

Everything here talks to Twilio through the official SDK. Sync functions get their client
from :func:`build_twilio_client` / :func:`build_explicit_twilio_client` (looked up at call
time, so tests can patch them or ``twilio.rest.Client``); its HTTP client is the SDK's
``requests``-based one with a bounded timeout and no redirects. :func:`list_calls` reads
pages with ``calls.page``/``calls.get_page`` and validates each page's raw JSON itself.

Settings come from :func:`voice_runtime.config.settings` when a function is called:
VOICE_STREAM_URL, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_PHONE_NUMBER,
TWILIO_HTTP_TIMEOUT and TWILIO_API_BASE_URL. Failures of the REST API surface as
:class:`TwilioRestError` (also a twilio ``TwilioRestException``; when Twilio cannot be
reached, a :class:`TwilioTransportError` that is also the ``requests`` exception, e.g.
``requests.exceptions.Timeout``), missing settings as
:class:`MissingTwilioCredentialError` / :class:`~voice_runtime.errors.MissingStreamUrlError`.

Each sync function has an ``*_async`` twin with the same options, built on the SDK's
``*_async`` methods and an aiohttp-based client.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from voice_runtime.config import Settings, settings
from voice_runtime.errors import MissingStreamUrlError
from voice_runtime.transports.twilio_models import (
    DEFAULT_API_HOST,
    MissingTwilioCredentialError,
    TwilioCallListIncompleteError,
    TwilioCallNotFoundError,
    TwilioCallNotFoundRestError,
    TwilioCallRow,
    TwilioRegion,
    TwilioRestError,
    TwilioTransportError,
    parse_call_page,
    validate_sid,
)
from voice_runtime.transports.xml_text import xml_safe
from voice_runtime.urls import ws_scheme

if TYPE_CHECKING:
    from twilio.rest import Client
    from twilio.twiml.voice_response import VoiceResponse

logger = logging.getLogger(__name__)

TWIML_MAX_CHARS = 4000
"""Twilio's limit on inline TwiML passed to a call (the SDK documents 4000 characters)."""

CALL_STATUS_EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})
MACHINE_DETECTION_MODES = frozenset({"Enable", "DetectMessageEnd"})
_HTTP_METHODS = frozenset({"GET", "POST"})
_UPDATE_STATUSES = frozenset({"completed", "canceled"})
_DIGITS = re.compile(r"[0-9*#wW]+")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CALLS_API_VERSION = "2010-04-01"


# --------------------------------------------------------------------------- TwiML


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


# --------------------------------------------------------------------------- settings


def _credentials(current: Settings) -> tuple[str, str]:
    if not current.twilio_account_sid:
        raise MissingTwilioCredentialError("TWILIO_ACCOUNT_SID", "Twilio account SID")
    if not current.twilio_auth_token:
        raise MissingTwilioCredentialError("TWILIO_AUTH_TOKEN", "Twilio auth token")
    # The account SID goes into every request path.
    return validate_sid(current.twilio_account_sid), current.twilio_auth_token


def build_twilio_client(account_sid: str, auth_token: str) -> Client:
    """Return the ``twilio.rest.Client`` every sync REST function here uses (as in 0.1.x).

    It has a bounded timeout (TWILIO_HTTP_TIMEOUT, default 15 s), never follows redirects,
    honours TWILIO_REGION / TWILIO_EDGE and TWILIO_API_BASE_URL, and is built through
    ``twilio.rest.Client`` looked up at call time. The functions here call this module-level
    name each time, so ``monkeypatch.setattr(twilio_call, "build_twilio_client", ...)`` and
    ``patch("twilio.rest.Client", ...)`` both reach every request.
    """
    from voice_runtime.transports import _rest

    return _rest.build_client(account_sid, auth_token, client_class=_patched_client_class())


def build_explicit_twilio_client(
    region: TwilioRegion, *, api_base_url: str | None = None, timeout: float | None = None
) -> Client:
    """Return a ``twilio.rest.Client`` bound to one explicit :class:`TwilioRegion`.

    Used by :func:`hangup_call` with ``regions`` and by :func:`list_calls`; the same timeout,
    redirect and patching rules as :func:`build_twilio_client` apply.
    """
    from voice_runtime.transports import _rest

    return _rest.build_region_client(
        region,
        api_base_url=api_base_url,
        timeout=timeout,
        client_class=_patched_client_class(),
    )


def _patched_client_class() -> Any:
    """``Client`` set on this module by a test's ``patch(...twilio_call.Client)``, else None."""
    return globals().get("Client")


def __getattr__(name: str) -> Any:
    # 0.1.x imported twilio.rest.Client into this module, and tests patch it here; it is
    # resolved lazily so that a patch leaves nothing behind (see _patched_client_class).
    if name == "Client":
        import twilio.rest

        return twilio.rest.Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sync_client(client: Client | None) -> Any:
    """Context manager yielding ``client`` or one built from the environment's credentials."""
    from voice_runtime.transports import _rest

    if client is not None:
        return _rest.sync_client(client, lambda: client)
    account_sid, auth_token = _credentials(settings())
    return _rest.sync_client(None, lambda: build_twilio_client(account_sid, auth_token))


def _async_client(client: Client | None) -> Any:
    """Async context manager yielding ``client`` or an async client from the environment."""
    from voice_runtime.transports import _rest

    if client is not None:
        return _rest.async_client(client, lambda: client)
    account_sid, auth_token = _credentials(settings())
    return _rest.async_client(None, lambda: _rest.build_async_client(account_sid, auth_token))


def _rest_errors() -> Any:
    from voice_runtime.transports import _rest

    return _rest.rest_errors()


# --------------------------------------------------------------------------- outbound calls


def _optional_positive_int(value: object, name: str, upper: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}")
    return value


def _call_options(
    phone: str,
    *,
    stream_url: str | None,
    route_token: str | None,
    parameters: Mapping[str, str] | None,
    status_callback: str | None,
    status_callback_events: Sequence[str] | None,
    status_callback_method: str,
    machine_detection: str | None,
    async_amd: bool,
    async_amd_status_callback: str | None,
    timeout: int | None,
    record: bool,
    time_limit: int | None,
    from_: str | None,
    client: Client | None,
) -> dict[str, Any]:
    """Validate every option, then resolve settings; return the SDK's ``calls.create`` kwargs."""
    if not isinstance(phone, str) or not phone.strip():
        raise ValueError("phone must be a non-blank phone number (E.164) or client/sip address")
    events: list[str] | None = None
    if status_callback_events is not None:
        if isinstance(status_callback_events, str):
            raise ValueError("status_callback_events must be a sequence of event names")
        events = list(status_callback_events)
        unknown = sorted(set(events) - CALL_STATUS_EVENTS)
        if unknown or not events:
            raise ValueError(
                f"status_callback_events must be non-empty, from {sorted(CALL_STATUS_EVENTS)}"
            )
        if status_callback is None:
            raise ValueError("status_callback_events needs status_callback")
    if status_callback_method not in _HTTP_METHODS:
        raise ValueError("status_callback_method must be 'GET' or 'POST'")
    if machine_detection is not None and machine_detection not in MACHINE_DETECTION_MODES:
        raise ValueError("machine_detection must be 'Enable' or 'DetectMessageEnd'")
    if async_amd and machine_detection is None:
        raise ValueError("async_amd needs machine_detection")
    if async_amd_status_callback is not None and not async_amd:
        raise ValueError("async_amd_status_callback needs async_amd=True")
    ring_timeout = _optional_positive_int(timeout, "timeout", 600)
    limit = _optional_positive_int(time_limit, "time_limit")
    if not isinstance(record, bool) or not isinstance(async_amd, bool):
        raise ValueError("record and async_amd must be booleans")

    current = settings()
    base = stream_url if stream_url is not None else current.voice_stream_url
    if not base:
        raise MissingStreamUrlError()
    if route_token is not None:
        twiml = build_route_stream_xml(base, route_token, parameters=parameters)
    else:
        twiml = build_stream_twiml(base, parameters=parameters)
    if client is None:
        _credentials(current)
    caller_id = from_ if from_ is not None else current.twilio_phone_number
    if not caller_id:
        raise MissingTwilioCredentialError("TWILIO_PHONE_NUMBER", "Twilio phone number")

    options: dict[str, Any] = {"to": phone, "from_": caller_id, "twiml": _check_twiml(twiml)}
    if status_callback is not None:
        options["status_callback"] = status_callback
        options["status_callback_method"] = status_callback_method
        if events is not None:
            options["status_callback_event"] = events
    if machine_detection is not None:
        options["machine_detection"] = machine_detection
    if async_amd:
        options["async_amd"] = "true"
        if async_amd_status_callback is not None:
            options["async_amd_status_callback"] = async_amd_status_callback
    if ring_timeout is not None:
        options["timeout"] = ring_timeout
    if record:
        options["record"] = True
    if limit is not None:
        options["time_limit"] = limit
    return options


def initiate_outbound_call(
    phone: str,
    *,
    stream_url: str | None = None,
    route_token: str | None = None,
    parameters: Mapping[str, str] | None = None,
    status_callback: str | None = None,
    status_callback_events: Sequence[str] | None = None,
    status_callback_method: str = "POST",
    machine_detection: str | None = None,
    async_amd: bool = False,
    async_amd_status_callback: str | None = None,
    timeout: int | None = None,
    record: bool = False,
    time_limit: int | None = None,
    from_: str | None = None,
    client: Client | None = None,
) -> str:
    """Place a call to ``phone`` whose TwiML connects it to this server's media stream.

    Returns the call SID. The TwiML is sent inline: ``<Connect><Stream>`` to
    ``{VOICE_STREAM_URL as ws}/voice`` (or ``/voice/{route_token}``), with ``parameters`` as
    ``<Parameter>``s. ``status_callback``/``status_callback_events`` (initiated, ringing,
    answered, completed), ``machine_detection`` ("Enable" | "DetectMessageEnd") with
    optional ``async_amd``, ``timeout`` (ring seconds, ≤ 600), ``record`` and
    ``time_limit`` (call seconds) map to Twilio's options. ``from_`` overrides
    TWILIO_PHONE_NUMBER; ``client`` replaces the client built from TWILIO_ACCOUNT_SID /
    TWILIO_AUTH_TOKEN.

    Raises MissingStreamUrlError, MissingTwilioCredentialError (names the variable),
    ValueError for invalid options (before any request) and TwilioRestError.
    """
    options = _call_options(
        phone,
        stream_url=stream_url,
        route_token=route_token,
        parameters=parameters,
        status_callback=status_callback,
        status_callback_events=status_callback_events,
        status_callback_method=status_callback_method,
        machine_detection=machine_detection,
        async_amd=async_amd,
        async_amd_status_callback=async_amd_status_callback,
        timeout=timeout,
        record=record,
        time_limit=time_limit,
        from_=from_,
        client=client,
    )
    with _sync_client(client) as rest, _rest_errors():
        call = rest.calls.create(**options)
    logger.info("Outbound call created", extra={"call_sid": call.sid})
    return str(call.sid)


async def initiate_outbound_call_async(
    phone: str,
    *,
    stream_url: str | None = None,
    route_token: str | None = None,
    parameters: Mapping[str, str] | None = None,
    status_callback: str | None = None,
    status_callback_events: Sequence[str] | None = None,
    status_callback_method: str = "POST",
    machine_detection: str | None = None,
    async_amd: bool = False,
    async_amd_status_callback: str | None = None,
    timeout: int | None = None,  # noqa: ASYNC109 - Twilio's ring timeout, not ours
    record: bool = False,
    time_limit: int | None = None,
    from_: str | None = None,
    client: Client | None = None,
) -> str:
    """Async twin of :func:`initiate_outbound_call` (``client`` must be an async client)."""
    options = _call_options(
        phone,
        stream_url=stream_url,
        route_token=route_token,
        parameters=parameters,
        status_callback=status_callback,
        status_callback_events=status_callback_events,
        status_callback_method=status_callback_method,
        machine_detection=machine_detection,
        async_amd=async_amd,
        async_amd_status_callback=async_amd_status_callback,
        timeout=timeout,
        record=record,
        time_limit=time_limit,
        from_=from_,
        client=client,
    )
    async with _async_client(client) as rest:
        with _rest_errors():
            call = await rest.calls.create_async(**options)
    logger.info("Outbound call created", extra={"call_sid": call.sid})
    return str(call.sid)


# --------------------------------------------------------------------------- hang-up


def validate_regions(regions: object) -> tuple[TwilioRegion, ...]:
    """Revalidate explicit regions: a non-empty tuple of TwilioRegion with distinct hosts."""
    if not isinstance(regions, tuple) or not regions:
        raise ValueError("regions must be a non-empty tuple of TwilioRegion")
    checked = tuple(TwilioRegion.model_validate(region) for region in regions)
    hosts = [region.api_host for region in checked]
    if len(set(hosts)) != len(hosts):
        raise ValueError("regions must have distinct api_host values")
    return checked


_validated_regions = validate_regions  # the 0.1.x private name, used by transports


def _hangup_outcome(exc: Exception, call_sid: str, host: str) -> bool:
    """False when the region does not know the call; True when it already ended; else raise."""
    from voice_runtime.transports import _rest

    error = _rest.as_rest_error(exc)
    if error is None:
        raise exc
    if error.status == 404 and error.code == 20404:
        logger.info("Call not in this region", extra={"call_sid": call_sid, "api_host": host})
        return False
    if error.status == 400 and error.code == 21220:
        logger.info("Call had already ended", extra={"call_sid": call_sid, "api_host": host})
        return True
    if error is exc:
        raise exc
    raise error from exc


def _complete(client: Client, call_sid: str, host: str) -> bool:
    try:
        client.calls(call_sid).update(status="completed")
    except Exception as exc:
        return _hangup_outcome(exc, call_sid, host)
    logger.info("Call hangup issued", extra={"call_sid": call_sid, "api_host": host})
    return True


async def _complete_async(client: Client, call_sid: str, host: str) -> bool:
    try:
        await client.calls(call_sid).update_async(status="completed")
    except Exception as exc:
        return _hangup_outcome(exc, call_sid, host)
    logger.info("Call hangup issued", extra={"call_sid": call_sid, "api_host": host})
    return True


def hangup_call(call_sid: str, *, regions: tuple[TwilioRegion, ...] | None = None) -> None:
    """End a call through the REST API (``status=completed``).

    With ``regions`` (a non-empty tuple of :class:`TwilioRegion` with distinct hosts), each
    region is tried in order: 404/20404 means "not here, try the next", 400/21220 means the
    call had already ended (success). Without regions the environment's credentials are used.
    When no region knows the call, :class:`TwilioCallNotFoundError` is raised (without
    regions, a :class:`TwilioCallNotFoundRestError`: also the 404 ``TwilioRestException``);
    any other failure raises :class:`TwilioRestError`.
    """
    from voice_runtime.transports import _rest

    validate_sid(call_sid)
    if regions is not None:
        checked = validate_regions(regions)
        for region in checked:
            client = build_explicit_twilio_client(region)
            try:
                if _complete(client, call_sid, region.api_host):
                    return
            finally:
                _rest.close_client(client)
        raise TwilioCallNotFoundError(tuple(region.api_host for region in checked))
    account_sid, auth_token = _credentials(settings())
    client = build_twilio_client(account_sid, auth_token)
    try:
        host = _rest.client_api_host(client)
        if not _complete(client, call_sid, host):
            raise TwilioCallNotFoundRestError((host,), uri=f"/Calls/{call_sid}.json")
    finally:
        _rest.close_client(client)


async def hangup_call_async(
    call_sid: str, *, regions: tuple[TwilioRegion, ...] | None = None
) -> None:
    """Async twin of :func:`hangup_call`."""
    from voice_runtime.transports import _rest

    validate_sid(call_sid)
    if regions is not None:
        checked = validate_regions(regions)
        for region in checked:
            client = _rest.build_region_client(region, use_async=True)
            try:
                if await _complete_async(client, call_sid, region.api_host):
                    return
            finally:
                await _rest.aclose_client(client)
        raise TwilioCallNotFoundError(tuple(region.api_host for region in checked))
    account_sid, auth_token = _credentials(settings())
    client = _rest.build_async_client(account_sid, auth_token)
    try:
        host = _rest.client_api_host(client)
        if not await _complete_async(client, call_sid, host):
            raise TwilioCallNotFoundRestError((host,), uri=f"/Calls/{call_sid}.json")
    finally:
        await _rest.aclose_client(client)


# --------------------------------------------------------------------------- live call control


def _update_options(
    call_sid: str, twiml: object | None, url: str | None, status: str | None
) -> dict[str, Any]:
    validate_sid(call_sid)
    if twiml is not None and url is not None:
        raise ValueError("pass twiml or url, not both")
    if twiml is None and url is None and status is None:
        raise ValueError("pass twiml, url or status")
    if status is not None and status not in _UPDATE_STATUSES:
        raise ValueError("status must be 'completed' or 'canceled'")
    options: dict[str, Any] = {}
    if twiml is not None:
        options["twiml"] = _check_twiml(twiml)
    if url is not None:
        if not isinstance(url, str) or not url.strip():
            raise ValueError("url must be a non-blank URL")
        options["url"] = url
    if status is not None:
        options["status"] = status
    return options


def update_call(
    call_sid: str,
    *,
    twiml: str | None = None,
    url: str | None = None,
    status: str | None = None,
    client: Client | None = None,
) -> str:
    """Give a live call new TwiML (inline or by URL) or end it (``status``); return its status.

    New TwiML replaces what the call is executing: an open ``<Connect><Stream>`` ends (Twilio
    sends ``stop`` and closes the websocket) before the new TwiML runs.
    """
    options = _update_options(call_sid, twiml, url, status)
    with _sync_client(client) as rest, _rest_errors():
        call = rest.calls(call_sid).update(**options)
    logger.info("Call updated", extra={"call_sid": call_sid, "fields": sorted(options)})
    return str(call.status or "")


async def update_call_async(
    call_sid: str,
    *,
    twiml: str | None = None,
    url: str | None = None,
    status: str | None = None,
    client: Client | None = None,
) -> str:
    """Async twin of :func:`update_call`."""
    options = _update_options(call_sid, twiml, url, status)
    async with _async_client(client) as rest:
        with _rest_errors():
            call = await rest.calls(call_sid).update_async(**options)
    logger.info("Call updated", extra={"call_sid": call_sid, "fields": sorted(options)})
    return str(call.status or "")


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


def transfer_call(
    call_sid: str, target: str, *, caller_id: str | None = None, client: Client | None = None
) -> str:
    """Transfer a live call to ``target`` (number or ``sip:`` URI); return the call status.

    The media stream to this server ends when the call starts dialling.
    """
    return update_call(
        call_sid, twiml=build_transfer_twiml(target, caller_id=caller_id), client=client
    )


async def transfer_call_async(
    call_sid: str, target: str, *, caller_id: str | None = None, client: Client | None = None
) -> str:
    """Async twin of :func:`transfer_call`."""
    return await update_call_async(
        call_sid, twiml=build_transfer_twiml(target, caller_id=caller_id), client=client
    )


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


def _digits_twiml(
    digits: str,
    stream_url: str | None,
    route_token: str | None,
    parameters: Mapping[str, str] | None,
) -> str:
    base = stream_url if stream_url is not None else settings().voice_stream_url
    if not base:
        raise MissingStreamUrlError()
    return build_digits_twiml(digits, base, route_token=route_token, parameters=parameters)


def send_digits(
    call_sid: str,
    digits: str,
    *,
    stream_url: str | None = None,
    route_token: str | None = None,
    parameters: Mapping[str, str] | None = None,
    client: Client | None = None,
) -> str:
    """Play DTMF ``digits`` into a live call, then reconnect its media stream.

    Twilio can only send digits into a live call by running new TwiML, and new TwiML ends
    the current ``<Connect><Stream>``: the session sees ``stop`` and the websocket closes.
    So the TwiML is ``<Play digits=…/>`` followed by a fresh ``<Connect><Stream>`` to
    ``stream_url`` (default VOICE_STREAM_URL, optionally with ``route_token`` and
    ``parameters``), which arrives as a new stream (new ``streamSid``) for the same call.
    ``digits`` may hold 0-9, ``*``, ``#``, and ``w``/``W`` pauses. Returns the call status.
    """
    twiml = _digits_twiml(digits, stream_url, route_token, parameters)
    return update_call(call_sid, twiml=twiml, client=client)


async def send_digits_async(
    call_sid: str,
    digits: str,
    *,
    stream_url: str | None = None,
    route_token: str | None = None,
    parameters: Mapping[str, str] | None = None,
    client: Client | None = None,
) -> str:
    """Async twin of :func:`send_digits` (same caveat: the media stream restarts)."""
    twiml = _digits_twiml(digits, stream_url, route_token, parameters)
    return await update_call_async(call_sid, twiml=twiml, client=client)


def start_recording(call_sid: str, *, client: Client | None = None, **options: Any) -> str:
    """Start recording a live call; return the recording SID.

    ``options`` go to the SDK's ``calls(sid).recordings.create`` (``recording_channels``,
    ``recording_track``, ``recording_status_callback``, ``trim``, …).
    """
    validate_sid(call_sid)
    with _sync_client(client) as rest, _rest_errors():
        recording = rest.calls(call_sid).recordings.create(**options)
    logger.info("Call recording started", extra={"call_sid": call_sid})
    return str(recording.sid)


async def start_recording_async(
    call_sid: str, *, client: Client | None = None, **options: Any
) -> str:
    """Async twin of :func:`start_recording`."""
    validate_sid(call_sid)
    async with _async_client(client) as rest:
        with _rest_errors():
            recording = await rest.calls(call_sid).recordings.create_async(**options)
    logger.info("Call recording started", extra={"call_sid": call_sid})
    return str(recording.sid)


def stop_recording(call_sid: str, recording_sid: str, *, client: Client | None = None) -> None:
    """Stop a recording started with :func:`start_recording`."""
    validate_sid(call_sid)
    validate_sid(recording_sid)
    with _sync_client(client) as rest, _rest_errors():
        rest.calls(call_sid).recordings(recording_sid).update(status="stopped")
    logger.info("Call recording stopped", extra={"call_sid": call_sid})


async def stop_recording_async(
    call_sid: str, recording_sid: str, *, client: Client | None = None
) -> None:
    """Async twin of :func:`stop_recording`."""
    validate_sid(call_sid)
    validate_sid(recording_sid)
    async with _async_client(client) as rest:
        with _rest_errors():
            await rest.calls(call_sid).recordings(recording_sid).update_async(status="stopped")
    logger.info("Call recording stopped", extra={"call_sid": call_sid})


# --------------------------------------------------------------------------- call lists


def _validate_list_query(
    to: object, start_after: object, page_size: object, max_pages: object
) -> None:
    if not isinstance(to, str) or not to.strip():
        raise ValueError("to must be a non-blank string")
    if not isinstance(start_after, datetime) or start_after.utcoffset() is None:
        raise ValueError("start_after must be a timezone-aware datetime")
    if type(page_size) is not int or not 1 <= page_size <= 1000:
        raise ValueError("page_size must be an int between 1 and 1000")
    if type(max_pages) is not int or max_pages < 1:
        raise ValueError("max_pages must be a positive int")


def _next_page_url(link: object, api_host: str, collection: str) -> str:
    """Resolve ``next_page_uri``; only the same https host and the same collection pass."""
    if (
        not isinstance(link, str)
        or not link
        or any(ord(char) <= 0x20 or ord(char) >= 0x7F for char in link)
        or "\\" in link
        or "#" in link
        or _BAD_PERCENT.search(link)
    ):
        raise ValueError("Malformed next_page_uri in the call list")
    parts = urlsplit(link)
    if (parts.scheme or parts.netloc) and (parts.scheme != "https" or parts.netloc != api_host):
        raise ValueError("next_page_uri leaves the API host of the call list")
    segments = unquote(parts.path).split("/")
    if any(segment in (".", "..") for segment in segments):
        raise ValueError("next_page_uri has dot segments")
    target = urljoin(f"https://{api_host}{collection}", link)
    resolved = urlsplit(target)
    if resolved.scheme != "https" or resolved.netloc != api_host or resolved.path != collection:
        raise ValueError("next_page_uri leaves the Calls collection of the account")
    return target


class _CallListing:
    """The paging state machine of a call list, without I/O: queries out, JSON pages in."""

    def __init__(
        self,
        *,
        api_host: str,
        account_sid: str,
        to: str | None,
        start_after: datetime,
        page_size: int,
        max_pages: int,
        cap_is_error: bool = True,
    ) -> None:
        self.api_host = api_host
        self.collection = f"/{_CALLS_API_VERSION}/Accounts/{account_sid}/Calls.json"
        self.after = start_after.astimezone(UTC)
        self.max_pages = max_pages
        self.cap_is_error = cap_is_error
        self.pages_fetched = 0
        self.rows: list[TwilioCallRow] = []
        # The SDK's calls.page() keywords: To, StartTime> (UTC, ...Z) and PageSize.
        self.first_query: dict[str, Any] = {"start_time_after": self.after, "page_size": page_size}
        if to is not None:
            self.first_query["to"] = to
        self.next_url: str | None = None

    def feed(self, payload: object) -> None:
        """Take one decoded page; set ``next_url`` (None when done) or raise."""
        self.pages_fetched += 1
        rows, link = parse_call_page(payload)
        cutoff = self.after.timestamp()
        self.rows.extend(row for row in rows if row.start_time is None or row.start_time > cutoff)
        if link is None:
            self.next_url = None
            return
        target = _next_page_url(link, self.api_host, self.collection)
        if self.pages_fetched >= self.max_pages:
            if self.cap_is_error:
                raise TwilioCallListIncompleteError(self.api_host, self.pages_fetched)
            self.next_url = None
            return
        self.next_url = target


def _status_error(response: Any, path: str) -> TwilioRestError:
    """The TwilioRestError for a non-200 page (the SDK raises a bare TwilioException)."""
    try:
        body = json.loads(response.text)
    except (TypeError, ValueError):
        body = {}
    body = body if isinstance(body, dict) else {}
    code = body.get("code")
    status = response.status_code
    return TwilioRestError(
        str(body.get("message") or "call list request failed"),
        status=status if isinstance(status, int) else None,
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        uri=path,
        method="GET",
    )


def _page_failure(exc: Exception, path: str) -> Exception:
    """Map what the SDK raised while fetching or decoding a page to our error."""
    from twilio.base.exceptions import TwilioException
    from twilio.http.response import Response

    from voice_runtime.transports import _rest

    error = _rest.as_rest_error(exc)
    if error is not None:
        return error
    if isinstance(exc, TwilioException) and len(exc.args) > 1 and isinstance(exc.args[1], Response):
        return _status_error(exc.args[1], path)  # "Unable to fetch page", with the response
    if isinstance(
        exc, TwilioException | json.JSONDecodeError | TypeError | AttributeError | KeyError
    ):
        # The SDK's page parser choked on the body (not JSON, not an object of records).
        return ValueError("Call list page is not a JSON object with a list of calls")
    return exc


def _page_payload(page: object) -> object:
    # The raw JSON the SDK decoded: validated here, before the SDK's lossy record parsing.
    return getattr(page, "_payload", None)


def _read_page(fetch: Callable[[], object], path: str) -> object:
    try:
        page = fetch()
    except Exception as exc:
        error = _page_failure(exc, path)
        if error is exc:
            raise
        raise error from exc
    return _page_payload(page)


async def _read_page_async(fetch: Callable[[], Awaitable[object]], path: str) -> object:
    try:
        page = await fetch()
    except Exception as exc:
        error = _page_failure(exc, path)
        if error is exc:
            raise
        raise error from exc
    return _page_payload(page)


def _fetch_all(listing: _CallListing, client: Client) -> list[TwilioCallRow]:
    """Read every page through the SDK (``calls.page``, then ``calls.get_page``)."""
    listing.feed(_read_page(lambda: client.calls.page(**listing.first_query), listing.collection))
    while listing.next_url is not None:
        url = listing.next_url
        listing.feed(_read_page(functools.partial(client.calls.get_page, url), listing.collection))
    return listing.rows


async def _fetch_all_async(listing: _CallListing, client: Client) -> list[TwilioCallRow]:
    """Async twin of :func:`_fetch_all` (``page_async``, ``get_page_async``)."""
    first = listing.first_query
    listing.feed(
        await _read_page_async(lambda: client.calls.page_async(**first), listing.collection)
    )
    while listing.next_url is not None:
        url = listing.next_url
        listing.feed(
            await _read_page_async(
                functools.partial(client.calls.get_page_async, url), listing.collection
            )
        )
    return listing.rows


def _new_listing(
    api_host: str,
    account_sid: str,
    auth: tuple[str, str],
    to: str,
    start_after: datetime,
    page_size: int,
    max_pages: int,
) -> tuple[_CallListing, TwilioRegion]:
    region = TwilioRegion(api_host=api_host, account_sid=account_sid, auth=auth)
    _validate_list_query(to, start_after, page_size, max_pages)
    listing = _CallListing(
        api_host=region.api_host,
        account_sid=region.account_sid,
        to=to,
        start_after=start_after,
        page_size=page_size,
        max_pages=max_pages,
    )
    return listing, region


def list_calls(
    *,
    api_host: str,
    account_sid: str,
    auth: tuple[str, str],
    to: str,
    start_after: datetime,
    page_size: int = 200,
    max_pages: int = 10,
    api_base_url: str | None = None,
    timeout: float | None = None,
) -> list[TwilioCallRow]:
    """Return every call to ``to`` that started after ``start_after`` in one explicit region.

    Everything is validated before the first request: the region (see
    :class:`TwilioRegion`), ``to`` non-blank, ``start_after`` timezone-aware,
    ``1 <= page_size <= 1000`` and ``max_pages >= 1`` as ints (ValueError otherwise).
    Pages are followed through ``next_page_uri`` only on the same https host and the same
    ``/2010-04-01/Accounts/{sid}/Calls.json`` collection (anything else is a ValueError);
    every page's raw JSON is validated. Rows with an unknown start time are kept, those that
    started at or before ``start_after`` dropped. A next page left after ``max_pages`` raises
    :class:`TwilioCallListIncompleteError`; a REST failure raises :class:`TwilioRestError`.
    No partial list is ever returned.

    ``api_base_url`` (default TWILIO_API_BASE_URL) sends the requests elsewhere (a proxy, a
    fake) while the host rules above still apply to the https URLs Twilio names.
    """
    listing, region = _new_listing(
        api_host, account_sid, auth, to, start_after, page_size, max_pages
    )
    from voice_runtime.transports import _rest

    if api_base_url is None and timeout is None:
        client = build_explicit_twilio_client(region)
    else:
        client = build_explicit_twilio_client(region, api_base_url=api_base_url, timeout=timeout)
    try:
        return _fetch_all(listing, client)
    finally:
        _rest.close_client(client)


async def list_calls_async(
    *,
    api_host: str,
    account_sid: str,
    auth: tuple[str, str],
    to: str,
    start_after: datetime,
    page_size: int = 200,
    max_pages: int = 10,
    api_base_url: str | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - per-request HTTP timeout
) -> list[TwilioCallRow]:
    """Async twin of :func:`list_calls` (the SDK's ``page_async``/``get_page_async``)."""
    from voice_runtime.transports import _rest

    listing, region = _new_listing(
        api_host, account_sid, auth, to, start_after, page_size, max_pages
    )
    client = _rest.build_region_client(
        region, api_base_url=api_base_url, timeout=timeout, use_async=True
    )
    try:
        return await _fetch_all_async(listing, client)
    finally:
        await _rest.aclose_client(client)


def list_recent_calls(lookback_s: float = 3600.0) -> list[dict[str, Any]]:
    """Deprecated: calls to TWILIO_PHONE_NUMBER in the last ``lookback_s`` seconds.

    Returns ``[]`` without credentials, else ``{"call_sid", "status", "start_time"}`` dicts
    (``start_time`` in epoch seconds, 0 when unknown), at most one page of 200. Use
    :func:`list_calls`, which is complete or raises.
    """
    warnings.warn(
        "list_recent_calls() is deprecated; use list_calls(), which reads every page",
        DeprecationWarning,
        stacklevel=2,
    )
    if isinstance(lookback_s, bool) or not isinstance(lookback_s, int | float):
        raise ValueError("lookback_s must be a number of seconds")
    if not math.isfinite(lookback_s) or lookback_s < 0:
        raise ValueError("lookback_s must be a finite, non-negative number of seconds")
    from voice_runtime.transports import _rest

    current = settings()
    if not current.twilio_account_sid or not current.twilio_auth_token:
        return []
    account_sid = validate_sid(current.twilio_account_sid)
    client = build_twilio_client(account_sid, current.twilio_auth_token)
    try:
        listing = _CallListing(
            api_host=_rest.client_api_host(client),
            account_sid=account_sid,
            to=current.twilio_phone_number or None,
            start_after=datetime.fromtimestamp(time.time() - lookback_s, tz=UTC),
            page_size=200,
            max_pages=1,
            cap_is_error=False,
        )
        rows = _fetch_all(listing, client)
    finally:
        _rest.close_client(client)
    return [
        {
            "call_sid": row.call_sid,
            "status": row.status,
            "start_time": row.start_time if row.start_time is not None else 0,
        }
        for row in rows
    ]


__all__ = [
    "CALL_STATUS_EVENTS",
    "DEFAULT_API_HOST",
    "MACHINE_DETECTION_MODES",
    "TWIML_MAX_CHARS",
    "MissingTwilioCredentialError",
    "TwilioCallListIncompleteError",
    "TwilioCallNotFoundError",
    "TwilioCallNotFoundRestError",
    "TwilioCallRow",
    "TwilioRegion",
    "TwilioRestError",
    "TwilioTransportError",
    "build_digits_twiml",
    "build_explicit_twilio_client",
    "build_route_stream_xml",
    "build_stream_twiml",
    "build_stream_xml",
    "build_transfer_twiml",
    "build_twilio_client",
    "hangup_call",
    "hangup_call_async",
    "initiate_outbound_call",
    "initiate_outbound_call_async",
    "list_calls",
    "list_calls_async",
    "list_recent_calls",
    "send_digits",
    "send_digits_async",
    "start_recording",
    "start_recording_async",
    "stop_recording",
    "stop_recording_async",
    "transfer_call",
    "transfer_call_async",
    "update_call",
    "update_call_async",
    "validate_regions",
]
