"""The fake Twilio REST API's conferences, participants and webhooks, driven by the twilio SDK."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import pytest
from conftest import wait_for
from twilio.base.exceptions import TwilioRestException
from twilio.request_validator import RequestValidator

from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest
from voice_runtime.transports.twilio_call import build_twilio_client
from voice_runtime.transports.twilio_control import initiate_outbound_call

OUR_NUMBER = "+15550001111"


class _Receiver(ThreadingHTTPServer):
    """Records signed webhooks and answers them with ``reply`` TwiML."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.token = token
        self.got: list[tuple[str, dict[str, str], bool]] = []
        self.reply = "<Response/>"
        self.done = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Hook(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        form = dict(parse_qsl(body))
        url = self.server.url + self.path
        valid = RequestValidator(self.server.token).validate(
            url, form, self.headers.get("X-Twilio-Signature", "")
        )
        self.server.got.append((self.path, form, valid))
        if self.path == "/done":
            self.server.done.set()
        data = self.server.reply.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTwilioRest]:
    with FakeTwilioRest() as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("TWILIO_PHONE_NUMBER", OUR_NUMBER)
        monkeypatch.setenv("VOICE_STREAM_URL", "https://bot.example.com")
        yield fake


@pytest.fixture
def receiver(fake: FakeTwilioRest) -> Iterator[_Receiver]:
    server = _Receiver(fake.auth_token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_participants_api_round_trip(fake: FakeTwilioRest, receiver: _Receiver) -> None:
    client = build_twilio_client(fake.account_sid, fake.auth_token)
    created = client.conferences("support-room").participants.create(
        from_=OUR_NUMBER,
        to="+15550009999",
        label="agent",
        status_callback=receiver.url + "/agent-status",
        start_conference_on_enter=True,
        end_conference_on_exit=False,
    )
    assert created.call_sid.startswith("CA") and created.conference_sid.startswith("CF")
    assert (created.status, created.label, created.hold) == ("queued", "agent", False)
    request = fake.requests[-1]
    assert request.path.endswith("/Conferences/support-room/Participants.json")
    assert request.field("StartConferenceOnEnter") == "true"

    conference = client.conferences(created.conference_sid).fetch()
    assert (conference.friendly_name, conference.status) == ("support-room", "init")
    listed = client.conferences.list(friendly_name="support-room")
    assert [c.sid for c in listed] == [created.conference_sid]

    # Ringing then answered: each posts a signed call status callback.
    fake.set_participant_status(created.call_sid, "ringing")
    fake.set_participant_status(created.call_sid, "connected")
    statuses = [(form["CallStatus"], valid) for path, form, valid in receiver.got]
    assert statuses == [("ringing", True), ("in-progress", True)]
    assert client.conferences(created.conference_sid).fetch().status == "in-progress"
    by_label = client.conferences(created.conference_sid).participants("agent").fetch()
    assert by_label.call_sid == created.call_sid and by_label.status == "connected"

    # A whisper: the announce URL is fetched (signed) after the update, its Redirect followed.
    receiver.reply = (
        f'<Response><Say>hi</Say><Redirect method="POST">{receiver.url}/done</Redirect></Response>'
    )
    updated = (
        client.conferences(created.conference_sid)
        .participants(created.call_sid)
        .update(hold=True, announce_url=receiver.url + "/say")
    )
    assert updated.hold is True
    assert receiver.done.wait(5)  # Twilio plays the announcement after answering the update
    paths = [path for path, _, valid in receiver.got if valid]
    assert paths[-2:] == ["/say", "/done"]
    assert receiver.got[-2][1]["ConferenceSid"] == created.conference_sid

    # Kick: 204, gone from the list; the last one out ends the conference.
    assert client.conferences(created.conference_sid).participants(created.call_sid).delete()
    assert client.conferences(created.conference_sid).participants.list() == []
    assert client.conferences(created.conference_sid).fetch().status == "completed"
    with pytest.raises(TwilioRestException) as info:
        client.conferences(created.conference_sid).participants(created.call_sid).fetch()
    assert (info.value.status, info.value.code) == (404, 20404)


def test_dial_conference_twiml_joins_and_end_on_exit_ends_it(fake: FakeTwilioRest) -> None:
    client = build_twilio_client(fake.account_sid, fake.auth_token)
    caller = initiate_outbound_call("+15550002222")
    fake.set_call_status(caller, "in-progress")
    twiml = (
        '<Response><Dial><Conference endConferenceOnExit="true" startConferenceOnEnter="false">'
        "room-7</Conference></Dial></Response>"
    )
    client.calls(caller).update(twiml=twiml)
    room = fake.conference_named("room-7")
    assert room is not None and room.status == "init"
    joined = room.participants[caller]
    assert joined.status == "connected" and joined.end_conference_on_exit
    agent = client.conferences("room-7").participants.create(from_=OUR_NUMBER, to="+15550009999")
    assert agent.conference_sid == room.sid  # the live conference of that name
    fake.set_participant_status(caller, "complete")
    assert room.status == "completed" and room.participants == {}
    assert fake.calls[agent.call_sid].status == "completed"
    with pytest.raises(TwilioRestException) as info:
        client.conferences(room.sid).participants.create(from_=OUR_NUMBER, to="+15550003333")
    assert info.value.status == 400


def test_amd_and_status_callbacks_need_their_urls(
    fake: FakeTwilioRest, receiver: _Receiver
) -> None:
    plain = initiate_outbound_call("+15550002222")
    with pytest.raises(ValueError, match="AsyncAmdStatusCallback"):
        fake.send_amd_result(plain, "human")
    with pytest.raises(ValueError, match="StatusCallback"):
        fake.send_call_status(plain, "ringing")
    amd = initiate_outbound_call(
        "+15550002222",
        status_callback=receiver.url + "/status",
        machine_detection="DetectMessageEnd",
        async_amd=True,
        async_amd_status_callback=receiver.url + "/amd",
    )
    sent = fake.send_amd_result(amd, "machine_end_beep", duration_ms=3100)
    assert sent.status == 200 and sent.field("MachineDetectionDuration") == "3100"
    fake.send_call_status(amd, "completed")
    assert [(p, f.get("AnsweredBy") or f.get("CallStatus"), v) for p, f, v in receiver.got] == [
        ("/amd", "machine_end_beep", True),
        ("/status", "completed", True),
    ]
    assert [s.url for s in fake.sent_callbacks] == [receiver.url + "/amd", receiver.url + "/status"]


async def test_fake_phone_follows_new_twiml_and_rest_hangups(fake: FakeTwilioRest) -> None:
    from voice_runtime.server import VoiceServer
    from voice_runtime.testing.fake_twilio_rest import FakePhone
    from voice_runtime.testing.server import serve_in_loop
    from voice_runtime.transports.twilio_call import hangup_call
    from voice_runtime.transports.twilio_control import send_digits

    server = VoiceServer()
    async with serve_in_loop(server.app) as srv:
        server.public_url = srv.url
        phone = FakePhone(fake).start()
        try:
            first = await server.place_call_async("+15550002222", parameters={"k": "v"})
            await first.wait_for_ws_connect_async(5)
            call_sid = first.call_sid or ""
            assert fake.calls[call_sid].status == "in-progress"
            # New TwiML: this stream stops, the next <Connect><Stream> is a new stream.
            route = server.new_route(parameters={"again": "1"}, call_sid=call_sid)
            await asyncio.to_thread(
                send_digits,
                call_sid,
                "1",
                stream_url=srv.url,
                route_token=route.token,
                parameters=route.parameters,
            )
            assert await first.wait_until_disconnected_async(5)
            assert await wait_for(lambda: len(phone.streams.get(call_sid, [])) == 2, 5)
            second = await asyncio.to_thread(server.session_for_call, call_sid, 5)
            assert second is not None and second is not first
            assert second.call_info is not None
            assert dict(second.call_info.custom_parameters) == {"again": "1"}
            await asyncio.to_thread(hangup_call, call_sid)  # REST hang-up ends the stream
            assert await second.wait_until_disconnected_async(5)
        finally:
            await asyncio.to_thread(phone.close)
    assert not fake.callback_errors
