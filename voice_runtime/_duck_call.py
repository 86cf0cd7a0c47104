"""A media stream for a session that is not a VoiceSession (0.1.x users pass mocks and fakes).

Server-layer code: :func:`~voice_runtime.single_session.register_voice_websocket` serves such
a session with :class:`DuckSessionCall`, which makes only the calls the 0.1.x package made
(``tests/test_compat_providers.py`` drives it with MagicMock and autospec sessions).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from voice_runtime._compat import maybe_await
from voice_runtime._sync import cancel_and_wait
from voice_runtime.call_wiring import build_stt, start_stt, stop_stt, stt_ready
from voice_runtime.transports import twilio_protocol as proto
from voice_runtime.transports.twilio_ws import REST_CLOSE_WAIT_S

__all__ = ["DuckSessionCall"]

logger = logging.getLogger(__name__)


async def _receive_text(ws: Any) -> str | None:
    """The next text frame of a stand-in websocket; None once it is closed or gives no text."""
    try:
        text = await ws.receive_text()
    except WebSocketDisconnect:
        return None
    # A double that returns something else (an unconfigured mock) would spin forever.
    return text if isinstance(text, str) else None


class DuckSessionCall:
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
        raw = data.get("start")
        body: dict[str, Any] = raw if isinstance(raw, dict) else {}
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
        stt, self._stt_from_factory = build_stt(session)
        inbound = getattr(session, "inbound", None)
        # An autospec session's ``stt`` is a mock of None: nothing to start.
        if callable(getattr(stt, "start", None)) and inbound is not None:
            stt_ready(session, stt)
            spawn(start_stt(stt, inbound, _sid(session)), "vr-stt-start")

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
        await stop_stt(self.session, self._stt_from_factory)


def _sid(session: Any) -> str | None:
    """The session's call SID for log context (None when it has no real one)."""
    sid = getattr(session, "call_sid", None)
    return sid if isinstance(sid, str) else None
