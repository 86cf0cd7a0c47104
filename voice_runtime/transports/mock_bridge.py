"""Loopback stand-in for Twilio: place a "call" against a local server without telephony.

Built on :class:`~voice_runtime.testing.simulator.CallerSimulator`, so the far end speaks the
real Media Streams protocol: ``connected``, a full ``start``, mark echoes and ``stop``.
Selected with ``TRANSPORT=mock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Literal
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from uuid import uuid4

import httpx

from voice_runtime.config import settings
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.urls import http_scheme, to_ws, ws_base

logger = logging.getLogger(__name__)

__all__ = [
    "FakeWsBridge",
    "cleanup_bridges",
    "create_text_relay",
    "initiate_mock_call",
    "is_mock_transport",
]

_relay_url_by_peer: dict[str, str] = {}
_active_bridges: list[FakeWsBridge] = []


class _StreamUrl(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.url = ""
        self.parameters: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k.lower(): v or "" for k, v in attrs}
        if tag.lower() == "stream" and not self.url:
            self.url = values.get("url", "").strip()
        elif tag.lower() == "parameter" and values.get("name"):
            self.parameters[values["name"]] = values.get("value", "")


def _default_voice_url(base_url: str) -> str:
    return ws_base(base_url) + "/voice"


def _parse_twiml(twiml: str) -> tuple[str, dict[str, str]]:
    parser = _StreamUrl()
    with contextlib.suppress(Exception):
        parser.feed(twiml)
    return to_ws(parser.url) if parser.url else "", parser.parameters


def _inject_url(stream_url: str) -> str:
    parts = urlsplit(stream_url)
    scheme = http_scheme(parts.scheme)
    if parts.path.startswith("/voice/"):
        token = unquote(parts.path.removeprefix("/voice/"))
        path = "/test/inject/" + quote(token, safe="")
    else:
        path = "/test/inject"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class FakeWsBridge:
    """A simulated Twilio leg in a background thread: connects, echoes marks, sends stop."""

    def __init__(
        self,
        call_sid: str | None = None,
        *,
        parameters: dict[str, str] | None = None,
        playback: Literal["realtime", "instant"] = "instant",
    ) -> None:
        self.call_sid = call_sid or f"CAMOCK{uuid4().hex[:26]}"
        self.parameters = dict(parameters or {})
        self.playback = playback
        self.simulator: CallerSimulator | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._connected = threading.Event()

    def start(self, ws_url: str) -> None:
        """Connect to ``ws_url`` in a background thread."""
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(ws_url),), daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Block until the stream has started; False on timeout."""
        return self._connected.wait(timeout)

    async def _run(self, ws_url: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        sim = CallerSimulator(
            ws_url, call_sid=self.call_sid, parameters=self.parameters, playback=self.playback
        )
        self.simulator = sim
        try:
            await sim.connect()
            self._connected.set()
            closed = asyncio.create_task(sim.wait_closed(timeout=24 * 3600))
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (closed, stopped):
                task.cancel()
        except Exception:
            logger.warning("mock bridge could not connect", exc_info=True)
        finally:
            await sim.hangup()
            self._connected.set()

    def stop(self) -> None:
        """Hang up (sends ``stop``) and join the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def initiate_mock_call(target_url: str, caller_url: str | None = None) -> str:
    """Place a mock call: POST the target's ``/incoming`` webhook and dial the TwiML's stream.

    A second bridge connects to the caller's own ``/voice`` (``caller_url`` or
    VOICE_STREAM_URL) so marks echo on that side too. Returns the fake call SID.
    """
    call_sid = f"CAMOCK{uuid4().hex[:26]}"
    resp = httpx.post(
        f"{target_url.rstrip('/')}/incoming",
        data={"CallSid": call_sid, "From": "+10000000000", "To": "+10000000001"},
        timeout=10.0,
    )
    resp.raise_for_status()
    stream_url, parameters = _parse_twiml(resp.text)
    stream_url = stream_url or _default_voice_url(target_url)
    _relay_url_by_peer[target_url.rstrip("/")] = _inject_url(stream_url)
    target = FakeWsBridge(call_sid, parameters=parameters)
    target.start(stream_url)
    _active_bridges.append(target)
    own = caller_url or settings().voice_stream_url
    if own:
        mine = FakeWsBridge(call_sid)
        mine.start(_default_voice_url(own))
        _active_bridges.append(mine)
    else:
        logger.warning("no caller_url or VOICE_STREAM_URL: marks will not echo on the caller side")
    logger.info("mock call placed", extra={"call_sid": call_sid})
    return call_sid


def create_text_relay(peer_url: str) -> Callable[[str], None]:
    """Return an ``on_spoken`` callback that POSTs each spoken text to the peer's inject URL."""
    key = peer_url.rstrip("/")

    def relay(text: str) -> None:
        url = _relay_url_by_peer.get(key, f"{key}/test/inject")
        try:
            # One short request per text: no client left open when the relay is dropped.
            httpx.post(url, json={"text": text}, timeout=10.0).raise_for_status()
        except httpx.HTTPError:
            logger.warning("text relay to the peer failed", exc_info=True)

    return relay


def cleanup_bridges() -> None:
    """Stop every bridge this process started."""
    while _active_bridges:
        _active_bridges.pop().stop()


def is_mock_transport() -> bool:
    """True when TRANSPORT=mock."""
    return settings().transport.lower() == "mock"
