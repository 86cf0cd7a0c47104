"""A Twilio caller simulator: a real websocket client that behaves like Media Streams.

It sends ``connected`` and ``start`` (with every field and the custom parameters), paces
caller audio as 20 ms ``media`` frames (real time, as fast as possible, or on a virtual
clock), sends ``dtmf`` and ``stop``, and models Twilio's playback buffer: agent audio plays
at real time, a mark is echoed once the audio before it has played, and ``clear`` drops
unplayed audio and echoes the pending marks at once. It records what the caller heard, and
both legs on one timeline for a stereo recording.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import websockets

from voice_runtime._sync import cancel_and_wait
from voice_runtime.audio.pcm import FRAME_BYTES, FRAME_INTERVAL, ULAW_SILENCE_BYTE
from voice_runtime.testing._wait import wait_on_change
from voice_runtime.testing.clock import Clock, RealClock

logger = logging.getLogger(__name__)

FRAME = FRAME_BYTES
FRAME_S = FRAME_INTERVAL
SILENCE = ULAW_SILENCE_BYTE

__all__ = ["CallerSimulator", "SimEvent"]


@dataclass(frozen=True, slots=True)
class SimEvent:
    """One entry of the simulator's timeline; ``t`` is seconds since the stream started."""

    t: float
    kind: str
    detail: str = ""


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def _sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:32].ljust(32, "0")


class CallerSimulator:
    """Plays the Twilio side of one media stream against a server's websocket URL."""

    def __init__(
        self,
        url: str,
        *,
        call_sid: str | None = None,
        stream_sid: str | None = None,
        account_sid: str | None = None,
        parameters: Mapping[str, str] | None = None,
        tracks: tuple[str, ...] = ("inbound",),
        headers: Mapping[str, str] | None = None,
        playback: Literal["realtime", "instant"] = "realtime",
        clock: Clock | None = None,
        echo_marks: bool = True,
        send_connected: bool = True,
        silence_when_idle: bool = True,
    ) -> None:
        self.url = url
        self.call_sid = call_sid or _sid("CA")
        self.stream_sid = stream_sid or _sid("MZ")
        self.account_sid = account_sid or _sid("AC")
        self.parameters = dict(parameters or {})
        self.tracks = tracks
        self.headers = dict(headers or {})
        self.playback = playback
        self.clock: Clock = clock or RealClock()
        self.echo_marks = echo_marks
        self.send_connected = send_connected
        # Twilio streams the caller's line continuously, silence included; VADs rely on it.
        self.silence_when_idle = silence_when_idle

        self.received = bytearray()  # every agent byte that arrived
        self.heard = bytearray()  # agent bytes actually played (cleared audio excluded)
        self.marks_echoed: list[str] = []
        self.clears = 0
        self.cleared_bytes = 0
        self.events: list[SimEvent] = []
        self.close_code: int | None = None
        self.on_event: Callable[[SimEvent], None] | None = None

        self._ws: Any = None
        self._seq = itertools.count(1)
        self._chunk = itertools.count(1)
        self._t0 = 0.0
        self._fifo: collections.deque[bytes | _Mark] = collections.deque()
        self._fifo_bytes = 0
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._send_lock = asyncio.Lock()
        self._caller_track = bytearray()
        self._agent_track = bytearray()
        self._playing = False
        self._heard_changed = asyncio.Event()
        self._mic: collections.deque[bytes] = collections.deque()
        self._mic_wake = asyncio.Event()
        self._mic_empty = asyncio.Event()
        self._mic_empty.set()

    # ------------------------------------------------------------------ lifecycle

    async def connect(self, timeout: float = 10.0) -> CallerSimulator:
        """Open the websocket and send ``connected`` and ``start``."""
        self._ws = await asyncio.wait_for(
            websockets.connect(
                self.url,
                additional_headers=self.headers or None,
                max_size=2**22,
                compression=None,  # Twilio does not negotiate permessage-deflate
                open_timeout=timeout,
            ),
            timeout,
        )
        self._t0 = self.clock.now()
        if self.send_connected:
            await self._send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send_json(
            {
                "event": "start",
                "sequenceNumber": str(next(self._seq)),
                "streamSid": self.stream_sid,
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": list(self.tracks),
                    "customParameters": self.parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
        self._event("start")
        self._tasks.append(asyncio.create_task(self._reader(), name="sim-reader"))
        if self.playback == "realtime":
            self._tasks.append(asyncio.create_task(self._player(), name="sim-player"))
        self._tasks.append(asyncio.create_task(self._microphone(), name="sim-mic"))
        return self

    async def __aenter__(self) -> CallerSimulator:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.hangup()

    @property
    def started_at(self) -> float:
        """Clock reading when the stream started; event times are relative to it."""
        return self._t0

    @property
    def closed(self) -> bool:
        """True once the websocket has closed (either side)."""
        return self._closed.is_set()

    async def wait_closed(self, timeout: float = 10.0) -> bool:
        """Wait until the server ends the call; False on timeout."""
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def hangup(self) -> None:
        """Send ``stop`` and close, as Twilio does when the caller hangs up."""
        if self._ws is not None and not self._closed.is_set():
            with contextlib.suppress(Exception):
                await self._send_json(
                    {
                        "event": "stop",
                        "sequenceNumber": str(next(self._seq)),
                        "streamSid": self.stream_sid,
                        "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                    }
                )
                self._event("stop")
            with contextlib.suppress(Exception):
                await self._ws.close()
        await self._finish()

    async def _finish(self) -> None:
        self._closed.set()
        self._wake.set()
        await cancel_and_wait(self._tasks)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()

    # ------------------------------------------------------------------ sending

    def _elapsed(self) -> float:
        return self.clock.now() - self._t0

    def _event(self, kind: str, detail: str = "") -> None:
        ev = SimEvent(round(self._elapsed(), 3), kind, detail)
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)

    async def _send_json(self, obj: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(obj))

    async def send_raw(self, text: str) -> None:
        """Send one text frame as is (for malformed-input tests)."""
        async with self._send_lock:
            await self._ws.send(text)

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary frame (Twilio never does; servers must cope)."""
        async with self._send_lock:
            await self._ws.send(data)

    async def send_audio(self, ulaw: bytes, *, realtime: bool = True) -> None:
        """Send caller μ-law audio as 20 ms ``media`` frames.

        Paced in real time (on the simulator's clock) through the line, which otherwise
        carries silence; with ``realtime=False`` the frames go out at once.
        """
        if not realtime:
            for i in range(0, len(ulaw), FRAME):
                if self._closed.is_set():
                    return
                await self._send_media(ulaw[i : i + FRAME])
            return
        for i in range(0, len(ulaw), FRAME):
            self._mic.append(ulaw[i : i + FRAME])
        self._mic_empty.clear()
        self._mic_wake.set()
        closed = asyncio.ensure_future(self._closed.wait())
        drained = asyncio.ensure_future(self._mic_empty.wait())
        try:
            await asyncio.wait({closed, drained}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            drained.cancel()

    async def _send_media(self, frame: bytes) -> None:
        ts = int(self._elapsed() * 1000)
        self._place(self._caller_track, frame)
        await self._send_json(
            {
                "event": "media",
                "sequenceNumber": str(next(self._seq)),
                "streamSid": self.stream_sid,
                "media": {
                    "track": "inbound",
                    "chunk": str(next(self._chunk)),
                    "timestamp": str(ts),
                    "payload": base64.b64encode(frame).decode("ascii"),
                },
            }
        )

    async def _microphone(self) -> None:
        mic = self._mic
        silence = bytes([SILENCE]) * FRAME
        next_t = self.clock.now()
        while not self._closed.is_set():
            if not mic:
                self._mic_empty.set()
                if not self.silence_when_idle:
                    self._mic_wake.clear()
                    await self._mic_wake.wait()
                    next_t = max(next_t, self.clock.now())
                    continue
            await self.clock.sleep_until(next_t)
            next_t += FRAME_S
            frame = mic.popleft() if mic else silence
            try:
                await self._send_media(frame)
            except websockets.ConnectionClosed:
                return

    async def send_silence(self, ms: float, *, realtime: bool = True) -> None:
        """Send ``ms`` of μ-law silence."""
        await self.send_audio(bytes([SILENCE]) * int(ms * 8), realtime=realtime)

    async def send_pcm(self, pcm: bytes, rate: int, *, realtime: bool = True) -> None:
        """Send PCM16 mono audio at ``rate`` (converted to 8 kHz μ-law)."""
        from voice_runtime.audio import pcm16_to_ulaw, resample

        if rate != 8000:
            pcm = resample(pcm, rate, 8000).tobytes()
        await self.send_audio(pcm16_to_ulaw(pcm), realtime=realtime)

    async def send_wav(self, path: str | Path, *, realtime: bool = True) -> None:
        """Send a WAV file (any rate, μ-law or PCM16) as caller audio."""
        from voice_runtime.audio import read_wav

        await self.send_audio(read_wav(path).to_ulaw_8k_mono(), realtime=realtime)

    async def say(
        self,
        text: str,
        tts: Callable[[str], bytes] | str = "piper",
        *,
        realtime: bool = True,
    ) -> None:
        """Speak ``text`` as the caller through a TTS (callable returning μ-law, or engine name)."""
        if isinstance(tts, str):
            from voice_runtime.offline import synthesize_ulaw

            audio = await asyncio.to_thread(synthesize_ulaw, text, tts)
        else:
            audio = tts(text)
        self._event("caller_says", text)
        await self.send_audio(audio, realtime=realtime)
        self._event("caller_done")

    async def send_dtmf(self, digit: str) -> None:
        """Press a key."""
        await self._send_json(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(next(self._seq)),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )
        self._event("dtmf", "digit")

    async def _echo(self, name: str) -> None:
        self.marks_echoed.append(name)
        self._event("mark", name)
        if not self.echo_marks or self._closed.is_set():
            return
        with contextlib.suppress(Exception):
            await self._send_json(
                {
                    "event": "mark",
                    "sequenceNumber": str(next(self._seq)),
                    "streamSid": self.stream_sid,
                    "mark": {"name": name},
                }
            )

    # ------------------------------------------------------------------ receiving / playback

    async def _reader(self) -> None:
        ws = self._ws
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self._event("protocol_error", "binary frame from server")
                    continue
                data = json.loads(message)
                event = data.get("event")
                if data.get("streamSid") != self.stream_sid:
                    self._event("protocol_error", "wrong streamSid")
                if event == "media":
                    audio = base64.b64decode(data["media"]["payload"])
                    self.received.extend(audio)
                    if self.playback == "instant":
                        self._play(audio)
                    else:
                        self._fifo.append(audio)
                        self._fifo_bytes += len(audio)
                        self._wake.set()
                elif event == "mark":
                    name = data["mark"]["name"]
                    if self.playback == "instant" or not self._fifo:
                        await self._echo(name)
                    else:
                        self._fifo.append(_Mark(name))
                elif event == "clear":
                    await self._clear()
                else:
                    self._event("protocol_error", f"unexpected event {event!r}")
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self._event("closed", str(ws.close_code))
            self._closed.set()
            self._wake.set()

    async def _clear(self) -> None:
        self.clears += 1
        dropped = self._fifo_bytes
        self.cleared_bytes += dropped
        marks = [item.name for item in self._fifo if isinstance(item, _Mark)]
        self._fifo.clear()
        self._fifo_bytes = 0
        self._set_playing(False)
        self._event("clear", f"{dropped / 8:.0f} ms dropped")
        for name in marks:
            await self._echo(name)

    def _play(self, frame: bytes) -> None:
        self.heard.extend(frame)
        self._place(self._agent_track, frame)
        self._heard_changed.set()

    def _place(self, track: bytearray, frame: bytes) -> None:
        pos = int(round(self._elapsed() / FRAME_S)) * FRAME
        if len(track) < pos:
            track.extend(bytes([SILENCE]) * (pos - len(track)))
        track.extend(frame)

    def _set_playing(self, playing: bool) -> None:
        if playing != self._playing:
            self._playing = playing
            self._event("agent_audio_start" if playing else "agent_audio_stop")

    async def _player(self) -> None:
        # Each frame counts as heard when it has finished playing, 20 ms after it started.
        fifo = self._fifo
        next_t = self.clock.now()
        while not self._closed.is_set():
            while fifo and isinstance(fifo[0], _Mark):
                await self._echo(fifo.popleft().name)  # type: ignore[union-attr]
            if not fifo:
                self._set_playing(False)
                self._wake.clear()
                await self._wake.wait()
                next_t = max(next_t, self.clock.now())
                continue
            self._set_playing(True)
            clears = self.clears
            frame = bytearray()
            need = FRAME
            while need and fifo and not isinstance(fifo[0], _Mark):
                head = fifo[0]
                take = head[:need]  # type: ignore[index]
                frame.extend(take)
                need -= len(take)
                self._fifo_bytes -= len(take)
                if len(take) == len(head):
                    fifo.popleft()
                else:
                    fifo[0] = head[len(take) :]  # type: ignore[index]
            next_t += len(frame) / 8000.0
            await self.clock.sleep_until(next_t)
            if self.clears != clears:
                continue  # cleared while this frame was playing
            self._play(bytes(frame))

    # ------------------------------------------------------------------ waiting and results

    @property
    def heard_ms(self) -> float:
        """Milliseconds of agent audio played to the caller."""
        return len(self.heard) / 8.0

    @property
    def buffered_ms(self) -> float:
        """Milliseconds of agent audio received but not yet played."""
        return self._fifo_bytes / 8.0

    @property
    def unsent_ms(self) -> float:
        """Milliseconds of caller audio queued by send_audio() but not yet sent."""
        return len(self._mic) * FRAME_S * 1000.0

    async def wait_for_heard(self, ms: float, timeout: float = 10.0) -> bool:
        """Wait until at least ``ms`` of agent audio has been played; False on timeout."""
        return await wait_on_change(
            self._heard_changed,
            lambda: self.heard_ms >= ms,
            timeout,
            poll=0.1,
            give_up=self._closed.is_set,
        )

    async def wait_for_mark(self, prefix: str, timeout: float = 10.0) -> str | None:
        """Wait until a mark whose name starts with ``prefix`` was echoed; return its name."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for name in self.marks_echoed:
                if name.startswith(prefix):
                    return name
            if loop.time() >= deadline or self._closed.is_set():
                return None
            await asyncio.sleep(0.01)

    async def wait_idle(self, quiet_s: float = 0.5, timeout: float = 30.0) -> bool:
        """Wait until no agent audio arrived or played for ``quiet_s``; False on timeout.

        ``quiet_s`` is measured on the simulator's clock, ``timeout`` in real time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = (len(self.received), len(self.heard))
        quiet_since = self.clock.now()
        while loop.time() < deadline:
            await asyncio.sleep(0.02)
            now = (len(self.received), len(self.heard))
            if now != last or self._fifo:
                last = now
                quiet_since = self.clock.now()
            elif self.clock.now() - quiet_since >= quiet_s:
                return True
            if self._closed.is_set() and not self._fifo:
                return True
        return False

    def tracks_ulaw(self) -> tuple[bytes, bytes]:
        """Caller and agent legs as μ-law on one 20 ms timeline, padded to equal length."""
        n = max(len(self._caller_track), len(self._agent_track))
        pad = bytes([SILENCE])
        caller = bytes(self._caller_track) + pad * (n - len(self._caller_track))
        agent = bytes(self._agent_track) + pad * (n - len(self._agent_track))
        return caller, agent

    def write_recording(self, path: str | Path) -> Path:
        """Write a stereo PCM16 WAV: the caller left, the agent right."""
        from voice_runtime.audio import write_stereo_call_wav

        caller, agent = self.tracks_ulaw()
        write_stereo_call_wav(path, caller, agent)
        return Path(path)

    def write_heard(self, path: str | Path) -> Path:
        """Write what the caller heard (agent audio only) as a μ-law WAV."""
        from voice_runtime.audio import write_ulaw_wav

        write_ulaw_wav(path, bytes(self.heard))
        return Path(path)
