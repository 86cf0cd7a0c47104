"""Webhooks the fake Twilio REST API sends, as Twilio does: signed form POSTs.

Each request is form-encoded and carries ``X-Twilio-Signature`` computed with the account's
auth token over the exact URL and form (the algorithm of ``twilio.request_validator``), so a
server that validates signatures accepts it. Requests go out with the standard library only.
"""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import urlencode

from voice_runtime.testing.fake_twilio_rest.records import FakeCall

logger = logging.getLogger(__name__)

CALLBACK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SentCallback:
    """One webhook the fake sent: where, what, and the HTTP status (0: no answer)."""

    url: str
    form: tuple[tuple[str, str], ...]
    status: int
    body: str

    def field(self, name: str) -> str | None:
        """The value of form field ``name``, or None."""
        return next((value for key, value in self.form if key == name), None)


def sign(auth_token: str, url: str, form: Mapping[str, str]) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for this URL and form."""
    from twilio.request_validator import RequestValidator

    return str(RequestValidator(auth_token).compute_signature(url, dict(form)))


def post_form(auth_token: str, url: str, form: Mapping[str, str]) -> SentCallback:
    """POST ``form`` to ``url`` signed with ``auth_token``; the answer (never raises)."""
    data = urlencode(list(form.items())).encode()
    request = urllib.request.Request(  # noqa: S310 - test double: the URL is the test's own
        url,
        data=data,
        method="POST",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": sign(auth_token, url, form),
            "User-Agent": "TwilioProxy/1.1",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=CALLBACK_TIMEOUT_S) as reply:  # noqa: S310
            return SentCallback(url, tuple(form.items()), reply.status, reply.read().decode())
    except urllib.error.HTTPError as exc:
        return SentCallback(url, tuple(form.items()), exc.code, "")
    except OSError:
        logger.warning("fake Twilio callback got no answer")
        return SentCallback(url, tuple(form.items()), 0, "")


class _CallCallbacks:
    """Call status and async AMD webhooks of :class:`FakeTwilioRest` (a mixin)."""

    account_sid: str
    auth_token: str
    _lock: threading.Lock
    _calls: dict[str, FakeCall]
    _sent: list[SentCallback]

    @property
    def sent_callbacks(self) -> list[SentCallback]:
        """Every webhook the fake has sent, oldest first (a copy)."""
        with self._lock:
            return list(self._sent)

    def _post(self, url: str, form: Mapping[str, str]) -> SentCallback:
        sent = post_form(self.auth_token, url, form)
        with self._lock:
            self._sent.append(sent)
        return sent

    def _call_param(self, call_sid: str, name: str) -> tuple[FakeCall, str | None]:
        with self._lock:
            call = self._calls[call_sid]
        return call, next((v for k, v in call.params if k == name), None)

    def send_amd_result(
        self, call_sid: str, answered_by: str, *, duration_ms: int = 2400
    ) -> SentCallback:
        """Post an async AMD result to the call's ``AsyncAmdStatusCallback`` (blocking).

        ``answered_by``: ``human``, ``machine_start``, ``machine_end_beep``,
        ``machine_end_silence``, ``machine_end_other``, ``fax`` or ``unknown``. Call it
        from a worker thread (``asyncio.to_thread``) when the server runs in your loop.
        """
        call, url = self._call_param(call_sid, "AsyncAmdStatusCallback")
        if url is None:
            raise ValueError("the call was not created with AsyncAmdStatusCallback")
        form = {
            "AccountSid": call.account_sid,
            "CallSid": call.sid,
            "AnsweredBy": answered_by,
            "MachineDetectionDuration": str(duration_ms),
        }
        return self._post(url, form)

    def send_call_status(self, call_sid: str, status: str) -> SentCallback:
        """Post a call status callback (``CallStatus=status``) to the call's StatusCallback."""
        call, url = self._call_param(call_sid, "StatusCallback")
        if url is None:
            raise ValueError("the call was not created with StatusCallback")
        with self._lock:
            call.callback_seq += 1
            seq = call.callback_seq
        form = {
            "AccountSid": call.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": call.sid,
            "CallStatus": status,
            "Direction": call.direction,
            "From": call.from_,
            "To": call.to,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": str(seq),
            "Timestamp": format_datetime(datetime.now(UTC)),
        }
        return self._post(url, form)
