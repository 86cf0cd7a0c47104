"""The HTTP side of :class:`~voice_runtime.server.VoiceServer`: Twilio webhooks and health.

Routes (prefix ``webhook_prefix``, default ``/twilio``)::

    POST {prefix}/voice    incoming-call webhook -> <Connect><Stream> (or busy TwiML)
    POST {prefix}/status   call-status and async AMD callbacks -> session events
    POST {prefix}/sms      incoming-SMS webhook
    POST {prefix}/whisper/{token}/{step}   a warm transfer's whisper to the agent
    GET  /health, /ready   liveness; readiness is 503 while draining

:class:`WebhookRoutes` holds the handlers; VoiceServer inherits them and provides the state
they read (declared below). Nothing unbounded is read before a request is authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import ImmutableMultiDict
from starlette.requests import ClientDisconnect

from voice_runtime._callbacks import CallbackRunner, CallbacksBusyError
from voice_runtime._callbacks import is_async_callable as _is_async_callable
from voice_runtime.calls import CallRegistry, make_route
from voice_runtime.errors import MissingStreamUrlError
from voice_runtime.logutil import LogLimiter, log_limited
from voice_runtime.session import VoiceSession
from voice_runtime.transports.security import (
    SignaturePolicy,
    check_request_signature,
    refusal_before_body,
    request_base_url,
)
from voice_runtime.transports.xml_text import xml_safe
from voice_runtime.types import SessionEvent
from voice_runtime.urls import is_local_host
from voice_runtime.voicemail import note_answered_by

logger = logging.getLogger(__name__)

TWIML = "application/xml"
MAX_WEBHOOK_BYTES = 64 * 1024
"""Default cap on a webhook body; Twilio's largest (an SMS with media URLs) is a few KB."""
MAX_WEBHOOK_FIELDS = 256
WEBHOOK_READ_TIMEOUT_S = 10.0
"""A webhook body must arrive within this long (a slow sender holds no handler longer)."""
ENDED_STATUSES = frozenset({"completed", "busy", "no-answer", "canceled", "failed"})

__all__ = [
    "ENDED_STATUSES",
    "MAX_WEBHOOK_BYTES",
    "MAX_WEBHOOK_FIELDS",
    "TWIML",
    "WEBHOOK_READ_TIMEOUT_S",
    "WebhookRoutes",
]


class WebhookRoutes:
    """The webhook and health handlers of VoiceServer (a mixin: it owns no state)."""

    # Provided by VoiceServer.
    path: str
    max_calls: int
    route_ttl_s: float
    inbound_route_ttl_s: float
    inbound_parameters: Callable[[Mapping[str, str]], Mapping[str, str]] | None
    on_sms: Callable[[Any], str | None] | None
    busy_message: str
    max_webhook_bytes: int
    webhook_read_timeout_s: float
    callbacks: CallbackRunner
    webhook_refusals: LogLimiter
    registry: CallRegistry
    draining: bool
    cluster: Any

    if TYPE_CHECKING:

        def _policy(self) -> SignaturePolicy: ...

        def _public_base(self) -> str: ...

        def _refuse(self, reason: str, message: str, **extra: Any) -> None: ...

        def _route_token(self, ttl_s: float, call_sid: str | None = None) -> str | None: ...

    def _refuse_webhook(self, status: int, kind: str, message: str | None = None) -> Response:
        """A refusal; the connection closes, so an unread body is never read."""
        if self.webhook_refusals.allow(kind) and message is not None:
            logger.warning(message, extra={"refused": self.webhook_refusals.count(kind)})
        return Response(status_code=status, headers={"Connection": "close"})

    async def _form(self, request: Request) -> dict[str, str] | Response:
        """The webhook's signed form, or the refusal to answer instead.

        Nothing unbounded is read before authentication: with signatures enforced a request
        without ``X-Twilio-Signature`` is refused before its body is read; a body is capped
        at ``max_webhook_bytes`` while it streams in (Content-Length first, a chunked body
        as it arrives). The signature covers the form, so the capped body is parsed once
        (no interpretation yet), then checked.
        """
        policy = self._policy()
        why = refusal_before_body(request, policy)
        if why is not None:
            return self._refuse_webhook(503 if why == "no_public_url" else 403, why)
        body = await self._read_body(request)
        if isinstance(body, Response):
            return body
        try:
            pairs = parse_qsl(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=True,
                max_num_fields=MAX_WEBHOOK_FIELDS,
            )
        except ValueError:  # UnicodeDecodeError is one too
            return self._refuse_webhook(400, "malformed", "webhook refused: malformed form body")
        if not check_request_signature(request, ImmutableMultiDict(pairs), policy):
            return self._refuse_webhook(403, "signature")
        return dict(pairs)

    async def _read_body(self, request: Request) -> bytes | Response:
        cap = self.max_webhook_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                return self._refuse_webhook(
                    400, "malformed", "webhook refused: malformed form body"
                )
            if int(declared) > cap:
                return self._refuse_webhook(413, "too_large", "webhook refused: body too large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.webhook_read_timeout_s):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > cap:
                        break
        except TimeoutError:
            return self._refuse_webhook(
                408, "slow_body", "webhook refused: body arrived too slowly"
            )
        except ClientDisconnect:
            return self._refuse_webhook(400, "disconnect")
        if len(body) > cap:
            return self._refuse_webhook(413, "too_large", "webhook refused: body too large")
        return bytes(body)

    async def _user_callback(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a user callback off the loop; a Response when it is refused or failed."""
        try:
            return await self.callbacks.run(fn, *args)
        except CallbacksBusyError:
            return self._refuse_webhook(503, "callbacks_busy", "webhook refused: callbacks busy")
        except Exception:
            if self.webhook_refusals.allow("callback_failed"):
                logger.exception("webhook callback failed")
            return Response(status_code=500)

    def _busy_answer(self) -> Response:
        self._refuse("draining" if self.draining else "busy", "incoming call refused")
        return Response(_twiml_busy(self.busy_message), media_type=TWIML)

    async def _call_form(self, request: Request) -> tuple[dict[str, str], str] | Response:
        """The signed form of a call webhook and its CallSid, or the refusal to answer."""
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        call_sid = form.get("CallSid", "")
        if not _is_sid(call_sid):
            return self._refuse_webhook(400, "incomplete", "webhook refused: incomplete form")
        return form, call_sid

    async def _voice_webhook(self, request: Request) -> Response:
        signed = await self._call_form(request)
        if isinstance(signed, Response):
            return signed
        form, call_sid = signed
        full = self.draining or self.registry.reserved_count >= self.max_calls
        if full and (self.cluster is None or self.cluster.pick_instance() is None):
            # Refused before any user callback runs; the reservation below is the real check.
            return self._busy_answer()
        from voice_runtime.transports.twilio_call import build_route_stream_xml

        params: dict[str, str] = {
            "direction": "inbound",
            "caller_number": form.get("From", ""),
            "called_number": form.get("To", ""),
        }
        if self.inbound_parameters is not None:
            extra = await self._user_callback(self.inbound_parameters, form)
            if isinstance(extra, Response):
                return extra
            if not isinstance(extra, Mapping):
                logger.error("inbound_parameters must return a mapping")
                return Response(status_code=500)
            params.update({str(k): str(v) for k, v in extra.items()})
        params = {k: v for k, v in params.items() if v}
        ttl = min(self.route_ttl_s, self.inbound_route_ttl_s)
        token = self._route_token(ttl, call_sid)
        route = make_route(ttl, params, None, call_sid, token=token)
        # The route holds a max_calls slot until its stream claims it or it expires.
        if self.draining or not self.registry.add_reserved_route(route, self.max_calls):
            return self._hand_off(ttl, params, call_sid)
        base = self._public_base_for(request)
        xml = build_route_stream_xml(base, route.token, parameters=params, path=self.path)
        return Response(xml, media_type=TWIML)

    def _hand_off(self, ttl: float, params: dict[str, str], call_sid: str) -> Response:
        """Full or draining: TwiML to the least-loaded ready instance, else busy."""
        target = self.cluster.hand_off() if self.cluster is not None else None
        if target is None:
            return self._busy_answer()
        from voice_runtime.transports.twilio_call import build_route_stream_xml

        token = self.cluster.signer.issue(ttl, instance_id=target.instance_id, call_sid=call_sid)
        xml = build_route_stream_xml(target.url, token, parameters=params, path=self.path)
        logger.info("incoming call handed to another instance", extra={"call_sid": call_sid})
        return Response(xml, media_type=TWIML)

    def _public_base_for(self, request: Request) -> str:
        try:
            return self._public_base()
        except MissingStreamUrlError:
            # Only reachable with signatures off: enforced ones need a configured URL.
            policy = self._policy()
            if not policy.trusted_proxies and not is_local_host(request.url.hostname):
                # Behind a tunnel the Host is public but the scheme is the tunnel's plain
                # http: guessing gives Twilio a URL it may not reach.
                log_limited(
                    logger,
                    "no_public_url",
                    "answering a webhook for a public host without a public URL: set "
                    "VOICE_PUBLIC_URL (or serve --public-url) to the https:// URL Twilio "
                    "calls, or trust_forwarded_headers (serve --trust-proxy) for a proxy",
                )
            return request_base_url(request, policy)

    async def _emit(self, session: VoiceSession, event: SessionEvent) -> None:
        """Deliver ``event`` to ``on_event`` off the loop, in order per session."""
        handler = session.on_event
        if handler is None:
            return
        if _is_async_callable(handler):
            await self.callbacks.run(_emit_async, handler, event, key=id(session))
        else:
            await self.callbacks.run(session.emit_event, event, key=id(session))

    async def _status_webhook(self, request: Request) -> Response:
        signed = await self._call_form(request)
        if isinstance(signed, Response):
            return signed
        form, call_sid = signed
        session = self.registry.by_call_sid(call_sid)
        if session is None:
            if self.cluster is not None:  # another instance's call: its owner handles it
                await self.cluster.forward(call_sid, "status", {"form": form})
            return Response(status_code=204)
        try:
            await self._apply_status(session, form)
        except CallbacksBusyError:
            return self._refuse_webhook(503, "callbacks_busy", "webhook refused: callbacks busy")
        return Response(status_code=204)

    async def _whisper_webhook(self, request: Request, token: str, step: str) -> Response:
        """A warm transfer's whisper to the agent (see :mod:`voice_runtime.transfer`)."""
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        from voice_runtime.transfer import whisper_answer

        xml = whisper_answer(self, token, step)
        return Response(status_code=404) if xml is None else Response(xml, media_type=TWIML)

    async def _apply_status(self, session: VoiceSession, form: Mapping[str, str]) -> None:
        """A status/AMD callback's events for ``session`` (raises CallbacksBusyError)."""
        status = form.get("CallStatus")
        answered_by = form.get("AnsweredBy")
        if status:
            fields = {"status": status, **_status_fields(form)}
            await self._emit(session, SessionEvent("call_status", fields))
        if answered_by:
            # Recorded first: leave_voicemail reads it whether or not on_event is set.
            note_answered_by(session, answered_by)
            await self._emit(session, SessionEvent("answered_by", {"answered_by": answered_by}))
        if status in ENDED_STATUSES and not session.is_connected:
            # The call never reached the stream (busy, no answer, ...): release its
            # waiters, after its events (on_disconnected is a user callback too).
            await self.callbacks.run(session.signal_disconnected, key=id(session))
            self.registry.ended(session)
            if self.cluster is not None:
                self.cluster.call_ended(session.call_sid)

    async def _sms_webhook(self, request: Request) -> Response:
        form = await self._form(request)
        if isinstance(form, Response):
            return form
        from voice_runtime.transports.twilio_sms import parse_inbound_sms, sms_reply_twiml

        try:
            sms = parse_inbound_sms(form)
        except ValueError:
            return self._refuse_webhook(400, "incomplete", "webhook refused: incomplete form")
        reply: Any = None
        if self.on_sms is not None:
            reply = await self._user_callback(self.on_sms, sms)
            if isinstance(reply, Response):
                return reply
        await self._sms_to_call(sms)
        return Response(sms_reply_twiml(None if reply is None else str(reply)), media_type=TWIML)

    async def _sms_to_call(self, sms: Any) -> None:
        """An SMS from the far party of a live call: ``SessionEvent("sms")`` on that call."""
        fields = {
            "message_sid": sms.message_sid,
            "body": sms.body,
            "media_urls": list(sms.media_urls),
        }
        if self.cluster is not None:  # wherever the call lives
            await self.cluster.deliver_sms(sms.from_, fields)
            return
        for session in self.registry.live_sessions():
            if session.caller_number and session.caller_number == sms.from_:
                with contextlib.suppress(CallbacksBusyError):
                    await self._emit(session, SessionEvent("sms", fields))

    async def _health(self) -> JSONResponse:
        extra = self.cluster.health() if self.cluster is not None else {}
        return JSONResponse(
            {"status": "ok", "live_calls": self.registry.live_count, "draining": self.draining,
             **extra}
        )  # fmt: skip

    async def _ready(self) -> JSONResponse:
        # In a cluster a full instance is not ready either: the balancer should go elsewhere.
        mine = {} if self.cluster is None else {"instance": self.cluster.instance_id}
        if self.draining:
            return JSONResponse({"status": "draining", **mine}, status_code=503)
        if mine and self.registry.reserved_count >= self.max_calls:
            return JSONResponse({"status": "full", **mine}, status_code=503)
        return JSONResponse({"status": "ready", "live_calls": self.registry.live_count, **mine})


def _twiml_busy(message: str) -> str:
    from twilio.twiml.voice_response import VoiceResponse

    response = VoiceResponse()
    response.say(xml_safe(message))
    response.hangup()
    return str(response)


def _is_sid(value: str) -> bool:
    # Twilio SIDs are two letters and 32 hex digits; anything else is not Twilio's form.
    return 0 < len(value) <= 64 and value.isascii() and value.isalnum()


async def _emit_async(handler: Callable[[SessionEvent], Any], event: SessionEvent) -> None:
    try:
        await handler(event)
    except Exception:
        logger.exception("on_event callback failed", extra={"event": event.kind})


def _status_fields(form: Mapping[str, str]) -> dict[str, str]:
    keys = (
        "CallDuration",
        "SequenceNumber",
        "Timestamp",
        "CallbackSource",
        "SipResponseCode",
        "Direction",
    )
    return {k: form[k] for k in keys if k in form}
