"""Twilio SMS: sending messages, answering the inbound SMS webhook, parsing its form.

``send_sms`` gets its client from :func:`build_twilio_client` (patchable) and reads
TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER (through
:func:`voice_runtime.config.settings`) when called, unless given ``client`` / ``from_`` /
``messaging_service_sid``; REST failures raise
:class:`~voice_runtime.transports.twilio_models.TwilioRestError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime.config import settings
from voice_runtime.transports.twilio_models import MissingTwilioCredentialError, validate_sid

if TYPE_CHECKING:
    from twilio.rest import Client

logger = logging.getLogger(__name__)


def build_twilio_client(account_sid: str, auth_token: str) -> Client:
    """Return the ``twilio.rest.Client`` :func:`send_sms` uses (as in 0.1.x).

    :func:`send_sms` calls this module-level name each time, so tests can replace it with
    ``monkeypatch.setattr(twilio_sms, "build_twilio_client", ...)`` (or patch
    ``twilio.rest.Client``). Bounded timeout, no redirects, as in
    :func:`voice_runtime.transports.twilio_call.build_twilio_client`.
    """
    from voice_runtime.transports import _rest

    # A test's patch("voice_runtime.transports.twilio_sms.Client") lands in globals().
    return _rest.build_client(account_sid, auth_token, client_class=globals().get("Client"))


def __getattr__(name: str) -> Any:
    # 0.1.x imported twilio.rest.Client into this module; resolved lazily (see above).
    if name == "Client":
        import twilio.rest

        return twilio.rest.Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _message_options(
    to: str,
    body: str,
    *,
    media_urls: Sequence[str] | None,
    messaging_service_sid: str | None,
    status_callback: str | None,
    from_: str | None,
    client: Client | None,
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Validate, resolve settings; return the SDK's ``messages.create`` kwargs and credentials."""
    if not isinstance(to, str) or not to.strip():
        raise ValueError("to must be a non-blank phone number")
    if not isinstance(body, str):
        raise ValueError("body must be a string")
    media: list[str] = []
    if media_urls is not None:
        if isinstance(media_urls, str):
            raise ValueError("media_urls must be a sequence of URLs, not one string")
        media = list(media_urls)
        if any(not isinstance(url, str) or not url.strip() for url in media):
            raise ValueError("media_urls must hold non-blank URLs")
    if not body.strip() and not media:
        raise ValueError("an SMS needs a body or media_urls")
    if messaging_service_sid is not None:
        validate_sid(messaging_service_sid)

    current = settings()
    credentials: tuple[str, str] | None = None
    if client is None:
        if not current.twilio_account_sid:
            raise MissingTwilioCredentialError("TWILIO_ACCOUNT_SID", "Twilio account SID")
        if not current.twilio_auth_token:
            raise MissingTwilioCredentialError("TWILIO_AUTH_TOKEN", "Twilio auth token")
        credentials = (current.twilio_account_sid, current.twilio_auth_token)
    sender = from_
    if sender is None and messaging_service_sid is None:
        sender = current.twilio_phone_number
        if not sender:
            raise MissingTwilioCredentialError("TWILIO_PHONE_NUMBER", "Twilio phone number")

    options: dict[str, Any] = {"to": to, "body": body}
    if sender is not None:
        options["from_"] = sender
    if messaging_service_sid is not None:
        options["messaging_service_sid"] = messaging_service_sid
    if media:
        options["media_url"] = media
    if status_callback is not None:
        options["status_callback"] = status_callback
    return options, credentials


def _result(message: Any, to: str) -> dict[str, str]:
    return {
        "message_sid": str(getattr(message, "sid", "") or ""),
        "status": str(getattr(message, "status", "") or ""),
        "to": to,
    }


def send_sms(
    to: str,
    body: str,
    *,
    media_urls: Sequence[str] | None = None,
    messaging_service_sid: str | None = None,
    status_callback: str | None = None,
    from_: str | None = None,
    client: Client | None = None,
) -> dict[str, str]:
    """Send an SMS (or MMS with ``media_urls``); return ``{"message_sid", "status", "to"}``.

    The sender is ``from_``, else ``messaging_service_sid`` (then no number is needed),
    else TWILIO_PHONE_NUMBER. Raises MissingTwilioCredentialError naming the missing
    variable, ValueError for invalid arguments and TwilioRestError when Twilio refuses.
    """
    from voice_runtime.transports import _rest

    options, credentials = _message_options(
        to,
        body,
        media_urls=media_urls,
        messaging_service_sid=messaging_service_sid,
        status_callback=status_callback,
        from_=from_,
        client=client,
    )

    def build() -> Client:
        assert credentials is not None
        return build_twilio_client(*credentials)

    with _rest.sync_client(client, build) as rest, _rest.rest_errors():
        message = rest.messages.create(**options)
    logger.info("SMS sent", extra={"message_sid": getattr(message, "sid", None)})
    return _result(message, to)


async def send_sms_async(
    to: str,
    body: str,
    *,
    media_urls: Sequence[str] | None = None,
    messaging_service_sid: str | None = None,
    status_callback: str | None = None,
    from_: str | None = None,
    client: Client | None = None,
) -> dict[str, str]:
    """Async twin of :func:`send_sms` (``client`` must be an async client)."""
    from voice_runtime.transports import _rest

    options, credentials = _message_options(
        to,
        body,
        media_urls=media_urls,
        messaging_service_sid=messaging_service_sid,
        status_callback=status_callback,
        from_=from_,
        client=client,
    )

    def build() -> Client:
        assert credentials is not None
        return _rest.build_async_client(*credentials)

    async with _rest.async_client(client, build) as rest:
        with _rest.rest_errors():
            message = await rest.messages.create_async(**options)
    logger.info("SMS sent", extra={"message_sid": getattr(message, "sid", None)})
    return _result(message, to)


def sms_reply_twiml(text: str | None) -> str:
    """Return the TwiML answer to an inbound SMS: one ``<Message>``, or an empty ``<Response/>``.

    ``None`` or an empty string means "no reply". Characters XML cannot carry (NUL and
    most other control characters) are removed, so the answer is always well-formed.
    """
    from twilio.twiml.messaging_response import MessagingResponse

    from voice_runtime.transports.xml_text import xml_safe

    response = MessagingResponse()
    text = xml_safe(text) if text else text
    if text:
        response.message(text)
    return response.to_xml()


@dataclass(frozen=True)
class InboundSms:
    """The fields of Twilio's inbound SMS webhook that an app needs."""

    message_sid: str
    from_: str
    to: str
    body: str
    media_urls: tuple[str, ...] = ()
    account_sid: str | None = None
    messaging_service_sid: str | None = None


def parse_inbound_sms(form: Mapping[str, str]) -> InboundSms:
    """Read the inbound SMS webhook form (MessageSid, From, To, Body, NumMedia, MediaUrlN).

    Raises ValueError when a required field is missing or NumMedia does not match the
    MediaUrlN fields.
    """
    message_sid = form.get("MessageSid") or form.get("SmsSid")
    if not message_sid:
        raise ValueError("inbound SMS form has no MessageSid")
    for field in ("From", "To"):
        if not form.get(field):
            raise ValueError(f"inbound SMS form has no {field}")
    raw_count = form.get("NumMedia") or "0"
    try:
        count = int(raw_count)
    except ValueError:
        raise ValueError("NumMedia is not an integer") from None
    if count < 0:
        raise ValueError("NumMedia is negative")
    media: list[str] = []
    for index in range(count):
        url = form.get(f"MediaUrl{index}")
        if not url:
            raise ValueError(f"NumMedia is {count} but MediaUrl{index} is missing")
        media.append(url)
    return InboundSms(
        message_sid=message_sid,
        from_=form["From"],
        to=form["To"],
        body=form.get("Body") or "",
        media_urls=tuple(media),
        account_sid=form.get("AccountSid") or None,
        messaging_service_sid=form.get("MessagingServiceSid") or None,
    )


__all__ = [
    "InboundSms",
    "build_twilio_client",
    "parse_inbound_sms",
    "send_sms",
    "send_sms_async",
    "sms_reply_twiml",
]
