"""Run a VoiceServer: in the foreground with a graceful drain, or on a background thread.

:func:`serve_forever` runs a :class:`~voice_runtime.server.VoiceServer` under uvicorn in the
main thread and drains it on SIGTERM/SIGINT *before* uvicorn closes the sockets (uvicorn's own
shutdown ends live websockets with 1012 before the app's lifespan shutdown runs).
:class:`BackgroundVoiceServer` runs one in a background thread, for sync scripts that place
calls. Both serve with :class:`~voice_runtime.transports.guard.ConnectionLimits`: header and
body read timeouts, a connection limit above ``max_calls``, a bounded close and a frame
budget per websocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from voice_runtime.config import settings
from voice_runtime.logutil import configure_logging, guard_server_logs
from voice_runtime.transports.guard import ConnectionLimits, connection_cap, guarded_http_protocol

if TYPE_CHECKING:
    from voice_runtime.server import VoiceServer

logger = logging.getLogger(__name__)

__all__ = ["BackgroundVoiceServer", "ConnectionLimits", "serve_forever", "uvicorn_config"]


class _DrainingUvicorn(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the VoiceServer, then exits cleanly."""

    def __init__(self, config: uvicorn.Config, voice: VoiceServer) -> None:
        super().__init__(config)
        self.voice = voice
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's handler: that one re-raises the signal after shutdown, so a drained
        # server would still die of SIGTERM instead of exiting 0.
        loop = self._loop
        if loop is None or self._drain_requested:
            # Before startup, or a second signal: stop now.
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        self._drain_requested = True
        loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self._drain_task is None:
            logger.info("shutdown requested: draining live calls")
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        from voice_runtime.transports.fastws import SHUTDOWN_GRACE_S

        # uvicorn's shutdown then gives each connection up to SHUTDOWN_GRACE_S to close before
        # aborting it: keep that inside drain_timeout, so the process exits within it.
        total = self.voice.drain_timeout
        try:
            await self.voice.drain(max(total - SHUTDOWN_GRACE_S, total / 2))
        finally:
            self.should_exit = True


def _http_class(http: Any) -> Any:
    """uvicorn's HTTP protocol class for an ``http`` setting, or None when it is not one."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string
    from uvicorn.protocols.http.h11_impl import H11Protocol

    guardable: tuple[type, ...] = (H11Protocol,)
    with contextlib.suppress(ImportError):
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        guardable += (HttpToolsProtocol,)
    if isinstance(http, str):
        if http not in ("auto", "h11", "httptools"):
            return None
        http = import_from_string(HTTP_PROTOCOLS[http])
    if isinstance(http, type) and issubclass(http, guardable):
        return http
    return None


def uvicorn_config(
    app: Any,
    *,
    ws: Any = None,
    limits: ConnectionLimits | None = None,
    max_calls: int | None = None,
    **kwargs: Any,
) -> uvicorn.Config:
    """A ``uvicorn.Config`` for ``app`` with the websocket settings media streams want.

    ``ws`` defaults to :class:`~voice_runtime.transports.fastws.VoiceWebSocketProtocol`;
    pass ``"auto"`` (or any uvicorn ``ws`` value) for uvicorn's own protocols. ``limits``
    (default :class:`ConnectionLimits()`) applies to uvicorn's h11/httptools protocols and to
    the lean websocket protocol; the default connection limit follows ``max_calls``.
    """
    from voice_runtime.transports.fastws import VoiceWebSocketProtocol

    limits = limits or ConnectionLimits()
    kwargs.setdefault("lifespan", "on")
    kwargs.setdefault("ws_max_size", 1 << 20)
    # No permessage-deflate: base64 audio barely compresses, and zlib on every 20 ms frame
    # was the largest single cost per call in benchmarks/bench_calls.py.
    kwargs.setdefault("ws_per_message_deflate", False)
    kwargs.setdefault("ws_ping_interval", limits.ws_ping_interval_s)
    kwargs.setdefault("ws_ping_timeout", limits.ws_ping_timeout_s)
    http = kwargs.pop("http", "auto")
    base = _http_class(http)
    if base is not None:
        http = guarded_http_protocol(base, limits, connection_cap(limits, max_calls))
    if ws is None:
        ws = VoiceWebSocketProtocol.with_limits(limits)
    guard_server_logs()  # uvicorn logs request paths and peer-triggered warnings
    return uvicorn.Config(app, ws=ws, http=http, **kwargs)


def _uvicorn_config(
    voice: VoiceServer,
    host: str,
    port: int,
    log_level: str,
    limits: ConnectionLimits | None,
    **extra: Any,
) -> uvicorn.Config:
    # uvicorn's own X-Forwarded-* handling is off: VoiceServer honours those headers itself,
    # only from its trusted proxy networks (it needs the real peer address to tell).
    return uvicorn_config(
        voice.app,
        host=host,
        port=port,
        log_level=log_level,
        proxy_headers=False,
        limits=limits,
        max_calls=voice.max_calls,
        **extra,
    )


def serve_forever(
    voice: VoiceServer,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_level: str = "info",
    limits: ConnectionLimits | None = None,
    log_format: str | None = None,
) -> None:
    """Serve ``voice`` until SIGTERM/SIGINT, then drain live calls and return (blocking).

    ``port`` defaults to VOICE_SERVER_PORT. A second signal stops at once. Raises
    ConfigurationError before binding when signatures are enforced and no public URL is set.
    ``limits``: connection timeouts and limits (default :class:`ConnectionLimits()`).
    ``log_format`` ("text" or "json"): log every logger at ``log_level`` to stderr in that
    format, each line with its call's SIDs (None: uvicorn's logging setup, as before).
    """
    voice.check_config()
    port = settings().voice_server_port if port is None else port
    extra: dict[str, Any] = {}
    if log_format is not None:
        configure_logging(log_level, log_format)
        extra["log_config"] = None
    config = _uvicorn_config(voice, host, port, log_level, limits, **extra)
    _DrainingUvicorn(config, voice).run()


class BackgroundVoiceServer:
    """A VoiceServer served by uvicorn on its own thread; ``stop()`` drains it first.

    ``port=0`` picks a free port (read it from :attr:`port` after :meth:`start`). ``limits``:
    connection timeouts and limits (default :class:`ConnectionLimits()`).
    """

    def __init__(
        self,
        voice: VoiceServer,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        limits: ConnectionLimits | None = None,
    ) -> None:
        self.voice = voice
        self.host = host
        config = _uvicorn_config(voice, host, port, log_level, limits)
        self._server = _DrainingUvicorn(config, voice)
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> BackgroundVoiceServer:
        """Start serving; return once the server accepts connections (idempotent)."""
        if self._thread is not None:
            return self
        server = self._server
        self._thread = threading.Thread(target=server.run, name="voice-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the voice server failed to start (is the port in use?)")
            if time.monotonic() >= deadline:
                raise TimeoutError("the voice server did not start")
            time.sleep(0.01)
        if self.port == 0:
            self.port = server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Drain live calls (unless ``drain=False``), stop the server and join its thread."""
        server, thread = self._server, self._thread
        if thread is None:
            return
        loop = server._loop
        if drain and loop is not None and thread.is_alive():
            wait = (self.voice.drain_timeout if timeout is None else timeout) + 5.0
            future = asyncio.run_coroutine_threadsafe(self.voice.drain(timeout), loop)
            with contextlib.suppress(Exception):
                future.result(wait)
        server.should_exit = True
        thread.join(10.0)
        self._thread = None

    def __enter__(self) -> BackgroundVoiceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
