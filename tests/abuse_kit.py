"""Shared kit for fault and abuse tests: raw Media Streams frames, a paced legitimate call, and
a VoiceServer served the production way in a second process (so memory, fds and time can be
measured from outside).

Attack tests run a :class:`PacedCaller` beside the attack and check, through the served app's
``/test/calls/{call_sid}`` route, that the server received every byte the legitimate caller
sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from websockets.sync.client import connect as ws_connect

FRAME = 160
ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def sids() -> tuple[str, str]:
    """A fresh (call SID, stream SID) pair."""
    return "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex


def start_frame(call_sid: str, stream_sid: str, parameters: dict[str, str] | None = None) -> str:
    """A Twilio ``start`` frame as text."""
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "accountSid": "AC" + "0" * 32,
                "streamSid": stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": parameters or {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )


def media_frame(stream_sid: str, frame: bytes, seq: int) -> str:
    """A Twilio inbound ``media`` frame as text."""
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "streamSid": stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(seq),
                "timestamp": str(20 * seq),
                "payload": base64.b64encode(frame).decode("ascii"),
            },
        }
    )


class PacedCaller(threading.Thread):
    """A well-behaved call: random 20 ms frames every 20 ms until stopped, then ``stop``.

    ``sent`` holds every caller byte sent; ``digest()`` its SHA-256 (compare with the served
    app's record of what it received). ``headers`` go on the upgrade request (signatures).
    ``max_send_gap_ms`` is the longest time between two of its sends (a starved caller shows).
    """

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        parameters: dict[str, str] | None = None,
        call_sid: str | None = None,
    ) -> None:
        super().__init__(name="paced-caller", daemon=True)
        self.url = url
        self.call_sid, self.stream_sid = sids()
        if call_sid is not None:
            self.call_sid = call_sid
        self.headers = headers
        self.parameters = parameters
        self.sent = bytearray()
        self.error: BaseException | None = None
        self.max_send_gap_ms = 0.0
        self.started = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with ws_connect(
                self.url, compression=None, additional_headers=self.headers, open_timeout=10
            ) as ws:
                ws.send(start_frame(self.call_sid, self.stream_sid, self.parameters))
                self.started.set()
                next_t = time.monotonic()
                seq = 2
                last = time.monotonic()
                while not self._halt.is_set():
                    frame = os.urandom(FRAME)
                    ws.send(media_frame(self.stream_sid, frame, seq))
                    now = time.monotonic()
                    self.max_send_gap_ms = max(self.max_send_gap_ms, (now - last) * 1000)
                    last = now
                    self.sent += frame
                    seq += 1
                    next_t += 0.02
                    self._halt.wait(max(0.0, next_t - time.monotonic()))
                ws.send(json.dumps({"event": "stop", "streamSid": self.stream_sid, "stop": {}}))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.started.set()

    def digest(self) -> str:
        """SHA-256 of every caller byte sent so far."""
        return hashlib.sha256(bytes(self.sent)).hexdigest()

    def stop(self) -> None:
        """Send ``stop`` and close; join the thread."""
        self._halt.set()
        self.join(10)


def ws_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client websocket frame (RFC 6455 section 5.2)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 * fin | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


class RawWebSocket:
    """A websocket client on a plain socket: it reads only when told to.

    ``rcvbuf`` sets SO_RCVBUF before connecting, so a client that stops reading closes its
    TCP window early. After :meth:`handshake` nothing is read until :meth:`wait_closed`.
    """

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))

    def handshake(self, path: str = "/voice") -> None:
        """Send the upgrade request and read the 101 answer (and nothing more)."""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            byte = self.sock.recv(1)  # byte by byte: not one byte past the 101 is read
            if not byte:
                raise ConnectionError("closed during the handshake")
            head += byte
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode("latin-1").split("\r\n", 1)[0])

    def send_text(self, text: str) -> None:
        """Send one text message."""
        self.sock.sendall(ws_frame(0x1, text.encode()))

    def wait_closed(self, timeout: float) -> bool:
        """Read and discard until the server ends the TCP connection; False on timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True  # reset: the server aborted the connection
        return False

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedApp:
    """``tests/abuse_app.py`` served by ``voice-runtime serve`` in a second process.

    ``env`` adds to (or, with a None value, removes from) the environment; the ABUSE_* knobs
    are read by abuse_app.py. Use as a context manager; ``stop()`` sends SIGTERM and returns
    the exit code. The server's output is read as it comes (a full pipe would stall its
    loop): ``output`` keeps its first MB, ``log_lines`` counts every line.
    """

    OUTPUT_KEPT = 1_000_000

    def __init__(
        self,
        env: dict[str, str | None] | None = None,
        *,
        args: list[str] | None = None,
        app: str = "abuse_app:voice",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "VOICE_"))}
        for key, value in (env or {}).items():
            if value is None:
                base.pop(key, None)
            else:
                base[key] = value
        base.setdefault("PYTHONPATH", "")
        self.env = base
        self.args = [
            sys.executable, "-m", "voice_runtime.cli", "serve", app,
            "--app-dir", str(TESTS), "--port", str(self.port), "--log-level", "warning",
            *(args or []),
        ]  # fmt: skip
        self.proc: subprocess.Popen[str] | None = None
        self.log_lines = 0
        self._kept: list[str] = []
        self._kept_chars = 0
        self._reader: threading.Thread | None = None

    def launch(self) -> ServedApp:
        """Start the process without waiting for it (several start in parallel)."""
        self.proc = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read_output, name="served-app-output")
        self._reader.daemon = True
        self._reader.start()
        return self

    def start(self, timeout: float = 20.0) -> ServedApp:
        """Start the process (unless :meth:`launch` did) and wait until ``/health`` answers."""
        if self.proc is None:
            self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"served app exited during startup:\n{self.output}")
            try:
                self.get_json("/health")
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("served app did not start")
            time.sleep(0.05)

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log_lines += 1
            if self._kept_chars < self.OUTPUT_KEPT:
                self._kept.append(line)
                self._kept_chars += len(line)

    def _reap(self) -> None:
        """Wait for the exited process and the end of its output."""
        assert self.proc is not None
        self.proc.wait()
        if self._reader is not None:
            self._reader.join(10)
            if self._reader.is_alive():
                # A child of the server still holds the pipe: closing it under the blocked
                # reader would hang; the daemon reader ends with the pipe.
                return
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    @property
    def output(self) -> str:
        """What the server wrote so far (its first MB)."""
        return "".join(self._kept)

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def get_json(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` and decode its JSON body."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def call_record(self, call_sid: str) -> dict[str, Any]:
        """What the served app received on ``call_sid``: bytes, sha256, ended."""
        return self.get_json(f"/test/calls/{call_sid}")

    def wait_call_record(self, caller: PacedCaller, timeout: float = 5.0) -> dict[str, Any]:
        """The record of ``caller``'s call once it has ended (or the last one on timeout)."""
        deadline = time.monotonic() + timeout
        record = self.call_record(caller.call_sid)
        while not record.get("ended") and time.monotonic() < deadline:
            time.sleep(0.05)
            record = self.call_record(caller.call_sid)
        return record

    def rss_mb(self) -> float:
        """Resident memory of the server process in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def fd_count(self) -> int:
        """Open file descriptors of the server process."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, return the exit code (kill on timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self._reap()
            raise
        self._reap()
        return self.proc.returncode

    def __enter__(self) -> ServedApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reap()  # also after a test killed it: its output pipe is closed here


def assert_no_frame_lost(app: ServedApp, caller: PacedCaller) -> None:
    """The served app received exactly what the legitimate caller sent."""
    assert caller.error is None, repr(caller.error)
    record = app.wait_call_record(caller)
    assert record["bytes"] == len(caller.sent), record
    assert record["sha256"] == caller.digest()
