"""Abuse of the console and the browser phone on a server reachable from outside (a public URL
is set, so every console request needs the token), served the production way, with a
legitimate paced call beside the attack that must lose no frame."""

from __future__ import annotations

import http.client
import re
import threading
import time
from collections import Counter

from abuse_kit import PacedCaller, RawWebSocket, ServedApp, assert_no_frame_lost

from voice_runtime.console.routes import MAX_VIEWERS

ATTACK_S = 3.0
ATTACKERS = 6


def status_of(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    """One request on a fresh connection; its status (the body is not read further)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


def hammer(port: int, call_sid: str, until: float, seen: Counter[int | str]) -> None:
    """Unauthenticated console, event-stream, phone and websocket requests, back to back."""
    requests = [
        ("GET", "/console", {}),
        ("GET", "/phone?token=guess", {}),
        ("GET", "/console/api/calls", {"Authorization": "Bearer guess"}),
        ("GET", f"/console/api/calls/{call_sid}/events?content=1", {}),
        ("POST", "/phone/api/call", {"Content-Type": "application/json"}),
        ("GET", "/console/api/calls", {"Cookie": "vr_console=guess"}),
    ]
    i = 0
    while time.monotonic() < until:
        method, path, headers = requests[i % len(requests)]
        seen[status_of(port, method, path, headers)] += 1
        if i % 7 == 0:
            with RawWebSocket(port) as ws:
                try:
                    ws.handshake("/phone/stream/guess")
                    seen["ws_accepted"] += 1
                except ConnectionError:
                    seen["ws_refused"] += 1
        i += 1


class Viewer(threading.Thread):
    """An authenticated event stream of one call, read until the server ends it."""

    def __init__(self, port: int, path: str, token: str) -> None:
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.bytes = 0

    def run(self) -> None:
        try:
            while chunk := self.response.read1(4096):
                self.bytes += len(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self.conn.close()
        self.join(5)


def test_console_hammering_beside_a_paced_call_loses_no_frame() -> None:
    app = ServedApp(args=["--console", "--phone"])
    app.env["VOICE_PUBLIC_URL"] = app.url  # reachable from outside: the token is needed
    with app:
        # serve printed both addresses, with the token (it is reachable from outside).
        found = re.search(r"console: (\S+)/console\?token=(\S+)", app.output)
        assert found is not None and found.group(1) == app.url, app.output
        assert f"phone: {app.url}/phone?token=" in app.output
        token = found.group(2)
        caller = PacedCaller(app.ws_url + "/voice")
        caller.start()
        assert caller.started.wait(10)
        deadline = time.monotonic() + 5
        while app.call_record(caller.call_sid)["bytes"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        rss_before, fds_before = app.rss_mb(), app.fd_count()
        # The operator's streams: at most MAX_VIEWERS at once, the rest refused at once.
        path = f"/console/api/calls/{caller.call_sid}/events"
        viewers = [Viewer(app.port, path, token) for _ in range(MAX_VIEWERS + 4)]
        statuses = Counter(v.status for v in viewers)
        assert statuses == {200: MAX_VIEWERS, 503: 4}, statuses
        for viewer in viewers:
            viewer.start()
        seen: Counter[int | str] = Counter()
        until = time.monotonic() + ATTACK_S
        attackers = [
            threading.Thread(target=hammer, args=(app.port, caller.call_sid, until, seen))
            for _ in range(ATTACKERS)
        ]
        try:
            for thread in attackers:
                thread.start()
            for thread in attackers:
                thread.join(ATTACK_S + 20)
        finally:
            caller.stop()
        assert_no_frame_lost(app, caller)
        # Every unauthenticated request was refused; none reached a page, a call or a stream.
        assert set(seen) <= {401, 403, "ws_refused"}, seen
        assert sum(n for k, n in seen.items() if k != "ws_refused") > 100, seen
        # The watched call's end closed its streams; they carried its events and levels.
        for viewer in viewers:
            viewer.close()
        assert all(v.bytes > 500 for v in viewers if v.status == 200)
        grown = app.rss_mb() - rss_before
        assert grown < 40, f"RSS grew {grown:.1f} MB"
        deadline = time.monotonic() + 5
        while app.fd_count() > fds_before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.fd_count() <= fds_before + 2, (app.fd_count(), fds_before)
        assert app.get_json("/health")["live_calls"] == 0
        assert app.stop() == 0
