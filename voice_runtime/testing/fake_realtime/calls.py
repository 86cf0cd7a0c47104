"""Scripted audio and whole calls against a realtime fake (serve_call, bridged_call)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from voice_runtime.testing.fake_realtime.base import FakeResponse


def tone_response(
    ms: float,
    *,
    freq: float = 440.0,
    transcript: str = "",
    usage: Mapping[str, int] | None = None,
) -> FakeResponse:
    """A response whose audio is a recognisable tone of ``ms`` milliseconds."""
    from voice_runtime.audio import tone_ulaw

    return FakeResponse(audio=tone_ulaw(freq, ms, -12.0), transcript=transcript, usage=usage)


def pattern_audio(ms: float) -> bytes:
    """Loud μ-law audio with a non-repeating byte pattern (for byte-exact comparisons)."""
    n = int(ms * 8)
    t = np.arange(n, dtype=np.float64)
    wave = 8000.0 * np.sin(2 * math.pi * 330.0 * t / 8000.0) + 3000.0 * np.sin(t * 0.0173)
    from voice_runtime.audio import ulaw_encode

    return ulaw_encode(wave.astype(np.int16)).tobytes()


# ---------------------------------------------------------------------------- whole calls


@dataclass
class FakeCall:
    """A live call: the session, the caller simulator, and the bridge's outcome."""

    session: Any
    simulator: Any
    events: list[Any]
    transcripts: list[Any]
    task: asyncio.Task[Any] | None = None

    async def result(self, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        """Wait for what the on-connect coroutine returned (a BridgeResult for agents)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.task is None:
            if loop.time() >= deadline:
                raise TimeoutError("the call never connected")
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(asyncio.shield(self.task), max(0.0, deadline - loop.time()))

    def of(self, kind: type) -> list[Any]:
        """The recorded agent events of one type."""
        return [e for e in self.events if isinstance(e, kind)]


@contextlib.asynccontextmanager
async def serve_call(
    on_connect: Callable[[Any, FakeCall], Any],
    *,
    stream_options: Any = None,
    parameters: Mapping[str, str] | None = None,
) -> Any:
    """Serve one Twilio media stream on 127.0.0.1, run ``on_connect(session, call)`` when it
    starts, and connect a caller simulator to it.

    Yields a :class:`FakeCall`; on exit the caller hangs up and everything is torn down.
    """
    from fastapi import FastAPI

    from voice_runtime.session import VoiceSession
    from voice_runtime.testing.server import serve_in_loop
    from voice_runtime.testing.simulator import CallerSimulator
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session, options=stream_options)
    call = FakeCall(session, None, [], [])

    async def watch() -> None:
        await session.wait_for_ws_connect_async(30.0)
        result = on_connect(session, call)
        call.task = asyncio.ensure_future(result)

    watcher = asyncio.create_task(watch(), name="fake-call-connect")
    async with serve_in_loop(app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice", parameters=parameters)
        call.simulator = sim
        await sim.connect()
        try:
            yield call
        finally:
            await sim.hangup()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(watcher, 5.0)
            if call.task is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(call.task, 10.0)
            session.signal_disconnected()


@contextlib.asynccontextmanager
async def bridged_call(
    agent: Any,
    *,
    stream_options: Any = None,
    parameters: Mapping[str, str] | None = None,
    **attach_kwargs: Any,
) -> Any:
    """A whole call with ``agent`` (an agent or a ``factory(session)``) bridged onto it.

    ``attach_kwargs`` go to :func:`~voice_runtime.realtime.attach_agent`; every agent event
    and transcript line is recorded on the yielded :class:`FakeCall`.
    """
    from voice_runtime.realtime.bridge import attach_agent

    def on_connect(session: Any, call: FakeCall) -> Any:
        real = agent(session) if callable(agent) and not hasattr(agent, "push_audio") else agent
        user_event = attach_kwargs.pop("on_event", None)
        user_transcript = attach_kwargs.pop("on_transcript", None)

        def on_event(event: Any) -> Any:
            call.events.append(event)
            return None if user_event is None else user_event(event)

        def on_transcript(line: Any) -> Any:
            call.transcripts.append(line)
            return None if user_transcript is None else user_transcript(line)

        return attach_agent(
            session, real, on_event=on_event, on_transcript=on_transcript, **attach_kwargs
        )

    async with serve_call(on_connect, stream_options=stream_options, parameters=parameters) as call:
        yield call
