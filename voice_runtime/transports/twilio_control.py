"""Twilio call control over REST: place a call, update, transfer, send digits, record.

Every function validates its options before any request and resolves settings when called.
Sync functions get their client from ``twilio_call.build_twilio_client`` (looked up at call
time, so a test's patch of it or of ``twilio.rest.Client`` reaches every request); each has
an ``*_async`` twin. Hang-up lives in :mod:`voice_runtime.transports.twilio_call` itself.
Re-exported by :mod:`voice_runtime.transports.twilio_call`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from voice_runtime.config import Settings, settings
from voice_runtime.errors import MissingStreamUrlError
from voice_runtime.transports.twilio_models import MissingTwilioCredentialError, validate_sid
from voice_runtime.transports.twilio_twiml import (
    _check_twiml,
    build_digits_twiml,
    build_route_stream_xml,
    build_stream_twiml,
    build_transfer_twiml,
)

if TYPE_CHECKING:
    from twilio.rest import Client

logger = logging.getLogger("voice_runtime.transports.twilio_call")

CALL_STATUS_EVENTS = frozenset({"initiated", "ringing", "answered", "completed"})
MACHINE_DETECTION_MODES = frozenset({"Enable", "DetectMessageEnd"})
_HTTP_METHODS = frozenset({"GET", "POST"})
_UPDATE_STATUSES = frozenset({"completed", "canceled"})

__all__ = [
    "CALL_STATUS_EVENTS",
    "MACHINE_DETECTION_MODES",
    "OutboundCallOptions",
    "initiate_outbound_call",
    "initiate_outbound_call_async",
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
]


# --------------------------------------------------------------------------- settings and clients


def _clients() -> ModuleType:
    """The twilio_call module, where tests patch the client builders and ``Client``."""
    from voice_runtime.transports import twilio_call

    return twilio_call


def _credentials(current: Settings) -> tuple[str, str]:
    if not current.twilio_account_sid:
        raise MissingTwilioCredentialError("TWILIO_ACCOUNT_SID", "Twilio account SID")
    if not current.twilio_auth_token:
        raise MissingTwilioCredentialError("TWILIO_AUTH_TOKEN", "Twilio auth token")
    # The account SID goes into every request path.
    return validate_sid(current.twilio_account_sid), current.twilio_auth_token


def _sync_client(client: Client | None) -> Any:
    """Context manager yielding ``client`` or one built from the environment's credentials."""
    from voice_runtime.transports import _rest

    if client is not None:
        return _rest.sync_client(client, lambda: client)
    account_sid, auth_token = _credentials(settings())
    return _rest.sync_client(None, lambda: _clients().build_twilio_client(account_sid, auth_token))


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


@dataclass(frozen=True, kw_only=True)
class OutboundCallOptions:
    """The options of one outbound call, validated on construction (before any request).

    :func:`initiate_outbound_call` and its async twin build one from their keywords;
    :meth:`create_kwargs` resolves the settings and returns the SDK's ``calls.create`` kwargs.
    """

    phone: str = field(repr=False)
    stream_url: str | None = None
    route_token: str | None = field(default=None, repr=False)
    parameters: Mapping[str, str] | None = field(default=None, repr=False)
    status_callback: str | None = None
    status_callback_events: Sequence[str] | None = None
    status_callback_method: str = "POST"
    machine_detection: str | None = None
    async_amd: bool = False
    async_amd_status_callback: str | None = None
    timeout: int | None = None
    record: bool = False
    time_limit: int | None = None
    from_: str | None = field(default=None, repr=False)
    client: Client | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        phone, status_callback_events = self.phone, self.status_callback_events
        if not isinstance(phone, str) or not phone.strip():
            raise ValueError("phone must be a non-blank phone number (E.164) or client/sip address")
        if status_callback_events is not None:
            if isinstance(status_callback_events, str):
                raise ValueError("status_callback_events must be a sequence of event names")
            events = tuple(status_callback_events)
            unknown = sorted(set(events) - CALL_STATUS_EVENTS)
            if unknown or not events:
                raise ValueError(
                    f"status_callback_events must be non-empty, from {sorted(CALL_STATUS_EVENTS)}"
                )
            if self.status_callback is None:
                raise ValueError("status_callback_events needs status_callback")
            # A snapshot: the caller's list may change after the call is placed.
            object.__setattr__(self, "status_callback_events", events)
        if self.status_callback_method not in _HTTP_METHODS:
            raise ValueError("status_callback_method must be 'GET' or 'POST'")
        machine_detection = self.machine_detection
        if machine_detection is not None and machine_detection not in MACHINE_DETECTION_MODES:
            raise ValueError("machine_detection must be 'Enable' or 'DetectMessageEnd'")
        if self.async_amd and machine_detection is None:
            raise ValueError("async_amd needs machine_detection")
        if self.async_amd_status_callback is not None and not self.async_amd:
            raise ValueError("async_amd_status_callback needs async_amd=True")
        _optional_positive_int(self.timeout, "timeout", 600)
        _optional_positive_int(self.time_limit, "time_limit")
        if not isinstance(self.record, bool) or not isinstance(self.async_amd, bool):
            raise ValueError("record and async_amd must be booleans")

    def create_kwargs(self) -> dict[str, Any]:
        """Resolve settings (stream URL, credentials, caller ID); the ``calls.create`` kwargs."""
        current = settings()
        base = self.stream_url if self.stream_url is not None else current.voice_stream_url
        if not base:
            raise MissingStreamUrlError()
        if self.route_token is not None:
            twiml = build_route_stream_xml(base, self.route_token, parameters=self.parameters)
        else:
            twiml = build_stream_twiml(base, parameters=self.parameters)
        if self.client is None:
            _credentials(current)
        caller_id = self.from_ if self.from_ is not None else current.twilio_phone_number
        if not caller_id:
            raise MissingTwilioCredentialError("TWILIO_PHONE_NUMBER", "Twilio phone number")

        options: dict[str, Any] = {
            "to": self.phone,
            "from_": caller_id,
            "twiml": _check_twiml(twiml),
        }
        if self.status_callback is not None:
            options["status_callback"] = self.status_callback
            options["status_callback_method"] = self.status_callback_method
            if self.status_callback_events is not None:
                options["status_callback_event"] = list(self.status_callback_events)
        if self.machine_detection is not None:
            options["machine_detection"] = self.machine_detection
        if self.async_amd:
            options["async_amd"] = "true"
            if self.async_amd_status_callback is not None:
                options["async_amd_status_callback"] = self.async_amd_status_callback
        if self.timeout is not None:
            options["timeout"] = self.timeout
        if self.record:
            options["record"] = True
        if self.time_limit is not None:
            options["time_limit"] = self.time_limit
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
    # The arguments, exactly as passed: one options object validates them all.
    options = OutboundCallOptions(**locals()).create_kwargs()
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
    # The arguments, exactly as passed: one options object validates them all.
    options = OutboundCallOptions(**locals()).create_kwargs()
    async with _async_client(client) as rest:
        with _rest_errors():
            call = await rest.calls.create_async(**options)
    logger.info("Outbound call created", extra={"call_sid": call.sid})
    return str(call.sid)


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
