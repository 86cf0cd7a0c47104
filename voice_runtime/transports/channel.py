"""Frame channels: the one interface a media stream uses to move websocket text messages.

:class:`FrameChannel` is what :class:`~voice_runtime.transports.twilio_ws.MediaStreamCall`
talks to: ``attach`` (inbound messages pushed to callbacks), ``send_texts`` (a batch of
outbound messages, one write where the backend allows), ``writable``/``wait_writable``
(backpressure) and ``close``. Three implementations:

- :class:`LeanChannel` over :class:`~voice_runtime.transports.fastws.VoiceWebSocketProtocol`
  (messages handed over from ``data_received``, a batch in one socket write);
- :class:`StarletteChannel` over any Starlette/FastAPI ``WebSocket`` (or a 0.1.x-style
  stand-in with ``receive_text``/``send_text``): a reader task and a writer task;
- :class:`MemoryChannel`: no socket at all, for tests (feed messages in, read what was sent).

:func:`channel_for` picks the right one for a websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_runtime.transports.fastws import EXTENSION, VoiceWebSocketProtocol

__all__ = [
    "FrameChannel",
    "LeanChannel",
    "MemoryChannel",
    "StarletteChannel",
    "channel_for",
]

logger = logging.getLogger(__name__)

# A close that waits for pending sends gives up after this long (the peer stopped reading).
CLOSE_WAIT_S = 5.0
# StarletteChannel: not writable while this many messages wait for the writer task.
_HIGH_WATER = 256


@runtime_checkable
class FrameChannel(Protocol):
    """A websocket as a media stream sees it (see the module doc)."""

    @property
    def writable(self) -> bool:
        """False while outbound messages are backed up."""

    def attach(
        self,
        on_text: Callable[[str], None],
        on_close: Callable[[int], None],
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        """Deliver every inbound message to the callbacks; ``on_close(code)`` once at the end."""

    def send_texts(self, texts: Sequence[str]) -> bool:
        """Send text messages in order; False once the channel is closing or closed."""

    async def wait_writable(self) -> None:
        """Wait until :attr:`writable` (or the channel is gone)."""

    async def close(self, code: int = 1000) -> None:
        """Start closing (idempotent); bounded, never waits on the peer for long."""


class LeanChannel:
    """:class:`FrameChannel` over the lean protocol's direct channel (no task, no queue)."""

    __slots__ = ("stream",)

    def __init__(self, stream: VoiceWebSocketProtocol) -> None:
        self.stream = stream

    @property
    def writable(self) -> bool:
        """False while the transport's write buffer is above its high-water mark."""
        return self.stream.writable

    def attach(
        self,
        on_text: Callable[[str], None],
        on_close: Callable[[int], None],
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        """Messages go to the callbacks straight from ``data_received``."""
        self.stream.attach(on_text, on_close, on_bytes)

    def send_texts(self, texts: Sequence[str]) -> bool:
        """One socket write for the whole batch."""
        return self.stream.send_texts(texts)

    async def wait_writable(self) -> None:
        """Wait for the write buffer to drain below its high-water mark."""
        await self.stream.wait_writable()

    async def close(self, code: int = 1000) -> None:
        """The protocol bounds the close (close_timeout, then abort)."""
        self.stream.close(code)


class StarletteChannel:
    """:class:`FrameChannel` over a Starlette ``WebSocket`` or a stand-in with text methods.

    A real ``WebSocket`` is read with ``receive()`` (binary frames reach ``on_bytes``); any
    other object, as 0.1.x read one, with ``receive_text()``. Sends go through one writer
    task in order; a send that fails ends the channel (``on_close(1006)``).
    """

    def __init__(self, websocket: Any) -> None:
        self.ws = websocket
        self._out: list[str] = []
        self._wake: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._on_close: Callable[[int], None] | None = None
        self._close_code: int | None = None
        self._failed = False

    @property
    def writable(self) -> bool:
        """False while many messages wait for the writer task."""
        return len(self._out) < _HIGH_WATER

    def attach(
        self,
        on_text: Callable[[str], None],
        on_close: Callable[[int], None],
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        """Start the reader and writer tasks."""
        self._on_close = on_close
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._reader = asyncio.create_task(self._read(on_text, on_bytes), name="vr-ws-read")
        self._writer = asyncio.create_task(self._write(), name="vr-ws-write")

    def _ended(self, code: int) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(code)

    async def _read(
        self, on_text: Callable[[str], None], on_bytes: Callable[[bytes], None] | None
    ) -> None:
        ws = self.ws
        code = 1006
        try:
            if isinstance(ws, WebSocket):
                while True:
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        code = int(message.get("code") or 1000)
                        break
                    text = message.get("text")
                    if text is not None:
                        on_text(text)
                    elif on_bytes is not None:
                        on_bytes(message.get("bytes") or b"")
            else:
                while True:
                    text = await ws.receive_text()
                    # A double that returns something else (an unconfigured mock) would spin.
                    if not isinstance(text, str):
                        break
                    on_text(text)
        except WebSocketDisconnect as exc:
            code = exc.code
        except Exception:
            logger.debug("websocket receive failed", exc_info=True)
        self._ended(code)

    async def _write(self) -> None:
        assert self._wake is not None and self._drained is not None
        send = self.ws.send_text
        while True:
            while self._out:
                batch, self._out = self._out, []
                try:
                    for text in batch:
                        await send(text)
                except Exception:
                    # A failed send means the far end is gone.
                    logger.info("send failed; treating the call as ended")
                    self._failed = True
                    self._out = []
                    self._drained.set()
                    self._ended(1006)
                    return
            self._drained.set()
            if self._close_code is not None:
                return
            self._wake.clear()
            await self._wake.wait()

    def send_texts(self, texts: Sequence[str]) -> bool:
        """Queue the messages for the writer task; False once closing, closed or failed."""
        if self._failed or self._close_code is not None or self._wake is None:
            return False
        self._out.extend(texts)
        if self._out:
            assert self._drained is not None
            self._drained.clear()
            self._wake.set()
        return True

    async def wait_writable(self) -> None:
        """Wait until the writer task has sent what was queued."""
        if self._drained is not None and not self.writable:
            await self._drained.wait()

    async def close(self, code: int = 1000) -> None:
        """Send what is queued (bounded), then close the websocket and stop the tasks."""
        if self._close_code is not None:
            return
        self._close_code = code
        if self._wake is not None:
            self._wake.set()
        writer, reader = self._writer, self._reader
        if writer is not None and not writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_WAIT_S)
            writer.cancel()
        ws = self.ws
        state = getattr(ws, "application_state", None)
        if state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(code)
        for task in (writer, reader):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._ended(code)


class MemoryChannel:
    """An in-memory :class:`FrameChannel` for tests: no socket, no task.

    ``feed(text)`` delivers an inbound message, ``feed_close(code)`` ends the stream as the
    peer would; ``sent`` holds every message sent, ``writes`` how many batches, and
    ``closed`` the code of our close. Set ``writable = False`` to hold the sender back, and
    ``fail_sends = True`` to make every send fail as a broken socket does.
    """

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.writes = 0
        self.closed: int | None = None
        self.fail_sends = False
        self._writable = True
        self._drained: asyncio.Event | None = None
        self._pending: list[str] = []
        self._peer_close: int | None = None
        self._on_text: Callable[[str], None] | None = None
        self._on_close: Callable[[int], None] | None = None

    @property
    def writable(self) -> bool:
        """What the test set (True by default)."""
        return self._writable

    @writable.setter
    def writable(self, value: bool) -> None:
        self._writable = value
        if value and self._drained is not None:
            self._drained.set()

    def attach(
        self,
        on_text: Callable[[str], None],
        on_close: Callable[[int], None],
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> None:
        """Deliver messages fed before and after this call."""
        self._on_text, self._on_close = on_text, on_close
        pending, self._pending = self._pending, []
        for text in pending:
            on_text(text)
        ended = self.closed if self.closed is not None else self._peer_close
        if ended is not None:
            self._end(ended)

    def feed(self, text: str) -> None:
        """An inbound text message from the peer."""
        if self._on_text is None:
            self._pending.append(text)
        else:
            self._on_text(text)

    def feed_close(self, code: int = 1000) -> None:
        """The peer closed the stream."""
        if self._on_close is None:
            self._peer_close = code  # before attach: delivered after the pending messages
        self._end(code)

    def _end(self, code: int) -> None:
        on_close, self._on_close = self._on_close, None
        self._on_text = None
        if on_close is not None:
            on_close(code)

    def send_texts(self, texts: Sequence[str]) -> bool:
        """Record the messages; False after a close or with ``fail_sends``."""
        if self.closed is not None or self.fail_sends:
            return False
        self.sent.extend(texts)
        self.writes += 1
        return True

    async def wait_writable(self) -> None:
        """Wait until the test sets ``writable`` back to True."""
        if self._writable:
            return
        self._drained = asyncio.Event()
        await self._drained.wait()

    async def close(self, code: int = 1000) -> None:
        """Record the close code and end the stream."""
        if self.closed is None:
            self.closed = code
            self._end(code)


def channel_for(websocket: Any) -> FrameChannel:
    """The channel for ``websocket``: itself when it is one, the lean or Starlette adapter."""
    if isinstance(websocket, (LeanChannel, StarletteChannel, MemoryChannel)):
        return websocket
    scope = getattr(websocket, "scope", None)
    extensions = scope.get("extensions") if isinstance(scope, dict) else None
    entry = extensions.get(EXTENSION) if isinstance(extensions, dict) else None
    stream = entry.get("stream") if isinstance(entry, dict) else None
    if isinstance(stream, VoiceWebSocketProtocol):
        return LeanChannel(stream)
    return StarletteChannel(websocket)
