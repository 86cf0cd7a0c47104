"""Shared fixtures: a live voice server on 127.0.0.1 and a caller simulator factory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from fastapi import FastAPI
from hypothesis import settings

from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import StreamOptions, register_voice_websocket

# Tests never reach a real Twilio account, whatever the developer's shell has.
for _name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER", "VOICE_STREAM_URL"):
    os.environ.pop(_name, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# CI runs the same generated examples every time (a landing must not hinge on a new random
# draw); developers' runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# How long a thread or task the test started may take to finish after the test (and its
# fixtures) returned: a closed socket's reader or a cancelled task needs a moment, a leak never
# ends.
LEAK_GRACE_S = 1.0

# Threads that outlive a test by design. Everything else a test starts must be gone when the
# test's fixtures are torn down.
_LONG_LIVED_THREAD_PREFIXES = (
    # pytest-timeout's watchdog (timeout_method=thread) lives as long as the timed test.
    "pytest_timeout",
    # tqdm's monitor is one per process: the first progress bar (model loading) starts it and
    # tqdm keeps it until the interpreter exits.
    "tqdm_monitor",
)


def _leaked_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not t.name.startswith(_LONG_LIVED_THREAD_PREFIXES)
    ]


def _fail_on_threads(leaked: list[threading.Thread]) -> None:
    if leaked:
        names = ", ".join(sorted(f"{t.name} ({t.__class__.__name__})" for t in leaked))
        pytest.fail(f"test leaked {len(leaked)} thread(s): {names}", pytrace=False)


@pytest.fixture(autouse=True)
def no_leaked_threads_or_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a thread (or, when async, a task of its loop) running."""
    if _is_function_loop_async_test(request.node):
        # Requested from here, the async check is torn down after every other fixture of the
        # test (this one included) while the test's loop still exists.
        request.getfixturevalue("_no_leaked_tasks_or_threads")
        yield
        return
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    for thread in _leaked_threads(before):
        thread.join(max(0.0, deadline - time.monotonic()))
    _fail_on_threads(_leaked_threads(before))


def _is_function_loop_async_test(item: pytest.Item) -> bool:
    if not pytest_asyncio.is_async_test(item):
        return False
    marker = item.get_closest_marker("asyncio")
    scope = marker.kwargs.get("loop_scope") if marker is not None else None
    return scope in (None, "function")


@pytest_asyncio.fixture
async def _no_leaked_tasks_or_threads() -> AsyncIterator[None]:
    """The async test's leak check: its loop's tasks and the threads still running at its end."""
    before_threads = set(threading.enumerate())
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEAK_GRACE_S
    while True:
        leaked = [t for t in asyncio.all_tasks() if t is not me and t not in before]
        if not leaked or loop.time() >= deadline:
            break
        await asyncio.sleep(0.01)
    if leaked:
        names = ", ".join(sorted(_task_label(t) for t in leaked))
        for task in leaked:  # don't let them run on into the next test's report
            task.cancel()
        pytest.fail(f"test leaked {len(leaked)} task(s): {names}", pytrace=False)
    # The loop's default executor (run_in_executor, to_thread) is the loop's, not the test's:
    # shut it down now, as closing the loop would next, so the check sees only the threads
    # the test left behind (a worker stuck in a call stays and is reported).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.shutdown_default_executor(), LEAK_GRACE_S)
    while _leaked_threads(before_threads) and loop.time() < deadline + LEAK_GRACE_S:
        await asyncio.sleep(0.01)
    _fail_on_threads(_leaked_threads(before_threads))


def _task_label(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", None) or repr(coro)
    return f"{task.get_name()} ({where})"


@dataclass
class VoiceServer:
    """A running app serving one VoiceSession at /voice."""

    session: VoiceSession
    app: FastAPI
    ws_url: str
    url: str

    def simulator(self, **kwargs: object) -> CallerSimulator:
        """A caller simulator pointed at this server's /voice."""
        return CallerSimulator(self.ws_url + "/voice", **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def single_session_server(
    *, options: StreamOptions | None = None, **config: Any
) -> AsyncIterator[VoiceServer]:
    """A real uvicorn server in the test's loop with one session registered."""
    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session, options=options or StreamOptions(lead_ms=60))
    async with serve_in_loop(app, **config) as srv:
        yield VoiceServer(session, app, srv.ws_url, srv.url)
    session.signal_disconnected()


@pytest.fixture
def no_twilio_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials and no public URL: signatures off, hang-up by closing the stream."""
    for name in (
        "TWILIO_AUTH_TOKEN",
        "TWILIO_ACCOUNT_SID",
        "TWILIO_SKIP_SIGNATURE_VALIDATION",
        "VOICE_PUBLIC_URL",
        "VOICE_STREAM_URL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A FakeTwilioRest with its credentials (and our number +15550001111) in the environment."""
    from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest

    with FakeTwilioRest() as fake:
        for name, value in fake.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("TWILIO_PHONE_NUMBER", "+15550001111")
        for name in ("VOICE_STREAM_URL", "VOICE_PUBLIC_URL", "TWILIO_SKIP_SIGNATURE_VALIDATION"):
            monkeypatch.delenv(name, raising=False)
        yield fake


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A private redis-server for this test session (tests/redis_server.py)."""
    from redis_server import private_redis_server

    yield from private_redis_server()


@pytest.fixture
async def voice_server() -> AsyncIterator[VoiceServer]:
    """A real uvicorn server in the test's loop with one session registered."""
    async with single_session_server() as server:
        yield server


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout``; return its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return bool(predicate())
        await asyncio.sleep(interval)
    return True
