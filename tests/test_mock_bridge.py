"""TRANSPORT=mock: the 0.1.x loopback bridge, built on the caller simulator."""

from __future__ import annotations

import threading

from fastapi import FastAPI, Request
from fastapi.responses import Response

from voice_runtime.mock.tts import MockTts
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import ServerThread
from voice_runtime.transports import mock_bridge
from voice_runtime.transports.twilio_call import build_route_stream_xml
from voice_runtime.transports.twilio_ws import register_voice_websocket


def test_initiate_mock_call_dials_the_twiml_stream_and_echoes_marks(monkeypatch, caplog) -> None:
    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session)
    injected: list[str] = []
    forms: list[dict[str, str]] = []
    base: list[str] = []

    @app.post("/incoming")
    async def incoming(request: Request) -> Response:
        forms.append({k: str(v) for k, v in (await request.form()).items()})
        xml = build_route_stream_xml(base[0], "tok-1", parameters={"tenant": "acme"})
        return Response(xml, media_type="application/xml")

    @app.post("/test/inject/{token}")
    async def inject(token: str, request: Request) -> dict[str, str]:
        injected.append((await request.json())["text"])
        return {"ok": token}

    with ServerThread(app) as server:
        base.append(server.url)
        call_sid = mock_bridge.initiate_mock_call(server.url, caller_url=None)
        try:
            session.wait_for_ws_connect(10)
            assert session.call_sid == call_sid == forms[0]["CallSid"]
            assert session.call_info is not None
            assert session.call_info.custom_parameters["tenant"] == "acme"
            relay = mock_bridge.create_text_relay(server.url)
            tts = MockTts(on_spoken=relay)
            result = tts.speak("hello over the bridge", session)
            assert result["last_spoken"] == "hello over the bridge"
            assert not result["interrupted"] and not result["call_disconnected"]
            assert injected == ["hello over the bridge"]
            # on_spoken runs off the loop: the relay's POST to this same server got through
            # (on the loop it waited out its 10 s timeout and failed).
            assert "text relay to the peer failed" not in caplog.text
        finally:
            mock_bridge.cleanup_bridges()
        assert session.wait_until_disconnected(5)
    assert not [t for t in threading.enumerate() if t.name.startswith("voice-test")]


def test_is_mock_transport_reads_transport(monkeypatch) -> None:
    monkeypatch.setenv("TRANSPORT", "mock")
    assert mock_bridge.is_mock_transport()
    monkeypatch.setenv("TRANSPORT", "twilio")
    assert not mock_bridge.is_mock_transport()
