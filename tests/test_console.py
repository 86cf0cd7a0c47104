"""Issue 16 items 4 and 5 without a browser: the console's and the phone's routes, who may use
them, the calls table and a call's event stream (SSE), and the phone's route to /voice."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from conftest import wait_for

from voice_runtime import CallerSimulator, VoiceServer, VoiceSession
from voice_runtime.console import install_console
from voice_runtime.console.routes import MAX_VIEWERS
from voice_runtime.testing.server import serve_in_loop

AUTH_TOKEN = "console-test-auth-token"
SECRET_WORDS = "my secret words"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "TWILIO_AUTH_TOKEN",
        "TWILIO_SKIP_SIGNATURE_VALIDATION",
        "VOICE_PUBLIC_URL",
        "VOICE_STREAM_URL",
    ):
        monkeypatch.delenv(name, raising=False)


async def turn_on_dtmf(session: VoiceSession) -> None:
    """A bot that, when the caller presses a key, 'hears' a sentence and answers with audio."""
    pressed = asyncio.Event()
    loop = asyncio.get_running_loop()
    # on_dtmf runs on a callback thread: wake the handler through the loop.
    session.on_dtmf = lambda digit: loop.call_soon_threadsafe(pressed.set)
    await pressed.wait()
    session.stt.inject(SECRET_WORDS)  # the mock STT commits this transcript
    await session.put_outbound(b"\x10" * 4000)  # half a second of loud agent audio
    await session.wait_until_disconnected_async()


@contextlib.asynccontextmanager
async def served(**kwargs: Any) -> AsyncIterator[tuple[VoiceServer, Any, httpx.AsyncClient]]:
    voice = VoiceServer(on_call=turn_on_dtmf, stt="mock", console=True, **kwargs)
    async with (
        serve_in_loop(voice.app) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10) as client,
    ):
        yield voice, srv, client


class SseReader:
    """Reads one SSE response in a task: data messages and named events, in order."""

    def __init__(self, client: httpx.AsyncClient, path: str) -> None:
        self.client, self.path = client, path
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.status = 0
        self.ended = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async with self.client.stream("GET", self.path) as response:
            self.status = response.status_code
            name = "message"
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.messages.append((name, json.loads(line[6:])))
                    name = "message"
        self.ended = True

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [m for n, m in self.messages if n == "message" and kind in (None, m["kind"])]

    def named(self, name: str) -> list[dict[str, Any]]:
        return [m for n, m in self.messages if n == name]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def calls(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/console/api/calls")
    assert response.status_code == 200
    return response.json()["calls"]


async def test_console_and_phone_are_off_by_default() -> None:
    voice = VoiceServer()
    async with serve_in_loop(voice.app) as srv, httpx.AsyncClient(base_url=srv.url) as client:
        for path in ("/console", "/phone", "/console/api/calls", "/console/static/phone.js"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.post("/phone/api/call")).status_code == 404


async def test_the_local_operator_needs_no_token_anyone_else_does() -> None:
    async with served() as (voice, srv, client):
        page = await client.get("/console")
        assert page.status_code == 200 and b"console.js" in page.content
        assert page.headers["x-frame-options"] == "DENY"
        assert (await client.get("/phone")).status_code == 200
        assert (await client.get("/console/static/phone-worklet.js")).status_code == 200
        assert (await client.get("/console/static/..%2Fauth.py")).status_code == 404
        # A tunnel or a DNS-rebinding page reaches loopback under another host name.
        tunnel = {"Host": "bot.example.ngrok.app"}
        assert (await client.get("/console/api/calls", headers=tunnel)).status_code == 401
        proxied = {"X-Forwarded-For": "203.0.113.9"}
        assert (await client.get("/console/api/calls", headers=proxied)).status_code == 401
        # Another site's page in the operator's browser may not place calls.
        evil = {"Origin": "http://evil.example"}
        assert (await client.post("/phone/api/call", json={}, headers=evil)).status_code == 403

        # A public URL means the server is reachable from outside: the token is needed.
        voice.public_url = "https://bot.example.com"
        assert (await client.get("/console")).status_code == 401
        assert (await client.get("/console/api/calls")).status_code == 401
        assert (await client.get("/console?token=wrong")).status_code == 401
        opened = await client.get(f"/console?token={voice.console.token}")
        assert opened.status_code == 303 and opened.headers["location"] == "/console"
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert (await client.get("/console")).status_code == 200  # the cookie now
        assert (await client.get("/console/api/calls")).status_code == 200
        client.cookies.clear()
        bearer = {"Authorization": f"Bearer {voice.console.token}"}
        assert (await client.get("/console/api/calls", headers=bearer)).status_code == 200


async def test_the_console_lists_a_call_and_streams_its_events() -> None:
    async with served() as (voice, srv, client):
        sim = await CallerSimulator(srv.ws_url + "/voice").connect()
        try:
            assert await wait_for(lambda: voice.console.board.card(sim.call_sid) is not None)
            [row] = await calls(client)
            assert row["call_sid"] == sim.call_sid and row["live"] and row["turns"] == 0
            path = f"/console/api/calls/{sim.call_sid}/events"
            plain = SseReader(client, path)
            assert await wait_for(lambda: plain.events("call_started"), timeout=5)
            await sim.send_dtmf("7")
            ok = await wait_for(lambda: plain.events("turn_latency"), timeout=10)
            assert ok, plain.messages
            assert await wait_for(
                lambda: any(m["agent"] > 0.05 for m in plain.named("levels")), timeout=5
            )
            # Without the operator asking, no call content leaves the server.
            [dtmf] = plain.events("dtmf")
            [said] = plain.events("transcript_committed")
            assert "digit" not in dtmf["data"] and "text" not in said["data"]
            [row] = await calls(client)
            assert row["turns"] == 1 and row["last_turn_ms"] > 0 and row["dtmf"] == 1
            # Asked for, the transcript comes with the replayed history.
            content = SseReader(client, path + "?content=1")
            assert await wait_for(lambda: content.events("transcript_committed"), timeout=5)
            assert content.events("transcript_committed")[0]["data"]["text"] == SECRET_WORDS
            assert content.events("dtmf")[0]["data"]["digit"] == "7"
            await content.close()
        finally:
            await sim.hangup()
        # The call's end closes its stream; the table keeps the call as ended.
        assert await wait_for(lambda: plain.ended, timeout=5)
        assert plain.events("call_ended") and plain.named("end")
        [row] = await calls(client)
        assert not row["live"] and row["state"] == "ended" and row["end_reason"]
        assert await wait_for(lambda: voice.console.viewers == 0)
        # An ended call's stream is its history, then the end.
        ended = await client.get(path)
        assert ended.status_code == 200 and "call_ended" in ended.text
        assert (await client.get("/console/api/calls/CAnope/events")).status_code == 404


async def test_event_streams_are_bounded_and_watching_leaves_the_session_as_it_was() -> None:
    async with served() as (voice, srv, client), CallerSimulator(srv.ws_url + "/voice") as sim:
        assert await wait_for(lambda: voice.console.board.card(sim.call_sid) is not None)
        session = voice.session_for_call(sim.call_sid)
        path = f"/console/api/calls/{sim.call_sid}/events"
        readers = [SseReader(client, path) for _ in range(MAX_VIEWERS)]
        assert await wait_for(lambda: all(r.status == 200 for r in readers), timeout=5)
        assert (await client.get(path)).status_code == 503
        assert session._mixer is not None  # the level meter taps the call while watched
        for reader in readers:
            await reader.close()
        assert await wait_for(lambda: voice.console.viewers == 0, timeout=5)
        assert session._mixer is None
        assert (await client.get("/console/api/calls")).status_code == 200


async def test_the_phone_gets_a_one_time_route_and_streams_through_enforced_signatures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    started: list[VoiceSession] = []

    async def on_call(session: VoiceSession) -> None:
        started.append(session)
        await session.wait_until_disconnected_async()

    voice = VoiceServer(on_call=on_call, console=True)
    async with serve_in_loop(voice.app) as srv:
        voice.public_url = srv.url
        bearer = {"Authorization": f"Bearer {voice.console.token}"}
        async with httpx.AsyncClient(base_url=srv.url, headers=bearer) as client:

            async def new_call() -> dict[str, Any]:
                body = {"parameters": {"lang": "en"}}
                response = await client.post("/phone/api/call", json=body)
                assert response.status_code == 200
                return response.json()

            bad = await client.post("/phone/api/call", json={"parameters": [1]})
            assert bad.status_code == 400
            first = await new_call()
            # The browser cannot sign its upgrade: it goes through the phone's own route, which
            # checks the operator instead; the bare route token is not enough there or on /voice.
            assert first["stream_path"].startswith("/phone/stream/")
            token = first["stream_path"].rsplit("/", 1)[1]
            for url in (srv.ws_url + first["stream_path"], f"{srv.ws_url}/voice/{token}"):
                with pytest.raises(websockets.InvalidStatus):
                    await CallerSimulator(url, call_sid=first["call_sid"]).connect()
            call = await new_call()
            sim = CallerSimulator(
                srv.ws_url + call["stream_path"],
                call_sid=call["call_sid"],
                parameters=call["parameters"],
                headers=bearer,
            )
            async with sim:
                assert await wait_for(lambda: bool(started), timeout=5)
                params = started[0].call_info.custom_parameters
                assert params["caller"] == "browser-phone" and params["lang"] == "en"
                assert started[0].call_sid == call["call_sid"]
            # One-time: the used route does not open a second stream.
            with pytest.raises(websockets.InvalidStatus):
                await CallerSimulator(srv.ws_url + call["stream_path"], headers=bearer).connect()


def test_install_console_after_construction_is_idempotent() -> None:
    voice = VoiceServer()
    console = install_console(voice, token="operator-token")
    assert install_console(voice) is console and voice.console is console
    assert console.url("http://127.0.0.1:8080", "phone").endswith("/phone?token=operator-token")
    assert console.url("http://127.0.0.1:8080", with_token=False) == "http://127.0.0.1:8080/console"


def test_serve_prints_the_page_addresses_with_the_token_only_when_reachable_from_outside(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from argparse import Namespace

    from voice_runtime.control_cli import _announce_console

    local = VoiceServer()
    _announce_console(local, Namespace(console=True, phone=True, host="127.0.0.1", port=8080))
    out = capsys.readouterr().out
    assert "console: http://127.0.0.1:8080/console " in out
    assert "phone: http://127.0.0.1:8080/phone " in out and "token" not in out
    exposed = VoiceServer()
    _announce_console(exposed, Namespace(console=False, phone=True, host="0.0.0.0", port=8080))
    out = capsys.readouterr().out
    assert out.startswith(f"phone: http://127.0.0.1:8080/phone?token={exposed.console.token} ")
    assert "console:" not in out


async def test_event_streams_end_when_the_server_drains() -> None:
    async with served(drain_timeout=2.0) as (voice, srv, client):
        async with CallerSimulator(srv.ws_url + "/voice") as sim:
            assert await wait_for(lambda: voice.console.board.card(sim.call_sid) is not None)
            reader = SseReader(client, f"/console/api/calls/{sim.call_sid}/events")
            assert await wait_for(lambda: reader.events("call_started"), timeout=5)
            drain = asyncio.create_task(voice.drain())
            # The viewer's stream ends at once; it does not hold the shutdown for the call.
            assert await wait_for(lambda: reader.ended, timeout=2)
            assert reader.named("end")
            await drain
        assert voice.console.viewers == 0
