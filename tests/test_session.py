"""VoiceSession: the 0.1.x contract and what goes beyond it, without a transport."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

import pytest
from conftest import wait_for

from voice_runtime import session as session_mod
from voice_runtime.errors import CallNotAnsweredError, LoopThreadError, NoEventLoopError
from voice_runtime.session import FRAME_BYTES, VoiceSession


def test_constructs_with_no_arguments_and_keeps_public_fields() -> None:
    s = VoiceSession()
    assert dataclasses.is_dataclass(s)
    assert FRAME_BYTES == 160
    for name in (
        "call_sid",
        "stream_sid",
        "caller_number",
        "inbound",
        "outbound",
        "stt",
        "stt_factory",
        "stt_secondary_factory",
        "on_stt_ready",
        "on_disconnected",
    ):
        assert hasattr(s, name)
    assert s.caller_number is None and s.loop is None


def test_put_inbound_without_loop_drops_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    s = VoiceSession()
    with caplog.at_level(logging.WARNING, logger="voice_runtime.session"):
        s.put_inbound(b"\xff" * 160)
        s.put_inbound(b"\xff" * 160)
    assert s.inbound.qsize() == 0
    assert s.stats.inbound_dropped == 2
    assert len([r for r in caplog.records if "no event loop" in r.getMessage()]) == 1


def test_put_outbound_before_loop_is_buffered_not_dropped() -> None:
    s = VoiceSession()
    s.put_outbound_sync(b"abc")
    assert s.outbound.get_nowait() == b"abc"


def test_blocking_calls_without_loop_raise_a_clear_error() -> None:
    s = VoiceSession()
    with pytest.raises(NoEventLoopError, match="wait_for_ws_connect"):
        s.send_mark_and_wait("x", timeout=0.1)


async def test_blocking_calls_on_the_loop_thread_raise_instead_of_deadlocking() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    with pytest.raises(LoopThreadError, match="send_mark_and_wait"):
        s.send_mark_and_wait("x", timeout=0.1)
    with pytest.raises(LoopThreadError):
        s.wait_for_ws_connect(timeout=0.1)
    with pytest.raises(CallNotAnsweredError, match="0.05s"):
        await s.wait_for_ws_connect_async(timeout=0.05)


async def test_put_inbound_on_loop_thread_needs_no_hop() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.put_inbound(b"1" * 160)
    # Enqueued synchronously: no callback had to run.
    assert s.inbound.get_nowait() == b"1" * 160


async def test_inbound_is_bounded_and_drops_oldest_with_a_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = VoiceSession(inbound=asyncio.Queue(3))
    s.set_loop(asyncio.get_running_loop())
    for i in range(5):
        s.put_inbound(bytes([i]) * 160)
    assert s.stats.inbound_dropped == 2
    assert [s.inbound.get_nowait()[0] for _ in range(3)] == [2, 3, 4]
    # The end-of-call sentinel is never the one dropped.
    for i in range(3):
        s.put_inbound(bytes([i]) * 160)
    s.signal_disconnected()
    items = [s.inbound.get_nowait() for _ in range(3)]
    assert items[-1] is None


async def test_put_inbound_from_a_thread_arrives_in_order() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())

    def produce() -> None:
        for i in range(50):
            s.put_inbound(bytes([i]) * 160)

    await asyncio.to_thread(produce)
    got = [(await s.inbound.get())[0] for _ in range(50)]
    assert got == list(range(50))


async def test_signal_disconnected_is_idempotent_and_releases_waiters() -> None:
    calls: list[int] = []
    s = VoiceSession(on_disconnected=lambda: calls.append(1))
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(s.send_mark_and_wait("m", timeout=5)))
    t.start()
    assert await wait_for(lambda: len(s.port.marks) == 1)  # the worker waits on its mark
    s.signal_disconnected()
    s.signal_disconnected()
    await asyncio.to_thread(t.join, 5)
    assert result == [False]
    assert await s.port.callbacks.drain()  # on_disconnected runs off the loop thread
    assert calls == [1]
    assert s.is_disconnected
    assert await s.inbound.get() is None


async def test_mark_names_are_unique_and_unknown_echoes_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    names: list[str] = []

    async def echo_all() -> None:
        for _ in range(2):
            item = await s.next_outbound()
            names.append(item.name)  # type: ignore[union-attr]
            s.signal_mark_received(item.name)  # type: ignore[union-attr]

    echo = asyncio.create_task(echo_all())
    assert await asyncio.gather(
        s.send_mark_and_wait_async("tts_complete", 2), s.send_mark_and_wait_async("tts_complete", 2)
    ) == [True, True]
    await echo
    assert len(set(names)) == 2
    assert all(
        n.startswith("tts_complete__") and len(n) == len("tts_complete__") + 8 for n in names
    )
    with caplog.at_level(logging.WARNING):
        s.signal_mark_received("nobody__12345678")
    assert s.stats.unknown_marks == 1


async def test_send_mark_and_wait_times_out_with_builtin_timeout_error() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(s.send_mark_and_wait, "late", 0.05)


async def test_marks_wait_for_audio_queued_before_them() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")

    def produce() -> None:
        s.put_outbound_sync(b"a" * 320)
        s.put_outbound_sync(b"b" * 320)

    await asyncio.to_thread(produce)
    waiter = asyncio.create_task(s.send_mark_and_wait_async("m", 2))
    await asyncio.sleep(0)
    order = []
    for _ in range(3):
        item = await s.next_outbound()
        order.append(item if isinstance(item, bytes) else "mark")
        if isinstance(item, bytes):
            s.note_audio_sent(len(item))
        else:
            s.signal_mark_received(item.name)
    assert order == [b"a" * 320, b"b" * 320, "mark"]
    assert await waiter is True
    assert s.played_ms == pytest.approx(80.0)


async def test_clear_drops_local_audio_and_releases_unsent_marks() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    s.put_outbound_sync(b"x" * 8000)
    waiter = asyncio.create_task(s.send_mark_and_wait_async("m", 2))
    await asyncio.sleep(0)
    s.request_clear_buffer()
    assert await waiter is False  # cleared, not played
    assert s.outbound.empty()
    assert s.stats.outbound_cleared == 1
    assert isinstance(await s.next_outbound(), session_mod.OutboundClear)


async def test_echoes_after_clear_do_not_count_as_played() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    s.note_audio_sent(1600)  # 200 ms sent
    before = s.position_mark_name()
    s.request_clear_buffer()
    s.signal_mark_received(before)  # Twilio echoes pending marks on clear
    assert s.played_ms == 0.0
    s.note_audio_sent(800)
    after = s.position_mark_name()
    s.signal_mark_received(after)
    assert s.played_ms == pytest.approx(100.0)


async def test_request_disconnect_ignores_stale_generation() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    old = s.generation
    s.reset()
    s.request_disconnect(generation=old)
    assert not s.disconnect_requested
    s.request_disconnect(generation=s.generation)
    assert s.disconnect_requested


async def test_reset_keeps_identity_and_factories_and_clears_call_state() -> None:
    factory = object()
    s = VoiceSession(call_sid="CA1", caller_number="+1555", stt_factory=factory)  # type: ignore[arg-type]
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    s.put_inbound(b"\x00" * 160)
    s.put_outbound_sync(b"\x00" * 160)
    s.signal_disconnected()
    s.reset()
    assert (s.call_sid, s.caller_number, s.stt_factory) == ("CA1", "+1555", factory)
    assert s.stream_sid is None and not s.is_connected and not s.is_disconnected
    assert s.inbound.empty() and s.outbound.empty()


async def test_dtmf_reaches_callback_and_iterators() -> None:
    seen: list[str] = []
    s = VoiceSession(on_dtmf=seen.append)
    s.set_loop(asyncio.get_running_loop())
    for d in "12#":
        s.signal_dtmf(d)
    s.signal_disconnected()
    # On the loop thread on_dtmf runs off the loop, in order (issue 12 item 5).
    assert await s.port.callbacks.drain()
    assert seen == ["1", "2", "#"]
    assert [d async for d in s.dtmf()] == ["1", "2", "#"]


async def test_iter_dtmf_from_a_worker_thread() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    task = asyncio.create_task(asyncio.to_thread(lambda: list(s.iter_dtmf(timeout=5))))
    assert await wait_for(lambda: s.port.dtmf_readers == 1)
    s.signal_dtmf("7")
    s.signal_dtmf("*")
    s.signal_disconnected()
    assert await task == ["7", "*"]


async def test_a_clear_cuts_a_pacing_sleep_short() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    loop = asyncio.get_running_loop()
    assert await s.sleep_unless_cleared(0.01) is False
    started = loop.time()
    sleeper = asyncio.create_task(s.sleep_unless_cleared(5.0))
    await asyncio.sleep(0.02)
    s.request_clear_buffer()
    assert await asyncio.wait_for(sleeper, 1) is True
    assert loop.time() - started < 0.5
