"""A lean caller farm for the capacity benchmark: many Twilio-like callers on raw sockets.

Past ~300 calls the :class:`~voice_runtime.testing.simulator.CallerSimulator` processes fill
their core (each caller runs its own tasks and timers through the ``websockets`` library),
so the farm, not the server, decides the result. This farm speaks the same wire protocol on
plain asyncio protocols: an RFC 6455 client handshake, masked text frames (an all-zero mask:
valid, and nothing to XOR), Twilio's ``connected``/``start``/``media``/``mark``/``stop``
events, agent audio played at real time with marks echoed once the audio before them has
played, ``clear`` honoured. One 20 ms ticker per group of callers drives all their
microphones and speakers; the groups start at different phases so frames do not arrive at
the server in one burst per tick.

Used by ``bench_calls.py client --lean``. Caller frames are stamped like the simulator's.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import _callkit as kit
from _callminute import client_frame

FRAME = 160
FRAME_S = 0.02
SILENCE = b"\xff" * FRAME
GROUPS = 10
_MEDIA = (
    '{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":'
    '{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
)


class LeanCaller(asyncio.Protocol):
    """One caller: a websocket client protocol plus its playback state."""

    def __init__(self, call_sid: str, stream_sid: str) -> None:
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.transport: asyncio.Transport | None = None
        self.upgraded = asyncio.get_running_loop().create_future()
        self.closed = False
        self._buf = b""
        self._http = True
        # Playback queue: ints are audio byte counts, strs are marks to echo.
        self.fifo: collections.deque[int | str] = collections.deque()
        self.seq = 0
        self.frames_sent = 0
        self.heard = 0
        self.received = 0
        self.marks: list[str] = []
        self.t0 = 0.0

    # ---------------------------------------------------------------- socket side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError("closed before the upgrade"))

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data
        if self._http:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(ConnectionError(buf[:40].decode("latin-1")))
                return
            self._http = False
            self.upgraded.set_result(None)
            buf = buf[end + 4 :]
        i, end = 0, len(buf)
        while end - i >= 2:
            n = buf[i + 1] & 0x7F
            head = 2
            if n == 126:
                if end - i < 4:
                    break
                n, head = int.from_bytes(buf[i + 2 : i + 4], "big"), 4
            elif n == 127:
                if end - i < 10:
                    break
                n, head = int.from_bytes(buf[i + 2 : i + 10], "big"), 10
            if end - i < head + n:
                break
            opcode = buf[i] & 0x0F
            payload = buf[i + head : i + head + n]
            i += head + n
            if opcode == 0x1:
                self._event(payload)
            elif opcode == 0x8:
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
                return
            elif opcode == 0x9 and self.transport is not None:  # ping: pong, masked
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
        self._buf = buf[i:]

    def _event(self, payload: bytes) -> None:
        head = payload[:40]
        if b'"media"' in head:
            start = payload.index(b'"payload"')
            start = payload.index(b'"', start + 9) + 1
            b64 = payload[start : payload.index(b'"', start)]
            n = len(b64) * 3 // 4 - b64.count(b"=")
            self.received += n
            self.fifo.append(n)
        elif b'"mark"' in head:
            name = json.loads(payload)["mark"]["name"]
            if self.fifo:
                self.fifo.append(name)
            else:
                self._echo(name)
        elif b'"clear"' in head:
            # Audio not played yet is dropped; its marks come back at once, as Twilio does.
            marks = [m for m in self.fifo if isinstance(m, str)]
            self.fifo.clear()
            for name in marks:
                self._echo(name)

    def send(self, text: str) -> None:
        """Write one text frame."""
        if self.transport is not None and not self.closed:
            self.transport.write(client_frame(text))

    def _echo(self, name: str) -> None:
        self.marks.append(name)
        self.seq += 1
        echo = {"event": "mark", "sequenceNumber": str(self.seq), "streamSid": self.stream_sid}
        echo["mark"] = {"name": name}
        self.send(json.dumps(echo))

    # ---------------------------------------------------------------- the 20 ms tick

    def tick(self) -> None:
        """Play 20 ms of agent audio (echoing marks behind it), then send a caller frame."""
        if self.closed:
            return
        fifo = self.fifo
        while fifo and isinstance(fifo[0], str):
            self._echo(fifo.popleft())  # type: ignore[arg-type]
        want = FRAME
        while want and fifo and not isinstance(fifo[0], str):
            n = fifo[0]
            take = min(n, want)  # type: ignore[type-var]
            want -= take
            self.heard += take
            if take == n:
                fifo.popleft()
            else:
                fifo[0] = n - take  # type: ignore[operator]
        stamped = kit.STAMP.pack(self.frames_sent, time.monotonic_ns()) + SILENCE[kit.STAMP.size :]
        self.seq += 1
        self.send(
            _MEDIA
            % (
                self.seq,
                self.stream_sid,
                self.frames_sent + 1,
                int((time.monotonic() - self.t0) * 1000),
                base64.b64encode(stamped).decode("ascii"),
            )
        )
        self.frames_sent += 1

    async def open(self, host: str, port: int, path: str) -> None:
        """Connect, upgrade and start the stream."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, host, port)
        assert self.transport is not None
        key = base64.b64encode(self.call_sid.encode()[:16].ljust(16, b"0")).decode()
        self.transport.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await asyncio.wait_for(self.upgraded, 30)
        self.t0 = time.monotonic()
        self.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        self.seq += 1
        start = {
            "accountSid": "AC" + "0" * 32,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        self.send(
            json.dumps(
                {
                    "event": "start",
                    "sequenceNumber": str(self.seq),
                    "streamSid": self.stream_sid,
                    "start": start,
                }
            )
        )

    def hangup(self) -> None:
        """Send Twilio's ``stop`` and close the websocket."""
        if self.transport is None or self.closed:
            return
        self.seq += 1
        self.send(
            json.dumps(
                {"event": "stop", "sequenceNumber": str(self.seq), "streamSid": self.stream_sid}
            )
        )
        self.transport.write(bytes((0x88, 0x82)) + b"\0\0\0\0" + (1000).to_bytes(2, "big"))
        self.closed = True  # no caller frame after the stop


async def run_group(callers: list[LeanCaller], phase_s: float, stop: asyncio.Event) -> None:
    """Tick ``callers`` every 20 ms from ``phase_s`` into the period until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    next_t = loop.time() + phase_s
    while not stop.is_set():
        delay = next_t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        next_t += FRAME_S
        for caller in callers:
            caller.tick()


def farm_result(callers: list[LeanCaller]) -> list[dict[str, Any]]:
    """Per-call figures in the shape ``bench_calls.py`` expects from a client."""
    return [
        {
            "call_sid": c.call_sid,
            "frames_sent": c.frames_sent,
            "heard_bytes": c.heard,
            "received_bytes": c.received,
            "done_mark": any(m.startswith("bench-done") for m in c.marks),
        }
        for c in callers
    ]


async def hold_farm(
    callers: list[LeanCaller],
    target: Callable[[int], tuple[int, str]],
    cpu: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """The client role of a benchmark: open ``callers`` (32 at a time) at ``target(i)``
    (port, path), tick them, print ``CONNECTED n``, hold until a line arrives on stdin, wait
    (at most 20 s) for every ``bench-done`` mark, hang up. Returns what the orchestrator reads;
    ``cpu`` (a CPU clock) adds the CPU the farm spent holding the calls."""
    gate = asyncio.Semaphore(32)
    opened: list[LeanCaller] = []
    errors = 0

    async def open_one(i: int, caller: LeanCaller) -> None:
        nonlocal errors
        port, path = target(i)
        async with gate:
            try:
                await caller.open("127.0.0.1", port, path)
            except Exception:
                errors += 1
                return
        opened.append(caller)

    stop = asyncio.Event()
    await asyncio.gather(*(open_one(i, c) for i, c in enumerate(callers)))
    groups = [opened[k::GROUPS] for k in range(GROUPS)]
    tickers = [
        asyncio.create_task(run_group(g, k * FRAME_S / GROUPS, stop)) for k, g in enumerate(groups)
    ]
    cpu0 = cpu() if cpu is not None else 0.0
    print(f"CONNECTED {len(opened)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    cpu1 = cpu() if cpu is not None else 0.0
    deadline = loop.time() + 20
    # Marks arrive through protocol callbacks, not awaitables: poll, as a harness may.
    while loop.time() < deadline and not all(  # noqa: ASYNC110
        any(m.startswith("bench-done") for m in c.marks) for c in opened
    ):
        await asyncio.sleep(0.05)
    for c in opened:
        c.hangup()
    stop.set()
    await asyncio.gather(*tickers)
    out: dict[str, Any] = {"connect_errors": errors, "calls": farm_result(opened)}
    if cpu is not None:
        out["cpu_hold_s"] = cpu1 - cpu0
    return out
