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

This module holds the client builders (the patch points) and hang-up; the rest lives beside
it and is re-exported here: :mod:`~voice_runtime.transports.twilio_twiml` (TwiML builders),
:mod:`~voice_runtime.transports.twilio_control` (placing, updating, transferring, digits,
recording) and :mod:`~voice_runtime.transports.twilio_listing` (call lists).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from voice_runtime.config import settings
from voice_runtime.transports.twilio_control import (
    CALL_STATUS_EVENTS,
    MACHINE_DETECTION_MODES,
    _credentials,
    initiate_outbound_call,
    initiate_outbound_call_async,
    send_digits,
    send_digits_async,
    start_recording,
    start_recording_async,
    stop_recording,
    stop_recording_async,
    transfer_call,
    transfer_call_async,
    update_call,
    update_call_async,
)
from voice_runtime.transports.twilio_listing import list_calls, list_calls_async, list_recent_calls
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
    validate_sid,
)
from voice_runtime.transports.twilio_twiml import (
    TWIML_MAX_CHARS,
    build_digits_twiml,
    build_route_stream_xml,
    build_stream_twiml,
    build_stream_xml,
    build_transfer_twiml,
)

if TYPE_CHECKING:
    from twilio.rest import Client

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- clients


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
