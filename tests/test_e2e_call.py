"""Whole calls over a real uvicorn server and the caller simulator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from conftest import VoiceServer, single_session_server, wait_for

from voice_runtime.mock.stt import MockStt
from voice_runtime.session import VoiceSession
from voice_runtime.testing.clock import ManualClock


@pytest.fixture(params=[None, "websockets-sansio"], ids=["fastws", "uvicorn-ws"])
async def voice_server(request: pytest.FixtureRequest) -> AsyncIterator[VoiceServer]:
    """Each call test twice: on VoiceWebSocketProtocol (the direct path) and on uvicorn's
    own websocket protocol (the ASGI path of apps served by plain ``uvicorn app:app``)."""
    config = {} if request.param is None else {"ws": request.param}
    async with single_session_server(**config) as server:
        yield server


def _noise(n: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _server_tasks() -> list[str]:
    return sorted(
        t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith(("vr-", "mock-stt"))
    )


async def test_caller_audio_reaches_stt_byte_exact_and_in_order(voice_server: VoiceServer) -> None:
    stts: list[MockStt] = []
    voice_server.session.stt_factory = lambda: stts.append(MockStt()) or stts[-1]
    audio = _noise(160 * 25 + 37)
    async with voice_server.simulator(silence_when_idle=False) as sim:
        await voice_server.session.wait_for_ws_connect_async(5)
        await sim.send_audio(audio, realtime=False)
        assert await wait_for(lambda: len(stts) == 1 and len(stts[0].audio) == len(audio))
        assert bytes(stts[0].audio) == audio
    assert await wait_for(lambda: stts[0].stopped)


async def test_agent_audio_reaches_the_caller_byte_exact(voice_server: VoiceServer) -> None:
    s = voice_server.session
    audio = _noise(8000, seed=2)  # 1 s, not a multiple of the frame size on purpose
    audio += b"\x10" * 77
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        played = await asyncio.to_thread(
            lambda: (s.put_outbound_sync(audio), s.send_mark_and_wait("done", 5))[1]
        )
        assert played is True
        assert bytes(sim.received) == audio
        assert bytes(sim.heard) == audio
        assert s.played_ms == len(audio) / 8


async def test_mark_returns_only_after_the_audio_before_it_was_played(
    voice_server: VoiceServer,
) -> None:
    s = voice_server.session
    clock = ManualClock()
    async with voice_server.simulator(clock=clock) as sim:
        await s.wait_for_ws_connect_async(5)
        s.put_outbound_sync(b"\x55" * 1600)  # 200 ms
        waiter = asyncio.create_task(s.send_mark_and_wait_async("tts_complete", 10))
        assert await wait_for(lambda: len(sim.received) == 1600)
        await asyncio.sleep(0.05)
        assert not waiter.done() and sim.heard_ms == 0  # nothing played yet on the virtual clock
        await clock.advance(0.1)
        assert not waiter.done() and sim.heard_ms < 200
        await clock.advance(0.12)
        assert await asyncio.wait_for(waiter, 5) is True
        assert sim.heard_ms == 200


async def test_marks_leave_after_audio_queued_before_them_from_other_threads(
    voice_server: VoiceServer,
) -> None:
    s = voice_server.session
    async with voice_server.simulator(playback="instant") as sim:
        await s.wait_for_ws_connect_async(5)

        def producer() -> bool:
            for _ in range(20):
                s.put_outbound_sync(b"\x01" * 400)
            return s.send_mark_and_wait("after_audio", 5)

        assert await asyncio.to_thread(producer) is True
        mark_time = [
            e for e in sim.events if e.kind == "mark" and e.detail.startswith("after_audio")
        ]
        assert mark_time and len(sim.received) == 8000


async def test_clear_mid_utterance_stops_playback_there(voice_server: VoiceServer) -> None:
    s = voice_server.session
    audio = _noise(8000 * 3, seed=3)
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        waiter = asyncio.create_task(
            asyncio.to_thread(
                lambda: (s.put_outbound_sync(audio), s.send_mark_and_wait("tts_complete", 10))[1]
            )
        )
        assert await sim.wait_for_heard(500, 5)
        s.request_clear_buffer()
        assert await asyncio.wait_for(waiter, 5) is False  # cleared, not played
        assert await wait_for(lambda: sim.clears == 1)
        heard_at_clear = sim.heard_ms
        await asyncio.sleep(0.3)
        assert sim.heard_ms == heard_at_clear < 1000  # nothing more was played
        assert bytes(sim.heard) == audio[: len(sim.heard)]  # and what was heard is the prefix
        assert s.played_ms <= sim.heard_ms
        assert s.stats.clears_sent == 1


async def test_disconnect_request_ends_the_call(voice_server: VoiceServer) -> None:
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        await asyncio.to_thread(s.request_disconnect)
        assert await sim.wait_closed(5)
        assert await s.wait_until_disconnected_async(5)


async def test_disconnect_after_playback_lets_the_last_words_play(
    voice_server: VoiceServer,
) -> None:
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        s.put_outbound_sync(b"\x22" * 2400)  # 300 ms
        s.request_disconnect(after_playback=True)
        assert await sim.wait_closed(5)
        assert sim.heard_ms == 300


async def test_stop_from_the_caller_ends_every_task_of_the_call(voice_server: VoiceServer) -> None:
    s = voice_server.session
    stt = MockStt()
    s.stt_factory = lambda: stt
    sim = voice_server.simulator()
    await sim.connect()
    await s.wait_for_ws_connect_async(5)
    assert await wait_for(lambda: "vr-send" in _server_tasks())
    await sim.hangup()
    assert await s.wait_until_disconnected_async(5)
    assert await wait_for(lambda: _server_tasks() == [])
    assert stt.stopped and s.stt is None  # the next call gets a fresh STT


async def test_reset_then_a_second_call_works(voice_server: VoiceServer) -> None:
    s = voice_server.session
    made: list[MockStt] = []
    s.stt_factory = lambda: made.append(MockStt()) or made[-1]
    for n in range(2):
        async with voice_server.simulator(call_sid=f"CA{n:032d}", silence_when_idle=False) as sim:
            await s.wait_for_ws_connect_async(5)
            assert s.call_sid == f"CA{n:032d}"
            await sim.send_audio(b"\x33" * 320, realtime=False)
            ok = await asyncio.to_thread(
                lambda: (s.put_outbound_sync(b"\x44" * 800), s.send_mark_and_wait("m", 5))[1]
            )
            assert ok
            assert await wait_for(lambda: len(made[-1].audio) == 320)
        assert await s.wait_until_disconnected_async(5)
        await wait_for(lambda: _server_tasks() == [])
        s.reset()
    assert len(made) == 2 and made[0] is not made[1]


async def test_malformed_frames_are_counted_and_the_call_goes_on(voice_server: VoiceServer) -> None:
    s = voice_server.session
    stt = MockStt()
    s.stt_factory = lambda: stt
    async with voice_server.simulator(silence_when_idle=False) as sim:
        await s.wait_for_ws_connect_async(5)
        await sim.send_raw("this is not json")
        await sim.send_bytes(b"\x00\x01\x02")
        await sim.send_raw('{"event":"what"}')
        await sim.send_raw(
            f'{{"event":"media","streamSid":"{sim.stream_sid}","media":{{"payload":"**"}}}}'
        )
        await sim.send_raw('{"event":"media","streamSid":"MZwrong","media":{"payload":"AAAA"}}')
        await sim.send_raw(f'{{"event":"media","streamSid":"{sim.stream_sid}"}}')
        await sim.send_raw("x" * 70_000)
        await sim.send_audio(b"\x42" * 160, realtime=False)
        assert await wait_for(lambda: bytes(stt.audio) == b"\x42" * 160)
        assert s.stats.bad_frames == {
            "not_json": 1,
            "binary_frame": 1,
            "unknown_event": 1,
            "bad_base64": 1,
            "wrong_stream_sid": 1,
            "missing_field": 1,
            "too_large": 1,
        }
        ok = await asyncio.to_thread(
            lambda: (s.put_outbound_sync(b"\x01" * 800), s.send_mark_and_wait("still_alive", 5))[1]
        )
        assert ok and not sim.closed


async def test_media_before_start_is_counted(voice_server: VoiceServer) -> None:
    import websockets

    async with websockets.connect(voice_server.ws_url + "/voice") as ws:
        await ws.send('{"event":"media","streamSid":"MZ1","media":{"payload":"AAAA"}}')
        await ws.send('{"event":"stop","streamSid":"MZ1"}')
        assert await wait_for(
            lambda: voice_server.session.stats.bad_frames.get("before_start", 0) >= 1
        )


async def test_dtmf_and_call_info_reach_the_session(voice_server: VoiceServer) -> None:
    s = voice_server.session
    digits: list[str] = []
    s.on_dtmf = digits.append
    params = {"caller_number": "+15550123", "tenant": "acme"}
    async with voice_server.simulator(parameters=params) as sim:
        await s.wait_for_ws_connect_async(5)
        assert s.call_info is not None and dict(s.call_info.custom_parameters) == params
        assert s.caller_number == "+15550123"
        assert s.call_info.stream_sid == sim.stream_sid == s.stream_sid
        for d in "42#":
            await sim.send_dtmf(d)
        assert await wait_for(lambda: digits == ["4", "2", "#"])


def test_sync_outbound_script_leaves_no_thread_or_task_behind() -> None:
    """The 0.1.x usage: a server thread, a sync consumer, one call; nothing leaks."""
    from fastapi import FastAPI

    from voice_runtime.mock.tts import MockTts
    from voice_runtime.testing.server import ServerThread
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    session = VoiceSession(stt_factory=MockStt)
    app = FastAPI()
    register_voice_websocket(app, session)
    tts = MockTts()
    with ServerThread(app) as server:
        sim_done = threading.Event()

        async def caller() -> None:
            async with voice_server_sim(server.ws_url) as sim:
                await sim.wait_closed(10)
            sim_done.set()

        t = threading.Thread(target=lambda: asyncio.run(caller()))
        t.start()
        session.wait_for_ws_connect(5)
        result = tts.speak("Hello there, this is a test call.", session)
        assert result["last_spoken"] == "Hello there, this is a test call."
        assert result["interrupted"] is False and result["call_disconnected"] is False
        session.request_disconnect()
        assert session.wait_until_disconnected(5)
        t.join(10)
        assert sim_done.is_set()
        deadline = time.monotonic() + 5
        while [n for n in server.tasks() if n.startswith(("vr-", "mock-stt"))]:
            assert time.monotonic() < deadline, server.tasks()
            time.sleep(0.02)
    leftover = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert leftover == []
    if fds_before is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds_before


def voice_server_sim(ws_base: str):
    from voice_runtime.testing.simulator import CallerSimulator

    return CallerSimulator(ws_base + "/voice")


async def test_a_session_subclass_overriding_put_inbound_sees_every_caller_frame() -> None:
    from fastapi import FastAPI

    from voice_runtime.testing.server import serve_in_loop
    from voice_runtime.testing.simulator import CallerSimulator
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    class Filtering(VoiceSession):
        """Drops every other frame before the STT: the transport must call this override."""

        seen = 0

        def put_inbound(self, data: bytes | None) -> None:
            if data is not None:
                self.seen += 1
                if self.seen % 2 == 0:
                    return
            super().put_inbound(data)

    session = Filtering()
    app = FastAPI()
    register_voice_websocket(app, session)
    audio = _noise(160 * 40, seed=5)
    async with (
        serve_in_loop(app) as srv,
        CallerSimulator(srv.ws_url + "/voice", silence_when_idle=False) as sim,
    ):
        await sim.send_audio(audio, realtime=False)
        assert await wait_for(lambda: session.seen == 40)
        got = [session.inbound.get_nowait() for _ in range(session.inbound.qsize())]
    assert got == [audio[i : i + 160] for i in range(0, len(audio), 320)]


@pytest.mark.parametrize("ws", [None, "websockets-sansio"], ids=["fastws", "uvicorn-ws"])
async def test_a_stream_that_never_starts_is_closed_and_counted(ws: str | None) -> None:
    import websockets
    from fastapi import FastAPI

    from voice_runtime.testing.server import serve_in_loop
    from voice_runtime.transports.twilio_ws import StreamOptions, register_voice_websocket

    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session, options=StreamOptions(start_timeout_s=0.3))
    config = {} if ws is None else {"ws": ws}
    async with serve_in_loop(app, **config) as srv:
        async with websockets.connect(srv.ws_url + "/voice", compression=None) as client:
            # Connected, but no start: the server ends the stream with 1008.
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(client.recv(), 5)
            await asyncio.wait_for(client.wait_closed(), 5)
            assert client.close_code == 1008
        assert await wait_for(lambda: session.stats.bad_frames.get("no_start") == 1)
    assert not _server_tasks()
