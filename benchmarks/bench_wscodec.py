"""Websocket codec CPU: our sans-I/O codec against ``websockets``' sans-I/O ``ServerProtocol``.

Both parse the same masked client frames, one per read as a socket delivers Twilio's 20 ms
media messages, into text, and build the same server text frames from text. The question
(issue 14): could ``websockets.server.ServerProtocol`` replace
``voice_runtime.transports.wscodec`` at equal CPU? Prints microseconds per frame each way and
the ratio (theirs / ours); best of a few runs, CPU time.

    python benchmarks/bench_wscodec.py            # 1,000,000 frames each way
    python benchmarks/bench_wscodec.py --quick    # 100,000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from voice_runtime.transports.wscodec import OP_TEXT, FrameParser, frame_header, unmask

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _callminute as cm  # noqa: E402  (benchmarks/ is not a package)

MAX_SIZE = 64 * 1024


def client_frame(text: str) -> bytes:
    """One masked client text frame, as Twilio sends it."""
    data = text.encode()
    mask = os.urandom(4)
    n = len(data)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    return head + mask + unmask(data, mask)


def parse_ours(frames: list[bytes]) -> float:
    """CPU seconds to parse every frame (one feed per frame) into text with our codec."""
    got: list[str] = []
    append = got.append

    def on_message(_op: int, payload: bytes) -> bool:
        append(payload.decode("utf-8"))
        return True

    parser = FrameParser(on_message, lambda _op, _p: True, max_size=MAX_SIZE)
    feed = parser.feed
    t0 = time.process_time()
    for frame in frames:
        feed(frame)
    cpu = time.process_time() - t0
    assert len(got) == len(frames)
    return cpu


def parse_theirs(frames: list[bytes]) -> float:
    """The same with ``websockets``' ServerProtocol (already open, as after the handshake)."""
    protocol = ServerProtocol(state=State.OPEN, max_size=MAX_SIZE)
    receive, events = protocol.receive_data, protocol.events_received
    n = 0
    t0 = time.process_time()
    for frame in frames:
        receive(frame)
        for event in events():
            if event.opcode is Opcode.TEXT:
                event.data.decode("utf-8")
                n += 1
    cpu = time.process_time() - t0
    assert n == len(frames)
    return cpu


def build_ours(texts: list[str]) -> float:
    """CPU seconds to build one server frame per text with our codec."""
    out = []
    append = out.append
    t0 = time.process_time()
    for text in texts:
        data = text.encode("utf-8")
        append(frame_header(OP_TEXT, len(data)) + data)
    return time.process_time() - t0


def build_theirs(texts: list[str]) -> float:
    """The same with ``websockets``' ServerProtocol."""
    protocol = ServerProtocol(state=State.OPEN, max_size=MAX_SIZE)
    send, take = protocol.send_text, protocol.data_to_send
    out = []
    append = out.append
    t0 = time.process_time()
    for text in texts:
        send(text.encode("utf-8"))
        append(b"".join(take()))
    return time.process_time() - t0


def _best(fn: Callable[[list], float], arg: list, repeats: int) -> float:
    return min(fn(arg) for _ in range(repeats))


def run(quick: bool = False, repeats: int = 3) -> list[dict[str, float | str]]:
    """Rows of microseconds per frame, ours and theirs, each way (``run.py`` calls this)."""
    n = 100_000 if quick else 1_000_000
    texts = [cm.media_text(i) for i in range(1000)] * (n // 1000)
    frames = [client_frame(t) for t in texts[:1000]] * (n // 1000)
    rows: list[dict[str, float | str]] = []
    for name, ours, theirs, arg in (
        ("parse client media frame -> text", parse_ours, parse_theirs, frames),
        ("build server text frame", build_ours, build_theirs, texts),
    ):
        a = _best(ours, arg, repeats) / len(arg) * 1e6
        b = _best(theirs, arg, repeats) / len(arg) * 1e6
        rows.append({"name": name, "ours_us": a, "websockets_us": b, "ratio": b / a})
    return rows


def format_table(rows: list[dict[str, float | str]]) -> str:
    """The rows as a plain-text table."""
    size = len(client_frame(cm.media_text(0)))
    lines = [f"{'':36} {'ours us':>9} {'websockets us':>14} {'ratio':>6}  ({size} B frames)"]
    for row in rows:
        lines.append(
            f"{row['name']:36} {row['ours_us']:9.3f} {row['websockets_us']:14.3f} "
            f"{row['ratio']:6.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 frames each way")
    print(format_table(run(quick=parser.parse_args().quick)))


if __name__ == "__main__":
    main()
