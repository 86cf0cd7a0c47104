"""Call admission under hostile load (issue 12, items 2, 7 and 12): ``max_calls`` holds under
bursts of webhooks and sockets, reservations are given back, sync handlers share a bounded
pool, a call SID belongs to one stream, the unrouted path is off under signatures, and the
route table is bounded."""

from __future__ import annotations

import asyncio
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from abuse_kit import PacedCaller, ServedApp, assert_no_frame_lost, sids, start_frame
from conftest import wait_for
from fastapi import FastAPI
from twilio.request_validator import RequestValidator

from voice_runtime.server import CallRegistry, Route, VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import StreamOptions, register_voice_websocket
from voice_runtime.types import SessionEvent

BURST = 40
MAX_CALLS = 5


def form(call_sid: str) -> dict[str, str]:
    """The voice webhook form of an incoming call."""
    return {"CallSid": call_sid, "From": "+15550100200", "To": "+15550001111"}


def stream_url(twiml: str) -> str | None:
    """The <Stream url> of a <Connect><Stream> answer; None for a busy <Say>+<Hangup>."""
    root = ET.fromstring(twiml)
    stream = root.find("Connect/Stream")
    if stream is None:
        assert [child.tag for child in root] == ["Say", "Hangup"], twiml
        return None
    return stream.attrib["url"]


class Attempt:
    """One websocket that opened and sent ``start``; ``closed`` ends with its close code."""

    def __init__(self, ws: Any, call_sid: str) -> None:
        self.ws = ws
        self.call_sid = call_sid
        self.closed = asyncio.ensure_future(ws.wait_closed())

    @property
    def close_code(self) -> int | None:
        """The close code once closed."""
        return self.ws.close_code if self.closed.done() else None


async def open_and_start(url: str, call_sid: str | None = None) -> Attempt:
    """Open a media stream and send its ``start`` (unless the server already closed it)."""
    sid, stream_sid = sids()
    call_sid = call_sid or sid
    ws = await websockets.connect(url, compression=None, open_timeout=10)
    try:
        await ws.send(start_frame(call_sid, stream_sid))
    except websockets.ConnectionClosed:
        pass
    return Attempt(ws, call_sid)


async def settle(attempts: list[Attempt], closed: int, timeout: float = 10.0) -> None:
    """Wait until ``closed`` of the attempts were closed by the server."""
    deadline = time.monotonic() + timeout
    while sum(a.closed.done() for a in attempts) < closed and time.monotonic() < deadline:
        pending = [a.closed for a in attempts if not a.closed.done()]
        await asyncio.wait(pending, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)


async def close_all(attempts: list[Attempt]) -> None:
    """Close every attempt from the client side."""
    await asyncio.gather(*(a.ws.close() for a in attempts))
    await asyncio.gather(*(a.closed for a in attempts))


async def admission(http: httpx.AsyncClient) -> dict[str, Any]:
    """The served app's slots and refusals."""
    return (await http.get("/test/admission")).json()


async def wait_admission(http: httpx.AsyncClient, check: Any, timeout: float = 10.0) -> dict:
    """Poll the served app's admission state until ``check(state)``; return the last state."""
    deadline = time.monotonic() + timeout
    state = await admission(http)
    while not check(state) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        state = await admission(http)
    return state


@pytest.fixture
async def served() -> AsyncIterator[tuple[ServedApp, PacedCaller, httpx.AsyncClient]]:
    """The abuse app in a second process with room for 5 calls beside one legitimate call."""
    app = ServedApp({"ABUSE_MAX_CALLS": str(MAX_CALLS + 1)})
    await asyncio.to_thread(app.start)
    try:
        caller = PacedCaller(app.ws_url + "/voice")
        caller.start()
        assert caller.started.wait(10)
        async with httpx.AsyncClient(base_url=app.url, timeout=10) as http:
            assert (await wait_admission(http, lambda s: s["live_calls"] == 1))["live_calls"] == 1
            yield app, caller, http
        await asyncio.to_thread(caller.stop)
        await asyncio.to_thread(assert_no_frame_lost, app, caller)
        assert await asyncio.to_thread(app.stop) == 0
    finally:
        app.__exit__()


# --------------------------------------------------------------------------- max_calls bursts


async def test_socket_burst_gives_exactly_max_calls_and_1013_for_the_rest(
    served: tuple[ServedApp, PacedCaller, httpx.AsyncClient],
) -> None:
    app, _caller, http = served
    fds = app.fd_count()
    attempts = await asyncio.gather(*(open_and_start(app.ws_url + "/voice") for _ in range(BURST)))
    await settle(attempts, BURST - MAX_CALLS)
    codes = [a.close_code for a in attempts if a.closed.done()]
    assert codes == [1013] * (BURST - MAX_CALLS)
    state = await wait_admission(http, lambda s: s["live_calls"] == MAX_CALLS + 1)
    assert state["live_calls"] == MAX_CALLS + 1 and state["reserved"] == MAX_CALLS + 1
    assert state["refusals"]["busy"] == BURST - MAX_CALLS

    # Closed calls give their slots back: the next caller gets in.
    await close_all(attempts)
    state = await wait_admission(http, lambda s: s["reserved"] == 1)
    assert state["reserved"] == 1
    again = await open_and_start(app.ws_url + "/voice")
    assert (await wait_admission(http, lambda s: s["live_calls"] == 2))["live_calls"] == 2
    assert not again.closed.done()
    await close_all([again])
    # No socket of the burst is left open in the server.
    assert await wait_for(lambda: app.fd_count() <= fds, 10), (app.fd_count(), fds)


async def test_webhook_and_socket_burst_together_admit_exactly_max_calls(
    served: tuple[ServedApp, PacedCaller, httpx.AsyncClient],
) -> None:
    app, _caller, http = served
    call_sids = [sids()[0] for _ in range(BURST)]
    answers, attempts = await asyncio.gather(
        asyncio.gather(*(http.post("/twilio/voice", data=form(sid)) for sid in call_sids)),
        asyncio.gather(*(open_and_start(app.ws_url + "/voice") for _ in range(BURST))),
    )
    urls = [stream_url(answer.text) for answer in answers]
    routed = [(url, sid) for url, sid in zip(urls, call_sids, strict=True) if url is not None]
    # Every webhook answer holds its slot, so webhooks and sockets share the 5 slots.
    await settle(attempts, BURST - MAX_CALLS + len(routed))
    open_sockets = [a for a in attempts if not a.closed.done()]
    assert len(routed) + len(open_sockets) == MAX_CALLS
    assert all(a.close_code == 1013 for a in attempts if a.closed.done())
    state = await admission(http)
    assert state["reserved"] == MAX_CALLS + 1
    assert state["refusals"]["busy"] == 2 * BURST - MAX_CALLS

    # A socket without a route finds no slot while the answered calls' routes wait.
    late = await open_and_start(app.ws_url + "/voice")
    assert await asyncio.wait_for(late.closed, 10) is None and late.close_code == 1013

    # Twilio's streams for the answered calls get in, on the slots their routes held.
    streams = await asyncio.gather(*(open_and_start(url, sid) for url, sid in routed))
    state = await wait_admission(http, lambda s: s["live_calls"] == MAX_CALLS + 1)
    assert state["live_calls"] == MAX_CALLS + 1 and state["reserved"] == MAX_CALLS + 1
    assert not any(s.closed.done() for s in streams)
    await close_all(attempts + streams)
    assert (await wait_admission(http, lambda s: s["reserved"] == 1))["reserved"] == 1


async def test_burst_on_routes_admits_max_calls_and_a_token_opens_one_stream(
    no_twilio_env: None,
) -> None:
    server = VoiceServer(max_calls=MAX_CALLS)
    async with serve_in_loop(server.app) as srv:
        routes = [server.new_route() for _ in range(BURST)]
        attempts = await asyncio.gather(
            *(open_and_start(f"{srv.ws_url}/voice/{r.token}") for r in routes)
        )
        await settle(attempts, BURST - MAX_CALLS)
        assert sorted(a.close_code or 0 for a in attempts) == [0] * MAX_CALLS + [1013] * (
            BURST - MAX_CALLS
        )
        assert await wait_for(lambda: server.registry.live_count == MAX_CALLS)
        # Many sockets on one token: one stream, the rest refused before the handshake ends.
        shared = server.new_route().token
        await close_all(attempts)
        results = await asyncio.gather(
            *(handshake(f"{srv.ws_url}/voice/{shared}", {}) for _ in range(10))
        )
        assert sorted(results) == [101] + [403] * 9
        assert server.refusals["bad_route"] == 9 and server.refused_busy == BURST - MAX_CALLS
    assert server.registry.reserved_count == 0


# --------------------------------------------------------------------------- reservations


async def test_slots_come_back_on_start_timeout_route_expiry_refused_start_and_close(
    no_twilio_env: None,
) -> None:
    server = VoiceServer(
        max_calls=1,
        inbound_route_ttl_s=0.3,
        stream_options=StreamOptions(start_timeout_s=0.3),
    )
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        # A socket that never sends start holds the slot, until the start timeout closes it.
        async with websockets.connect(srv.ws_url + "/voice") as silent:
            assert await wait_for(lambda: server.registry.reserved_count == 1)
            busy = await http.post("/twilio/voice", data=form(sids()[0]))
            assert stream_url(busy.text) is None
            await asyncio.wait_for(silent.wait_closed(), 5)
            assert silent.close_code == 1008
        assert await wait_for(lambda: server.registry.reserved_count == 0)
        assert server.refusals["no_start"] == 1

        # An unused webhook answer holds the slot until its route expires.
        first = stream_url((await http.post("/twilio/voice", data=form(sids()[0]))).text)
        assert first is not None and server.registry.reserved_count == 1
        assert stream_url((await http.post("/twilio/voice", data=form(sids()[0]))).text) is None
        assert await wait_for(lambda: server.registry.reserved_count == 0)
        assert await handshake(first, {}) == 403  # its route expired

        # A claimed route whose start is refused gives its slot back.
        second = stream_url((await http.post("/twilio/voice", data=form(sids()[0]))).text)
        assert second is not None
        refused = await open_and_start(second, sids()[0])  # not the call SID it was issued for
        assert await asyncio.wait_for(refused.closed, 5) is None
        assert refused.close_code == 1008
        assert await wait_for(lambda: server.registry.reserved_count == 0)

        # A call that ends gives its slot back.
        sid = sids()[0]
        third = stream_url((await http.post("/twilio/voice", data=form(sid))).text)
        assert third is not None
        async with CallerSimulator(third, call_sid=sid):
            assert await wait_for(lambda: server.registry.live_count == 1)
        assert await wait_for(lambda: server.registry.reserved_count == 0)
        assert server.refusals["busy"] == 2


async def test_a_replayed_webhook_takes_no_second_slot(no_twilio_env: None) -> None:
    server = VoiceServer(max_calls=2)
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        sid = sids()[0]
        urls = [stream_url((await http.post("/twilio/voice", data=form(sid))).text) for _ in "abc"]
        assert all(urls) and server.registry.reserved_count == 1
        other = await http.post("/twilio/voice", data=form(sids()[0]))
        assert stream_url(other.text) is not None and server.registry.reserved_count == 2


# --------------------------------------------------------------------------- handler pool


async def test_sync_handlers_run_on_a_pool_of_max_calls_threads(no_twilio_env: None) -> None:
    gate = threading.Event()
    lock = threading.Lock()
    running: list[int] = [0, 0]  # now, peak
    finished: list[str] = []

    def on_call(session: VoiceSession) -> None:
        # A handler that outlives its call (post-call work) keeps its thread busy.
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        gate.wait(10)
        with lock:
            running[0] -= 1
            finished.append(session.call_sid or "")

    server = VoiceServer(on_call=on_call, max_calls=2)
    try:
        async with serve_in_loop(server.app) as srv:
            for _ in range(3):
                sims = [CallerSimulator(srv.ws_url + "/voice") for _ in range(2)]
                await asyncio.gather(*(s.connect() for s in sims))
                assert await wait_for(lambda: server.registry.live_count == 2)
                await asyncio.gather(*(s.hangup() for s in sims))
                assert await wait_for(lambda: server.registry.reserved_count == 0)
            assert await wait_for(lambda: server.handlers_waiting == 4)
            assert running[1] == 2
            assert len([t for t in threading.enumerate() if t.name == "vr-on-call"]) == 2
    finally:
        gate.set()
    assert await wait_for(lambda: len(finished) == 6)
    assert running[1] == 2
    assert await wait_for(lambda: not any(t.name == "vr-on-call" for t in threading.enumerate()))


# --------------------------------------------------------------------------- call SIDs


async def test_a_call_sid_belongs_to_one_stream(
    served: tuple[ServedApp, PacedCaller, httpx.AsyncClient],
) -> None:
    app, caller, http = served
    # A second stream naming the live call's SID: refused, and the live call's record (keyed
    # by call SID in the served app) is not taken over.
    hijack = await open_and_start(app.ws_url + "/voice", caller.call_sid)
    assert await asyncio.wait_for(hijack.closed, 10) is None and hijack.close_code == 1008
    # A routed stream whose start names another call than the one the route was issued for.
    url = stream_url((await http.post("/twilio/voice", data=form(sids()[0]))).text)
    assert url is not None
    stray = await open_and_start(url, sids()[0])
    assert await asyncio.wait_for(stray.closed, 10) is None and stray.close_code == 1008
    state = await wait_admission(http, lambda s: s["reserved"] == 1)
    assert state["refusals"]["call_sid_in_use"] == 1
    assert state["refusals"]["call_sid_mismatch"] == 1
    assert state["live_calls"] == 1 and state["reserved"] == 1


async def test_status_callbacks_keep_reaching_the_real_call(no_twilio_env: None) -> None:
    sessions: list[VoiceSession] = []
    events: list[SessionEvent] = []

    def factory() -> VoiceSession:
        sessions.append(VoiceSession())
        return sessions[-1]

    server = VoiceServer(session_factory=factory)
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        async with CallerSimulator(srv.ws_url + "/voice") as real:
            assert await wait_for(lambda: server.registry.live_count == 1)
            session = server.session_for_call(real.call_sid)
            assert session is sessions[0]
            session.on_event = events.append
            for _ in range(3):
                hijack = await open_and_start(srv.ws_url + "/voice", real.call_sid)
                assert await asyncio.wait_for(hijack.closed, 5) is None
                assert hijack.close_code == 1008
            assert server.session_for_call(real.call_sid) is session
            reply = await http.post(
                "/twilio/status", data={"CallSid": real.call_sid, "CallStatus": "in-progress"}
            )
            assert reply.status_code == 204
            assert await wait_for(lambda: any(e.kind == "call_status" for e in events))
            assert session.is_connected and not session.is_disconnected
        assert server.refusals["call_sid_in_use"] == 3
        assert all(s.call_sid is None for s in sessions[1:])  # refused before touching them


# --------------------------------------------------------------------------- unrouted path

TOKEN = "test-auth-token-0123456789"
PUBLIC = "https://voice.example.com"


@pytest.fixture
def signed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("VOICE_PUBLIC_URL", PUBLIC)
    monkeypatch.delenv("TWILIO_SKIP_SIGNATURE_VALIDATION", raising=False)


def signed(path: str) -> dict[str, str]:
    """The X-Twilio-Signature header Twilio would send for an upgrade of ``path``."""
    url = PUBLIC.replace("https://", "wss://") + path
    return {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(url, {})}


async def handshake(url: str, headers: dict[str, str]) -> int:
    """101 when the upgrade was accepted, else the refusal's HTTP status."""
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


async def test_unrouted_path_is_off_by_default_when_signatures_are_enforced(
    signed_env: None,
) -> None:
    default = VoiceServer()
    async with serve_in_loop(default.app) as srv:
        # One captured signature of the fixed URL would open streams forever: refused.
        assert await handshake(srv.ws_url + "/voice", signed("/voice")) == 403
        path = "/voice/" + default.new_route().token
        assert await handshake(srv.ws_url + path, signed(path)) == 101
    assert default.refusals["unrouted"] == 1

    opted_in = VoiceServer(allow_unrouted_streams=True)
    async with serve_in_loop(opted_in.app) as srv:
        assert await handshake(srv.ws_url + "/voice", signed("/voice")) == 101

    # The single-session 0.1.x form keeps serving /voice.
    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session)
    async with serve_in_loop(app) as srv:
        assert await handshake(srv.ws_url + "/voice", signed("/voice")) == 101
    session.signal_disconnected()


def test_serve_allow_unrouted_flag_opens_the_fixed_path_under_signatures() -> None:
    env = {"TWILIO_AUTH_TOKEN": TOKEN, "VOICE_PUBLIC_URL": PUBLIC}
    with ServedApp(env, args=["--allow-unrouted"]) as app:
        caller = PacedCaller(app.ws_url + "/voice", headers=signed("/voice"))
        caller.start()
        assert caller.started.wait(10)
        caller.stop()
        assert_no_frame_lost(app, caller)
        assert app.get_json("/test/admission")["refusals"]["unrouted"] == 0
        assert app.stop() == 0


async def test_unrouted_path_stays_on_without_signatures(no_twilio_env: None) -> None:
    server = VoiceServer()
    assert server.unrouted_streams_allowed()
    async with serve_in_loop(server.app) as srv:
        assert await handshake(srv.ws_url + "/voice", {}) == 101


# --------------------------------------------------------------------------- route table


def test_route_table_is_capped_and_expired_routes_go_first() -> None:
    registry = CallRegistry(max_routes=100)
    now = time.monotonic()

    def route(ttl: float) -> Route:
        return Route(token=sids()[0], expires_at=time.monotonic() + ttl)

    kept = [route(1000 + i) for i in range(50)]
    expiring = [route(0.05) for _ in range(50)]
    for r in kept + expiring:
        registry.add_route(r)
    assert registry.route_count == 100
    while time.monotonic() < now + 0.1:  # let the short routes expire (a clock, not a race)
        time.sleep(0.01)
    fresh = [route(2000) for _ in range(50)]
    for r in fresh:
        registry.add_route(r)
    assert registry.routes_evicted == 0 and registry.route_count == 100
    # Full of live routes: the one that expires soonest makes room.
    registry.add_route(route(3000))
    assert registry.routes_evicted == 1 and registry.route_count == 100
    assert registry.claim(kept[0].token) is None
    assert registry.claim(kept[1].token) is kept[1]
    assert registry.claim(fresh[0].token) is fresh[0]


def test_route_table_costs_log_n_per_route() -> None:
    registry = CallRegistry(max_routes=100_000)
    for _ in range(20_000):
        registry.add_route(Route(token=sids()[0], expires_at=time.monotonic() + 300))
    t0 = time.monotonic()
    for _ in range(10_000):
        r = Route(token=sids()[0], expires_at=time.monotonic() + 300)
        registry.add_route(r)
        assert registry.claim(r.token) is r
    # A scan of the table per route (the old prune) takes tens of seconds here.
    assert time.monotonic() - t0 < 3.0
    assert len(registry._expiry) <= 2 * registry.route_count + 64
