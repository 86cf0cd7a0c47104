"""Socket lifetimes and connection-level abuse against the app served the production way.

Issue 12 items 3 (no socket outlives its call), 4 (no slowloris) and 11 (a per-connection
frame budget). Each attack runs beside a legitimate paced call that must lose no frame; the
server is a second process, so its fds and exit time are measured from outside. Timeouts
are set short on the command line to keep the tests fast.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from abuse_kit import (
    PacedCaller,
    RawWebSocket,
    ServedApp,
    assert_no_frame_lost,
    sids,
    start_frame,
    ws_frame,
)

OP_TEXT, OP_PING = 0x1, 0x9
CLOSE_S = 1.0  # --close-timeout of the served apps
HEADER_S = 2.0
BODY_S = 1.0
# Enough 125-byte pings that their pongs fill the server's socket (ABUSE_WS_SNDBUF) and the
# transport's 64 KiB buffer, while staying inside the frame budget's burst.
FILLING_PINGS = 900
SLACK_S = 4.0  # scheduling on a loaded 2-core box


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        top = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < need:
        pytest.skip(f"needs {need} file descriptors, the hard limit allows {soft}")


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` (a /proc read or an HTTP probe) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def quiet_fd_count(app: ServedApp) -> int:
    """The server's fd count once it is steady (our HTTP probes' sockets have closed)."""
    last = app.fd_count()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = app.fd_count()
        if now == last:
            return now
        last = now
    return last


def stat(app: ServedApp, kind: str) -> int:
    return int(app.get_json("/test/connection-stats").get(kind, 0))


@pytest.fixture(scope="module")
def app() -> Iterator[ServedApp]:
    """Short timeouts; websockets with a small kernel send buffer and a long audio lead."""
    _raise_fd_limit(4096)
    env = {"ABUSE_WS_SNDBUF": "4096", "ABUSE_LEAD_MS": "60000", "ABUSE_START_TIMEOUT": "1"}
    args = [
        "--header-timeout", str(HEADER_S), "--body-timeout", str(BODY_S),
        "--close-timeout", str(CLOSE_S), "--max-connections", "1500", "--send-timeout", "1",
    ]  # fmt: skip
    with ServedApp(env, args=args) as served:
        yield served


@pytest.fixture
def legit(app: ServedApp) -> Iterator[PacedCaller]:
    """A legitimate call beside the attack; it must lose no frame."""
    caller = PacedCaller(app.ws_url + "/voice")
    caller.start()
    assert caller.started.wait(10)
    assert wait_until(lambda: app.call_record(caller.call_sid)["bytes"] > 0, 10)
    yield caller
    caller.stop()
    assert_no_frame_lost(app, caller)


def _fill_with_pongs(peer: RawWebSocket) -> None:
    peer.sock.sendall(ws_frame(OP_PING, b"p" * 125) * FILLING_PINGS)


# --------------------------------------------------------------------------- item 3


def test_app_hangup_frees_fd_and_slot_of_a_peer_that_stops_reading(
    app: ServedApp, legit: PacedCaller
) -> None:
    aborted = stat(app, "close_timeout")
    base = quiet_fd_count(app)
    call_sid, stream_sid = sids()
    with RawWebSocket(app.port, rcvbuf=2048) as peer:
        peer.handshake()
        # 30 s of agent audio sent at once (long lead): far more than the socket takes.
        params = {"abuse_play_ms": "30000", "abuse_hangup_after_s": "0.5"}
        peer.send_text(start_frame(call_sid, stream_sid, params))
        assert wait_until(lambda: app.call_record(call_sid)["ended"], 0.5 + CLOSE_S + SLACK_S)
        assert wait_until(lambda: app.fd_count() <= base, SLACK_S)
        assert app.get_json("/health")["live_calls"] == 1  # only the legitimate call
        assert stat(app, "close_timeout") > aborted


def test_start_timeout_frees_fd_of_a_peer_that_stops_reading(
    app: ServedApp, legit: PacedCaller
) -> None:
    aborted = stat(app, "close_timeout")
    base = quiet_fd_count(app)
    with RawWebSocket(app.port, rcvbuf=2048) as peer:
        peer.handshake()
        _fill_with_pongs(peer)  # no start frame, and no reading
        assert wait_until(lambda: app.fd_count() > base, SLACK_S)  # held, until ...
        assert wait_until(lambda: app.fd_count() <= base, 1.0 + CLOSE_S + SLACK_S)
    assert stat(app, "close_timeout") > aborted


# --------------------------------------------------------------------------- item 11


@pytest.mark.parametrize(
    "flood",
    [ws_frame(OP_PING, b"ping"), ws_frame(OP_TEXT, b"not json at all")],
    ids=["pings", "junk-text"],
)
def test_a_connection_flooding_frames_is_closed_and_counted(
    app: ServedApp, legit: PacedCaller, flood: bytes
) -> None:
    closed = stat(app, "frame_budget")
    call_sid, stream_sid = sids()
    block = flood * 1000
    with RawWebSocket(app.port) as peer:
        peer.handshake()
        peer.send_text(start_frame(call_sid, stream_sid))
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:
                peer.sock.sendall(block)
        except OSError:
            pass  # the server closed the connection under us
        assert time.monotonic() < deadline, "the flood was never stopped"
        assert peer.wait_closed(SLACK_S)
    assert stat(app, "frame_budget") == closed + 1
    assert wait_until(lambda: app.call_record(call_sid)["ended"], SLACK_S)


# --------------------------------------------------------------------------- item 4


def _connect_many(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def _trickle_until_closed(
    socks: list[socket.socket], first: bytes, timeout: float, every: float = 0.25
) -> tuple[int, list[bytes]]:
    """Send ``first`` on each socket, then one byte every ``every`` s until the server closes
    them; return (how many are still open at ``timeout``, the first answers seen)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    answers: list[bytes] = []
    pending = b"" + first
    open_socks = set(socks)
    deadline = time.monotonic() + timeout
    try:
        while open_socks and time.monotonic() < deadline:
            for s in list(open_socks):
                try:
                    s.send(pending)
                except OSError:
                    pass  # closed by the server: the reader below notices
            pending = b"X"
            end = time.monotonic() + every
            while (left := end - time.monotonic()) > 0 and open_socks:
                for key, _ in sel.select(left):
                    s = key.fileobj
                    try:
                        data = s.recv(4096)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        answers.append(data)
                        continue
                    sel.unregister(s)
                    open_socks.discard(s)  # type: ignore[arg-type]
                    s.close()  # type: ignore[union-attr]
        return len(open_socks), answers
    finally:
        sel.close()
        for s in socks:
            s.close()


def test_trickling_headers_are_closed_by_the_header_timeout(
    app: ServedApp, legit: PacedCaller
) -> None:
    timeouts = stat(app, "header_timeout")
    base = quiet_fd_count(app)
    socks = _connect_many(app.port, 1000)
    peak = 0

    def held() -> bool:
        nonlocal peak
        peak = max(peak, app.fd_count())
        return peak >= base + 500

    assert wait_until(held, HEADER_S)  # the server holds them (each has an fd) ...
    left, answers = _trickle_until_closed(socks, b"GET /health HTTP/1.1\r\nX-Slow: ", HEADER_S + 5)
    assert left == 0  # ... until the header timeout closes every one of them
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[:3]
    assert wait_until(lambda: app.fd_count() <= base, SLACK_S)
    assert stat(app, "header_timeout") - timeouts >= 990
    assert app.get_json("/health")["status"] == "ok"


def test_a_kept_alive_connection_trickling_its_next_request_is_closed(
    app: ServedApp, legit: PacedCaller
) -> None:
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        s.setblocking(False)
        left, answers = _trickle_until_closed([s], b"GET /health HTTP/1.1\r\nX: ", HEADER_S + 5)
    assert left == 0
    assert answers[-1].startswith(b"HTTP/1.1 408 ")  # (after the rest of the first answer)


def test_trickling_body_is_closed_by_the_body_timeout(app: ServedApp, legit: PacedCaller) -> None:
    timeouts = stat(app, "body_timeout")
    base = quiet_fd_count(app)
    socks = _connect_many(app.port, 50)
    head = (
        b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
    )
    left, _ = _trickle_until_closed(socks, head, BODY_S + 5)
    assert left == 0
    assert wait_until(lambda: app.fd_count() <= base, SLACK_S)
    assert stat(app, "body_timeout") - timeouts == 50


def test_a_peer_that_stops_reading_a_response_is_aborted_after_the_send_timeout(
    app: ServedApp, legit: PacedCaller
) -> None:
    stalled = stat(app, "send_timeout")
    base = quiet_fd_count(app)
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    with peer:
        peer.connect(("127.0.0.1", app.port))
        # 8 MiB: more than the kernel buffers take, so the server's own buffer stays full.
        peer.sendall(b"GET /test/big?kb=8192 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_until(lambda: stat(app, "send_timeout") > stalled, 1.0 + SLACK_S)
        assert wait_until(lambda: app.fd_count() <= base, SLACK_S)


# --------------------------------------------------------------------------- keepalive, limit


@pytest.fixture(scope="module")
def tight_app() -> Iterator[ServedApp]:
    """A connection limit of 60 (max_calls 20) and a fast keepalive."""
    _raise_fd_limit(4096)
    args = [
        "--max-connections", "60", "--header-timeout", str(HEADER_S),
        "--close-timeout", str(CLOSE_S), "--ws-ping-interval", "0.5", "--ws-ping-timeout", "0.5",
    ]  # fmt: skip
    with ServedApp({"ABUSE_WS_SNDBUF": "4096"}, args=args) as served:
        yield served


def test_keepalive_failure_frees_fd_of_a_peer_that_stops_reading(tight_app: ServedApp) -> None:
    app = tight_app
    caller = PacedCaller(app.ws_url + "/voice")  # answers pings: the keepalive keeps it
    caller.start()
    assert caller.started.wait(10)
    failures = stat(app, "keepalive_timeout")
    base = quiet_fd_count(app)
    with RawWebSocket(app.port, rcvbuf=2048) as peer:
        peer.handshake()
        peer.send_text(start_frame(*sids()))
        _fill_with_pongs(peer)
        assert wait_until(lambda: app.fd_count() <= base, 0.5 + 0.5 + CLOSE_S + SLACK_S)
    assert stat(app, "keepalive_timeout") > failures
    time.sleep(1.5)  # three more ping intervals for the legitimate call
    caller.stop()
    assert_no_frame_lost(app, caller)


def test_connections_above_the_limit_are_refused_at_once(tight_app: ServedApp) -> None:
    app = tight_app
    caller = PacedCaller(app.ws_url + "/voice")
    caller.start()
    assert caller.started.wait(10)
    refused = stat(app, "connection_limit")
    base = quiet_fd_count(app)
    socks = _connect_many(app.port, 1000)
    peak = 0

    def all_accepted_or_refused() -> bool:
        nonlocal peak
        peak = max(peak, app.fd_count())
        return False

    wait_until(all_accepted_or_refused, 1.0)
    assert peak <= base + 60 + 5  # never more fds than the limit (+ /proc jitter)
    left, answers = _trickle_until_closed(socks, b"", HEADER_S + 5)
    assert left == 0
    assert sum(a.startswith(b"HTTP/1.1 503 ") for a in answers) >= 900
    assert wait_until(lambda: app.fd_count() <= base, SLACK_S)
    assert stat(app, "connection_limit") - refused >= 900
    caller.stop()
    assert_no_frame_lost(app, caller)


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_exits_within_the_drain_timeout_despite_a_peer_that_stops_reading() -> None:
    env = {"ABUSE_WS_SNDBUF": "4096", "ABUSE_LEAD_MS": "60000", "ABUSE_DRAIN_TIMEOUT": "2"}
    with ServedApp(env) as app:  # the default close timeout (5 s)
        caller = PacedCaller(app.ws_url + "/voice")
        caller.start()
        assert caller.started.wait(10)
        time.sleep(0.3)
        caller.stop()
        assert_no_frame_lost(app, caller)
        with RawWebSocket(app.port, rcvbuf=2048) as peer:
            peer.handshake()
            call_sid, stream_sid = sids()
            peer.send_text(start_frame(call_sid, stream_sid, {"abuse_play_ms": "30000"}))
            assert wait_until(lambda: app.get_json("/health")["live_calls"] == 1, 5)
            started = time.monotonic()
            assert app.stop(timeout=20) == 0
            assert time.monotonic() - started < 2 + 1.5  # (interpreter teardown, a loaded box)


def test_oversized_headers_are_refused_with_431(app: ServedApp, legit: PacedCaller) -> None:
    too_large = stat(app, "header_too_large")
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
        # Just over the 64 KiB limit: the read that crosses it takes the last byte, so the
        # server closes with nothing unread (which would make the kernel send a reset).
        s.sendall(head + b"a" * (64 * 1024 + 100 - len(head)))
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:40]
    assert stat(app, "header_too_large") == too_large + 1


# --------------------------------------------------------------------------- configuration


def test_the_served_configuration_has_timeouts_and_a_cap_above_max_calls() -> None:
    from fastapi import FastAPI

    from voice_runtime.serving import uvicorn_config

    config = uvicorn_config(FastAPI(), max_calls=200)
    config.load()
    limits = config.http_protocol_class.limits  # type: ignore[attr-defined]
    assert (limits.header_timeout_s, limits.body_timeout_s, limits.close_timeout_s) == (5, 10, 5)
    assert config.http_protocol_class.max_connections == 2 * 200 + 64  # type: ignore[attr-defined]
    assert config.ws_protocol_class.limits is limits  # type: ignore[union-attr]
    assert (config.ws_ping_interval, config.ws_ping_timeout) == (20.0, 20.0)


def test_serve_options_become_connection_limits() -> None:
    from voice_runtime.cli import build_parser
    from voice_runtime.control_cli import _limits
    from voice_runtime.serving import ConnectionLimits

    args = build_parser().parse_args(
        ["serve", "m:f", "--header-timeout", "2", "--max-connections", "300"]
        + ["--ws-ping-interval", "0", "--ws-max-frames-per-s", "200"]
    )
    assert _limits(args) == ConnectionLimits(
        header_timeout_s=2, max_connections=300, ws_ping_interval_s=None, ws_frames_per_s=200
    )
    with pytest.raises(ValueError, match="header_timeout_s"):
        ConnectionLimits(header_timeout_s=0)


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_both_uvicorn_http_protocols_get_the_header_timeout(http: str) -> None:
    from fastapi import FastAPI

    from voice_runtime.serving import ConnectionLimits
    from voice_runtime.testing.server import ServerThread

    limits = ConnectionLimits(header_timeout_s=0.3)
    with (
        ServerThread(FastAPI(), http=http, limits=limits) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as s,
    ):
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert s.recv(4096).startswith(b"HTTP/1.1 408 ")
        assert s.recv(4096) == b""
