"""Logs a user can act on: every line of a call names the call, failures say why, ``serve``
logs at one level in text or JSON, and no tunnel trap (wss:// stream URLs, a warning that names
the setting, ``voice-runtime tunnel-check``)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from abuse_kit import ServedApp, free_port, media_frame, sids, start_frame
from conftest import wait_for
from websockets.sync.client import connect as ws_connect

from voice_runtime.cli import main
from voice_runtime.logutil import CallContextFilter, JsonFormatter, call_log_context
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_twiml import build_route_stream_xml

user_log = logging.getLogger("user.bot")


@pytest.fixture
def call_caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog at INFO whose handler adds the call context, as ``serve``'s handler does."""
    context = CallContextFilter()
    caplog.handler.addFilter(context)
    caplog.set_level(logging.INFO)
    yield caplog
    caplog.handler.removeFilter(context)


async def _one_call(voice: VoiceServer, done: asyncio.Event | None = None) -> CallerSimulator:
    async with serve_in_loop(voice.app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice")
        await sim.connect()
        if done is not None:
            await asyncio.wait_for(done.wait(), 5)
        await sim.hangup()
        assert await wait_for(lambda: voice.registry.live_count == 0)
    return sim


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_every_line_of_a_call_names_it(
    kind: str, call_caplog: pytest.LogCaptureFixture, no_twilio_env: None
) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def sync_handler(session: VoiceSession) -> None:
        user_log.info("handler line")
        loop.call_soon_threadsafe(done.set)

    async def async_handler(session: VoiceSession) -> None:
        user_log.info("handler line")
        done.set()

    voice = VoiceServer(on_call=sync_handler if kind == "sync" else async_handler)
    sim = await _one_call(voice, done)
    records = {r.getMessage(): r for r in call_caplog.records}
    mine = records["handler line"]
    assert mine.call_sid == sim.call_sid and mine.stream_sid == sim.stream_sid  # type: ignore[attr-defined]
    assert records["call started"].call_sid == sim.call_sid  # type: ignore[attr-defined]
    ended = [r for r in call_caplog.records if r.getMessage().startswith("call ended after ")]
    assert len(ended) == 1 and ended[0].getMessage().endswith(": the caller hung up (stream stop)")
    assert ended[0].stream_sid == sim.stream_sid  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_failed_handler_says_why_in_the_text(
    kind: str, call_caplog: pytest.LogCaptureFixture, no_twilio_env: None
) -> None:
    def sync_handler(session: VoiceSession) -> None:
        raise RuntimeError("no greeting configured")

    async def async_handler(session: VoiceSession) -> None:
        raise RuntimeError("no greeting configured")

    voice = VoiceServer(on_call=sync_handler if kind == "sync" else async_handler)
    sim = await _one_call(voice)
    assert await wait_for(
        lambda: any(r.getMessage().startswith("call handler failed") for r in call_caplog.records)
    )
    (failed,) = [r for r in call_caplog.records if r.getMessage().startswith("call handler")]
    assert failed.getMessage() == "call handler failed: RuntimeError: no greeting configured"
    assert failed.call_sid == sim.call_sid and failed.exc_info  # type: ignore[attr-defined]


def test_json_lines_carry_extra_fields_and_the_call() -> None:
    record = logging.LogRecord("voice_runtime.x", logging.WARNING, "f", 1, "lag %d", (5,), None)
    record.lag_ms = 5.0
    with call_log_context("CA1", "MZ1"):
        CallContextFilter().filter(record)
    out = json.loads(JsonFormatter().format(record))
    assert out["message"] == "lag 5" and out["level"] == "WARNING" and out["lag_ms"] == 5.0
    assert out["call_sid"] == "CA1" and out["stream_sid"] == "MZ1"


def test_served_app_logs_calls_as_json_at_info() -> None:
    call_sid, stream_sid = sids()
    with ServedApp(args=["--log-level", "info", "--log-format", "json"]) as app:
        with ws_connect(app.ws_url + "/voice") as ws:
            ws.send(start_frame(call_sid, stream_sid))
            ws.send(media_frame(stream_sid, b"\xff" * 160, 2))
            ws.send(json.dumps({"event": "stop", "streamSid": stream_sid}))
        assert app.stop() == 0
    lines = [json.loads(line) for line in app.output.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("call_sid") == call_sid]
    messages = [line["message"] for line in mine]
    assert "call started" in messages
    assert any(m.startswith("call ended after ") for m in messages), messages
    assert all(line["stream_sid"] == stream_sid for line in mine)
    # uvicorn's lines come through the same handler, as JSON too.
    assert any(line["logger"].startswith("uvicorn") for line in lines)


def test_served_app_logs_each_call_line_once_as_text_by_default() -> None:
    call_sid, stream_sid = sids()
    with ServedApp(args=["--log-level", "info"]) as app:
        with ws_connect(app.ws_url + "/voice") as ws:
            ws.send(start_frame(call_sid, stream_sid))
            ws.send(json.dumps({"event": "stop", "streamSid": stream_sid}))
        assert app.stop() == 0
    ids = f"[{call_sid}/{stream_sid}]"
    assert app.output.count("call started") == 1
    assert f"INFO voice_runtime.transports.twilio_ws: call started {ids}" in app.output
    (ended,) = [line for line in app.output.splitlines() if "call ended after" in line]
    assert ended.endswith(f"the caller hung up (stream stop) {ids}")


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("https://bot.example.com", "wss://bot.example.com/voice/tok"),
        ("http://abc.trycloudflare.com", "wss://abc.trycloudflare.com/voice/tok"),
        ("http://localhost:8000", "ws://localhost:8000/voice/tok"),
        ("http://127.0.0.5:8000", "ws://127.0.0.5:8000/voice/tok"),
        ("http://[::1]:8000", "ws://[::1]:8000/voice/tok"),
    ],
)
def test_stream_urls_are_wss_unless_local(base: str, expected: str) -> None:
    assert f'url="{expected}"' in build_route_stream_xml(base, "tok")


async def test_a_public_host_without_a_public_url_names_the_setting(
    caplog: pytest.LogCaptureFixture, no_twilio_env: None
) -> None:
    voice = VoiceServer(on_call=lambda session: None)
    form = {"CallSid": sids()[0], "From": "+15550100200", "To": "+15550001111"}
    async with serve_in_loop(voice.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        local = await http.post("/twilio/voice", data=form)
        assert 'url="ws://127.0.0.1' in local.text
        assert not [r for r in caplog.records if "VOICE_PUBLIC_URL" in r.getMessage()]
        form["CallSid"] = sids()[0]
        public = await http.post(
            "/twilio/voice", data=form, headers={"Host": "abc.trycloudflare.com"}
        )
        assert 'url="wss://abc.trycloudflare.com/voice/' in public.text
    (warning,) = [r for r in caplog.records if "VOICE_PUBLIC_URL" in r.getMessage()]
    assert warning.levelno == logging.WARNING and "trust_forwarded_headers" in warning.getMessage()


def _tunnel_check(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any]:
    code = main(["tunnel-check", url, "--timeout", "5"])
    return code, capsys.readouterr()


async def test_tunnel_check_says_whether_it_reached_the_server(
    capsys: pytest.CaptureFixture[str], no_twilio_env: None
) -> None:
    voice = VoiceServer(on_call=lambda session: None)
    async with serve_in_loop(voice.app) as srv:
        code, out = await asyncio.to_thread(_tunnel_check, srv.url, capsys)
        assert code == 0 and "reached a voice-runtime server" in out.out
        code, out = await asyncio.to_thread(_tunnel_check, srv.url + "/nothing", capsys)
        assert code == 1 and "not as a voice-runtime server" in out.err
    code, out = await asyncio.to_thread(_tunnel_check, f"http://127.0.0.1:{free_port()}", capsys)
    assert code == 1 and "could not reach" in out.err and "ConnectError" in out.err


def test_a_peer_chosen_sid_is_clipped_in_the_context() -> None:
    record = logging.LogRecord("voice_runtime.x", logging.INFO, "f", 1, "line", None, None)
    with call_log_context("CA" + "x" * 5000, "MZ\n" + "y" * 5000):
        CallContextFilter().filter(record)
    assert len(record.call_sid) <= 64 and len(record.stream_sid) <= 64  # type: ignore[attr-defined]
    assert "\n" not in record.call  # type: ignore[attr-defined]
