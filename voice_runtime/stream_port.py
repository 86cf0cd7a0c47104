"""The stream port: the only object a transport talks to (``session.port``).

A transport turns wire frames into port calls (:meth:`StreamPort.started`,
:meth:`~StreamPort.caller_audio`, :meth:`~StreamPort.mark_echoed`, :meth:`~StreamPort.dtmf`,
:meth:`~StreamPort.ended`) and asks the port what to send (:meth:`~StreamPort.next_outbound`),
reporting back what went out (:meth:`~StreamPort.sent`, :meth:`~StreamPort.clear_sent`). All of
it runs on the session's event loop. The port calls the session's public ``signal_*`` hooks,
so subclasses that override them (``class TelcoSession(VoiceSession)``) still see every event;
the playback bookkeeping itself is the sans-I/O :class:`~voice_runtime.playback.PlaybackLedger`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from voice_runtime._callbacks import CallbackLane
from voice_runtime._marks import MarkWaiters
from voice_runtime._queues import SessionStats, _AudioQueue, _CountingQueue
from voice_runtime._sync import Flag, running_loop
from voice_runtime.events import CALL_STARTED, DTMF, CallEvents
from voice_runtime.logutil import LogLimiter, clip
from voice_runtime.playback import CLEAR, END_PREFIX, OutboundClear, OutboundMark, PlaybackLedger

if TYPE_CHECKING:
    from voice_runtime.contracts import SttProvider
    from voice_runtime.session import VoiceSession
    from voice_runtime.turns import SentTail
    from voice_runtime.types import CallInfo

__all__ = ["DTMF_MAXSIZE", "StreamPort"]

logger = logging.getLogger(__name__)

DTMF_MAXSIZE = 256

_T = TypeVar("_T")


async def run_fn(fn: Callable[[], _T]) -> _T:
    """``fn()`` as a coroutine, so loop-side work can go through ``VoiceSession._blocking``."""
    return fn()


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


class StreamPort:
    """The transport-facing side of one :class:`~voice_runtime.session.VoiceSession`."""

    def __init__(self, session: VoiceSession, ledger: PlaybackLedger) -> None:
        self.session = session
        self.ledger = ledger
        self.wakeup = asyncio.Event()
        #: The session's user callbacks fired on the loop thread (on_dtmf, on_event, ...).
        self.callbacks = CallbackLane(id(session))
        #: The consumer's ``send_mark_and_wait`` waiters, by wire name.
        self.marks = MarkWaiters()
        #: This call's event publisher (``events.bus`` is the server's bus when it has one).
        self.events = CallEvents(session)
        self.dtmf_queue: asyncio.Queue[str | None] = asyncio.Queue(DTMF_MAXSIZE)
        #: Readers waiting for a DTMF digit now (``dtmf()``, ``iter_dtmf()``); tests wait on it.
        self.dtmf_readers = 0
        # Tasks of this call (cancelled when it ends) and ones that outlive it (an STT stop).
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bg_tasks: set[asyncio.Task[Any]] = set()
        self._clear_waiters: list[asyncio.Future[bool]] = []
        # A tentative barge-in holds agent audio back (voice_runtime.turns.pause_playback).
        self.paused = False
        self.sent_tail: SentTail | None = None
        # A pacing sleep nudge() may end early: (its loop, loop time it may end from, future).
        self._nudgeable: tuple[asyncio.AbstractEventLoop, float, asyncio.Future[bool]] | None = None
        from voice_runtime.session import VoiceSession

        cls = type(session)
        # Frames arrive on the loop, so put_inbound's which-thread hop is skipped, unless a
        # subclass overrides put_inbound or tap_caller (then those are called as such).
        plain_put = cls.put_inbound is VoiceSession.put_inbound
        self._put = self.push_inbound if plain_put else session.put_inbound
        self._plain_tap = cls.tap_caller is VoiceSession.tap_caller
        self._plain_tap_agent = cls.tap_agent is VoiceSession.tap_agent

    # ------------------------------------------------------------------ far end → session

    def started(
        self,
        stream_sid: str,
        info: CallInfo | None = None,
        *,
        mark_every_ms: float | None = None,
        prepare: Callable[[VoiceSession], None] | None = None,
    ) -> None:
        """The stream started: a session left over from an earlier call is reset first.

        ``mark_every_ms`` is the transport's position-mark granularity; ``prepare(session)``
        runs after the call info is applied and before ``wait_for_ws_connect`` wakes.
        """
        session = self.session
        if session.is_disconnected or session.is_connected:
            session.reset()
        if info is not None:
            session.apply_call_info(info)
        if mark_every_ms is not None:
            self.ledger.set_mark_every(mark_every_ms)
        if prepare is not None:
            prepare(session)
        session.signal_ws_connected(stream_sid)
        self.events.emit(CALL_STARTED, tracks=list(info.tracks) if info is not None else [])

    def caller_audio(self, data: bytes) -> None:
        """A caller frame (μ-law): to the inbound queue and the mixer."""
        self._put(data)
        if self._plain_tap:
            mixer = self.session._mixer
            if mixer is not None:
                mixer.write_caller(data)
        else:
            self.session.tap_caller(data)

    def mark_echoed(self, name: str) -> None:
        """The far end echoed a mark."""
        self.session.signal_mark_received(name)

    def dtmf(self, digit: str) -> None:
        """The caller pressed a key."""
        self.session.signal_dtmf(digit)

    def ended(self) -> None:
        """The stream ended (stop, close or a failed send); idempotent."""
        self.session.signal_disconnected()

    def count_bad(self, reason: str) -> int:
        """Count one unusable inbound message; return the new count."""
        return self.session.stats.count_bad(reason)

    # ------------------------------------------------------------------ the session's hooks' work

    def resolve_echo(self, name: str) -> None:
        """Settle what an echoed mark stands for (``signal_mark_received``'s work)."""
        session = self.session
        stats = session.stats
        stats.marks_echoed += 1
        echo = self.ledger.echo(name)
        if self.events.watching:
            self.events.played(self.ledger.played_ms, self.ledger.queued_ms)
        if echo.kind != "user":
            if echo.kind == "bad" or echo.generation < 0:
                stats.unknown_marks += 1
            if echo.kind == "end":
                session._disconnect_requested.set()
            return
        waiter = self.marks.get(name)
        if waiter is None:
            stats.unknown_marks += 1
            if session._log_limit.allow("unknown_mark"):
                logger.warning(
                    "unknown mark echoed",
                    extra={
                        "call_sid": session.call_sid,
                        "mark": clip(name),
                        "unknown_marks": stats.unknown_marks,
                    },
                )
            return
        waiter.resolve("played" if self.ledger.mark_played(waiter.mark) else "cleared")
        if self.events.watching:
            self.events.played(self.ledger.played_ms, self.ledger.queued_ms)

    def deliver_dtmf(self, digit: str) -> None:
        """Queue a digit for the DTMF readers and fire ``on_dtmf`` (``signal_dtmf``'s work)."""
        session = self.session
        session.stats.dtmf_digits += 1
        self.events.emit(DTMF, digit=digit)
        try:
            self.dtmf_queue.put_nowait(digit)
        except asyncio.QueueFull:
            session.stats.dtmf_dropped += 1
            if session._log_limit.allow("dtmf_dropped"):
                logger.warning(
                    "DTMF digit dropped: nobody reads the DTMF iterator",
                    extra={"call_sid": session.call_sid, "dropped": session.stats.dtmf_dropped},
                )
        if session.on_dtmf is not None:
            session._user_callback(session.on_dtmf, digit, what="on_dtmf")

    async def next_dtmf(self) -> str | None:
        """The caller's next digit; None once the call ended (left for every other reader)."""
        queue = self.dtmf_queue
        self.dtmf_readers += 1
        try:
            digit = await queue.get()
        finally:
            self.dtmf_readers -= 1
        if digit is None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        return digit

    def finish_ended(self) -> None:
        """The loop side of the end of a call: end inbound, marks, DTMF readers and tasks."""
        self.push_inbound(None)
        self.ledger.marks.clear()
        self.wakeup.set()
        with contextlib.suppress(asyncio.QueueFull):
            self.dtmf_queue.put_nowait(None)
        for task in list(self._tasks):
            task.cancel()

    def keep(self, task: asyncio.Task[Any], *, cancel_on_end: bool = True) -> None:
        """Hold a reference to ``task``; with ``cancel_on_end`` the end of the call cancels it."""
        holder = self._tasks if cancel_on_end else self._bg_tasks
        holder.add(task)
        task.add_done_callback(holder.discard)

    def stop_stt_later(self, stt: SttProvider, loop: asyncio.AbstractEventLoop | None) -> None:
        """Stop a dropped STT on the loop without waiting (bounded; a failure is logged)."""
        if loop is None or not loop.is_running():
            logger.debug("STT dropped without stop: no running loop")
        elif loop is running_loop():
            self.keep(loop.create_task(_stop_stt(stt)), cancel_on_end=False)
        else:
            asyncio.run_coroutine_threadsafe(_stop_stt(stt), loop)

    def drain_inbound(self) -> int:
        """Drop queued caller audio, keeping the end-of-call sentinel; return how many."""
        inbound = self.session.inbound
        n = 0
        while True:
            try:
                item = inbound.get_nowait()
            except asyncio.QueueEmpty:
                return n
            if item is None:
                inbound.put_nowait(None)
                return n
            n += 1

    def reset_session(self) -> None:
        """``VoiceSession.reset``'s work (any thread): release marks, drop the STT, clear the
        flags and intents, then reset the queues on the loop (here if it does not answer)."""
        session = self.session
        self.marks.release_all("disconnected", forget=True)
        stt, session.stt = session.stt, None
        loop = session._loop
        if stt is not None:
            self.stop_stt_later(stt, loop)
        session._ws_connected = Flag()
        session._disconnected = Flag()
        session._settled = Flag()
        session.stream_sid = None
        session.call_info = None
        session._pending_disconnect = False
        if loop is not None and loop.is_running() and running_loop() is not loop:
            with contextlib.suppress(TimeoutError):
                if session._blocking("reset", run_fn(self._reset_call_done), 2.0, False, grace=0):
                    return
        self.reset_call()

    def _reset_call_done(self) -> bool:
        self.reset_call()
        return True

    def reset_call(self) -> None:
        """Forget the previous call's queues, positions, stats and wakeups (reset's work)."""
        session = self.session
        session._disconnect_requested = asyncio.Event()
        self.ledger.reset()
        session.stats = SessionStats()
        session._log_limit = LogLimiter()
        self.events.reset()
        self.reset()
        self.bind_outbound()
        for q in (session.inbound, session.outbound):
            while True:
                try:
                    q.get_nowait()
                except asyncio.QueueEmpty:
                    break
        self.dtmf_queue = asyncio.Queue(DTMF_MAXSIZE)
        logger.info("session reset for the next call")

    def bind_outbound(self) -> None:
        """Count what goes into the session's outbound queue (when it is ours)."""
        out = self.session.outbound
        if isinstance(out, _CountingQueue):
            out.on_put = self._on_outbound_put

    def _on_outbound_put(self, item: bytes) -> None:
        ledger = self.ledger
        events = self.events
        if events.turn_open or (
            ledger.queued_ms <= ledger.played_ms + 0.5 and not events.awaiting_heard
        ):
            # The caller's turn ended, or nothing was left to play: a new response starts.
            events.audio_queued(ledger.queued_ms)
        ledger.queued_ms += len(item) / 8.0
        if ledger.protecting:
            ledger.protected_ms = ledger.queued_ms
        self.wakeup.set()

    def queue_mark(self, mark: OutboundMark) -> None:
        """Queue ``mark`` behind the agent audio queued so far."""
        out = self.session.outbound
        self.ledger.queue_mark(mark, out.put_count if isinstance(out, _CountingQueue) else 0)
        self.wakeup.set()

    def queue_end_mark(self) -> None:
        """Queue the mark that ends the call once the audio before it was heard."""
        if not self.session.is_disconnected:
            self.queue_mark(self.ledger.end_mark())

    # ------------------------------------------------------------------ queues

    def push_inbound(self, data: bytes | None) -> None:
        """Queue caller audio on the loop: bounded, oldest dropped and counted; None ends it."""
        session = self.session
        q = session.inbound
        if data is None:
            while q.full() and self._drop_oldest_inbound(q):
                pass
            q.put_nowait(None)
            return
        if session._disconnected.is_set():
            return
        session.stats.inbound_frames += 1
        for tap in session.inbound_taps:
            try:
                tap(data)
            except Exception:
                if session._log_limit.allow("tap_failed"):  # once per caller frame otherwise
                    logger.exception("inbound tap failed")
        if type(q) is _AudioQueue:
            size = len(data)
            # fits() inlined for the common case (this runs for every caller frame); a bound
            # of 0 (none) lands in the exact check below.
            if (
                q.nbytes + size > q.max_bytes or len(q._queue) >= q._maxsize  # type: ignore[attr-defined]
            ) and not q.fits(size):
                if size > q.max_bytes > 0:
                    # Could never fit: dropping older audio for it would not help.
                    self._count_inbound_drop(size)
                    return
                while not q.fits(size) and self._drop_oldest_inbound(q):
                    pass
        else:  # a plain queue a consumer assigned
            while q.full() and self._drop_oldest_inbound(q):
                pass
        q.put_nowait(data)

    def _drop_oldest_inbound(self, q: asyncio.Queue[bytes | None]) -> bool:
        try:
            item = q.get_nowait()
        except asyncio.QueueEmpty:
            return False
        self._count_inbound_drop(len(item) if item is not None else 0)
        return True

    def _count_inbound_drop(self, size: int) -> None:
        session = self.session
        stats = session.stats
        stats.inbound_dropped += 1
        stats.inbound_dropped_bytes += size
        if session._log_limit.allow("inbound_dropped"):
            logger.warning(
                "caller audio dropped: STT is not keeping up",
                extra={"call_sid": self.session.call_sid, "dropped": stats.inbound_dropped},
            )

    def push_outbound(self, data: bytes) -> None:
        """Queue agent audio on the loop; a chunk that does not fit is dropped and counted."""
        session = self.session
        if session._disconnected.is_set():
            return
        q = session.outbound
        if isinstance(q, _AudioQueue) and not q.fits(len(data)):
            self.count_outbound_drop("outbound queue full", len(data))
            return
        try:
            q.put_nowait(data)
        except asyncio.QueueFull:
            self.count_outbound_drop("outbound queue full", len(data))

    def count_outbound_drop(self, why: str, size: int) -> None:
        """Count (and log, rate-limited) one dropped chunk of agent audio."""
        session = self.session
        stats = session.stats
        stats.outbound_dropped += 1
        stats.outbound_dropped_bytes += size
        if session._log_limit.allow("outbound_dropped"):
            logger.warning(
                "agent audio dropped: %s",
                why,
                extra={"call_sid": session.call_sid, "dropped": stats.outbound_dropped},
            )

    # ------------------------------------------------------------------ session → far end

    async def next_outbound(self) -> bytes | OutboundMark | OutboundClear:
        """Return the next thing to send, in queue order: a clear, audio or a mark."""
        session = self.session
        ledger = self.ledger
        while True:
            if ledger.take_clear():
                return CLEAR
            out = session.outbound
            if self.paused:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            if ledger.marks:
                taken = out.taken_count if isinstance(out, _CountingQueue) else 1 << 62
                mark = ledger.next_mark(taken)
                if mark is not None:
                    session.stats.marks_sent += 1
                    self.events.mark_sent()
                    return mark
            if not out.empty():
                item = out.get_nowait()
                if self.sent_tail is not None:  # an item goes out whole unless cleared
                    self.sent_tail.add(ledger.sent_ms, item)
                return item
            self.wakeup.clear()
            await self.wakeup.wait()

    async def next_mark_name(self) -> str:
        """The next queued mark's name, for a transport that sends marks on their own."""
        ledger = self.ledger
        while True:
            if ledger.marks and not self.paused:
                mark = ledger.marks.popleft()
                ledger.hand_out(mark)
                self.session.stats.marks_sent += 1
                return mark.name
            self.wakeup.clear()
            await self.wakeup.wait()

    def pending(self) -> bool:
        """True while agent audio, marks or a clear wait to be sent."""
        ledger = self.ledger
        if self.paused:
            return bool(ledger.clear_pending)
        return bool(ledger.clear_pending or ledger.marks or not self.session.outbound.empty())

    def sent(self, chunk: bytes) -> str | None:
        """``chunk`` of agent audio went out; return a position mark's name when one is due.

        Runs for every outbound message, so the ledger's bookkeeping is inlined here.
        """
        n = len(chunk)
        ledger = self.ledger
        ledger.sent_ms += n / 8.0
        session = self.session
        stats = session.stats
        stats.audio_sent_bytes += n
        stats.outbound_chunks += 1
        if self._plain_tap_agent:
            mixer = session._mixer
            if mixer is not None:
                mixer.write_agent(chunk)
        else:
            session.tap_agent(chunk)
        if ledger.sent_ms - ledger.last_position_ms < ledger.every_ms:
            return None
        stats.marks_sent += 1
        self.events.mark_sent()
        return ledger.position_name()

    def position_mark(self, *, idle: bool = False) -> str | None:
        """The name of a position mark due now (see the ledger's granularity), or None."""
        if not self.ledger.position_due(idle):
            return None
        self.session.stats.marks_sent += 1
        self.events.mark_sent()
        return self.ledger.position_name()

    def clear_sent(self) -> None:
        """A ``clear`` went to the far end."""
        self.session.stats.clears_sent += 1

    @property
    def clear_pending(self) -> bool:
        """True when a clear was requested and not yet handed out."""
        return bool(self.ledger.clear_pending)

    def clear_requested(self) -> None:
        """Wake the send loop and any pacing sleep: a clear was requested."""
        self.wakeup.set()
        waiters, self._clear_waiters = self._clear_waiters, []
        for fut in waiters:
            _resolve(fut, True)

    def clear_local(self, keep_uninterruptible: bool = False) -> None:
        """Drop queued agent audio and unsent marks (their waiters: cleared); ask for a clear.

        With ``keep_uninterruptible`` (a barge-in) nothing is cleared while uninterruptible
        audio is unheard: a Twilio ``clear`` would drop it from the far end's buffer too.
        """
        session = self.session
        if keep_uninterruptible and self.ledger.uninterruptible_pending():
            session.stats.clears_skipped += 1
            logger.debug("barge-in clear skipped: uninterruptible audio playing")
            return
        self.paused = False
        if self.sent_tail is not None:
            self.sent_tail.clear()
        dropped = 0
        while True:
            try:
                session.outbound.get_nowait()
            except asyncio.QueueEmpty:
                break
            dropped += 1
        session.stats.outbound_cleared += dropped
        self.events.cleared(self.ledger.played_ms, dropped)
        live = session.stream_sid is not None and not session._disconnected.is_set()
        for mark in self.ledger.clear(send=live):
            if mark.name.startswith(END_PREFIX):
                session._disconnect_requested.set()
            else:
                self.marks.resolve(mark.name, "cleared")
        self.clear_requested()

    async def sleep_unless_cleared(self, seconds: float, *, early: float = 0.0) -> bool:
        """Sleep up to ``seconds``; return True at once when a clear is requested.

        With ``early``, :meth:`nudge` may end the sleep (returning False) up to that many
        seconds before its end.
        """
        if self.ledger.clear_pending:
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._clear_waiters.append(fut)
        handle = loop.call_later(seconds, _resolve, fut, False)
        if early > 0.0:
            self._nudgeable = (loop, loop.time() + seconds - early, fut)
        try:
            return await fut
        finally:
            handle.cancel()
            self._nudgeable = None
            if fut in self._clear_waiters:
                with contextlib.suppress(ValueError):
                    self._clear_waiters.remove(fut)

    def nudge(self) -> None:
        """End a pacing sleep that may end now.

        Transports call it when the loop is awake anyway (a caller frame arrived), so paced
        audio rides on that wakeup instead of a timer of its own.
        """
        pending = self._nudgeable
        if pending is not None and pending[0].time() >= pending[1]:
            self._nudgeable = None
            _resolve(pending[2], False)

    # ------------------------------------------------------------------ intents and state

    async def wait_disconnect_requested(self) -> None:
        """Wait until consumer code asks to end the call."""
        await self.session.wait_disconnect_requested()

    async def wait_ended(self, timeout: float | None = None) -> bool:
        """Wait until the call ended; False on timeout."""
        return await self.session.wait_until_disconnected_async(timeout)

    @property
    def is_ended(self) -> bool:
        """True once the call ended."""
        return self.session.is_disconnected

    @property
    def call_sid(self) -> str | None:
        """The call's SID (for log context)."""
        return self.session.call_sid

    def reset(self) -> None:
        """Forget the previous call's wakeups (the session's reset calls it on the loop)."""
        self.wakeup = asyncio.Event()
        self.wakeup.set()
        self.paused = False
        if self.sent_tail is not None:
            self.sent_tail.clear()

    def __repr__(self) -> str:
        return f"StreamPort(call_sid={self.session.call_sid!r})"


async def _stop_stt(stt: SttProvider) -> None:
    try:
        await asyncio.wait_for(stt.stop(), 5.0)
    except Exception:
        logger.warning("STT stop failed during reset", exc_info=True)
