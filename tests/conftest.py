"""Shared fixtures: a live voice server on 127.0.0.1 and a caller simulator factory."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
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
async def single_session_server(**config: Any) -> AsyncIterator[VoiceServer]:
    """A real uvicorn server in the test's loop with one session registered."""
    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session, options=StreamOptions(lead_ms=60))
    async with serve_in_loop(app, **config) as srv:
        yield VoiceServer(session, app, srv.ws_url, srv.url)
    session.signal_disconnected()


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
