"""``voice-runtime serve --workers N``: N instances on one host sharing one Redis; SIGTERM
drains them all; refused without Redis. Also: one process with no Redis never imports it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from abuse_kit import ROOT, TESTS, PacedCaller, ServedApp, free_port
from test_cluster import new_sid, stream_of, wait_until

pytestmark = pytest.mark.timeout(60)


def _json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _alive(url: str) -> bool:
    try:
        _json(url)
    except OSError:
        return False
    return True


def test_workers_share_redis_and_sigterm_drains_them_all(redis_server: Any) -> None:
    redis_server.flush()
    app = ServedApp(
        {
            "VOICE_REDIS_URL": redis_server.url,
            "VOICE_CLUSTER_SECRET": "workers-secret",
            "VOICE_CLUSTER_HEARTBEAT_S": "0.3",
            "VOICE_INSTANCE_ID": "host1",
            "TWILIO_SKIP_SIGNATURE_VALIDATION": "1",
        },
        args=["--workers", "2"],
    )
    second = f"http://127.0.0.1:{app.port + 1}"
    with app:
        wait_until(lambda: _alive(second + "/health"), what="the second worker")
        instances = wait_until(
            lambda: len(i := _json(second + "/health")["cluster"]["instances"]) == 2 and i,
            what="both workers in the cluster",
        )
        assert {(i["instance_id"], i["url"]) for i in instances} == {
            ("host1-0", app.url),
            ("host1-1", second),
        }
        # A call on worker 1, then SIGTERM to the supervisor: every worker drains.
        sid = new_sid()
        req = urllib.request.Request(
            second + "/twilio/voice",
            data=f"CallSid={sid}&From=%2B1555&To=%2B1666".encode(),
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            twiml = resp.read().decode()
        url, params = stream_of(twiml)
        assert url.startswith(f"ws://127.0.0.1:{app.port + 1}/")
        caller = PacedCaller(url, parameters=params, call_sid=sid)
        caller.start()
        caller.started.wait(10)
        try:
            wait_until(lambda: _json(second + "/health")["live_calls"] == 1)
            assert app.proc is not None
            app.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: _json(second + "/health")["draining"], what="worker 1 draining")
            wait_until(lambda: not _alive(app.url + "/health"), what="idle worker 0 to exit")
            assert _json(second + "/health")["live_calls"] == 1  # the live call goes on
        finally:
            caller.stop()
        assert caller.error is None
        app.proc.wait(20)  # drained: it exits by itself (a second SIGTERM would kill)
        assert app.stop() == 0
        assert not _alive(second + "/health")


def test_workers_do_not_outlive_a_killed_supervisor(redis_server: Any) -> None:
    app = ServedApp(
        {
            "VOICE_REDIS_URL": redis_server.url,
            "VOICE_CLUSTER_SECRET": "workers-secret",
            "VOICE_CLUSTER_HEARTBEAT_S": "0.3",
            "TWILIO_SKIP_SIGNATURE_VALIDATION": "1",
        },
        args=["--workers", "2"],
    )
    second = f"http://127.0.0.1:{app.port + 1}"
    with app:
        wait_until(lambda: _alive(second + "/health"), what="the second worker")
        assert app.proc is not None
        app.proc.kill()  # no chance to forward anything: the kernel tells the workers
        wait_until(
            lambda: not _alive(app.url + "/health") and not _alive(second + "/health"),
            timeout=15,
            what="both workers to exit after their supervisor was killed",
        )


def test_workers_without_redis_are_refused_with_a_clear_message() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "voice_runtime.cli", "serve", "abuse_app:voice",
         "--app-dir", str(TESTS), "--workers", "3", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--workers 3 needs Redis" in done.stderr and "VOICE_REDIS_URL" in done.stderr


def test_one_process_without_redis_never_imports_it() -> None:
    code = (
        "import sys\n"
        "from voice_runtime.server import VoiceServer\n"
        "voice = VoiceServer()\n"
        "assert voice.cluster is None\n"
        "with voice.start_in_thread():\n"
        "    pass\n"
        "print('redis' in sys.modules, any(m.startswith('redis') for m in sys.modules))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
