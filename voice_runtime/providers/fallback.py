"""Speech fallback chains: the next provider takes over when one fails mid-call.

``create_stt(["elevenlabs", "offline"])`` and ``create_tts(["elevenlabs", "offline"])`` build
:class:`FallbackStt` and :class:`FallbackTts`. A provider counts as failed once it gives up
after its own retries: an STT calls ``on_error`` (or fails to start), a TTS returns a result
with ``error`` (or raises). The offline engines make the last resort: they need no network.

Every switch is logged (warning, the reason in the message text), counted in ``switches``,
reported to ``on_switch`` and, when the chain knows its call, emitted as
``SessionEvent("speech_fallback", {"kind", "from", "to", "reason"})``. Only when the last
provider fails does the chain's own ``on_error`` hear of it.

The STT chain keeps the caller audio since the last committed transcript (bounded in bytes)
and replays it into the next provider, so words spoken while the first one was failing
(its reconnect attempts included) are still transcribed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime._compat import is_voice_session
from voice_runtime._sync import running_loop
from voice_runtime.contracts import SttProvider, TtsProvider
from voice_runtime.errors import ConfigurationError
from voice_runtime.logutil import describe_error
from voice_runtime.providers.base import SpeakFromAsync, speak_async
from voice_runtime.types import SessionEvent

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

#: Caller audio an STT chain keeps for a replay: 30 s of μ-law at 8 kHz.
REPLAY_MAX_BYTES = 240_000
#: Frames waiting for the listening provider: a stuck one must not make the queue grow.
PROVIDER_QUEUE_FRAMES = 3000
STOP_TIMEOUT_S = 5.0
_REASON_CHARS = 120  # a vendor's error text may quote anything: keep it short

__all__ = ["FallbackStt", "FallbackSwitch", "FallbackTts"]


@dataclass(frozen=True)
class FallbackSwitch:
    """One switch of a chain: which kind, from which provider to which, and why."""

    kind: str  # "stt" or "tts"
    from_name: str
    to_name: str
    reason: str


def _clip(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"


def _link_names(providers: Sequence[object], names: Sequence[str] | None) -> list[str]:
    if not providers:
        raise ConfigurationError("a fallback chain needs at least one provider")
    if names is None:
        return [type(p).__name__ for p in providers]
    if len(names) != len(providers):
        raise ConfigurationError("a fallback chain needs one name per provider")
    return list(names)


class _Chain:
    """What both chains share: names, the switch counter, its log line and event."""

    kind = ""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.switches = 0
        self.on_switch: Callable[[FallbackSwitch], None] | None = None
        self.on_error: Callable[[str], None] | None = None

    def _report_switch(self, index: int, reason: str, session: Any) -> FallbackSwitch:
        switch = FallbackSwitch(self.kind, self.names[index], self.names[index + 1], _clip(reason))
        self.switches += 1
        logger.warning(
            "%s provider %s failed (%s); switching to %s",
            "speech recognition" if self.kind == "stt" else "speech synthesis",
            switch.from_name,
            switch.reason,
            switch.to_name,
            extra={"provider": switch.from_name, "fallback": switch.to_name},
        )
        if session is not None and is_voice_session(session):
            data = {
                "kind": switch.kind,
                "from": switch.from_name,
                "to": switch.to_name,
                "reason": switch.reason,
            }
            session.emit_event(SessionEvent("speech_fallback", data))
        if self.on_switch is not None:
            try:
                self.on_switch(switch)
            except Exception:
                logger.exception("on_switch callback failed")
        return switch

    def _give_up(self, reason: str) -> None:
        if self.on_error is not None:
            try:
                self.on_error(reason)
            except Exception:
                logger.exception("on_error callback failed")


class FallbackStt(_Chain):
    """An STT that hands the call to the next provider when the current one gives up."""

    kind = "stt"

    def __init__(
        self,
        providers: Sequence[SttProvider],
        *,
        names: Sequence[str] | None = None,
        replay_max_bytes: int = REPLAY_MAX_BYTES,
        session: VoiceSession | None = None,
    ) -> None:
        super().__init__(_link_names(providers, names))
        self.providers = list(providers)
        self.on_committed: Callable[[str], None] | None = None
        self.on_recognizing: Callable[[str], None] | None = None
        self.session = session
        self.active = 0
        self.replay_max_bytes = replay_max_bytes
        self.replay_dropped_bytes = 0
        self.dropped_frames = 0  # caller frames a provider did not take in time
        self._replay: collections.deque[bytes] = collections.deque()
        self._replay_bytes = 0
        self._speaking = False
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._ended = False
        for index, provider in enumerate(self.providers):
            self._bind(index, provider)

    @property
    def current(self) -> SttProvider:
        """The provider that hears the caller now."""
        return self.providers[self.active]

    def bind_session(self, session: VoiceSession) -> None:
        """Know the call, so switches are emitted as its SessionEvents (the transport calls it)."""
        self.session = session

    def _bind(self, index: int, provider: SttProvider) -> None:
        def committed(text: str) -> None:
            if index == self.active:
                self._clear_replay()  # heard and final: no replay needed for it any more
                if self.on_committed is not None:
                    self.on_committed(text)

        def recognizing(text: str) -> None:
            if index == self.active and self.on_recognizing is not None:
                self.on_recognizing(text)

        def failed(reason: str) -> None:
            self._failed(index, reason)

        provider.on_committed = committed
        provider.on_recognizing = recognizing
        provider.on_error = failed

    def set_speaking(self, speaking: bool) -> None:
        """Echo discard: told to the provider listening now (and to the next one on a switch)."""
        self._speaking = speaking
        self.current.set_speaking(speaking)

    async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
        """Start the first provider and the pump that copies caller audio to it; returns at once."""
        self._loop = asyncio.get_running_loop()
        self._stopped = self._ended = False
        self.active = 0
        self._clear_replay()
        self._queue = asyncio.Queue(PROVIDER_QUEUE_FRAMES)
        self._pump = asyncio.create_task(self._run_pump(inbound_queue), name="fallback-stt-pump")
        await self._start_current(self._queue)

    async def _start_current(self, queue: asyncio.Queue[bytes | None]) -> None:
        index = self.active
        try:
            await self.providers[index].start(queue)
        except Exception as exc:
            await self._switch(index, f"could not start: {describe_error(exc)}")

    async def _run_pump(self, inbound: asyncio.Queue[bytes | None]) -> None:
        while True:
            frame = await inbound.get()
            if frame is None:
                self._ended = True
            else:
                self._keep(frame)
            queue = self._queue
            if queue is not None:
                self._offer(queue, frame)
            if frame is None:
                return

    def _offer(self, queue: asyncio.Queue[bytes | None], frame: bytes | None) -> None:
        """Queue a frame for the provider; when it is full, the oldest frame goes (counted)."""
        if queue.full():
            queue.get_nowait()
            self.dropped_frames += 1
            if self.dropped_frames == 1:
                logger.warning("speech recognition provider falls behind; dropping caller audio")
        queue.put_nowait(frame)

    def _keep(self, frame: bytes) -> None:
        self._replay.append(frame)
        self._replay_bytes += len(frame)
        while self._replay_bytes > self.replay_max_bytes and len(self._replay) > 1:
            old = self._replay.popleft()
            self._replay_bytes -= len(old)
            self.replay_dropped_bytes += len(old)

    def _clear_replay(self) -> None:
        self._replay.clear()
        self._replay_bytes = 0

    @property
    def replay_bytes(self) -> int:
        """Caller audio kept since the last committed transcript, for a switch."""
        return self._replay_bytes

    def _failed(self, index: int, reason: str) -> None:
        """A provider gave up (its ``on_error``, any thread): switch on the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            if index == len(self.providers) - 1 or loop is None:
                self._give_up(reason)
            return

        def schedule() -> None:
            task = loop.create_task(self._switch(index, reason), name="fallback-stt-switch")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        if running_loop() is loop:
            schedule()
        else:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: the call is over
                loop.call_soon_threadsafe(schedule)

    async def _switch(self, index: int, reason: str) -> None:
        if index != self.active or self._stopped:
            return  # a late report from a provider already replaced
        if index == len(self.providers) - 1:
            self._queue = None  # nobody listens any more: drop caller audio, do not pile it up
            self._give_up(reason)
            return
        old = self.providers[index]
        self.active = index + 1
        self._report_switch(index, reason, self.session)
        # Replay and switch in one step on the loop: the pump's next frame goes in behind.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(PROVIDER_QUEUE_FRAMES)
        for frame in self._replay:
            self._offer(queue, frame)
        if self._ended:
            self._offer(queue, None)
        self._queue = queue
        self.current.set_speaking(self._speaking)
        retire = asyncio.create_task(self._stop_quietly(old), name="fallback-stt-retire")
        self._tasks.add(retire)
        retire.add_done_callback(self._tasks.discard)
        await self._start_current(queue)

    @staticmethod
    async def _stop_quietly(provider: SttProvider) -> None:
        try:
            await asyncio.wait_for(provider.stop(), STOP_TIMEOUT_S)
        except Exception:
            logger.warning("a replaced STT provider did not stop cleanly", exc_info=True)

    async def stop(self) -> None:
        """Stop the pump and every provider; idempotent."""
        self._stopped = True
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        pending = [t for t in self._tasks if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=STOP_TIMEOUT_S)
        await self._stop_quietly(self.current)
        self._queue = None


class FallbackTts(SpeakFromAsync, _Chain):
    """A TTS that speaks with the next provider when the current one fails.

    A failed sentence is spoken again from its start by the next provider (what the failing
    one played of it cannot be mapped onto the new voice). After ``recover_after_s`` the first
    provider is tried again (None: stay on the fallback).
    """

    kind = "tts"

    def __init__(
        self,
        providers: Sequence[TtsProvider],
        *,
        names: Sequence[str] | None = None,
        recover_after_s: float | None = 60.0,
    ) -> None:
        super().__init__(_link_names(providers, names))
        self.providers = list(providers)
        self.recover_after_s = recover_after_s
        self.active = 0
        self._switched_at = 0.0
        self._lock = threading.Lock()  # speak() may run in several consumer threads

    @property
    def current(self) -> TtsProvider:
        """The provider that speaks now."""
        return self.providers[self._start_index()]

    def _start_index(self) -> int:
        with self._lock:
            if (
                self.active
                and self.recover_after_s is not None
                and time.monotonic() - self._switched_at >= self.recover_after_s
            ):
                logger.info("speech synthesis tries its first provider again")
                self.active = 0
            return self.active

    def _advance(self, index: int) -> bool:
        """Move past a failed provider; False when someone else already did."""
        with self._lock:
            if index < self.active:
                return False
            self.active = index + 1
            self._switched_at = time.monotonic()
            return True

    async def speak_async(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Awaitable twin of :meth:`speak`."""
        index = self._start_index()
        last = len(self.providers) - 1
        while True:
            provider = self.providers[index]
            failed: dict[str, Any] | None = None
            try:
                result = await speak_async(provider, text, session, stop_event)
            except Exception as exc:
                if index == last:
                    raise
                reason = describe_error(exc)
            else:
                if "error" not in result or result.get("interrupted"):
                    return result
                if result.get("call_disconnected"):
                    return result
                failed, reason = result, str(result["error"])
                if index == last:
                    self._give_up(reason)
                    return result
            if failed is not None and stop_event is not None and stop_event.is_set():
                return failed  # stopped meanwhile: nothing more to say
            if self._advance(index):
                self._report_switch(index, reason, session)
            index += 1
