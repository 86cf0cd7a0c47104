"""X-Twilio-Signature on webhooks and media-stream upgrades, proxies, bypass, log hygiene."""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
import websockets
from conftest import wait_for
from fastapi import FastAPI
from twilio.request_validator import RequestValidator

from voice_runtime.errors import ConfigurationError
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports import security
from voice_runtime.transports.twilio_ws import register_voice_websocket

TOKEN = "test-auth-token-0123456789"
PUBLIC = "https://voice.example.com"
CALLER = "+15557654321"
FORM = {
    "AccountSid": "AC" + "2" * 32,
    "CallSid": "CA" + "3" * 32,
    "CallStatus": "ringing",
    "Direction": "inbound",
    "From": CALLER,
    "To": "+15550001111",
}
PROXY_HEADERS = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "voice.example.com"}


def sign(url: str, params: dict[str, str] | None = None, token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params or {})


def stream_url_of(twiml: str) -> str:
    stream = ET.fromstring(twiml).find("Connect/Stream")
    assert stream is not None, twiml
    return stream.attrib["url"]


async def handshake_status(url: str, headers: dict[str, str] | None = None) -> int:
    """101 when the websocket was accepted, else the HTTP status of the refusal."""
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
            await ws.close()
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    return 101


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    for name in (
        "TWILIO_SKIP_SIGNATURE_VALIDATION",
        "VOICE_PUBLIC_URL",
        "VOICE_STREAM_URL",
        "TWILIO_ACCOUNT_SID",
    ):
        monkeypatch.delenv(name, raising=False)


@dataclass
class Running:
    server: VoiceServer
    url: str
    ws_url: str
    http: httpx.AsyncClient
    sessions: list[VoiceSession]


@contextlib.asynccontextmanager
async def running(**kwargs: object) -> AsyncIterator[Running]:
    sessions: list[VoiceSession] = []

    def factory() -> VoiceSession:
        sessions.append(VoiceSession())
        return sessions[-1]

    server = VoiceServer(session_factory=factory, **kwargs)  # type: ignore[arg-type]
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        yield Running(server, srv.url, srv.ws_url, http, sessions)


@pytest.fixture
async def public(token_env: None) -> AsyncIterator[Running]:
    """A server told its public URL (as behind a proxy or tunnel)."""
    async with running(public_url=PUBLIC) as r:
        yield r


@pytest.fixture
async def no_url(token_env: None) -> AsyncIterator[Running]:
    """Signatures enforced but no public URL: nothing may be served."""
    async with running(trust_forwarded_headers=True) as r:
        yield r


@pytest.fixture
def unsigned_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TWILIO_AUTH_TOKEN", "VOICE_PUBLIC_URL", "VOICE_STREAM_URL"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- webhook


async def test_webhook_valid_signature_is_served(public: Running) -> None:
    reply = await public.http.post(
        "/twilio/voice",
        data=FORM,
        headers={"X-Twilio-Signature": sign(PUBLIC + "/twilio/voice", FORM)},
    )
    assert reply.status_code == 200
    assert stream_url_of(reply.text).startswith("wss://voice.example.com/voice/")


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(sign(PUBLIC + "/twilio/voice", FORM, token="another-token"), id="forged"),
        pytest.param(None, id="missing"),
        pytest.param(sign(PUBLIC + "/twilio/status", FORM), id="other-path"),
        pytest.param(sign("https://evil.example.com/twilio/voice", FORM), id="other-host"),
        pytest.param(sign(PUBLIC + "/twilio/voice", {**FORM, "From": "+1"}), id="other-form"),
    ],
)
async def test_webhook_bad_signature_is_403(public: Running, signature: str | None) -> None:
    headers = {} if signature is None else {"X-Twilio-Signature": signature}
    reply = await public.http.post("/twilio/voice", data=FORM, headers=headers)
    assert reply.status_code == 403
    assert "Connect" not in reply.text
    assert not public.server.registry._routes  # no route was handed out


async def test_webhook_signature_covers_the_query_string(public: Running) -> None:
    path = "/twilio/voice?tenant=acme"
    good = await public.http.post(
        path, data=FORM, headers={"X-Twilio-Signature": sign(PUBLIC + path, FORM)}
    )
    assert good.status_code == 200
    without_query = await public.http.post(
        path, data=FORM, headers={"X-Twilio-Signature": sign(PUBLIC + "/twilio/voice", FORM)}
    )
    assert without_query.status_code == 403


async def test_status_and_sms_webhooks_are_checked_too(public: Running) -> None:
    for path in ("/twilio/status", "/twilio/sms"):
        forged = await public.http.post(path, data=FORM, headers={"X-Twilio-Signature": "x"})
        assert forged.status_code == 403, path
    sms = {"MessageSid": "SM" + "4" * 32, "From": CALLER, "To": "+15550001111", "Body": "hi"}
    ok = await public.http.post(
        "/twilio/sms", data=sms, headers={"X-Twilio-Signature": sign(PUBLIC + "/twilio/sms", sms)}
    )
    assert ok.status_code == 200 and ok.text.startswith("<?xml")


async def test_enforced_signatures_without_public_url_refuse_every_webhook(
    no_url: Running,
) -> None:
    # Whatever URL the sender claims (Host, X-Forwarded-* from a trusted proxy, or the
    # internal one), the signed URL is not rebuilt from the request: nothing is served.
    for url in (PUBLIC, no_url.url):
        for path in ("/twilio/voice", "/twilio/status", "/twilio/sms"):
            signature = sign(url + path, FORM)
            reply = await no_url.http.post(
                path, data=FORM, headers={**PROXY_HEADERS, "X-Twilio-Signature": signature}
            )
            assert reply.status_code == 503, (url, path)
    assert not no_url.server.registry._routes


def test_check_config_names_the_missing_public_url(token_env: None) -> None:
    with pytest.raises(ConfigurationError, match="VOICE_PUBLIC_URL"):
        VoiceServer().check_config()
    VoiceServer(public_url=PUBLIC).check_config()


async def test_signature_is_checked_against_the_configured_url_not_forwarded_headers(
    token_env: None,
) -> None:
    async with running(public_url=PUBLIC, trust_forwarded_headers=["127.0.0.0/8"]) as r:
        other = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example.com"}
        spoofed = sign("https://evil.example.com/twilio/voice", FORM)
        reply = await r.http.post(
            "/twilio/voice", data=FORM, headers={**other, "X-Twilio-Signature": spoofed}
        )
        assert reply.status_code == 403
        good = sign(PUBLIC + "/twilio/voice", FORM)
        reply = await r.http.post(
            "/twilio/voice", data=FORM, headers={**other, "X-Twilio-Signature": good}
        )
        assert reply.status_code == 200
        assert stream_url_of(reply.text).startswith("wss://voice.example.com/voice/")


@pytest.mark.parametrize("trust", [True, "127.0.0.1/32, 10.0.0.0/8", ["127.0.0.0/8"]])
async def test_forwarded_headers_from_a_trusted_proxy_shape_the_stream_url(
    unsigned_env: None, trust: object
) -> None:
    async with running(trust_forwarded_headers=trust) as r:
        reply = await r.http.post("/twilio/voice", data=FORM, headers=PROXY_HEADERS)
        assert stream_url_of(reply.text).startswith("wss://voice.example.com/voice/")


@pytest.mark.parametrize("trust", [False, None, "10.0.0.0/8", ["::1/128"]])
async def test_forwarded_headers_from_other_peers_are_ignored(
    unsigned_env: None, trust: object
) -> None:
    async with running(trust_forwarded_headers=trust) as r:
        reply = await r.http.post("/twilio/voice", data=FORM, headers=PROXY_HEADERS)
        # (The scheme is left to uvicorn, whose own proxy handling the test server keeps.)
        assert urlsplit(stream_url_of(reply.text)).netloc == urlsplit(r.url).netloc


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "proxy.example.com", [42]])
def test_trusted_proxies_must_be_networks(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="trust_forwarded_headers"):
        VoiceServer(trust_forwarded_headers=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- websocket


async def test_websocket_valid_signature_is_accepted(public: Running) -> None:
    route = public.server.new_route()
    signed = f"wss://voice.example.com/voice/{route.token}"
    sim = CallerSimulator(
        f"{public.ws_url}/voice/{route.token}", headers={"X-Twilio-Signature": sign(signed)}
    )
    async with sim:
        assert await wait_for(lambda: public.server.registry.live_count == 1)
    assert len(public.sessions) == 1


@pytest.mark.parametrize("case", ["forged", "missing", "other-url"])
async def test_websocket_bad_signature_refused_before_accept(public: Running, case: str) -> None:
    route = public.server.new_route()
    signed = f"wss://voice.example.com/voice/{route.token}"
    headers = {
        "forged": {"X-Twilio-Signature": sign(signed, token="another-token")},
        "missing": {},
        "other-url": {"X-Twilio-Signature": sign("wss://voice.example.com/voice/other")},
    }[case]
    assert await handshake_status(f"{public.ws_url}/voice/{route.token}", headers) == 403
    assert public.sessions == [] and public.server.registry.live_count == 0
    # The refused attempt did not use up the route: Twilio's real stream still gets in.
    good = {"X-Twilio-Signature": sign(signed)}
    assert await handshake_status(f"{public.ws_url}/voice/{route.token}", good) == 101


async def test_websocket_refused_without_public_url(no_url: Running) -> None:
    # Routed: the unrouted /voice path is off under signatures anyway.
    path = "/voice/" + no_url.server.new_route().token
    for url in ("wss://voice.example.com" + path, no_url.ws_url + path):
        headers = {**PROXY_HEADERS, "X-Twilio-Signature": sign(url)}
        assert await handshake_status(no_url.ws_url + path, headers) == 403
    assert no_url.sessions == []


async def test_single_session_websocket_checks_signatures(
    token_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOICE_STREAM_URL", PUBLIC)
    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session)
    async with serve_in_loop(app) as srv:
        assert await handshake_status(srv.ws_url + "/voice", {"X-Twilio-Signature": "x"}) == 403
        assert not session.is_connected
        signed = {"X-Twilio-Signature": sign("wss://voice.example.com/voice")}
        async with CallerSimulator(srv.ws_url + "/voice", headers=signed):
            assert await wait_for(lambda: session.is_connected)
    session.signal_disconnected()


# --------------------------------------------------------------------------- bypass and no token


async def test_skip_signature_validation_bypasses_checks(
    token_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TWILIO_SKIP_SIGNATURE_VALIDATION", "true")
    monkeypatch.setattr(security, "_warned_skip", False)
    caplog.set_level(logging.WARNING, logger="voice_runtime.transports.security")
    async with running(public_url=PUBLIC) as r:
        reply = await r.http.post("/twilio/voice", data=FORM)
        assert reply.status_code == 200
        assert await handshake_status(r.ws_url + "/voice") == 101
    assert any("TWILIO_SKIP_SIGNATURE_VALIDATION" in m for m in caplog.messages)


async def test_without_auth_token_warns_loudly_and_does_not_check(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("TWILIO_AUTH_TOKEN", "TWILIO_SKIP_SIGNATURE_VALIDATION", "VOICE_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(security, "_warned_no_token", False)
    caplog.set_level(logging.WARNING, logger="voice_runtime.transports.security")
    async with running() as r:
        reply = await r.http.post("/twilio/voice", data=FORM, headers={"X-Twilio-Signature": "x"})
        assert reply.status_code == 200
        assert await handshake_status(r.ws_url + "/voice") == 101
    warnings = [
        rec
        for rec in caplog.records
        if rec.levelno == logging.WARNING and "TWILIO_AUTH_TOKEN" in rec.getMessage()
    ]
    assert len(warnings) == 1
    assert "NOT checked" in warnings[0].getMessage()


# --------------------------------------------------------------------------- log hygiene


async def test_logs_never_carry_phone_numbers_or_digits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("TWILIO_AUTH_TOKEN", "TWILIO_SKIP_SIGNATURE_VALIDATION", "VOICE_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.DEBUG)
    digits = ["4", "9", "#"]
    pressed: list[str] = []

    def on_call(session: VoiceSession) -> None:
        for digit in session.iter_dtmf(timeout=5):
            pressed.append(digit)
            if len(pressed) == len(digits):
                session.request_disconnect()
                return

    async with running(on_call=on_call) as r:
        reply = await r.http.post("/twilio/voice", data=FORM)
        url = stream_url_of(reply.text)
        params = {"caller_number": CALLER, "direction": "inbound", "called_number": FORM["To"]}
        async with CallerSimulator(url, parameters=params, call_sid=FORM["CallSid"]) as sim:
            for digit in digits:
                await sim.send_dtmf(digit)
            assert await sim.wait_closed(5)
        assert await wait_for(lambda: r.server.registry.live_count == 0)
    assert pressed == digits
    ours = [rec for rec in caplog.records if rec.name.startswith("voice_runtime")]
    assert ours  # the call was logged ...
    for rec in ours:
        text = rec.getMessage()
        # ... but never with the caller's number or the digits in the message text.
        assert CALLER not in text and CALLER[1:] not in text, text
        assert not any(ch in text for ch in "49#"), text


@pytest.mark.parametrize(
    "url", ["voice.example.com", "ftp://voice.example.com", "https://voice.example.com/?a=1"]
)
def test_a_malformed_public_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="public URL"):
        VoiceServer(public_url=url)
