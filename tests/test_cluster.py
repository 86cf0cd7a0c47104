"""Issue 17: three instances (separate ``voice-runtime serve`` processes) on one real Redis.

Inbound calls posted to random instances follow their TwiML and are served wholly by their
owner; an outbound call's stream and callbacks reach its owner wherever they are posted;
control works from a fourth process with only Redis; foreign, forged and expired route tokens
are refused before accept; Redis restarts under live calls; one instance drains on SIGTERM
and another dies of ``kill -9``. Short heartbeats keep the module within seconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from html import unescape
from typing import Any

import pytest
from abuse_kit import ROOT, PacedCaller, ServedApp, assert_no_frame_lost
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from voice_runtime.cluster import Cluster, RouteSigner
from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest
from voice_runtime.testing.simulator import CallerSimulator

HEARTBEAT_S = 0.3
EXPIRY_S = 3 * HEARTBEAT_S
SECRET = "cluster-test-secret"
CAPACITY = 2  # calls per instance: six calls fill the cluster

pytestmark = pytest.mark.timeout(90)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` (a cheap HTTP or Redis read) until truthy; fail on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


def new_sid() -> str:
    return "CA" + uuid.uuid4().hex


def post(app: ServedApp, path: str, form: dict[str, str]) -> tuple[int, str]:
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(app.url + path, data, timeout=10) as resp:
        return resp.status, resp.read().decode()


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    """The stream URL and parameters of ``<Connect><Stream>`` TwiML."""
    match = re.search(r'<Stream url="([^"]+)"', twiml)
    assert match, twiml
    params = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]*)"', twiml))
    return unescape(match.group(1)), {k: unescape(v) for k, v in params.items()}


def inbound(app: ServedApp, call_sid: str) -> tuple[str, dict[str, str]]:
    status, twiml = post(
        app, "/twilio/voice", {"CallSid": call_sid, "From": "+15550001111", "To": "+15550002222"}
    )
    assert status == 200
    return stream_of(twiml)


def cluster_calls(redis_url: str) -> list[Any]:
    async def read() -> list[Any]:
        async with Cluster(redis_url) as cluster:
            return await cluster.calls()

    return asyncio.run(read())


def health(app: ServedApp) -> dict[str, Any]:
    result: dict[str, Any] = app.get_json("/health")
    return result


def control_process(redis_url: str, script: str) -> dict[str, Any]:
    """Run ``script`` (the body of ``async def main(cluster)``) in a new process, only Redis."""
    code = (
        "import asyncio, json, sys\n"
        "from voice_runtime.cluster import Cluster\n"
        "async def main(cluster):\n"
        + "".join(f"    {line}\n" for line in script.strip().splitlines())
        + "async def run():\n"
        f"    async with Cluster({redis_url!r}) as cluster:\n"
        "        print(json.dumps(await main(cluster)))\n"
        "asyncio.run(run())\n"
    )
    return run_script(code)


def run_script(code: str) -> dict[str, Any]:
    """Run a Python script in a new process whose environment names nothing but Python."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class Cluster3:
    def __init__(self, redis_url: str, fake: FakeTwilioRest) -> None:
        self.redis_url = redis_url
        self.fake = fake
        self.apps: dict[str, ServedApp] = {}
        for name in ("a", "b", "c"):
            app = ServedApp({"TWILIO_SKIP_SIGNATURE_VALIDATION": "1"})
            app.env.update(fake.env())
            app.env.update({
                "TWILIO_SKIP_SIGNATURE_VALIDATION": "1",
                "TWILIO_PHONE_NUMBER": "+15550009999",
                "VOICE_REDIS_URL": redis_url,
                "VOICE_INSTANCE_ID": name,
                "VOICE_INSTANCE_URL": app.url,
                "VOICE_CLUSTER_SECRET": SECRET,
                "VOICE_CLUSTER_HEARTBEAT_S": str(HEARTBEAT_S),
                "ABUSE_MAX_CALLS": str(CAPACITY),
                "ABUSE_DRAIN_TIMEOUT": "10",
            })  # fmt: skip
            self.apps[name] = app

    def owner(self, ws_url: str) -> ServedApp:
        return next(a for a in self.apps.values() if ws_url.startswith(a.ws_url + "/"))

    def name_of(self, app: ServedApp) -> str:
        return next(n for n, a in self.apps.items() if a is app)

    def alive(self) -> list[ServedApp]:
        return [a for a in self.apps.values() if a.proc is not None and a.proc.poll() is None]

    def seen_live(self, count: int) -> bool:
        return all(health(a)["cluster"]["live_calls"] == count for a in self.alive())


@pytest.fixture(scope="module")
def cluster3(redis_server: Any) -> Iterator[Cluster3]:
    redis_server.flush()
    with FakeTwilioRest() as fake:
        group = Cluster3(redis_server.url, fake)
        try:
            for app in group.apps.values():  # start all three, then wait for each
                app.launch()
            for app in group.apps.values():
                app.start()
            wait_until(
                lambda: all(
                    len(health(a)["cluster"]["instances"]) == 3 for a in group.apps.values()
                ),
                what="every instance sees three",
            )
            yield group
        finally:
            for app in group.apps.values():
                app.__exit__()


def test_inbound_calls_posted_to_random_instances_are_served_wholly_by_their_owner(
    cluster3: Cluster3,
) -> None:
    rng = random.Random(17)
    callers: list[tuple[PacedCaller, ServedApp]] = []
    try:
        for k in range(3 * CAPACITY):
            sid = new_sid()
            url, params = inbound(rng.choice(list(cluster3.apps.values())), sid)
            owner = cluster3.owner(url)
            caller = PacedCaller(url, parameters=params, call_sid=sid)
            caller.start()
            caller.started.wait(10)
            callers.append((caller, owner))
            # Each instance hands calls over from what the last heartbeats told it.
            wait_until(lambda n=k + 1: cluster3.seen_live(n), what=f"{k + 1} live calls")
        # Every instance took its share: the full ones handed calls over, none went busy.
        per_instance = {n: 0 for n in cluster3.apps}
        for _, owner in callers:
            per_instance[cluster3.name_of(owner)] += 1
        assert per_instance == {"a": CAPACITY, "b": CAPACITY, "c": CAPACITY}
        # The whole cluster is full: only now does a caller hear the busy message.
        status, twiml = post(
            cluster3.apps["b"], "/twilio/voice", {"CallSid": new_sid(), "From": "+1555", "To": "+1"}
        )
        assert "<Hangup" in twiml and "<Stream" not in twiml
        listed = {c.call_sid: c for c in cluster_calls(cluster3.redis_url)}
        assert {s: listed[s].instance_id for s in listed} == {
            c.call_sid: cluster3.name_of(o) for c, o in callers
        }
        assert all(c.direction == "inbound" and "+1555" not in repr(c) for c in listed.values())
    finally:
        for caller, _ in callers:
            caller.stop()
    for caller, owner in callers:
        assert_no_frame_lost(owner, caller)
        for other in cluster3.apps.values():
            if other is not owner:
                assert other.call_record(caller.call_sid)["bytes"] == 0
    wait_until(lambda: cluster_calls(cluster3.redis_url) == [], what="calls to leave Redis")


def test_outbound_call_stream_and_callbacks_reach_its_owner_and_control_from_a_script(
    cluster3: Cluster3,
) -> None:
    a, b, c = (cluster3.apps[n] for n in "abc")
    fake = cluster3.fake
    status, body = post(a, "/test/place?async_amd=true", {})
    sid = json.loads(body)["call_sid"]
    created = fake.calls[sid]
    url, params = stream_of(created.twiml or "")
    assert url.startswith(a.ws_url + "/voice/a.")  # the stream goes to the placing instance
    sent = dict(created.params)
    assert sent["StatusCallback"] == a.url + "/twilio/status"
    assert sent["AsyncAmdStatusCallback"] == a.url + "/twilio/status"
    # Callbacks posted to other instances reach A's session as the same events.
    assert post(b, "/twilio/status", {"CallSid": sid, "CallStatus": "ringing"})[0] == 204
    caller = PacedCaller(url, parameters=params, call_sid=sid)
    caller.start()
    try:
        caller.started.wait(10)
        assert post(c, "/twilio/status", {"CallSid": sid, "AnsweredBy": "human"})[0] == 204
        wait_until(
            lambda: (
                {e["kind"] for e in a.get_json(f"/test/events/{sid}")}
                >= {"call_status", "answered_by"}
            ),
            what="forwarded events on A",
        )
        events = a.get_json(f"/test/events/{sid}")
        assert {"kind": "call_status", "status": "ringing"} in events
        assert {"kind": "answered_by", "answered_by": "human"} in events
        assert b.get_json(f"/test/events/{sid}") == [] == c.get_json(f"/test/events/{sid}")
        # An SMS from the callee, posted to C, reaches the call on A.
        sms = {"MessageSid": "SM" + "1" * 32, "From": "+15550002222", "To": "+15550009999",
               "Body": "running late"}  # fmt: skip
        assert post(c, "/twilio/sms", sms)[0] == 200
        wait_until(
            lambda: any(e["kind"] == "sms" for e in a.get_json(f"/test/events/{sid}")),
            what="the SMS on A",
        )
        got = next(e for e in a.get_json(f"/test/events/{sid}") if e["kind"] == "sms")
        assert got == {"kind": "sms", "message_sid": sms["MessageSid"], "body": "running late",
                       "media_urls": []}  # fmt: skip
        wait_until(lambda: any(x.call_sid == sid for x in cluster_calls(cluster3.redis_url)))
        # A fourth process with only Redis: digits and a transfer, executed by A over REST.
        result = control_process(
            cluster3.redis_url,
            f"""
call = cluster.control({sid!r})
digits = await call.send_digits_async("1234#")
transferred = await call.transfer_async("+15550003333")
return {{"digits": digits, "transfer": transferred}}
""",
        )
        assert set(result) == {"digits", "transfer"}
        updates = [dict(u).get("Twiml", "") for u in fake.calls[sid].updates]
        # The stream restarts on A, with a token naming A.
        assert any('<Play digits="1234#"' in u and a.ws_url + "/voice/a." in u for u in updates)
        assert any("<Dial" in u and "+15550003333" in u for u in updates), updates
    finally:
        caller.stop()
    assert_no_frame_lost(a, caller)


async def test_hangup_from_a_fourth_process_ends_the_call_after_its_last_words(
    cluster3: Cluster3,
) -> None:
    sid = new_sid()
    url, params = await asyncio.to_thread(inbound, cluster3.apps["b"], sid)
    sim = CallerSimulator(url, call_sid=sid, parameters={**params, "abuse_play_ms": "1500"})
    async with sim:
        assert await sim.wait_for_heard(100, timeout=10)
        # A plain sync script: nothing but the Redis URL and the call SID.
        script = (
            "from voice_runtime.cluster import Cluster\n"
            f"Cluster({cluster3.redis_url!r}).control({sid!r}).hangup(after_playback=True)\n"
            "print('{\"ok\": 1}')\n"
        )
        result = await asyncio.to_thread(run_script, script)
        assert result == {"ok": 1}
        assert await sim.wait_closed(15)
        # Every word queued before the hang-up was heard.
        assert sim.heard_ms >= 1500 - 20, sim.heard_ms


def _refused(url: str) -> bool:
    try:
        with ws_connect(url, open_timeout=5):
            return False
    except InvalidStatus as exc:
        return exc.response.status_code == 403


def test_foreign_forged_expired_and_used_tokens_are_refused_before_accept(
    cluster3: Cluster3,
) -> None:
    a, b = cluster3.apps["a"], cluster3.apps["b"]
    sid = new_sid()
    url, params = inbound(a, sid)
    assert url.startswith(a.ws_url)
    token = url.rsplit("/", 1)[1]
    assert _refused(f"{b.ws_url}/voice/{token}")  # A's token at B
    assert _refused(f"{a.ws_url}/voice/{token[:-4]}AAAA")  # forged signature
    expired = RouteSigner(SECRET.encode(), "a").issue(-5)
    assert _refused(f"{a.ws_url}/voice/{expired}")
    other_secret = RouteSigner(b"another cluster", "a").issue(30)
    assert _refused(f"{a.ws_url}/voice/{other_secret}")
    # The refusals used nothing up: the token still serves its call at its owner, once.
    caller = PacedCaller(url, parameters=params, call_sid=sid)
    caller.start()
    caller.started.wait(10)
    caller.stop()
    assert_no_frame_lost(a, caller)
    assert _refused(url)
    assert "route token names another instance" in b.output
    for line in ("not signed by this cluster", "route token expired", "already used"):
        assert line in a.output


def test_redis_restart_keeps_audio_and_control_resumes(
    cluster3: Cluster3, redis_server: Any
) -> None:
    a = cluster3.apps["a"]
    sid = new_sid()
    url, params = inbound(a, sid)
    caller = PacedCaller(url, parameters=params, call_sid=sid)
    caller.start()
    try:
        caller.started.wait(10)
        wait_until(lambda: any(x.call_sid == sid for x in cluster_calls(cluster3.redis_url)))
        redis_server.stop()
        wait_until(lambda: health(a)["cluster"]["redis"] == "down", what="A to notice")
        during = len(caller.sent)
        wait_until(lambda: len(caller.sent) >= during + 8000, what="a second of audio")
        redis_server.start()
        wait_until(lambda: health(a)["cluster"]["redis"] == "up", what="A to reconnect")
        # The state comes back with the next heartbeat, and control works again.
        wait_until(lambda: any(x.call_sid == sid for x in cluster_calls(cluster3.redis_url)))

        async def clear() -> None:
            async with Cluster(cluster3.redis_url) as cluster:
                await cluster.control(sid).clear_async()

        wait_until(lambda: _try(lambda: asyncio.run(clear())), what="control after the outage")
        assert health(a)["cluster"]["redis_outages"] >= 1
    finally:
        caller.stop()
    assert_no_frame_lost(a, caller)
    # The media path never waited on Redis (a wait would show as a gap of a second).
    assert a.call_record(sid)["max_gap_ms"] < 500
    assert "Redis unreachable" in a.output and "Redis reachable again" in a.output


def _try(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except Exception:
        return False
    return True


def test_sigterm_drains_one_instance_and_kill_9_leaves_within_the_expiry(
    cluster3: Cluster3,
) -> None:
    a, b, c = (cluster3.apps[n] for n in "abc")
    callers: dict[str, PacedCaller] = {}
    for name, app in (("a", a), ("b", b), ("c", c)):
        sid = new_sid()
        url, params = inbound(app, sid)
        assert cluster3.owner(url) is app
        callers[name] = PacedCaller(url, parameters=params, call_sid=sid)
        callers[name].start()
        callers[name].started.wait(10)
    try:
        wait_until(lambda: cluster3.seen_live(3), what="three live calls")
        # SIGTERM C: it drains; new calls posted to it go to the others.
        assert c.proc is not None
        c.proc.send_signal(15)
        wait_until(lambda: c.get_json("/health")["draining"], what="C draining")
        url, params = inbound(c, new_sid())
        assert cluster3.owner(url) in (a, b)
        during = c.call_record(callers["c"].call_sid)["bytes"]
        wait_until(lambda: c.call_record(callers["c"].call_sid)["bytes"] > during + 8000)
        callers["c"].stop()
        assert callers["c"].error is None  # its live call finished on its own terms
        assert c.stop() == 0
        wait_until(lambda: "c" not in {i["instance_id"] for i in health(a)["cluster"]["instances"]})
        # kill -9 B: within the heartbeat expiry it and its call leave the cluster.
        assert b.proc is not None
        b.proc.kill()
        killed = time.monotonic()
        wait_until(
            lambda: (
                {x.instance_id for x in cluster_calls(cluster3.redis_url)} == {"a"}
                and [i["instance_id"] for i in health(a)["cluster"]["instances"]] == ["a"]
            ),
            timeout=EXPIRY_S + 5,
            what="B to leave",
        )
        assert time.monotonic() - killed < EXPIRY_S + 3
    finally:
        for caller in callers.values():
            caller.stop()
    assert_no_frame_lost(a, callers["a"])
