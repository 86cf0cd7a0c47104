"""Cluster pieces in one process: signed route tokens, configuration, and a server whose Redis
is down (its calls flow anyway, the outage is counted and the server still stops quickly)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from abuse_kit import free_port

from voice_runtime.cluster import Cluster, RouteSigner, cluster_for
from voice_runtime.errors import ConfigurationError
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import StreamOptions
from voice_runtime.types import SessionEvent


def test_a_token_serves_only_its_instance_once_and_only_until_it_expires() -> None:
    a, b = RouteSigner(b"k", "a"), RouteSigner(b"k", "b")
    token = a.issue(30, call_sid="CA1")
    assert token.startswith("a.") and "/" not in token and "?" not in token
    assert b.check(token).reason == "foreign"  # another instance refuses it
    assert RouteSigner(b"other", "a").check(token).reason == "forged"
    assert a.check(token[:-2] + "xx").reason == "forged"
    assert a.check("a.1.2.3").reason == "forged"
    check = a.check(token)
    assert (check.reason, check.call_sid) == (None, "CA1")
    assert a.check(token).reason == "used"
    assert a.check(a.issue(-5)).reason == "expired"
    # Any instance can hand a call to another: B's token, issued at A.
    assert b.check(a.issue(30, instance_id="b")).reason is None


def test_cluster_configuration_comes_from_arguments_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("VOICE_REDIS_URL", "VOICE_CLUSTER_SECRET", "VOICE_INSTANCE_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cluster_for(None) is None  # no Redis: one process, as before
    assert VoiceServer().cluster is None
    with pytest.raises(ConfigurationError, match="VOICE_REDIS_URL"):
        Cluster()
    with pytest.raises(ConfigurationError, match="VOICE_CLUSTER_SECRET"):
        VoiceServer(cluster="redis://127.0.0.1:1/0")
    monkeypatch.setenv("VOICE_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("VOICE_CLUSTER_SECRET", "s")
    monkeypatch.setenv("VOICE_INSTANCE_ID", "east-1")
    server = VoiceServer()
    assert server.cluster is not None and server.cluster.instance_id == "east-1"
    assert VoiceServer(cluster=False).cluster is None
    with pytest.raises(ConfigurationError, match="VOICE_INSTANCE_ID"):
        Cluster(instance_id="no spaces")


async def test_with_redis_down_calls_flow_the_outage_is_counted_and_stop_is_quick() -> None:
    cluster = Cluster(
        f"redis://127.0.0.1:{free_port()}/0", secret="s", instance_id="lonely", heartbeat_s=0.2
    )
    heard = asyncio.Event()

    async def on_call(session: VoiceSession) -> None:
        await session.put_outbound(b"\xff" * 1600)
        heard.set()

    server = VoiceServer(on_call=on_call, cluster=cluster, stream_options=StreamOptions(lead_ms=60))
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        server.public_url = srv.url
        answer = await http.post(
            "/twilio/voice", data={"CallSid": "CA" + "1" * 32, "From": "+1", "To": "+2"}
        )
        token = answer.text.split("/voice/", 1)[1].split('"', 1)[0]
        assert token.startswith("lonely.")
        async with CallerSimulator(f"{srv.ws_url}/voice/{token}", call_sid="CA" + "1" * 32) as sim:
            assert await sim.wait_for_heard(200, timeout=5)
        body = (await http.get("/health")).json()
        assert body["cluster"]["redis"] == "down"
        assert body["cluster"]["redis_outages"] == 1  # one outage, however many retries
        assert (await http.get("/ready")).json()["instance"] == "lonely"
        started = time.monotonic()
    assert time.monotonic() - started < 5


async def test_an_sms_from_a_live_callers_number_reaches_that_call_as_an_event() -> None:
    events: list[SessionEvent] = []
    server = VoiceServer(session_factory=lambda: VoiceSession(on_event=events.append))
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        sim = CallerSimulator(srv.ws_url + "/voice", parameters={"caller_number": "+15550100"})
        async with sim:
            await asyncio.to_thread(server.session_for_call, sim.call_sid, 5)
            sms = {"MessageSid": "SM" + "2" * 32, "From": "+15550100", "To": "+1555", "Body": "hi"}
            other = {**sms, "MessageSid": "SM" + "3" * 32, "From": "+15550199"}
            assert (await http.post("/twilio/sms", data=other)).status_code == 200
            assert (await http.post("/twilio/sms", data=sms)).status_code == 200
            for _ in range(200):
                if events:
                    break
                await asyncio.sleep(0.01)
    assert [(e.kind, e.data["message_sid"], e.data["body"]) for e in events if e.kind == "sms"] == [
        ("sms", sms["MessageSid"], "hi")
    ]


async def test_an_instance_accepts_signatures_for_the_public_url_and_its_own_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from twilio.request_validator import RequestValidator

    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "tok")
    public, own = "https://voice.example.com", "https://voice.example.com/w1"
    cluster = Cluster(
        f"redis://127.0.0.1:{free_port()}/0", secret="s", instance_url=own, heartbeat_s=5
    )
    server = VoiceServer(cluster=cluster, public_url=public)
    form = {"MessageSid": "SM" + "4" * 32, "From": "+15550100", "To": "+1555", "Body": "x"}
    sign = RequestValidator("tok").compute_signature
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        for url, status in (
            (public + "/twilio/sms", 200),  # the number's webhook, through the shared URL
            (own + "/twilio/sms", 200),  # a callback this instance asked for at its own URL
            ("https://voice.example.com/w2/twilio/sms", 403),  # another instance's
        ):
            headers = {"X-Twilio-Signature": sign(url, form)}
            answer = await http.post("/twilio/sms", data=form, headers=headers)
            assert answer.status_code == status, url


def test_hand_offs_go_to_the_least_loaded_and_stop_when_the_cluster_is_full() -> None:
    from voice_runtime.cluster import InstanceInfo

    cluster = Cluster("redis://127.0.0.1:1/0", secret="s", instance_id="a")
    now = time.time()

    def info(name: str, live: int, ready: bool = True) -> InstanceInfo:
        return InstanceInfo(name, f"http://{name}", live, live, 2, ready, not ready, now)

    # What the last heartbeat showed (normally read from Redis by the heartbeat).
    cluster._view = [info("a", 2), info("b", 0), info("c", 1), info("d", 0, ready=False)]
    targets = [getattr(cluster.hand_off(), "instance_id", None) for _ in range(5)]
    # b was emptiest; calls handed since the heartbeat count (b is then as loaded as c, and
    # the tie goes by URL), so c gets its free slot too; then every instance is full (d
    # drains) and the caller hears busy.
    assert targets == ["b", "b", "c", None, None]


async def test_a_blocking_control_on_the_event_loop_is_a_clear_error() -> None:
    from voice_runtime.errors import LoopThreadError

    handle = Cluster("redis://127.0.0.1:1/0").control("CA" + "5" * 32)
    with pytest.raises(LoopThreadError, match="hangup_async"):
        handle.hangup()
