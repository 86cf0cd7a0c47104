"""Call controls on the session, against the fake Twilio REST API."""

from __future__ import annotations

import asyncio

import pytest
from conftest import VoiceServer

from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest
from voice_runtime.transports.call_control import CallControl


@pytest.fixture
def fake_rest(monkeypatch: pytest.MonkeyPatch):
    with FakeTwilioRest() as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("VOICE_STREAM_URL", "https://bot.example.com")
        yield fake


async def test_session_controls_transfer_record_and_send_digits(
    voice_server: VoiceServer, fake_rest: FakeTwilioRest
) -> None:
    call = fake_rest.add_call("+15550001111", status="in-progress")
    s = voice_server.session
    from twilio.request_validator import RequestValidator

    signature = RequestValidator(fake_rest.auth_token).compute_signature(
        "wss://bot.example.com/voice", {}
    )
    async with voice_server.simulator(
        call_sid=call.sid,
        parameters={"tenant": "acme"},
        headers={"X-Twilio-Signature": signature},
    ):
        await s.wait_for_ws_connect_async(5)
        control = s.control
        assert isinstance(control, CallControl)

        recording = await asyncio.to_thread(control.start_recording)
        assert recording.startswith("RE") and control.recording_sid == recording
        await asyncio.to_thread(control.stop_recording)

        await asyncio.to_thread(control.transfer, "sip:desk@pbx.example.com")
        await control.send_digits_async("12#")

    paths = [(r.method, r.path) for r in fake_rest.requests]
    base = f"/2010-04-01/Accounts/{fake_rest.account_sid}/Calls/{call.sid}"
    assert ("POST", f"{base}/Recordings.json") in paths
    assert ("POST", f"{base}/Recordings/{recording}.json") in paths
    updates = [r for r in fake_rest.requests if r.path == f"{base}.json"]
    transfer_twiml = updates[0].field("Twiml") or ""
    assert "<Dial>" in transfer_twiml and "<Sip>sip:desk@pbx.example.com</Sip>" in transfer_twiml
    digits_twiml = updates[1].field("Twiml") or ""
    assert 'digits="12#"' in digits_twiml and "<Stream" in digits_twiml
    assert '<Parameter name="tenant" value="acme"' in digits_twiml


async def test_controls_need_a_started_call() -> None:
    from voice_runtime.errors import SessionError
    from voice_runtime.session import VoiceSession

    control = CallControl(VoiceSession())
    with pytest.raises(SessionError, match="no call SID"):
        control.transfer("+15550002222")
    with pytest.raises(SessionError, match="no recording"):
        control._recording(None)
