"""VoiceServer: many concurrent calls, inbound webhook, outbound calls, routes, limits, drain."""

from __future__ import annotations

import asyncio
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets
from conftest import wait_for
from fastapi import FastAPI
from twilio.request_validator import RequestValidator

from voice_runtime.conversation import Conversation
from voice_runtime.errors import CallHangupError, CallNotAnsweredError, ConfigurationError
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_twilio_rest import FakeCall, FakeTwilioRest
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import StreamOptions, register_voice_websocket
from voice_runtime.types import SessionEvent

OUR_NUMBER = "+15550001111"
AGENT_BYTES = 1600  # 200 ms of agent audio per call
CALLER_BYTES = 1600  # 200 ms of caller audio per call


# --------------------------------------------------------------------------- helpers


def parse_stream(twiml: str) -> tuple[str, dict[str, str]]:
    """The <Stream url> and its <Parameter>s from a <Connect><Stream> answer."""
    root = ET.fromstring(twiml)
    stream = root.find("Connect/Stream")
    assert stream is not None, twiml
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    return stream.attrib["url"], params


def is_busy_twiml(twiml: str) -> bool:
    """True for a <Say>…</Say><Hangup/> answer with no stream."""
    root = ET.fromstring(twiml)
    return [child.tag for child in root] == ["Say", "Hangup"]


def inbound_form(i: int) -> dict[str, str]:
    """The form Twilio posts to the voice webhook for an incoming call."""
    return {
        "AccountSid": "AC" + "1" * 32,
        "CallSid": f"CA{i:032d}",
        "CallStatus": "ringing",
        "Direction": "inbound",
        "From": f"+1555000{i:04d}",
        "To": OUR_NUMBER,
    }


async def refused_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    """Open a websocket; return the handshake's HTTP status when refused, None if accepted."""
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
            await ws.close()
    except websockets.InvalidStatus as exc:
        return exc.response.status_code
    return None


async def close_code_after_open(url: str) -> int | None:
    """Open a websocket that the server accepts; return the close code it ends with."""
    async with websockets.connect(url, open_timeout=5) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        return ws.close_code


def vr_tasks() -> list[str]:
    """Names of tasks that voice_runtime started for calls."""
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("vr-"))


# --------------------------------------------------------------------------- 50 concurrent calls


async def test_fifty_concurrent_inbound_calls_are_isolated(no_twilio_env: None) -> None:
    agent_byte = {i: 0x10 + i for i in range(50)}
    caller_byte = {i: 0x80 + i for i in range(50)}
    stts: dict[str, MockStt] = {}
    heard_marks: dict[str, bool] = {}

    def factory() -> VoiceSession:
        return VoiceSession(stt_factory=MockStt)

    async def on_call(session: VoiceSession) -> None:
        assert session.call_sid is not None and session.caller_number is not None
        stts[session.call_sid] = session.stt  # type: ignore[assignment]
        i = int(session.caller_number[-4:])
        await session.put_outbound(bytes([agent_byte[i]]) * AGENT_BYTES)
        heard_marks[session.call_sid] = await session.send_mark_and_wait_async("said", 10)
        await session.wait_until_disconnected_async()

    def extra_params(form: Any) -> dict[str, str]:
        return {"tenant": "acme", "ref": form["CallSid"][-4:]}

    server = VoiceServer(
        on_call=on_call,
        session_factory=factory,
        inbound_parameters=extra_params,
        stream_options=StreamOptions(lead_ms=60),
    )
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        answers = await asyncio.gather(
            *(http.post("/twilio/voice", data=inbound_form(i)) for i in range(50))
        )
        sims: list[CallerSimulator] = []
        for i, answer in enumerate(answers):
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("application/xml")
            url, params = parse_stream(answer.text)
            assert url.startswith(srv.ws_url + "/voice/")
            assert params == {
                "direction": "inbound",
                "caller_number": f"+1555000{i:04d}",
                "called_number": OUR_NUMBER,
                "tenant": "acme",
                "ref": f"{i:04d}",
            }
            sims.append(
                CallerSimulator(url, call_sid=inbound_form(i)["CallSid"], parameters=params)
            )
        assert len({s.url for s in sims}) == 50  # one route per call

        await asyncio.gather(*(s.connect() for s in sims))
        assert await wait_for(lambda: server.registry.live_count == 50, 10)
        await asyncio.gather(
            *(s.send_audio(bytes([caller_byte[i]]) * CALLER_BYTES) for i, s in enumerate(sims))
        )
        assert all(await asyncio.gather(*(s.wait_for_heard(AGENT_BYTES / 8, 10) for s in sims)))

        def stt_complete() -> bool:
            return len(stts) == 50 and all(
                stts[s.call_sid].audio.count(caller_byte[i]) >= CALLER_BYTES
                for i, s in enumerate(sims)
            )

        assert await wait_for(stt_complete, 10)
        for sim in sims:
            assert server.registry.by_call_sid(sim.call_sid) is not None
            assert server.registry.by_stream_sid(sim.stream_sid) is not None
        await asyncio.gather(*(s.hangup() for s in sims))
        assert await wait_for(lambda: server.registry.live_count == 0, 10)
        assert await wait_for(lambda: not vr_tasks(), 5), vr_tasks()

    for i, sim in enumerate(sims):
        # The caller heard exactly its own agent audio, all of it.
        assert set(sim.heard) == {agent_byte[i]}
        assert len(sim.heard) == AGENT_BYTES
        # Its STT received only its own caller audio (and the line's silence).
        audio = stts[sim.call_sid].audio
        assert set(audio) <= {caller_byte[i], 0xFF}
        assert audio.count(caller_byte[i]) == CALLER_BYTES
        assert heard_marks[sim.call_sid] is True
    assert server.registry.by_call_sid(sims[0].call_sid) is None  # forgotten after the call


# --------------------------------------------------------------------------- outbound calls


@dataclass
class FarEnd:
    """Plays Twilio for calls created on the fake REST API: dials their stream, hangs up."""

    fake: FakeTwilioRest
    loop: asyncio.AbstractEventLoop
    answer: Callable[[FakeCall], bool] = lambda call: True
    sims: dict[str, CallerSimulator] = field(default_factory=dict)
    dialled: asyncio.Event = field(default_factory=asyncio.Event)
    _futures: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fake.on_call_created(self._created)

    def _created(self, call: FakeCall) -> None:
        if self.answer(call):
            fut = asyncio.run_coroutine_threadsafe(self._dial(call), self.loop)
            self._futures.append(fut)

    async def _dial(self, call: FakeCall) -> None:
        assert call.twiml is not None
        url, params = parse_stream(call.twiml)
        signature = RequestValidator(self.fake.auth_token).compute_signature(url, {})
        sim = CallerSimulator(
            url,
            call_sid=call.sid,
            parameters=params,
            headers={"X-Twilio-Signature": signature},
        )
        self.sims[call.sid] = sim
        await sim.connect()
        self.dialled.set()
        # A REST hang-up (status=completed) ends the stream, as Twilio does.
        while not sim.closed:
            if self.fake.calls[call.sid].status == "completed":
                await sim.hangup()
                return
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        for sim in self.sims.values():
            await sim.hangup()
        for fut in self._futures:
            await asyncio.wrap_future(fut)


async def post_signed(
    http: httpx.AsyncClient, base: str, path: str, form: dict[str, str], token: str
) -> httpx.Response:
    signature = RequestValidator(token).compute_signature(base + path, form)
    return await http.post(path, data=form, headers={"X-Twilio-Signature": signature})


@pytest.fixture
async def outbound() -> AsyncIterator[tuple[VoiceServer, Any]]:
    server = VoiceServer(stream_options=StreamOptions(lead_ms=60))
    async with serve_in_loop(server.app) as srv:
        server.public_url = srv.url
        yield server, srv


async def test_place_call_connects_its_own_session_and_gets_status_events(
    fake_env: FakeTwilioRest, outbound: tuple[VoiceServer, Any]
) -> None:
    server, srv = outbound
    far = FarEnd(fake_env, asyncio.get_running_loop())
    events: list[SessionEvent] = []

    session = await asyncio.to_thread(
        server.place_call,
        "+15550002222",
        parameters={"campaign": "spring"},
        timeout=20,
        machine_detection="Enable",
        async_amd=True,
    )
    session.on_event = events.append
    (call_sid,) = fake_env.calls
    assert session.call_sid == call_sid
    create = next(r for r in fake_env.requests if r.path.endswith("/Calls.json"))
    assert create.field("To") == "+15550002222"
    assert create.field("From") == OUR_NUMBER
    assert create.field("Timeout") == "20"
    assert create.field("StatusCallback") == srv.url + "/twilio/status"
    assert create.field("AsyncAmdStatusCallback") == srv.url + "/twilio/status"
    assert create.field("MachineDetection") == "Enable"
    url, params = parse_stream(create.field("Twiml") or "")
    assert url.startswith(srv.ws_url + "/voice/") and len(url) > len(srv.ws_url + "/voice/") + 16
    assert params == {"direction": "outbound", "campaign": "spring"}

    await asyncio.to_thread(session.wait_for_ws_connect, 5)
    assert server.session_for_call(call_sid) is session
    sim = far.sims[call_sid]
    assert session.stream_sid == sim.stream_sid
    assert session.call_info is not None
    assert dict(session.call_info.custom_parameters) == params

    async with httpx.AsyncClient(base_url=srv.url) as http:
        answered = await post_signed(
            http,
            srv.url,
            "/twilio/status",
            {
                "CallSid": call_sid,
                "CallStatus": "in-progress",
                "CallbackSource": "call-progress-events",
            },
            fake_env.auth_token,
        )
        assert answered.status_code == 204
        amd = await post_signed(  # what an async AMD result looks like
            http,
            srv.url,
            "/twilio/status",
            {"CallSid": call_sid, "AnsweredBy": "human", "MachineDetectionDuration": "1800"},
            fake_env.auth_token,
        )
        assert amd.status_code == 204
        forged = await http.post(
            "/twilio/status",
            data={"CallSid": call_sid, "CallStatus": "completed"},
            headers={"X-Twilio-Signature": "forged"},
        )
        assert forged.status_code == 403
    assert [e.kind for e in events] == ["call_status", "answered_by"]
    assert events[0].data["status"] == "in-progress"
    assert events[0].data["CallbackSource"] == "call-progress-events"
    assert events[1].data == {"answered_by": "human"}
    assert not session.is_disconnected  # the forged "completed" changed nothing

    # Speak, then hang up once heard: REST hang-up through the fake, the stream ends.
    tts = MockTts()
    result = await asyncio.to_thread(tts.speak, "hello there", session)
    assert result["interrupted"] is False and "error" not in result
    session.request_disconnect(after_playback=True)
    assert await sim.wait_closed(5)
    assert await wait_for(lambda: session.is_disconnected, 5)
    assert fake_env.calls[call_sid].status == "completed"
    assert sim.heard_ms >= len(tts.audio_for("hello there")) / 8
    await far.close()
    assert not fake_env.callback_errors
    assert await wait_for(lambda: not vr_tasks(), 5), vr_tasks()


async def test_no_answer_status_releases_the_waiter(
    fake_env: FakeTwilioRest, outbound: tuple[VoiceServer, Any]
) -> None:
    server, srv = outbound
    far = FarEnd(fake_env, asyncio.get_running_loop(), answer=lambda call: False)
    session = await server.place_call_async("+15550003333", machine_detection="Enable")
    events: list[SessionEvent] = []
    session.on_event = events.append
    create = next(r for r in fake_env.requests if r.path.endswith("/Calls.json"))
    assert create.field("MachineDetection") == "Enable"
    waiter = asyncio.ensure_future(asyncio.to_thread(session.wait_for_ws_connect, 10))
    async with httpx.AsyncClient(base_url=srv.url) as http:
        await asyncio.sleep(0.05)  # let the waiter block first (the race is in its favour)
        reply = await post_signed(
            http,
            srv.url,
            "/twilio/status",
            {"CallSid": session.call_sid or "", "CallStatus": "no-answer"},
            fake_env.auth_token,
        )
        assert reply.status_code == 204
    t0 = time.monotonic()
    with pytest.raises(CallNotAnsweredError):
        await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - t0 < 2
    assert session.is_disconnected
    assert events and events[0].data["status"] == "no-answer"
    assert server.session_for_call(session.call_sid or "") is None
    await far.close()


# --------------------------------------------------------------------------- routes and limits


async def test_unknown_expired_and_reused_route_tokens_are_refused(no_twilio_env: None) -> None:
    server = VoiceServer(allow_unrouted_streams=False)
    async with serve_in_loop(server.app) as srv:
        assert await refused_status(srv.ws_url + "/voice/not-a-token") == 403
        assert await refused_status(srv.ws_url + "/voice") == 403

        expired = server.new_route()
        expired.expires_at = time.monotonic() - 1
        assert await refused_status(f"{srv.ws_url}/voice/{expired.token}") == 403

        route = server.new_route(parameters={"k": "v"})
        url = f"{srv.ws_url}/voice/{route.token}"
        async with CallerSimulator(url) as sim:
            assert await wait_for(lambda: server.registry.live_count == 1)
        assert await wait_for(lambda: server.registry.live_count == 0)
        assert sim.close_code != 1008
        assert await refused_status(url) == 403  # one-time


async def test_over_max_calls_webhook_is_busy_and_stream_gets_1013(no_twilio_env: None) -> None:
    server = VoiceServer(max_calls=2, busy_message="Sorry, busy.")
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        sims = [CallerSimulator(srv.ws_url + "/voice") for _ in range(2)]
        for sim in sims:
            await sim.connect()
        assert await wait_for(lambda: server.registry.live_count == 2)

        busy = await http.post("/twilio/voice", data=inbound_form(7))
        assert busy.status_code == 200 and is_busy_twiml(busy.text)
        assert "Sorry, busy." in busy.text
        assert await close_code_after_open(srv.ws_url + "/voice") == 1013
        assert server.registry.live_count == 2 and server.refused_busy == 2

        await sims[0].hangup()
        assert await wait_for(lambda: server.registry.live_count == 1)
        ok = await http.post("/twilio/voice", data=inbound_form(8))
        url, _ = parse_stream(ok.text)
        async with CallerSimulator(url, call_sid=inbound_form(8)["CallSid"]) as third:
            assert await wait_for(lambda: server.registry.live_count == 2)
        await sims[1].hangup()
        assert third.close_code != 1013


# --------------------------------------------------------------------------- drain


async def test_drain_lets_calls_finish_their_sentence_then_says_goodbye(
    no_twilio_env: None,
) -> None:
    speech = MockTts(freq=440.0)
    goodbye = MockTts(freq=880.0)
    utterance = "Your order ships tomorrow morning."  # ~2 s of tone
    speaking = threading.Semaphore(0)
    handler_ended: list[str] = []

    def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, speech)
        speaking.release()
        conv.say(utterance)
        try:
            while True:
                conv.listen(timeout=30)
        except CallHangupError:
            handler_ended.append(session.call_sid or "")

    server = VoiceServer(
        on_call=on_call,
        stt=MockStt,  # listen() needs an STT (issue 15); this one never commits anything
        goodbye="Goodbye.",
        goodbye_tts=goodbye,
        drain_timeout=4.0,
        stream_options=StreamOptions(lead_ms=60),
    )
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        sims = []
        for i in range(3):
            answer = await http.post("/twilio/voice", data=inbound_form(i))
            url, params = parse_stream(answer.text)
            sims.append(
                CallerSimulator(url, parameters=params, call_sid=inbound_form(i)["CallSid"])
            )
        await asyncio.gather(*(s.connect() for s in sims))
        for _ in sims:
            assert await asyncio.to_thread(speaking.acquire, True, 5)
        assert all(await asyncio.gather(*(s.wait_for_heard(200, 5) for s in sims)))

        (await http.get("/ready")).raise_for_status()
        t0 = time.monotonic()
        drain = asyncio.create_task(server.drain())
        assert await wait_for(lambda: server.draining)
        ready = await http.get("/ready")
        assert ready.status_code == 503
        busy = await http.post("/twilio/voice", data=inbound_form(9))
        assert is_busy_twiml(busy.text)
        assert (await http.get("/health")).json()["draining"] is True
        with pytest.raises(ConfigurationError, match="draining"):
            await server.place_call_async("+15550004444")
        await asyncio.wait_for(drain, 6)
        elapsed = time.monotonic() - t0
        assert elapsed <= 4.0 + 0.3
        assert all(await asyncio.gather(*(s.wait_closed(2) for s in sims)))
        assert server.registry.live_count == 0
        assert await wait_for(lambda: len(handler_ended) == 3, 5)
        assert await wait_for(lambda: not vr_tasks(), 5), vr_tasks()

    whole = speech.audio_for(utterance) + goodbye.audio_for("Goodbye.")
    for sim in sims:
        # Nothing was cut: the whole sentence, then the whole goodbye, in order.
        assert bytes(sim.heard) == whole
        assert sim.close_code == 1000


# --------------------------------------------------------------------------- handlers


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_on_call_handlers_run_and_end_with_the_call(no_twilio_env: None, kind: str) -> None:
    started: list[str] = []
    ended: list[str] = []
    threads: list[str] = []

    if kind == "sync":

        def on_call(session: VoiceSession) -> None:
            threads.append(threading.current_thread().name)
            started.append(session.call_sid or "")
            session.wait_until_disconnected(10)
            ended.append(session.call_sid or "")

    else:

        async def on_call(session: VoiceSession) -> None:  # type: ignore[misc]
            threads.append(threading.current_thread().name)
            started.append(session.call_sid or "")
            await session.wait_until_disconnected_async(10)
            ended.append(session.call_sid or "")

    server = VoiceServer(on_call=on_call)
    async with serve_in_loop(server.app) as srv:
        sims = [CallerSimulator(srv.ws_url + "/voice") for _ in range(3)]
        await asyncio.gather(*(s.connect() for s in sims))
        assert await wait_for(lambda: len(started) == 3)
        assert sorted(started) == sorted(s.call_sid for s in sims)
        await asyncio.gather(*(s.hangup() for s in sims))
        assert await wait_for(lambda: server.registry.live_count == 0)
        if kind == "sync":
            assert await wait_for(lambda: sorted(ended) == sorted(started))
            assert all(name == "vr-on-call" for name in threads)
            assert await wait_for(lambda: not server._threads)
            assert not any(t.name == "vr-on-call" for t in threading.enumerate())
        else:
            assert await wait_for(lambda: sorted(ended) == sorted(started))
            assert threads == [threading.current_thread().name] * 3
        assert await wait_for(lambda: not vr_tasks() and not server._call_tasks, 5), vr_tasks()


async def test_register_voice_websocket_per_call_form(no_twilio_env: None) -> None:
    app = FastAPI()
    seen: list[tuple[str, type]] = []

    class MySession(VoiceSession):
        pass

    async def on_call(session: VoiceSession) -> None:
        seen.append((session.call_sid or "", type(session)))
        session.request_disconnect()

    server = register_voice_websocket(app, session_factory=MySession, on_call=on_call)
    assert isinstance(server, VoiceServer) and server.app is app
    async with serve_in_loop(app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        answer = await http.post("/twilio/voice", data=inbound_form(1))
        url, params = parse_stream(answer.text)
        sims = [
            CallerSimulator(url, parameters=params, call_sid=inbound_form(1)["CallSid"]),
            CallerSimulator(srv.ws_url + "/voice"),
        ]
        for sim in sims:
            await sim.connect()
            assert await sim.wait_closed(5)
        assert (await http.get("/health")).json()["status"] == "ok"
    assert sorted(seen) == sorted((s.call_sid, MySession) for s in sims)


async def test_oversized_webhook_body_is_refused(no_twilio_env: None) -> None:
    server = VoiceServer()
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        big = {**inbound_form(1), "Padding": "x" * (70 * 1024)}
        assert (await http.post("/twilio/voice", data=big)).status_code == 413
        assert not server.registry._routes
        assert (await http.post("/twilio/voice", data=inbound_form(1))).status_code == 200


async def test_an_object_with_an_async_call_method_runs_as_a_coroutine() -> None:
    import threading

    from voice_runtime.server import VoiceServer
    from voice_runtime.testing.server import serve_in_loop
    from voice_runtime.testing.simulator import CallerSimulator

    ran_on: list[str] = []
    done = asyncio.Event()

    class Handler:
        async def __call__(self, session: object) -> None:
            ran_on.append(threading.current_thread().name)
            done.set()

    voice = VoiceServer(on_call=Handler())
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice"):
        await asyncio.wait_for(done.wait(), 5)
    assert ran_on == [threading.current_thread().name]  # on the loop, not a worker thread
