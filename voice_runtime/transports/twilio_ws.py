"""Twilio Media Streams over a FastAPI/Starlette websocket.

:func:`register_voice_websocket` serves ``/voice`` (and the routed ``/voice/{token}``) for one
:class:`~voice_runtime.session.VoiceSession`. :class:`MediaStreamCall` runs one stream: it
turns frames into session calls (via the socket-free parser in ``twilio_protocol``) and the
session's outbound items into frames, paced a little ahead of real time.

As in 0.1.x, ``twilio_call``, ``hangup_call`` and ``TwilioRegion`` are names of this module
(resolved on first use, so importing it loads no Twilio SDK), and a REST hang-up calls this
module's ``hangup_call`` looked up at that moment: ``patch("...twilio_ws.hangup_call")``
intercepts it, and otherwise ``twilio_call.hangup_call`` (patchable there too) is called.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_runtime._compat import is_voice_session, maybe_await
from voice_runtime._sync import cancel_and_wait
from voice_runtime.errors import MissingCredentialError
from voice_runtime.logutil import LogLimiter, log_limiter
from voice_runtime.session import FRAME_BYTES, OutboundClear, OutboundMark, VoiceSession
from voice_runtime.transports import twilio_protocol as proto
from voice_runtime.transports.fastws import EXTENSION, VoiceWebSocketProtocol

if TYPE_CHECKING:
    from fastapi import FastAPI

    from voice_runtime.providers import SttProvider

logger = logging.getLogger(__name__)

REST_CLOSE_WAIT_S = 5.0
STT_STOP_TIMEOUT_S = 5.0
POSITION_MARK_EVERY_MS = 100.0
# Most messages one socket write carries (a second of 40 ms media with its marks).
BATCH_MAX = 32
# A pacing wait may end this much early when a caller frame wakes the loop anyway (Twilio
# sends one every 20 ms), so paced audio needs no timer wakeups of its own.
NUDGE_S = 0.02

__all__ = [
    "MediaStreamCall",
    "StreamOptions",
    "register_voice_websocket",
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
    ``on_start(session)`` runs once the stream started.
    """

    def __init__(
        self,
        websocket: WebSocket,
        session: VoiceSession,
        *,
        options: StreamOptions | None = None,
        hangup: Callable[[str], Awaitable[bool]] | None = None,
        on_start: Callable[[VoiceSession], Any] | None = None,
        check_start: Callable[[proto.Start], str | None] | None = None,
    ) -> None:
        self.ws = websocket
        self.session = session
        self.options = options or StreamOptions()
        self._hangup = hangup
        self._on_start = on_start
        self._check_start = check_start
        # Why ``check_start`` refused the stream, if it did.
        self.refused: str | None = None
        self._end_code = 1000
        self._parser = proto.MediaStreamParser(max_media_bytes=self.options.max_media_bytes)
        # The peer decides how many bad frames arrive: log the first few, then one in N.
        self._log_limit = LogLimiter()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stt_from_factory = False
        self._closed = False
        self._batch: list[str] = []
        self._max_bytes = self.options.max_message_bytes
        # The only object the stream talks to for frames and outbound items.
        self.port = session.port
        # Served by VoiceWebSocketProtocol: frames go straight to and from its transport.
        self._fast: VoiceWebSocketProtocol | None = _fast_stream(websocket)

    async def run(self) -> None:
        """Serve the stream until it ends, then release everything the call created."""
        session = self.session
        loop = asyncio.get_running_loop()
        session.set_loop(loop)
        no_start = loop.call_later(self.options.start_timeout_s, self._no_start)
        try:
            await self._receive_loop()
        except Exception:
            logger.exception("media stream failed", extra={"call_sid": session.call_sid})
        finally:
            no_start.cancel()
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
        if self._fast is not None:
            await self._receive_pushed(self._fast)
            return
        ws = self.ws
        if not isinstance(ws, WebSocket):
            # A stand-in websocket (a test double with receive_text, as 0.1.x read frames).
            while (text := await _receive_text(ws)) is not None:
                if not self._handle(text):
                    return
            return
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._bad("binary_frame")
            elif not self._handle(text):
                return

    async def _receive_pushed(self, stream: VoiceWebSocketProtocol) -> None:
        # The protocol hands each message over from data_received: no task wakes up per frame.
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

        stream.attach(on_text, on_close, lambda _data: self._bad("binary_frame"))
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
                self.port.count_bad("start_refused")
                self._end_code = 1008
                return False
        session = self.session
        # A previous call on this session that ended without reset() is reset first.
        self.port.started(
            start.stream_sid,
            start.call_info(),
            mark_every_ms=self.options.position_mark_every_ms,
            prepare=_install_call_control,
        )
        logger.info("media stream started", extra={"call_sid": start.call_sid})
        self._spawn(self._send_loop(), "vr-send")
        self._spawn(self._watch_disconnect(), "vr-disconnect")
        stt = self._build_stt()
        if stt is not None:
            if session.on_stt_ready is not None:
                try:
                    session.on_stt_ready(stt)
                except Exception:
                    logger.exception("on_stt_ready callback failed")
            self._spawn(_start_stt(stt, session.inbound, session.call_sid), "vr-stt-start")
        if self._on_start is not None:
            result = self._on_start(session)
            if asyncio.iscoroutine(result):
                self._spawn(result, "vr-on-start")
        return True

    def _build_stt(self) -> SttProvider | None:
        session = self.session
        if session.stt is None and session.stt_factory is not None:
            primary = session.stt_factory()
            if session.stt_secondary_factory is not None:
                from voice_runtime.stt_tee import SttTee

                session.stt = SttTee(primary, session.stt_secondary_factory())
            else:
                session.stt = primary
            self._stt_from_factory = True
        return session.stt

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _send(self, text: str) -> bool:
        """Send one message; on the direct channel it waits in the batch for :meth:`_flush`."""
        if self._closed:
            return False
        if self._fast is not None:
            self._batch.append(text)
            return True
        try:
            await self.ws.send_text(text)
        except Exception:
            return self._send_failed()
        return True

    async def _flush(self) -> bool:
        """Write the batched messages with one socket write; False when the far end is gone."""
        batch = self._batch
        if not batch:
            return not self._closed
        self._batch = []
        if self._closed:
            return False
        fast = self._fast
        assert fast is not None  # only the direct channel batches
        if not fast.writable:
            await fast.wait_writable()
        if fast.send_texts(batch):
            return True
        return self._send_failed()

    def _send_failed(self) -> bool:
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
            except Exception:
                logger.warning("REST hangup failed; closing the stream instead", exc_info=True)
                ended = False
            if ended and await port.wait_ended(REST_CLOSE_WAIT_S):
                return
        logger.info("closing the media stream to end the call", extra={"call_sid": port.call_sid})
        await self._close(1000)

    async def _close(self, code: int) -> None:
        """Start closing the stream; on the lean protocol the close is bounded by its limits."""
        if self._closed:
            return
        self._closed = True
        if self._fast is not None:
            self._fast.close(code)
            return
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)

    async def _cleanup(self) -> None:
        session = self.session
        self.port.ended()
        if self._fast is not None:
            # Start the close now, not after the STT stop below: the protocol bounds it
            # (close_timeout, then abort), so the fd is freed even if the peer stopped reading.
            await self._close(self._end_code)
        stt = session.stt
        if stt is not None:
            try:
                await asyncio.wait_for(stt.stop(), STT_STOP_TIMEOUT_S)
            except Exception:
                logger.warning(
                    "STT stop failed", exc_info=True, extra={"call_sid": session.call_sid}
                )
            if self._stt_from_factory:
                session.stt = None
        await cancel_and_wait(self._tasks)
        await self._close(self._end_code)
        logger.info(
            "media stream finished",
            extra={"call_sid": session.call_sid, "bad_frames": dict(session.stats.bad_frames)},
        )


def _install_call_control(session: VoiceSession) -> None:
    if session.control is None:
        from voice_runtime.transports.call_control import CallControl

        session.control = CallControl(session)


def _fast_stream(websocket: Any) -> VoiceWebSocketProtocol | None:
    """The direct channel of a websocket served by VoiceWebSocketProtocol, else None."""
    scope = getattr(websocket, "scope", None)
    extensions = scope.get("extensions") if isinstance(scope, dict) else None
    entry = extensions.get(EXTENSION) if isinstance(extensions, dict) else None
    stream = entry.get("stream") if isinstance(entry, dict) else None
    return stream if isinstance(stream, VoiceWebSocketProtocol) else None


async def _receive_text(ws: Any) -> str | None:
    """The next text frame of a stand-in websocket; None once it is closed or gives no text."""
    try:
        text = await ws.receive_text()
    except WebSocketDisconnect:
        return None
    # A double that returns something else (an unconfigured mock) would spin forever.
    return text if isinstance(text, str) else None


async def _start_stt(stt: Any, inbound: Any, call_sid: Any) -> None:
    """Start the call's STT; a failure is logged and reported to its ``on_error``.

    The call goes on. A missing key is reported as ``auth_error``, what the vendor answered
    an empty key with in 0.1.x, so code that watches ``on_error`` still hears of it.
    """
    try:
        await maybe_await(stt.start(inbound))
    except Exception as exc:
        logger.exception("STT failed to start", extra={"call_sid": call_sid})
        on_error = getattr(stt, "on_error", None)
        if callable(on_error):
            reason = "auth_error" if isinstance(exc, MissingCredentialError) else "start_failed"
            try:
                on_error(reason)
            except Exception:
                logger.exception("STT on_error callback failed", extra={"call_sid": call_sid})


class _DuckSessionCall:
    """One stream for a session object that is not a VoiceSession (a mock, a fake).

    It makes only the calls the 0.1.x package made: ``put_inbound``/``tap_caller`` per media
    frame, ``signal_mark_received``, ``call_sid`` and ``signal_ws_connected`` on start,
    ``get_outbound``/``get_pending_mark`` loops, the ``_disconnect_requested`` event and the
    ``_clear_queue`` when the object has them, and ``signal_disconnected`` once at the end. A
    real :class:`VoiceSession` is served by :class:`MediaStreamCall` instead.
    """

    def __init__(
        self,
        websocket: Any,
        session: Any,
        hangup: Callable[[str], Awaitable[bool]] | None,
    ) -> None:
        self.ws = websocket
        self.session = session
        self._hangup = hangup
        self._stream_sid = ""
        self._tasks: list[asyncio.Task[Any]] = []
        self._stt_from_factory = False
        self._ended = asyncio.Event()
        self._bad = 0

    async def run(self) -> None:
        """Serve the stream until it ends, then stop the STT and every task."""
        session = self.session
        try:
            while (text := await self._next_text()) is not None:
                if not self._handle(text):
                    break
        except Exception:
            logger.exception("media stream failed", extra={"call_sid": _sid(session)})
        finally:
            self._ended.set()
            session.signal_disconnected()
            await self._stop_stt()
            await cancel_and_wait(self._tasks)

    async def _next_text(self) -> str | None:
        ws = self.ws
        if not isinstance(ws, WebSocket):
            return await _receive_text(ws)
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            if text is not None:
                return text  # type: ignore[no-any-return]
            self._count_bad("binary_frame")

    def _count_bad(self, reason: str) -> None:
        self._bad += 1
        if self._bad == 1 or self._bad % 100 == 0:
            logger.warning(
                "unusable media stream frame dropped",
                extra={"call_sid": _sid(self.session), "reason": reason, "count": self._bad},
            )

    def _handle(self, text: str) -> bool:
        """Apply one frame to the session as 0.1.x did; False once the stream stopped."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            self._count_bad("not_json")
            return True
        if not isinstance(data, dict):
            self._count_bad("not_object")
            return True
        session = self.session
        event = data.get("event")
        if event == "media":
            media = data.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            if isinstance(payload, str) and payload:
                try:
                    audio = base64.b64decode(payload, validate=True)
                except ValueError:
                    self._count_bad("bad_base64")
                    return True
                session.put_inbound(audio)
                session.tap_caller(audio)
        elif event == "mark":
            mark = data.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            session.signal_mark_received(name if isinstance(name, str) else "")
        elif event == "start":
            self._started(data)
        elif event == "dtmf":
            body = data.get("dtmf")
            digit = body.get("digit") if isinstance(body, dict) else None
            signal = getattr(session, "signal_dtmf", None)
            if isinstance(digit, str) and len(digit) == 1 and callable(signal):
                signal(digit)
        elif event == "stop":
            logger.info("stream stopped by the far end", extra={"call_sid": _sid(session)})
            return False
        return True

    def _started(self, data: dict[str, Any]) -> None:
        session = self.session
        body = data.get("start") if isinstance(data.get("start"), dict) else {}
        stream_sid = data.get("streamSid") or body.get("streamSid")
        self._stream_sid = stream_sid if isinstance(stream_sid, str) else ""
        session.call_sid = body.get("callSid")
        session.signal_ws_connected(stream_sid)
        logger.info("media stream started", extra={"call_sid": _sid(session)})
        spawn = self._spawn
        spawn(self._send_loop(session.get_outbound, proto.encode_media, bytes), "vr-send")
        spawn(self._send_loop(session.get_pending_mark, proto.encode_mark, str), "vr-marks")
        spawn(self._watch_disconnect(), "vr-disconnect")
        spawn(self._send_clears(), "vr-clears")
        stt = self._build_stt()
        inbound = getattr(session, "inbound", None)
        # An autospec session's ``stt`` is a mock of None: nothing to start.
        if callable(getattr(stt, "start", None)) and inbound is not None:
            ready = getattr(session, "on_stt_ready", None)
            if callable(ready):
                try:
                    ready(stt)
                except Exception:
                    logger.exception("on_stt_ready callback failed")
            spawn(_start_stt(stt, inbound, _sid(session)), "vr-stt-start")

    def _build_stt(self) -> Any:
        session = self.session
        if getattr(session, "stt", None) is None and session.stt_factory is not None:
            primary = session.stt_factory()
            secondary = getattr(session, "stt_secondary_factory", None)
            if secondary is not None:
                from voice_runtime.stt_tee import SttTee

                session.stt = SttTee(primary, secondary())
            else:
                session.stt = primary
            self._stt_from_factory = True
        return session.stt

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def _sid_now(self) -> str:
        sid = self.session.stream_sid
        return sid if isinstance(sid, str) and sid else self._stream_sid

    async def _send(self, text: str) -> bool:
        try:
            await self.ws.send_text(text)
        except Exception:
            # A failed send means the far end is gone.
            logger.info("send failed; treating the call as ended")
            self.session.signal_disconnected()
            return False
        return True

    async def _send_loop(self, source: Callable[[], Any], encode: Any, kind: type) -> None:
        """Send what ``source()`` gives (audio or mark names) until it gives something else."""
        while True:
            item = await maybe_await(source())
            if not isinstance(item, kind):
                return  # a stand-in with nothing real to give
            if not await self._send(encode(self._sid_now(), item)):
                return

    async def _send_clears(self) -> None:
        queue = getattr(self.session, "_clear_queue", None)
        get = getattr(queue, "get", None)
        while callable(get):
            waiter = get()
            if not asyncio.iscoroutine(waiter) and not isinstance(waiter, asyncio.Future):
                return
            sid = await waiter
            if not await self._send(proto.encode_clear(sid if isinstance(sid, str) else "")):
                return

    async def _watch_disconnect(self) -> None:
        event = getattr(self.session, "_disconnect_requested", None)
        wait = getattr(event, "wait", None)
        waiter = wait() if callable(wait) else None
        if not asyncio.iscoroutine(waiter):
            return  # no real intent event to watch (a mock's attribute)
        await waiter
        call_sid = self.session.call_sid
        if self._hangup is not None and isinstance(call_sid, str) and call_sid:
            try:
                ended = await self._hangup(call_sid)
            except Exception:
                logger.warning("REST hangup failed; closing the stream instead", exc_info=True)
                ended = False
            if ended:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), REST_CLOSE_WAIT_S)
                    return
        logger.info("closing the media stream to end the call", extra={"call_sid": call_sid})
        with contextlib.suppress(Exception):
            await self.ws.close(1000)

    async def _stop_stt(self) -> None:
        session = self.session
        stt = getattr(session, "stt", None)
        if not callable(getattr(stt, "stop", None)):
            return
        try:
            await asyncio.wait_for(maybe_await(stt.stop()), STT_STOP_TIMEOUT_S)
        except Exception:
            logger.warning("STT stop failed", exc_info=True, extra={"call_sid": _sid(session)})
        if self._stt_from_factory:
            session.stt = None


def _sid(session: Any) -> str | None:
    """The session's call SID for log context (None when it has no real one)."""
    sid = getattr(session, "call_sid", None)
    return sid if isinstance(sid, str) else None


def __getattr__(name: str) -> Any:
    # 0.1.x imported these here; they load the Twilio SDK, so they resolve on first access.
    if name in ("twilio_call", "hangup_call", "TwilioRegion"):
        from voice_runtime.transports import twilio_call

        return twilio_call if name == "twilio_call" else getattr(twilio_call, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hangup_call_now() -> Callable[..., Any]:
    """This module's ``hangup_call`` when a test replaced it, else ``twilio_call.hangup_call``.

    monkeypatch's undo leaves behind the function it read from ``twilio_call``; that is no
    replacement, so a later patch of ``twilio_call.hangup_call`` still takes effect.
    """
    from voice_runtime.transports import twilio_call

    replaced = globals().get("hangup_call")
    code = getattr(replaced, "__code__", None)
    genuine = code is not None and (code.co_name, code.co_filename) == (
        "hangup_call",
        twilio_call.__file__,
    )
    return twilio_call.hangup_call if replaced is None or genuine else replaced


def _rest_hangup(regions: Any) -> Callable[[str], Awaitable[bool]] | None:
    """Return a coroutine function that ends a call over REST, or None without credentials."""
    from voice_runtime.config import settings

    cfg = settings()
    if regions is None and not (cfg.twilio_account_sid and cfg.twilio_auth_token):
        return None

    async def hangup(call_sid: str) -> bool:
        hangup_call = _hangup_call_now()
        if regions is None:
            await asyncio.to_thread(hangup_call, call_sid)
        else:
            await asyncio.to_thread(hangup_call, call_sid, regions=regions)
        return True

    return hangup


def register_voice_websocket(
    app: FastAPI,
    session: VoiceSession | None = None,
    *,
    hangup_regions: Any = None,
    path: str = "/voice",
    options: StreamOptions | None = None,
    session_factory: Callable[[], VoiceSession] | None = None,
    on_call: Callable[[VoiceSession], Any] | None = None,
) -> Any:
    """Serve Twilio media streams at ``path`` and ``{path}/{token}``.

    With ``session``: the single-session form of the 0.1.x package, one call at a time; a
    second stream that arrives while a call is live is refused (close code 1013).
    With ``session_factory`` and/or ``on_call`` instead: every stream gets its own session,
    and the :class:`~voice_runtime.server.VoiceServer` that serves them is returned.
    """
    if session is None:
        from voice_runtime.server import VoiceServer

        return VoiceServer(
            app=app,
            on_call=on_call,
            session_factory=session_factory or VoiceSession,
            path=path,
            stream_options=options,
            hangup_regions=hangup_regions,
        )
    if hangup_regions is not None:
        from voice_runtime.transports import twilio_call

        hangup_regions = twilio_call.validate_regions(hangup_regions)
    busy = asyncio.Lock()

    async def websocket_endpoint(websocket: WebSocket) -> None:
        from voice_runtime.transports.security import check_websocket_signature

        if not check_websocket_signature(websocket):
            await websocket.close(code=1008)
            return
        if busy.locked():
            if log_limiter().allow("stream_refused_busy"):
                logger.warning("second media stream refused: the single session is in a call")
            await websocket.close(code=1013)
            return
        async with busy:
            await websocket.accept()
            hangup = _rest_hangup(hangup_regions)
            call: MediaStreamCall | _DuckSessionCall
            if is_voice_session(session):
                call = MediaStreamCall(websocket, session, options=options, hangup=hangup)
            else:
                call = _DuckSessionCall(websocket, session, hangup)
            await call.run()

    async def routed_endpoint(websocket: WebSocket, token: str) -> None:
        await websocket_endpoint(websocket)

    # The 0.1.x route is added last, with app.websocket(path), and its endpoint takes just the
    # websocket: tests that capture the endpoint from that decorator get this one.
    app.add_api_websocket_route(path.rstrip("/") + "/{token}", routed_endpoint)
    app.websocket(path)(websocket_endpoint)
    return None
