"""Attacks against a served VoiceServer, each beside one legitimate call: what held.

Run ``python benchmarks/bench_abuse.py`` (``--quick`` for a shorter run, ``--only 1,5`` for
some attacks). The server is ``tests/abuse_app.py`` under ``voice-runtime serve`` in a second
process (``tests/abuse_kit.ServedApp``); a :class:`PacedCaller` sends 20 ms frames beside each
attack, and the app's record of what it received gives the legitimate call's lost frames and
the longest gap between two of its frames at the server. Server RSS and open fds are sampled
every 50 ms (before / peak / after the attack), and ``/health`` is asked once the attack ends.

Every attack is measured by its outcome (status codes, close codes, what the server closed and
when), so the same table reads before and after the fixes. ``--serve-arg ARG`` (repeatable)
adds arguments to every ``voice-runtime serve`` and ``--env KEY=VALUE`` (repeatable) sets
server environment, e.g. shorter timeouts; ``run.py`` takes them from ``VR_ABUSE_SERVE_ARGS``
(shell words) and ``VR_ABUSE_ENV`` (space-separated KEY=VALUE). All traffic is to 127.0.0.1.

:func:`run` returns the rows as dicts so a benchmark runner can collect them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import select
import selectors
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import websockets
from twilio.request_validator import RequestValidator
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from abuse_kit import (  # noqa: E402  (tests/ holds the shared abuse harness)
    FRAME,
    PacedCaller,
    ServedApp,
    media_frame,
    sids,
    start_frame,
)

TOKEN = "bench-auth-token-0123456789"
PUBLIC = "https://voice.example.com"
SIGNED_ENV = {"TWILIO_AUTH_TOKEN": TOKEN, "VOICE_PUBLIC_URL": PUBLIC}
# The legitimate caller's websockets client reports its own troubles; the table says enough.
logging.getLogger("websockets").addHandler(logging.NullHandler())
logging.getLogger("websockets").propagate = False

FREE_SLOTS = 5  # max_calls for attacks 3 and 4, beside the legitimate call


# --------------------------------------------------------------------------- measuring


class Sampler(threading.Thread):
    """Samples the server's RSS and open fds every 50 ms; keeps the peaks."""

    def __init__(self, app: ServedApp) -> None:
        super().__init__(name="abuse-sampler", daemon=True)
        self.app = app
        self.rss_peak = 0.0
        self.fds_peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            with contextlib.suppress(OSError, RuntimeError):
                self.rss_peak = max(self.rss_peak, self.app.rss_mb())
                self.fds_peak = max(self.fds_peak, self.app.fd_count())

    def stop(self) -> None:
        """Stop sampling."""
        self._halt.set()
        self.join(5)


def settle_fds(app: ServedApp, target: int, timeout: float) -> int:
    """Wait up to ``timeout`` s for the server's fds to fall to ``target``; return the count."""
    deadline = time.monotonic() + timeout
    fds = app.fd_count()
    while fds > target and time.monotonic() < deadline:
        time.sleep(0.1)
        fds = app.fd_count()
    return fds


def signed(path: str) -> dict[str, str]:
    """The X-Twilio-Signature Twilio would send for an upgrade of ``path`` (SIGNED_ENV)."""
    url = PUBLIC.replace("https://", "wss://") + path
    return {"X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(url, {})}


def summary(counts: Counter[Any]) -> str:
    """``a×3 b×1``, most common first."""
    return " ".join(f"{k}×{n}" for k, n in counts.most_common()) or "-"


# --------------------------------------------------------------------------- raw clients


def raw_post(port: int, path: str, total: int, chunked: bool, limit_s: float) -> dict[str, Any]:
    """POST ``total`` body bytes, unsigned, until the server answers or closes."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "Content-Type: application/x-www-form-urlencoded\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n"
    piece = b"A=" + b"x" * (64 * 1024 - 2)
    if chunked:
        piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    pending = memoryview((head + "\r\n").encode())
    body_left = total
    sent_body = 0
    answer = b""
    started = time.monotonic()
    outcome = "timeout"
    try:
        while time.monotonic() - started < limit_s:
            events = sel.select(0.5)
            if not events:
                continue
            mask = events[0][1]
            if mask & selectors.EVENT_READ:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    outcome = "reset"
                    break
                if not data:
                    outcome = "closed"
                    break
                answer += data
                if b"\r\n" in answer:
                    outcome = answer.split(b" ", 2)[1].decode("ascii", "replace")
                    break
                continue
            if not pending:
                if body_left <= 0:
                    # Whole body sent: from now on only wait for the answer.
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                n = min(body_left, 64 * 1024)
                body_left -= n
                pending = memoryview(piece if n == 64 * 1024 else _last_piece(n, chunked))
                if body_left <= 0 and chunked:
                    pending = memoryview(bytes(pending) + b"0\r\n\r\n")
            try:
                n_sent = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                outcome = "reset while sending"
                # The server may have answered before it closed: the answer wins.
                with contextlib.suppress(OSError):
                    answer += sock.recv(65536)
                if answer.startswith(b"HTTP/") and b" " in answer:
                    outcome = answer.split(b" ", 2)[1].decode("ascii", "replace") + ", reset"
                break
            pending = pending[n_sent:]
            sent_body = total - body_left - len(pending)
    finally:
        sel.close()
        sock.close()
    return {"outcome": outcome, "sent_mb": max(sent_body, 0) / 1e6, "s": time.monotonic() - started}


def _last_piece(n: int, chunked: bool) -> bytes:
    data = b"A=" + b"x" * (n - 2) if n > 2 else b"x" * n
    return b"%x\r\n" % n + data + b"\r\n" if chunked else data


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (a fixed mask: the server cannot tell)."""
    key = b"\x37\xfa\x21\x3d"
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload[:4])) if n <= 4 else None
    if masked is None:
        whole = (key * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(n, "big")
    return head + key + masked


class RawWebSocket:
    """A media-stream client on a plain socket: we choose when to write and whether to read."""

    def __init__(self, url: str, rcvbuf: int | None = None) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        uri = parse_uri(url)
        self.sock.settimeout(5)
        self.sock.connect((uri.host, uri.port))
        self.protocol.send_request(self.protocol.connect())
        for data in self.protocol.data_to_send():
            self.sock.sendall(data)
        while self.protocol.handshake_exc is None and self.protocol.state.name == "CONNECTING":
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.protocol.receive_data(data)
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc
        self.sock.setblocking(False)
        self.close_code: int | None = None
        self.eof = False
        self._tail = b""

    def read_available(self, budget: int = 8) -> None:
        """Read up to ``budget`` chunks of what the server sent; note its close frame or EOF.

        Only the close frame matters here, and parsing every pong of a flood in Python would
        starve the attack, so chunks are scanned for a close frame header (0x88, a length of
        2-125, a close code 1000-4999); the server's other frames are text, or pongs echoing
        our one-byte payload.
        """
        for _ in range(budget):
            if self.eof:
                return
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.eof = True
                return
            data, self._tail = self._tail + data, data[-3:]
            at = data.find(b"\x88")
            while at != -1 and self.close_code is None:
                if at + 4 <= len(data) and 2 <= data[at + 1] <= 125:
                    code = struct.unpack("!H", data[at + 2 : at + 4])[0]
                    if 1000 <= code <= 4999:
                        self.close_code = code
                at = data.find(b"\x88", at + 1)

    @property
    def closed(self) -> bool:
        """The server sent a close frame or closed the connection."""
        return self.close_code is not None or self.eof

    def close_text(self) -> str:
        """How the server ended it: close code, EOF, or still open."""
        if self.close_code is not None:
            return f"closed {self.close_code}"
        return "EOF" if self.eof else "open"

    def flood(self, frame: bytes, seconds: float, rate: float | None = None) -> tuple[int, float]:
        """Write ``frame`` as fast as possible (or ``rate`` a second) for ``seconds``.

        Returns (frames the kernel took, seconds until the server closed, or the whole time).
        """
        batch = frame * (1 if rate else max(1, 65536 // len(frame)))
        per_batch = len(batch) // len(frame)
        sent = 0
        started = time.monotonic()
        pending = memoryview(b"")
        next_t = started
        read_at = started
        while (now := time.monotonic()) - started < seconds:
            if now >= read_at:
                read_at = now + 0.02
                self.read_available()
                if self.closed:
                    break
            if not pending:
                if rate:
                    if now < next_t:
                        time.sleep(min(next_t - now, 0.02))
                        continue
                    next_t += 1 / rate
                pending = memoryview(batch)
            _, writable, _ = select_one(self.sock, 0.05)
            if not writable:
                continue
            try:
                n = self.sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                self.eof = True
                break
            pending = pending[n:]
            if not pending:
                sent += per_batch
        return sent, time.monotonic() - started

    def send(self, data: bytes, timeout: float = 5.0) -> bool:
        """Write all of ``data`` within ``timeout``; False when the socket would not take it."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view and time.monotonic() < deadline:
            _, writable, _ = select_one(self.sock, 0.05)
            if writable:
                try:
                    view = view[self.sock.send(view) :]
                except OSError:
                    return False
        return not view

    def close(self) -> None:
        """Drop the connection (no close handshake)."""
        self.sock.close()


def select_one(sock: socket.socket, timeout: float) -> tuple[bool, bool, bool]:
    """(readable, writable, error) for one socket."""
    r, w, x = select.select([sock], [sock], [], timeout)
    return bool(r), bool(w), bool(x)


# --------------------------------------------------------------------------- attacks


def attack_big_post(app: ServedApp, quick: bool, chunked: bool) -> dict[str, Any]:
    """An unsigned huge body to each webhook."""
    total = (50 if quick else 200) * 1_000_000
    results = {}
    sent = 0.0
    for path in ("/twilio/voice", "/twilio/status", "/twilio/sms"):
        r = raw_post(app.port, path, total, chunked, limit_s=30)
        results[path.rsplit("/", 1)[1]] = f"{r['outcome']} after {r['sent_mb']:.0f} MB"
        sent += r["sent_mb"]
    kind = "chunked" if chunked else "Content-Length"
    return {
        "load": f"3 × {total // 1_000_000} MB unsigned POST ({kind})",
        "outcome": ", ".join(f"{k}: {v}" for k, v in results.items()),
    }


def attack_webhook_burst(app: ServedApp, quick: bool) -> dict[str, Any]:
    """40 voice webhooks at once with 5 free call slots."""

    async def go() -> Counter[str]:
        async with httpx.AsyncClient(base_url=app.url, timeout=20) as http:
            replies = await asyncio.gather(
                *(http.post("/twilio/voice", data=_form()) for _ in range(40)),
                return_exceptions=True,
            )
        counts: Counter[str] = Counter()
        for reply in replies:
            if isinstance(reply, BaseException):
                counts[type(reply).__name__] += 1
            elif "<Stream" in reply.text:
                counts["stream"] += 1
            elif "<Hangup" in reply.text:
                counts["busy"] += 1
            else:
                counts[f"HTTP {reply.status_code}"] += 1
        return counts

    return {
        "load": f"40 webhooks at once, {FREE_SLOTS} free slots",
        "outcome": summary(asyncio.run(go())),
    }


def _sms_form() -> dict[str, str]:
    return {"MessageSid": "SM" + sids()[0][2:], "From": "+15550100200", "To": "+15550001111"}


def _form() -> dict[str, str]:
    return {"CallSid": sids()[0], "From": "+15550100200", "To": "+15550001111"}


def attack_socket_burst(app: ServedApp, quick: bool) -> dict[str, Any]:
    """40 media streams at once with 5 free call slots."""

    async def one() -> Any:
        call_sid, stream_sid = sids()
        ws = await websockets.connect(app.ws_url + "/voice", compression=None, open_timeout=10)
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(start_frame(call_sid, stream_sid))
        return ws

    async def go() -> Counter[str]:
        sockets = await asyncio.gather(*(one() for _ in range(40)), return_exceptions=True)
        live = [ws for ws in sockets if not isinstance(ws, BaseException)]
        counts: Counter[str] = Counter(
            type(ws).__name__ for ws in sockets if isinstance(ws, BaseException)
        )
        # The server refuses at once or not at all: give it 3 s to close the refused ones.
        waits = [asyncio.ensure_future(ws.wait_closed()) for ws in live]
        if waits:
            await asyncio.wait(waits, timeout=3)
        for ws, waited in zip(live, waits, strict=True):
            counts[f"closed {ws.close_code}" if waited.done() else "started"] += 1
        await asyncio.gather(*(ws.close() for ws in live), return_exceptions=True)
        return counts

    return {
        "load": f"40 sockets at once, {FREE_SLOTS} free slots",
        "outcome": summary(asyncio.run(go())),
    }


def attack_slowloris(app: ServedApp, quick: bool) -> dict[str, Any]:
    """1,000 connections trickling header bytes, one byte per connection a second."""
    count, hold = 1000, (10.0 if quick else 30.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    conns: list[socket.socket] = []
    refused = 0
    connect_until = time.monotonic() + 15.0  # a server that stops accepting: bounded
    for _ in range(count):
        if time.monotonic() > connect_until:
            refused += 1
            continue
        try:
            sock = socket.create_connection(("127.0.0.1", app.port), timeout=2)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)
            conns.append(sock)
        except OSError:
            refused += 1
    started = time.monotonic()
    closed_at: dict[int, float] = {}
    how: Counter[str] = Counter()
    sel = selectors.DefaultSelector()
    for i, sock in enumerate(conns):
        sel.register(sock, selectors.EVENT_READ, i)
    next_tick = started
    while (now := time.monotonic()) - started < hold and len(closed_at) < len(conns):
        for key, _ in sel.select(timeout=max(0.0, min(0.2, next_tick - now))):
            i = key.data
            try:
                data = key.fileobj.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            if not data or data.startswith(b"HTTP/"):
                closed_at[i] = time.monotonic() - started
                how["closed" if not data else "HTTP " + data[9:12].decode("ascii", "replace")] += 1
                sel.unregister(key.fileobj)
        if time.monotonic() >= next_tick:
            next_tick += 1.0
            for i, sock in enumerate(conns):
                if i not in closed_at:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
    sel.close()
    still_open = len(conns) - len(closed_at)
    for sock in conns:
        sock.close()
    times = sorted(closed_at.values())
    when = f", first at {times[0]:.1f} s, last at {times[-1]:.1f} s" if times else ""
    return {
        "load": f"{count} slowloris connections, {hold:.0f} s",
        "outcome": f"server ended {len(times)} ({summary(how)}){when}; open at end {still_open}"
        + (f"; refused or closed at connect {refused}" if refused else ""),
    }


def attack_ws_flood(app: ServedApp, quick: bool, junk: bool) -> dict[str, Any]:
    """One started stream writing ping frames (or non-JSON text) as fast as it can."""
    seconds = 3.0 if quick else 8.0
    ws = RawWebSocket(app.ws_url + "/voice")
    call_sid, stream_sid = sids()
    ws.send(ws_frame(0x1, start_frame(call_sid, stream_sid).encode()))
    frame = ws_frame(0x1, b"not json {{{ " * 8) if junk else ws_frame(0x9, b"p")
    sent, took = ws.flood(frame, seconds)
    end = ws.close_text()
    if not ws.closed:
        # The server may still be working through what the kernel buffered: 2 s more.
        deadline = time.monotonic() + 2.0
        while not ws.closed and time.monotonic() < deadline:
            time.sleep(0.02)
            ws.read_available()
        end = f"{ws.close_text()} 2 s after the flood" if ws.closed else "open"
    ws.close()
    what = "junk text frames" if junk else "ping frames"
    return {
        "load": f"1 stream flooding {what}, {seconds:.0f} s",
        "outcome": f"{end} after {took:.1f} s; {sent:,} frames sent ({sent / took:,.0f}/s)",
    }


def attack_big_frames(app: ServedApp, quick: bool) -> dict[str, Any]:
    """One started stream sending 47 KB media frames 50 times a second."""
    seconds = 3.0 if quick else 8.0
    ws = RawWebSocket(app.ws_url + "/voice")
    call_sid, stream_sid = sids()
    ws.send(ws_frame(0x1, start_frame(call_sid, stream_sid).encode()))
    frame = ws_frame(0x1, media_frame(stream_sid, os.urandom(35_000), 2).encode())
    sent, took = ws.flood(frame, seconds, rate=50)
    end = ws.close_text()
    ws.close()
    got = app.call_record(call_sid)["bytes"]
    return {
        "load": f"{round(len(frame) / 1000)} KB media frames at 50/s, {seconds:.0f} s",
        "outcome": f"{end} after {took:.1f} s; {sent} frames sent "
        f"({sent * len(frame) / 1e6:.0f} MB), app got {got / 1e6:.1f} MB of audio",
    }


def attack_non_reader(app: ServedApp, quick: bool) -> dict[str, Any]:
    """A stream that never reads while the app plays to it, then hangs up (stop)."""
    talk, wait = (3.0, 15.0) if quick else (15.0, 40.0)
    fds = app.fd_count()
    ws = RawWebSocket(app.ws_url + "/voice", rcvbuf=4096)
    call_sid, stream_sid = sids()
    ws.send(ws_frame(0x1, start_frame(call_sid, stream_sid).encode()))
    for seq in range(2, 2 + int(talk * 50)):  # caller audio, paced; never a read
        ws.send(ws_frame(0x1, media_frame(stream_sid, b"\xff" * FRAME, seq).encode()))
        time.sleep(0.02)
    queued = send_queue(app.port, ws.sock.getsockname()[1])
    stop = ws_frame(0x1, b'{"event":"stop","streamSid":"%s","stop":{}}' % stream_sid.encode())
    ws.send(stop, timeout=2)
    stopped = time.monotonic()
    left = settle_fds(app, fds, wait)
    freed = time.monotonic() - stopped
    ws.close()
    outcome = f"fd freed {freed:.1f} s after stop" if left <= fds else f"fd held {wait:.0f} s"
    if queued is not None:
        outcome += f"; {queued / 1000:.0f} KB unread in the server's kernel send queue at stop"
    return {
        "load": f"1 stream never reading (SO_RCVBUF 4 KB), app playing, {talk:.0f} s",
        "outcome": outcome,
    }


def send_queue(server_port: int, client_port: int) -> int | None:
    """Bytes the kernel holds unsent on the server's end of one loopback connection."""
    want = (f":{server_port:04X}", f":{client_port:04X}")
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(want[0]) and fields[2].endswith(want[1]):
                return int(fields[4].split(":")[0], 16)
    return None


def attack_slow_sms(app: ServedApp, quick: bool) -> dict[str, Any]:
    """30 SMS webhooks at once to an on_sms that blocks 100 ms."""

    async def go() -> tuple[Counter[str], float]:
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=app.url, timeout=30) as http:
            replies = await asyncio.gather(
                *(http.post("/twilio/sms", data=_sms_form()) for _ in range(30)),
                return_exceptions=True,
            )
        counts: Counter[str] = Counter(
            type(r).__name__ if isinstance(r, BaseException) else f"HTTP {r.status_code}"
            for r in replies
        )
        return counts, time.monotonic() - started

    counts, took = asyncio.run(go())
    return {
        "load": "30 SMS at once, on_sms blocks 100 ms",
        "outcome": f"{summary(counts)} in {took:.1f} s",
    }


Attack = Callable[[ServedApp, bool], dict[str, Any]]

# (number, name, attack, server environment, serve arguments, legitimate call signed)
ATTACKS: list[tuple[int, str, Attack, dict[str, str], list[str], bool]] = [
    (1, "huge webhook body", lambda a, q: attack_big_post(a, q, False), SIGNED_ENV,
     ["--allow-unrouted"], True),
    (2, "huge chunked body", lambda a, q: attack_big_post(a, q, True), SIGNED_ENV,
     ["--allow-unrouted"], True),
    (3, "webhook burst", attack_webhook_burst, {"ABUSE_MAX_CALLS": str(FREE_SLOTS + 1)}, [],
     False),
    (4, "socket burst", attack_socket_burst, {"ABUSE_MAX_CALLS": str(FREE_SLOTS + 1)}, [],
     False),
    (5, "slowloris", attack_slowloris, {}, [], False),
    (6, "ping flood", lambda a, q: attack_ws_flood(a, q, False), {}, [], False),
    (7, "junk-frame flood", lambda a, q: attack_ws_flood(a, q, True), {}, [], False),
    (8, "oversized frames", attack_big_frames, {}, [], False),
    (9, "never-reading client", attack_non_reader, {"ABUSE_PLAY_MS": "60000"}, [], False),
    (10, "slow on_sms", attack_slow_sms, {"ABUSE_SMS_BLOCK_MS": "100"}, [], False),
]  # fmt: skip


# --------------------------------------------------------------------------- running


def run_attack(
    number: int,
    name: str,
    attack: Attack,
    env: dict[str, str],
    args: list[str],
    sign: bool,
    quick: bool,
    extra_env: dict[str, str],
    extra_args: list[str],
) -> dict[str, Any]:
    """Serve the app, start the legitimate call, run one attack, measure; one row."""
    row: dict[str, Any] = {"attack": f"{number}. {name}"}
    app = ServedApp({"ABUSE_DRAIN_TIMEOUT": "2", **env, **extra_env}, args=args + extra_args)
    sampler: Sampler | None = None
    caller: PacedCaller | None = None
    try:
        app.start()
        caller = PacedCaller(app.ws_url + "/voice", headers=signed("/voice") if sign else None)
        caller.start()
        caller.started.wait(10)
        time.sleep(0.3)
        row["rss_before_mb"] = app.rss_mb()
        row["fds_before"] = app.fd_count()
        sampler = Sampler(app)
        sampler.start()
        started = time.monotonic()
        log_lines = app.log_lines
        try:
            row.update(attack(app, quick))
        except Exception as exc:  # the attack's own failure is an outcome too
            row["outcome"] = f"attack failed: {type(exc).__name__}: {exc}"
        row["seconds"] = time.monotonic() - started
        row["log_lines"] = app.log_lines - log_lines
        # What the server still holds once the attackers are gone (up to 3 s to let go).
        row["fds_after"] = settle_fds(app, row["fds_before"], 3.0)
        row["rss_after_mb"] = app.rss_mb()
        sampler.stop()
        row["rss_peak_mb"] = max(sampler.rss_peak, row["rss_after_mb"])
        row["fds_peak"] = max(sampler.fds_peak, row["fds_after"])
        try:
            row["health"] = app.get_json("/health", timeout=5).get("status", "?")
        except OSError as exc:
            row["health"] = f"no ({type(exc).__name__})"
        caller.stop()
        row.update(legit_loss(app, caller))
    except Exception as exc:
        row.setdefault("outcome", f"benchmark failed: {type(exc).__name__}: {exc}")
    finally:
        if sampler is not None:
            sampler.stop()
        if caller is not None and caller.is_alive():
            caller.stop()
        row["exit"] = stop_server(app)
    return row


def legit_loss(app: ServedApp, caller: PacedCaller) -> dict[str, Any]:
    """Frames the legitimate call lost on the way in, and its longest gap at the server."""
    record = app.wait_call_record(caller)
    lost = (len(caller.sent) - record["bytes"]) // FRAME
    out: dict[str, Any] = {
        "legit_frames": len(caller.sent) // FRAME,
        "legit_lost": lost,
        "legit_gap_ms": record.get("max_gap_ms"),
        "legit_send_gap_ms": caller.max_send_gap_ms,
    }
    if lost == 0 and record["sha256"] != caller.digest():
        out["legit_lost"] = "corrupt"
    if caller.error is not None:
        out["legit_lost"] = f"{lost} ({type(caller.error).__name__})"
    return out


def stop_server(app: ServedApp) -> str:
    """SIGTERM the server; its exit code, or how it had to go."""
    if app.proc is None:
        return "not started"
    try:
        return str(app.stop(timeout=15))
    except subprocess.TimeoutExpired:
        return "killed"


def _env_pairs(words: list[str]) -> dict[str, str]:
    return dict(word.split("=", 1) for word in words)


def run(
    quick: bool = False,
    only: list[int] | None = None,
    serve_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run the attacks (``only`` by number); return one row per attack."""
    if serve_args is None:
        serve_args = shlex.split(os.environ.get("VR_ABUSE_SERVE_ARGS", ""))
    if env is None:
        env = _env_pairs(os.environ.get("VR_ABUSE_ENV", "").split())
    rows = []
    for number, name, attack, app_env, args, sign in ATTACKS:
        if only and number not in only:
            continue
        print(f"  attack {number}: {name}", file=sys.stderr, flush=True)
        rows.append(run_attack(number, name, attack, app_env, args, sign, quick, env, serve_args))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    head = (
        "| attack | load | outcome | legit frames lost (of) | legit max gap ms at server "
        "(at caller) "
        "| RSS MB before / peak / after | fds before / peak / after | log lines | s "
        "| /health | exit |"
    )
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r.get('load', '-')} | {r.get('outcome', '-')} "
            f"| {r.get('legit_lost', '-')} ({r.get('legit_frames', '-')}) "
            f"| {_num(r.get('legit_gap_ms'), '.0f')} ({_num(r.get('legit_send_gap_ms'), '.0f')}) "
            f"| {_trio(r, 'rss_before_mb', 'rss_peak_mb', 'rss_after_mb', '.0f')} "
            f"| {_trio(r, 'fds_before', 'fds_peak', 'fds_after', 'd')} "
            f"| {r.get('log_lines', '-')} | {_num(r.get('seconds'), '.1f')} "
            f"| {r.get('health', '-')} | {r.get('exit', '-')} |"
        )
    return "\n".join(lines)


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _trio(r: dict[str, Any], a: str, b: str, c: str, fmt: str) -> str:
    return " / ".join(_num(r.get(k), fmt) for k in (a, b, c))


def main() -> None:
    """Parse the options, run the attacks and print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter attacks (about a minute)")
    parser.add_argument("--only", help="comma-separated attack numbers, e.g. 1,5,9")
    parser.add_argument(
        "--serve-arg", action="append", default=None, metavar="ARG",
        help="add ARG to every `voice-runtime serve` (repeat; use --serve-arg=--flag)",
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=None, metavar="KEY=VALUE",
        help="set this in every server's environment (repeat)",
    )  # fmt: skip
    args = parser.parse_args()
    only = [int(n) for n in args.only.split(",")] if args.only else None
    env = _env_pairs(args.env) if args.env is not None else None
    print(format_table(run(args.quick, only, args.serve_arg, env)))


if __name__ == "__main__":
    main()
