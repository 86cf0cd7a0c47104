"""The playback ledger and Segment, with plain calls (no loop, no socket), and the stream port."""

from __future__ import annotations

import asyncio

import pytest

from voice_runtime.playback import (
    END_PREFIX,
    POSITION_PREFIX,
    OutboundMark,
    PlaybackLedger,
    Segment,
    parse_echo,
    user_mark_name,
)
from voice_runtime.session import VoiceSession

MS_40 = 320  # bytes of μ-law in 40 ms


def send(ledger: PlaybackLedger, nbytes: int) -> None:
    ledger.note_queued(nbytes)
    ledger.note_sent(nbytes)


def test_user_mark_names_keep_the_0_1_wire_form_and_are_unique() -> None:
    names = {user_mark_name("tts_complete") for _ in range(200)}
    assert len(names) == 200
    for name in names:
        base, _, tail = name.rpartition("__")
        assert base == "tts_complete"
        assert len(tail) == 8
        int(tail, 16)


def test_parse_echo_tells_internal_marks_from_user_marks() -> None:
    assert parse_echo("tts_complete__0123abcd").kind == "user"
    pos = parse_echo(f"{POSITION_PREFIX}3~120.000")
    assert (pos.kind, pos.generation, pos.ms) == ("position", 3, 120.0)
    assert parse_echo(f"{END_PREFIX}2~0").kind == "end"
    assert parse_echo(f"{POSITION_PREFIX}x").kind == "bad"


def test_marks_wait_for_the_audio_queued_before_them() -> None:
    ledger = PlaybackLedger()
    mark = OutboundMark("m", 0)
    ledger.queue_mark(mark, after=2)  # two chunks were queued before it
    assert ledger.next_mark(taken=1) is None
    send(ledger, MS_40)
    assert ledger.next_mark(taken=2) is mark
    assert mark.sent_ms == 40.0
    assert ledger.mark_played(mark)
    assert ledger.played_ms == 40.0


def test_position_echo_moves_played_but_never_past_what_was_sent() -> None:
    ledger = PlaybackLedger()
    send(ledger, MS_40 * 3)
    name = ledger.position_name()
    for forged in ("inf", "nan", "1e300", "120.125"):
        ledger.echo(f"{POSITION_PREFIX}0~{forged}")
    assert ledger.played_ms == 0.0
    ledger.echo(name)
    assert ledger.played_ms == 120.0
    assert not ledger.unconfirmed()


def test_clear_starts_a_generation_whose_old_echoes_do_not_count() -> None:
    ledger = PlaybackLedger()
    send(ledger, MS_40)
    ledger.echo(ledger.position_name())  # 40 ms heard
    send(ledger, MS_40 * 2)
    old_position = ledger.position_name()
    user = OutboundMark("u", 0)
    ledger.hand_out(user)
    pending = OutboundMark("p", 0)
    ledger.queue_mark(pending, after=99)
    dropped = ledger.clear(send=True)
    assert dropped == [pending]
    assert ledger.generation == 1
    assert ledger.sent_ms == ledger.queued_ms == ledger.played_ms == 40.0
    ledger.echo(old_position)  # Twilio returns the marks a clear discarded
    assert ledger.played_ms == 40.0
    assert not ledger.mark_played(user)
    assert ledger.take_clear() and not ledger.take_clear()


def test_clear_without_a_stream_asks_no_clear_frame() -> None:
    ledger = PlaybackLedger()
    ledger.clear(send=False)
    assert not ledger.take_clear()


def test_one_granularity_for_position_marks() -> None:
    ledger = PlaybackLedger()  # the transport's default: every 100 ms
    marks = 0
    for _ in range(25):  # one second in 40 ms messages
        send(ledger, MS_40)
        if ledger.position_due(idle=False):
            ledger.position_name()
            marks += 1
    assert marks == 8  # at 120, 240, ... ms: about 35 messages/s with the 25 media
    ledger.request_granularity(20.0)  # the realtime bridge wants a finer position
    marks = 0
    for _ in range(25):
        send(ledger, MS_40)
        if ledger.position_due(idle=False):
            ledger.position_name()
            marks += 1
    assert marks == 25  # one per message, never more: messages are not split for marks
    ledger.reset()
    assert ledger.every_ms == 100.0


def test_idle_confirms_the_end_of_an_utterance() -> None:
    ledger = PlaybackLedger()
    assert not ledger.position_due(idle=True)
    send(ledger, 80)
    assert not ledger.position_due(idle=False)
    assert ledger.position_due(idle=True)


def test_segment_heard_is_clamped_to_the_segment() -> None:
    assert Segment.at(100.0, 200.0, 50.0).heard_ms == 0.0
    seg = Segment.at(100.0, 200.0, 180.0, interrupted=True)
    assert (seg.heard_ms, seg.interrupted, seg.fully_heard) == (80.0, True, False)
    assert seg.heard_fraction == pytest.approx(0.4)
    assert Segment.at(100.0, 200.0, 1e9).fully_heard
    with pytest.raises(AttributeError):
        seg.heard_ms = 1.0  # type: ignore[misc]


async def test_port_moves_frames_and_outbound_items_in_order() -> None:
    session = VoiceSession()
    port = session.port
    session.set_loop(asyncio.get_running_loop())
    port.started("MZ1", mark_every_ms=40.0)
    assert session.is_connected and session.stream_sid == "MZ1"
    port.caller_audio(b"\xff" * 160)
    assert session.inbound.get_nowait() == b"\xff" * 160
    session.put_outbound_sync(b"\x00" * MS_40)
    waiter = asyncio.ensure_future(session.send_mark_and_wait_async("done", 2.0))
    await asyncio.sleep(0)
    assert await port.next_outbound() == b"\x00" * MS_40
    assert port.sent(b"\x00" * MS_40) is not None  # 40 ms sent: a position mark is due
    mark = await port.next_outbound()
    assert isinstance(mark, OutboundMark) and mark.name.startswith("done__")
    port.mark_echoed(mark.name)
    assert await waiter is True
    assert session.played_ms == 40.0
    port.ended()
    assert session.is_disconnected and session.inbound.get_nowait() is None


async def test_port_calls_the_session_hooks_subclasses_override() -> None:
    seen: list[str] = []

    class Telco(VoiceSession):
        def signal_ws_connected(self, stream_sid: str) -> None:
            seen.append("connected")
            super().signal_ws_connected(stream_sid)

        def signal_dtmf(self, digit: str) -> None:
            seen.append("dtmf")
            super().signal_dtmf(digit)

        def signal_mark_received(self, name: str) -> None:
            seen.append("mark")
            super().signal_mark_received(name)

        def signal_disconnected(self) -> None:
            seen.append("disconnected")
            super().signal_disconnected()

    session = Telco()
    session.set_loop(asyncio.get_running_loop())
    port = session.port
    port.started("MZ2")
    port.dtmf("5")
    port.mark_echoed("nobody__00000000")
    port.ended()
    assert seen == ["connected", "dtmf", "mark", "disconnected"]
