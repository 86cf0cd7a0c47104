"""The transport-side names of :class:`~voice_runtime.session.VoiceSession` (0.1.x and 0.2).

Transports now talk to ``session.port`` (:mod:`voice_runtime.stream_port`) only. These methods
stay on the session for code written against the older names (COMPAT.md's table, custom
transports, tests) and as the hooks a subclass may override: the port calls
``signal_ws_connected``, ``signal_mark_received``, ``signal_dtmf``, ``signal_disconnected``,
``put_inbound``, ``tap_caller`` and ``tap_agent`` through the session, so an override sees
every event. Each one is a thin delegate of the port or the playback ledger. All are "loop
only" unless said otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from voice_runtime._sync import running_loop

if TYPE_CHECKING:
    from voice_runtime._queues import SessionStats
    from voice_runtime.playback import OutboundClear, OutboundMark, PlaybackLedger
    from voice_runtime.stream_port import StreamPort
    from voice_runtime.types import CallInfo

__all__ = ["TransportSide"]

logger = logging.getLogger(__name__)


class TransportSide:
    """Mixin of :class:`~voice_runtime.session.VoiceSession`: the transport-side names."""

    if TYPE_CHECKING:
        port: StreamPort
        playback: PlaybackLedger
        stats: SessionStats
        outbound: asyncio.Queue[bytes]
        stream_sid: str | None
        call_sid: str | None
        caller_number: str | None
        call_info: CallInfo | None
        _mixer: Any
        _disconnect_requested: asyncio.Event
        _loop: asyncio.AbstractEventLoop | None

        def set_loop(self, loop: asyncio.AbstractEventLoop) -> None: ...
        def _mark_connected(self) -> None: ...

    # ------------------------------------------------------------------ far end → session

    def signal_ws_connected(self, stream_sid: str) -> None:
        """Record the stream as connected and wake ``wait_for_ws_connect`` (transport)."""
        self.stream_sid = stream_sid
        if self._loop is None:
            loop = running_loop()
            if loop is not None:
                self.set_loop(loop)
        self._mark_connected()
        logger.info("media stream connected", extra={"call_sid": self.call_sid})

    def apply_call_info(self, info: CallInfo) -> None:
        """Store what the stream's ``start`` said about the call (transport)."""
        self.call_info = info
        self.call_sid = info.call_sid
        if info.caller_number:
            self.caller_number = info.caller_number

    def signal_mark_received(self, name: str) -> None:
        """Handle a mark echo from the far end (loop only); unknown names log a warning."""
        self.port.resolve_echo(name)

    def signal_dtmf(self, digit: str) -> None:
        """Deliver a DTMF digit from the caller (transport, loop only)."""
        self.port.deliver_dtmf(digit)

    def _put_inbound_now(self, data: bytes | None) -> None:
        """Delegate of ``port.push_inbound`` (loop only; kept for subclasses that call it)."""
        self.port.push_inbound(data)

    # ------------------------------------------------------------------ session → far end

    async def get_outbound(self) -> bytes:
        """Return the next queued agent audio chunk (loop only)."""
        return await self.outbound.get()

    async def get_pending_mark(self) -> str:
        """Return the next mark name for a transport that sends marks on its own (loop only).

        Transports that care about ordering use ``port.next_outbound()`` instead.
        """
        return await self.port.next_mark_name()

    async def next_outbound(self) -> bytes | OutboundMark | OutboundClear:
        """Delegate of ``port.next_outbound()``: a clear, audio or a mark, in queue order."""
        return await self.port.next_outbound()

    def outbound_pending(self) -> bool:
        """Delegate of ``port.pending()``."""
        return self.port.pending()

    def note_audio_sent(self, nbytes: int) -> None:
        """Record that ``nbytes`` of μ-law agent audio went to the far end (loop only)."""
        self.playback.note_sent(nbytes)
        self.stats.audio_sent_bytes += nbytes
        self.stats.outbound_chunks += 1

    def position_mark_name(self) -> str:
        """Name of a mark that, when echoed, moves the playback position to now (loop only)."""
        self.stats.marks_sent += 1
        return self.playback.position_name()

    def queue_position_mark(self) -> None:
        """Ask for position marks as fine as the transport's messages (loop only).

        0.2 queued a mark behind the audio here; now the transport owns position marks and
        this only raises their granularity (see :meth:`PlaybackLedger.request_granularity`).
        """
        self.playback.request_granularity(1.0)

    @property
    def clear_pending(self) -> bool:
        """True when a clear was requested and not yet handed to the transport."""
        return self.port.clear_pending

    async def sleep_unless_cleared(self, seconds: float, *, early: float = 0.0) -> bool:
        """Delegate of ``port.sleep_unless_cleared()`` (loop only)."""
        return await self.port.sleep_unless_cleared(seconds, early=early)

    def nudge(self) -> None:
        """Delegate of ``port.nudge()`` (loop only)."""
        self.port.nudge()

    def note_clear_sent(self) -> None:
        """Record that the transport sent a clear (loop only)."""
        self.port.clear_sent()

    async def wait_disconnect_requested(self) -> None:
        """Wait until consumer code asks to end the call (transport, loop only)."""
        await self._disconnect_requested.wait()

    # ------------------------------------------------------------------ monitoring taps

    def tap_caller(self, b: bytes) -> None:
        """Feed caller audio to the mixer, if one is set."""
        mixer = self._mixer
        if mixer is not None:
            mixer.write_caller(b)

    def tap_agent(self, b: bytes) -> None:
        """Feed agent audio to the mixer, if one is set."""
        mixer = self._mixer
        if mixer is not None:
            mixer.write_agent(b)
