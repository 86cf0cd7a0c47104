"""A fake Twilio REST API on 127.0.0.1, for testing code that places calls and sends SMS.

It speaks the real wire format (form-encoded requests, Basic auth, snake_case JSON, Twilio
error bodies), so the official ``twilio`` SDK and voice_runtime's REST helpers run against
it unchanged::

    from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest

    def test_places_call(monkeypatch):
        with FakeTwilioRest() as fake:
            for name, value in fake.env().items():
                monkeypatch.setenv(name, value)
            monkeypatch.setenv("TWILIO_PHONE_NUMBER", "+15550001111")
            monkeypatch.setenv("VOICE_STREAM_URL", "https://bot.example.com")
            call_sid = initiate_outbound_call("+15550002222")
            assert fake.calls[call_sid].twiml.startswith("<?xml")

voice_runtime's clients send requests meant for ``https://api.twilio.com`` (or a regional
``api.{edge}.{region}.twilio.com``) to TWILIO_API_BASE_URL and name the intended host in the
``X-Voice-Runtime-Api-Host`` header; the fake keeps calls per host, so regional behaviour
(404/20404 in the wrong region) is real. A plain SDK client can be pointed here with any
``http_client`` that rewrites URLs the same way.

Implemented: ``POST/GET …/Calls.json`` (create; list with To/From/Status/StartTime filters
and paging), ``POST/GET …/Calls/{CA}.json``, ``POST/GET …/Calls/{CA}/Recordings.json``,
``POST/GET …/Calls/{CA}/Recordings/{RE}.json``, ``POST …/Messages.json`` and conferences
with their participants (:mod:`~voice_runtime.testing.fake_twilio_rest.conferences`). Every request
is recorded in :attr:`FakeTwilioRest.requests`; faults are scripted with
:meth:`FakeTwilioRest.fail_next`, :meth:`FakeTwilioRest.add_fault` and
:meth:`FakeTwilioRest.respond_next`. Webhooks go out as Twilio sends them (signed form
POSTs): :meth:`FakeTwilioRest.send_amd_result` posts an async AMD result to the call's
``AsyncAmdStatusCallback``, :meth:`FakeTwilioRest.send_call_status` a call status; every one
sent is kept in :attr:`FakeTwilioRest.sent_callbacks`. :class:`FakePhone` answers the calls
created on the fake with caller simulators, as Twilio would dial their streams.

The server is a stdlib ``ThreadingHTTPServer`` on its own thread; :meth:`FakeTwilioRest.stop`
joins that thread and every request thread and closes the socket.
"""

from __future__ import annotations

from voice_runtime.testing.fake_twilio_rest.callbacks import SentCallback
from voice_runtime.testing.fake_twilio_rest.conferences import FakeConference, FakeParticipant
from voice_runtime.testing.fake_twilio_rest.phone import FakePhone
from voice_runtime.testing.fake_twilio_rest.records import (
    API_HOST_HEADER,
    DEFAULT_ACCOUNT_SID,
    DEFAULT_AUTH_TOKEN,
    FakeCall,
    FakeMessage,
    FakeRecording,
    FakeRequest,
    FaultRule,
)
from voice_runtime.testing.fake_twilio_rest.server import FakeTwilioRest

__all__ = [
    "API_HOST_HEADER",
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "FakeCall",
    "FakeConference",
    "FakeMessage",
    "FakeParticipant",
    "FakePhone",
    "FakeRecording",
    "FakeRequest",
    "FakeTwilioRest",
    "FaultRule",
    "SentCallback",
]
