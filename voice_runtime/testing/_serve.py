"""Serving a test double on a free 127.0.0.1 port: one way for every fake.

:func:`bind_free_socket` picks the port (known before serving starts), :func:`close_server`
stops an asyncio server within a bound, and :class:`FakeService` runs a fake in the current
event loop or on a thread with its own loop (``with fake:``/``async with fake:``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

T = TypeVar("T")

__all__ = ["FakeService", "bind_free_socket", "close_server", "free_port", "port_of"]


def bind_free_socket(host: str = "127.0.0.1", *, blocking: bool = False) -> socket.socket:
    """A listening TCP socket on a free port of ``host`` (asyncio servers want it non-blocking)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(2048)
        sock.setblocking(blocking)
    except BaseException:
        sock.close()
        raise
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A port of ``host`` free a moment ago (to know a server's public URL before it starts)."""
    with bind_free_socket(host, blocking=True) as sock:
        return port_of(sock)


def port_of(sock: socket.socket) -> int:
    """The port a socket is bound to."""
    return int(sock.getsockname()[1])


async def close_server(server: Any, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Stop listening and wait (at most ``timeout``) for ``server`` to close."""
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), timeout)


class FakeService:
    """A fake served in the running loop or in a thread with its own loop.

    Subclasses implement ``_start`` (listen on :func:`bind_free_socket`, set ``port``) and
    ``_stop`` (close every connection and stop listening).
    """

    host = "127.0.0.1"
    port = 0

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None

    async def start(self) -> Self:
        """Start serving in the running loop."""
        self.loop = asyncio.get_running_loop()
        await self._start()
        return self

    async def stop(self) -> None:
        """Stop serving and close every connection."""
        await self._stop()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self, timeout: float = 10.0) -> Self:
        """Start serving on a new event loop in a daemon thread."""
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            self._thread_stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            await self._thread_stop.wait()
            await self.stop()

        self._thread = threading.Thread(
            target=lambda: asyncio.run(main()), name=type(self).__name__, daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{type(self).__name__} did not start")
        if errors:
            raise RuntimeError(f"{type(self).__name__} failed to start") from errors[0]
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start_in_thread` and join its thread."""
        if self._thread is None or self.loop is None or self._thread_stop is None:
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._thread_stop.set)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop from another thread and return its result."""
        assert self.loop is not None, "server not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: what a client takes as its base URL."""
        return f"http://{self.host}:{self.port}"
