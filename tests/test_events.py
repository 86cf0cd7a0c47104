"""The call event stream: what a call publishes, in order, and how subscribers get it."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import wait_for

from voice_runtime import events as ev
from voice_runtime.events import CallEvent, EventBus
from voice_runtime.mock.stt import MockStt
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator

CALLER = "+15551234567"
AGENT_AUDIO = b"\x7f" * 3200  # 400 ms


def _server(on_call: Any, **kw: Any) -> VoiceServer:
    return VoiceServer(on_call=on_call, stt=lambda: MockStt(), **kw)


async def _turn(session: VoiceSession) -> None:
    """A handler: answer each transcript with 400 ms of audio, confirmed heard."""
    answered = asyncio.Event()

    def committed(_text: str) -> None:
        session.put_outbound_sync(AGENT_AUDIO)
        answered.set()

    assert session.stt is not None or await _wait_stt(session)
    session.stt.on_committed = committed  # type: ignore[union-attr]
    await session.wait_until_disconnected_async(20)


async def _wait_stt(session: VoiceSession) -> bool:
    return await wait_for(lambda: session.stt is not None)


async def test_a_call_publishes_its_events_in_order_without_the_callers_number() -> None:
    seen: list[CallEvent] = []
    server = _server(_turn)
    server.events.subscribe(seen.append)
    async with serve_in_loop(server.app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice", parameters={"caller_number": CALLER})
        async with sim:
            session = await asyncio.to_thread(server.session_for_call, sim.call_sid, 5)
            assert session is not None
            await wait_for(lambda: session.stt is not None and session.stt.on_committed)
            await sim.send_dtmf("7")
            assert await wait_for(lambda: any(e.kind == ev.DTMF for e in seen), 5)
            session.stt.inject("hello there")  # type: ignore[union-attr]
            assert await wait_for(lambda: any(e.kind == ev.TURN_LATENCY for e in seen), 5)
            assert await wait_for(lambda: any(e.kind == ev.AGENT_AUDIO_DONE for e in seen), 5)
            session.request_clear_buffer()
            assert await wait_for(lambda: any(e.kind == ev.CLEAR for e in seen), 5)
        assert await wait_for(lambda: any(e.kind == ev.CALL_ENDED for e in seen), 5)
    kinds = [e.kind for e in seen]
    order = [
        ev.CALL_STARTED,
        ev.DTMF,
        ev.TRANSCRIPT_COMMITTED,
        ev.AGENT_AUDIO_QUEUED,
        ev.AGENT_AUDIO_HEARD,
        ev.TURN_LATENCY,
        ev.AGENT_AUDIO_DONE,
        ev.CLEAR,
        ev.CALL_ENDED,
    ]
    assert [k for k in kinds if k in order] == order, kinds
    # The server's shutdown drained it: the one event of no call.
    assert [e.call_sid for e in seen if e.kind == ev.DRAINING] == [""]
    seen = [e for e in seen if e.kind != ev.DRAINING]
    assert {e.call_sid for e in seen} == {sim.call_sid}
    assert all(e.stream_sid == sim.stream_sid for e in seen)
    by_kind = {e.kind: e for e in seen}
    assert by_kind[ev.DTMF].data["digit"] == "7"
    assert "digit" not in by_kind[ev.DTMF].redacted().data
    assert by_kind[ev.TRANSCRIPT_COMMITTED].data["text"] == "hello there"
    turn = by_kind[ev.TURN_LATENCY].data
    # 400 ms of audio paced 120 ms ahead: the first echo comes back well within a second.
    assert 0 < turn["queued_to_heard_ms"] <= turn["total_ms"] < 3000
    assert turn["to_commit_ms"] == 0.0
    assert by_kind[ev.AGENT_AUDIO_DONE].data["audio_ms"] == len(AGENT_AUDIO) / 8
    ended = by_kind[ev.CALL_ENDED].data
    assert ended["reason"] == "caller_hangup"
    assert ended["frames_out"] > 0 and ended["frames_in"] > 0
    assert CALLER not in repr([e.data for e in seen])


async def test_stream_subscribers_get_one_call_and_a_slow_one_loses_the_oldest() -> None:
    bus = EventBus()
    fast = bus.stream(call_sid="CA1")
    slow = bus.stream(maxsize=2)
    async with fast, slow:
        for i in range(5):
            for sid in ("CA1", "CA2"):
                bus.publish(CallEvent(ev.DTMF, sid, None, float(i), 0.0, {"digit": str(i)}))
        got = [await fast.get(1) for _ in range(5)]
        assert [e.data["digit"] for e in got] == ["0", "1", "2", "3", "4"]
        assert slow.dropped == 8 and bus.dropped == 8
        assert [(await slow.get(1)).t for _ in range(2)] == [4.0, 4.0]
    assert not bus.active


async def test_a_timed_out_get_leaves_the_stream_open() -> None:
    bus = EventBus()
    async with bus.stream(call_sid="CA1") as stream:
        for _ in range(2):
            try:
                await stream.get(0.01)
            except TimeoutError:
                pass
            else:
                raise AssertionError("get() returned with nothing published")
        assert bus.active
        bus.publish(CallEvent(ev.DTMF, "CA1", None, 1.0, 0.0, {"digit": "5"}))
        assert (await stream.get(1)).data["digit"] == "5"


async def test_a_failing_listener_is_counted_and_others_still_hear() -> None:
    bus = EventBus()
    got: list[CallEvent] = []

    def broken(_e: CallEvent) -> None:
        raise RuntimeError("listener bug")

    bus.subscribe(broken)
    unsubscribe = bus.subscribe(got.append)
    bus.publish(CallEvent(ev.CLEAR, "CA1"))
    assert bus.errors == 1 and len(got) == 1
    unsubscribe()
    bus.unsubscribe(broken)
    assert not bus.active


async def test_async_for_ends_when_the_stream_is_closed() -> None:
    bus = EventBus()
    stream = bus.stream()
    got: list[str] = []

    async def read() -> None:
        async for event in stream:
            got.append(event.kind)

    task = asyncio.create_task(read())
    assert await wait_for(lambda: bus.active)
    bus.publish(CallEvent(ev.CALL_STARTED, "CA1"))
    assert await wait_for(lambda: got == [ev.CALL_STARTED])
    stream.close()
    await asyncio.wait_for(task, 2)
    assert not bus.active


async def test_leaving_an_async_for_early_unsubscribes() -> None:
    bus = EventBus()

    async def first() -> CallEvent:
        async for event in bus.stream():
            return event
        raise AssertionError("the stream ended")

    task = asyncio.create_task(first())
    assert await wait_for(lambda: bus.active)
    bus.publish(CallEvent(ev.CALL_STARTED, "CA1"))
    assert (await asyncio.wait_for(task, 2)).kind == ev.CALL_STARTED
    assert await wait_for(lambda: not bus.active)
