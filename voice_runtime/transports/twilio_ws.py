"""Twilio Media Streams over a frame channel: frames <-> session, plus pacing.

:class:`MediaStreamCall` runs one stream: it turns inbound messages into session calls (via the
socket-free parser in ``twilio_protocol``) and the session's outbound items into messages,
paced a little ahead of real time. It talks to the socket only through a
:class:`~voice_runtime.transports.channel.FrameChannel` (the lean protocol, Starlette, or an
in-memory channel in tests). What a call needs beyond frames (its STT, call control, a REST
hang-up) is wired by the server layer (``voice_runtime.call_wiring``) through the ``hangup``
and ``on_start`` hooks.

As in 0.1.x, ``register_voice_websocket``, ``twilio_call``, ``hangup_call`` and
``TwilioRegion`` are names of this module, resolved on first use (so importing it loads
neither the server nor the Twilio SDK), and a REST hang-up calls this module's ``hangup_call``
looked up at that moment: ``patch("...twilio_ws.hangup_call")`` intercepts it, and otherwise
``twilio_call.hangup_call`` (patchable there too) is called.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from voice_runtime._sync import cancel_and_wait
from voice_runtime.events import CALL_ENDED
from voice_runtime.logutil import LogLimiter, log_limiter, set_call_context
from voice_runtime.session import FRAME_BYTES, OutboundClear, OutboundMark, VoiceSession
from voice_runtime.transports import twilio_protocol as proto
from voice_runtime.transports.channel import FrameChannel, channel_for

logger = logging.getLogger(__name__)

REST_CLOSE_WAIT_S = 5.0
POSITION_MARK_EVERY_MS = 100.0
# Most messages one socket write carries (a second of 40 ms media with its marks).
BATCH_MAX = 32
# A pacing wait may end this much early when a caller frame wakes the loop anyway (Twilio
# sends one every 20 ms), so paced audio needs no timer wakeups of its own.
NUDGE_S = 0.02

__all__ = [
    "MediaStreamCall",
    "StreamOptions",
    "register_voice_websocket",  # noqa: F822  (resolved by __getattr__)
]


@dataclass(frozen=True)
class StreamOptions:
    """How a media stream is served.

    ``frame_bytes`` is the most audio one outbound media message carries (160 = 20 ms);
    ``lead_ms`` is how far ahead of real time agent audio may be sent, so a ``clear`` has
    little to discard; ``max_message_bytes`` bounds one inbound frame and ``max_media_bytes``
    the caller audio one ``media`` frame may carry (Twilio sends 160 bytes); larger frames
    are dropped and counted in ``session.stats.bad_frames``.

    The default of 40 ms a message halves the messages of 20 ms frames: Twilio plays any
    payload size, and each message costs the server about as much as a 20 ms one.
    """

    frame_bytes: int = 2 * FRAME_BYTES
    lead_ms: float = 120.0
    max_message_bytes: int = 64 * 1024
    position_mark_every_ms: float = POSITION_MARK_EVERY_MS
    # Twilio sends ``start`` right after connecting; a stream without one is closed (1008).
    start_timeout_s: float = 10.0
    max_media_bytes: int = proto.MAX_MEDIA_BYTES


class _Pacer:
    """Keeps outbound audio at most ``lead`` seconds ahead of the far end's playback.

    When it must wait, it waits until a third of the lead has played out, so one wakeup sends
    several frames (two to three times fewer timers per call than one per frame), and the
    far end never holds less than two thirds of the lead.
    """

    __slots__ = ("_lead", "_loop", "_low", "_until", "_woke", "release")

    def __init__(self, lead_s: float) -> None:
        self._lead = lead_s
        self._low = lead_s * (2.0 / 3.0)
        self._loop = asyncio.get_running_loop()
        self._until = 0.0
        self._woke = 0.0
        # Loop time at which pacing first let the last reserved frame go (for statistics).
        self.release = 0.0

    def woke(self, now: float) -> None:
        """Note that a pacing wait ended at ``now`` (earlier than planned when nudged)."""
        if now < self.release:
            self.release = self._woke = now

    def reserve(self, duration_s: float) -> float:
        """Book the next frame; return how long to sleep before sending it (0: send now)."""
        now = self._loop.time()
        until = self._until
        if until < now:
            until = now
        ahead = until - now
        self._until = until + duration_s
        if ahead > self._lead:
            delay = ahead - self._low
            self._woke = self.release = now + delay
            return delay
        release = until - self._lead
        self.release = release if release > self._woke else self._woke
        return 0.0

    def reset(self) -> None:
        """Forget what was sent (after a clear the far end holds nothing)."""
        self._until = 0.0
        self._woke = 0.0


class MediaStreamCall:
    """One Twilio media stream bound to one session, from accept to cleanup.

    ``check_start(start)`` runs before a ``start`` touches the session; a returned reason
    refuses the stream (closed with 1008, ``refused`` set, counted as ``start_refused``).
    ``on_start(session)`` runs once the stream started (a coroutine it returns runs as one of
    the call's tasks); ``hangup(call_sid)`` is awaited when the session asks to end the call,
    and the stream is closed unless it returns True and the far end then stops the stream.
    ``on_end(session)`` is awaited once the stream ended, before the call's tasks are
    cancelled. ``websocket`` is a Starlette ``WebSocket``, one served by the lean protocol, or any
    :class:`~voice_runtime.transports.channel.FrameChannel`.
    """

    def __init__(
        self,
        websocket: Any,
        session: VoiceSession,
        *,
        options: StreamOptions | None = None,
        hangup: Callable[[str], Awaitable[bool]] | None = None,
        on_start: Callable[[VoiceSession], Any] | None = None,
        check_start: Callable[[proto.Start], str | None] | None = None,
        on_end: Callable[[VoiceSession], Awaitable[None]] | None = None,
    ) -> None:
        self.ws = websocket
        self.session = session
        self.options = options or StreamOptions()
        self._hangup = hangup
        self._on_start = on_start
        self._check_start = check_start
        self._on_end = on_end
        # Why ``check_start`` refused the stream, if it did.
        self.refused: str | None = None
        self._end_code = 1000
        self._parser = proto.MediaStreamParser(max_media_bytes=self.options.max_media_bytes)
        # The peer decides how many bad frames arrive: log the first few, then one in N.
        self._log_limit = LogLimiter()
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = False
        self._started_at: float | None = None
        # Why the call ended, for the "call ended" line (the first reason seen wins).
        self._reason: str | None = None
        self._batch: list[str] = []
        self._max_bytes = self.options.max_message_bytes
        # The only object the stream talks to for frames and outbound items.
        self.port = session.port
        self.channel: FrameChannel = channel_for(websocket)

    async def run(self) -> None:
        """Serve the stream until it ends, then release everything the call created."""
        session = self.session
        loop = asyncio.get_running_loop()
        session.set_loop(loop)
        no_start = loop.call_later(self.options.start_timeout_s, self._no_start)
        try:
            await self._receive_loop()
        except Exception as exc:
            set_call_context(session.call_sid, session.stream_sid)
            logger.exception(
                "media stream failed: %s", type(exc).__name__, extra={"call_sid": session.call_sid}
            )
        finally:
            no_start.cancel()
            set_call_context(session.call_sid, session.stream_sid)
            await self._cleanup()

    def _no_start(self) -> None:
        if self._parser.started or self._closed:
            return
        # A socket that never starts a stream would hold its slot forever.
        self.port.count_bad("no_start")
        if log_limiter().allow("no_start"):  # any client can open sockets that never start
            logger.warning(
                "media stream sent no start in time; closing it",
                extra={"timeout_s": self.options.start_timeout_s},
            )
        self._spawn(self._close(1008), "vr-close")

    async def _receive_loop(self) -> None:
        # The channel hands each message over as it arrives (from data_received on the lean
        # protocol): no task wakes up per frame.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_text(text: str) -> None:
            if done.done():
                return
            try:
                if not self._handle(text):
                    done.set_result(None)
            except Exception as exc:
                done.set_exception(exc)

        def on_close(_code: int) -> None:
            if not done.done():
                done.set_result(None)

        self.channel.attach(on_text, on_close, lambda _data: self._bad("binary_frame"))
        await done

    def _handle(self, text: str) -> bool:
        """Apply one inbound message to the session; False when the stream has ended."""
        if len(text) > self._max_bytes:
            self._bad("too_large")
            return True
        try:
            event = self._parser.parse_inbound(text)
        except proto.MediaStreamError as exc:
            self._bad(exc.reason)
            return True
        port = self.port
        kind = type(event)
        if kind is bytes:  # caller audio
            port.caller_audio(event)  # type: ignore[arg-type]
        elif kind is proto.Media:
            pass  # the outbound track echoed back: not the caller
        elif kind is proto.Mark:
            port.mark_echoed(event.name)  # type: ignore[union-attr]
        elif kind is proto.Start:
            if not self._started(event):  # type: ignore[arg-type]
                return False
        elif kind is proto.Dtmf:
            port.dtmf(event.digit)  # type: ignore[union-attr]
        elif kind is proto.Stop:
            logger.info("stream stopped by the far end", extra={"call_sid": port.call_sid})
            self._reason = self._reason or "the caller hung up (stream stop)"
            return False
        port.nudge()
        return True

    def _bad(self, reason: str) -> None:
        n = self.port.count_bad(reason)
        if self._log_limit.allow("bad_frame"):
            logger.warning(
                "unusable media stream frame dropped",
                extra={"call_sid": self.port.call_sid, "reason": reason, "count": n},
            )

    @property
    def started(self) -> bool:
        """True once the stream's ``start`` was received."""
        return self._parser.started

    def _started(self, start: proto.Start) -> bool:
        """Apply ``start``; False when ``check_start`` refused it (the stream then ends)."""
        if self._check_start is not None:
            reason = self._check_start(start)
            if reason is not None:
                self.refused = reason
                self._reason = "start refused"
                self.port.count_bad("start_refused")
                self._end_code = 1008
                return False
        session = self.session
        # Every record from here on (and in the tasks spawned below, the call handler's
        # included) names this call.
        set_call_context(start.call_sid, start.stream_sid)
        self._started_at = time.monotonic()
        # A previous call on this session that ended without reset() is reset first.
        self.port.started(
            start.stream_sid,
            start.call_info(),
            mark_every_ms=self.options.position_mark_every_ms,
        )
        logger.info("call started", extra={"call_sid": start.call_sid})
        self._spawn(self._send_loop(), "vr-send")
        self._spawn(self._watch_disconnect(), "vr-disconnect")
        if self._on_start is not None:
            result = self._on_start(session)
            if asyncio.iscoroutine(result):
                self._spawn(result, "vr-on-start")
        return True

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _send(self, text: str) -> bool:
        """Queue one message in the batch that :meth:`_flush` writes; False once closed."""
        if self._closed:
            return False
        self._batch.append(text)
        return True

    async def _flush(self) -> bool:
        """Write the batched messages (one socket write); False when the far end is gone."""
        batch = self._batch
        if not batch:
            return not self._closed
        self._batch = []
        if self._closed:
            return False
        channel = self.channel
        if not channel.writable:
            await channel.wait_writable()
        if channel.send_texts(batch):
            return True
        return self._send_failed()

    def _send_failed(self) -> bool:
        if self._closed:
            return False
        # A failed send means the far end is gone.
        logger.info(
            "send failed; treating the call as ended", extra={"call_sid": self.port.call_sid}
        )
        self._closed = True
        self.port.ended()
        return False

    async def _send_loop(self) -> None:
        port = self.port
        sid = self.session.stream_sid or ""
        opts = self.options
        frame = opts.frame_bytes
        pacer = _Pacer(opts.lead_ms / 1000.0)
        encode_media = proto.encode_media
        encode_mark = proto.encode_mark
        reserve = pacer.reserve
        position_mark = port.position_mark
        loop = asyncio.get_running_loop()
        # What may go out at one moment (frames the pacing allows, the marks between them)
        # leaves in one write, flushed before anything that can wait.
        flush = self._flush
        while not port.is_ended:
            if self._batch and not port.pending() and not await flush():
                return
            item = await port.next_outbound()
            if port.is_ended:
                return
            if isinstance(item, OutboundClear):
                pacer.reset()
                if await self._send(proto.encode_clear(sid)) and await flush():
                    port.clear_sent()
                continue
            if isinstance(item, OutboundMark):
                if not await self._send(encode_mark(sid, item.name)):
                    return
                continue
            size = len(item)
            for i in range(0, size, frame):
                if port.clear_pending:
                    break
                chunk = item if size <= frame else item[i : i + frame]
                delay = reserve(len(chunk) / 8000.0)
                if delay > 0:
                    if self._batch and not await flush():
                        return
                    if await port.sleep_unless_cleared(delay, early=min(delay, NUDGE_S)):
                        break
                    pacer.woke(loop.time())
                if not await self._send(encode_media(sid, chunk)):
                    return
                # Periodic marks keep played_ms fresh inside long utterances.
                name = port.sent(chunk)
                if name is not None and not await self._send(encode_mark(sid, name)):
                    return
                if len(self._batch) >= BATCH_MAX and not await flush():
                    return  # a long lead must not build one huge write
            if port.clear_pending:
                continue
            # The end of what was queued is always confirmed.
            name = None if port.pending() else position_mark(idle=True)
            if name is not None and not await self._send(encode_mark(sid, name)):
                return

    async def _watch_disconnect(self) -> None:
        port = self.port
        await port.wait_disconnect_requested()
        if port.is_ended:
            return
        if self._hangup is not None and port.call_sid:
            try:
                ended = await self._hangup(port.call_sid)
            except Exception as exc:
                logger.warning(
                    "REST hangup failed (%s); closing the stream instead",
                    type(exc).__name__,
                    exc_info=True,
                )
                ended = False
            if ended and await port.wait_ended(REST_CLOSE_WAIT_S):
                self._reason = self._reason or "the app hung up (REST)"
                return
        self._reason = self._reason or "the app hung up"
        logger.info("closing the media stream to end the call", extra={"call_sid": port.call_sid})
        await self._close(1000)

    async def _close(self, code: int) -> None:
        """Start closing the stream; every channel bounds its close."""
        if self._closed:
            return
        self._closed = True
        await self.channel.close(code)

    async def _cleanup(self) -> None:
        session = self.session
        self.port.ended()
        # Start the close now: the channel bounds it (on the lean protocol close_timeout, then
        # abort), so the fd is freed even if the peer stopped reading.
        await self._close(self._end_code)
        if self._on_end is not None:
            try:
                await self._on_end(session)
            except Exception:
                logger.exception("call end hook failed", extra={"call_sid": session.call_sid})
        await cancel_and_wait(self._tasks)
        # The user callbacks this call fired (on_dtmf, on_disconnected, ...) end with it.
        await self.port.callbacks.drain()
        duration = 0.0 if self._started_at is None else time.monotonic() - self._started_at
        if self._started_at is not None:
            _publish_ended(session, self._reason, duration)
        logger.info(
            "call ended after %.1f s: %s",
            duration,
            self._reason or ("the connection closed" if self._started_at else "never started"),
            extra={"call_sid": session.call_sid, "bad_frames": dict(session.stats.bad_frames)},
        )


# Short, fixed codes for the event stream (and metric labels) by the reason logged.
_END_CODES = {
    "the caller hung up (stream stop)": "caller_hangup",
    "the app hung up (REST)": "app_hangup",
    "the app hung up": "app_hangup",
}


def _publish_ended(session: VoiceSession, reason: str | None, duration: float) -> None:
    events = session.port.events
    if not events.active:
        return
    stats = session.stats
    events.emit(
        CALL_ENDED,
        reason=_END_CODES.get(reason or "", "connection_closed"),
        duration_s=duration,
        frames_in=stats.inbound_frames,
        frames_out=stats.outbound_chunks,
        inbound_dropped=stats.inbound_dropped,
        outbound_dropped=stats.outbound_dropped,
        bad_frames=dict(stats.bad_frames),
        marks_sent=stats.marks_sent,
        marks_echoed=stats.marks_echoed,
        clears=stats.clears_sent,
    )


def __getattr__(name: str) -> Any:
    # 0.1.x imported these here; they load the Twilio SDK, so they resolve on first access.
    if name in ("twilio_call", "hangup_call", "TwilioRegion"):
        from voice_runtime.transports import twilio_call

        return twilio_call if name == "twilio_call" else getattr(twilio_call, name)
    if name == "register_voice_websocket":
        # The 0.1.x entry point is a name of this module, but it is server-layer code (a
        # one-session VoiceServer): a re-export resolved on access, so this transport module
        # itself depends on nothing above it.
        import importlib

        return importlib.import_module("voice_runtime.single_session").register_voice_websocket
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
