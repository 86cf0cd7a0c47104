"""The units the session facade delegates to: mark waiters, the port's end and reset of a
call, and the callback lane, with plain calls."""

from __future__ import annotations

import asyncio
import threading

import pytest

from voice_runtime._callbacks import CallbackLane, CallbackRunner
from voice_runtime._marks import MarkWaiters
from voice_runtime.playback import OutboundMark
from voice_runtime.session import VoiceSession


def test_mark_waiters_register_unique_names_and_release_all() -> None:
    waiters = MarkWaiters()
    a_name, a = waiters.register("m")
    b_name, b = waiters.register("m")
    assert a_name != b_name and a_name.startswith("m__") and len(waiters) == 2
    waiters.resolve(a_name, "played")
    waiters.resolve("unknown__00000000", "played")  # no waiter: nothing happens
    waiters.release_all("disconnected")
    assert a.future.result(0) == "played"  # the first status wins
    assert b.future.result(0) == "disconnected"
    assert len(waiters) == 2  # released, still registered until their wait ends
    waiters.release_all("disconnected", forget=True)
    assert len(waiters) == 0 and waiters.get(b_name) is None


async def test_port_resolves_echoes_and_counts_unknown_ones() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    port = s.port
    name, waiter = port.marks.register("m")
    waiter.mark = OutboundMark(name, 0)
    port.queue_mark(waiter.mark)
    assert await port.next_outbound() == waiter.mark
    port.resolve_echo(name)
    assert waiter.future.result(0) == "played"
    port.resolve_echo("m__ffffffff")
    assert s.stats.unknown_marks == 1 and s.stats.marks_echoed == 2


async def test_port_end_and_reset_of_a_call() -> None:
    s = VoiceSession()
    s.set_loop(asyncio.get_running_loop())
    s.signal_ws_connected("MZ1")
    port = s.port
    port.deliver_dtmf("5")
    task = asyncio.create_task(asyncio.sleep(10))
    port.keep(task)
    port.finish_ended()
    assert await s.inbound.get() is None
    assert [await port.next_dtmf(), await port.next_dtmf(), await port.next_dtmf()] == [
        "5",
        None,
        None,  # the end stays for every other reader
    ]
    with pytest.raises(asyncio.CancelledError):
        await task
    s.put_outbound_sync(b"\x00" * 160)
    s.stats.dtmf_digits = 3
    port.reset_call()
    assert s.outbound.empty() and s.stats.dtmf_digits == 0 and s.queued_ms == 0
    assert port.dtmf_queue.empty()


async def test_lane_runs_sync_callbacks_off_the_loop_in_order_and_bounds_itself() -> None:
    loop_thread = threading.get_ident()
    ran: list[tuple[str, int]] = []
    runner = CallbackRunner(workers=4, max_pending=1)
    lane = CallbackLane("call", max_in_flight=3)
    lane.runner = runner
    release = threading.Event()

    def slow(name: str) -> None:
        release.wait(5)
        ran.append((name, threading.get_ident()))

    for i in range(5):
        lane.fire(slow, str(i), what="test")
    lane.fire(slow, "end", what="test", essential=True)  # on_disconnected is never dropped
    assert lane.in_flight == 4 and lane.dropped == 2
    # A lane does not draw on the runner's shared budget (webhooks keep theirs).
    assert runner.pending == 0
    release.set()
    assert await lane.drain()
    assert [name for name, _ in ran] == ["0", "1", "2", "end"]
    assert all(ident != loop_thread for _, ident in ran)
    assert await runner.aclose()
