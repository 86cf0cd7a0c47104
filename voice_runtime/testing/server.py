"""Run an ASGI app on a free 127.0.0.1 port, in a thread or in the current event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import uvicorn

from voice_runtime.serving import uvicorn_config
from voice_runtime.testing._serve import bind_free_socket


class _TestServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone: Ctrl-C still stops the test run."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install no signal handlers (uvicorn would in the main thread)."""
        yield


T = TypeVar("T")

__all__ = ["ServerThread", "serve_in_loop"]


class _Base:
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base HTTP URL of the server."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """Base websocket URL of the server."""
        return f"ws://{self.host}:{self.port}"


class ServerThread(_Base):
    """A uvicorn server on its own event loop in a background thread.

    Use as a context manager; ``stop()`` shuts the server down and joins the thread.
    """

    def __init__(
        self, app: Any, *, host: str = "127.0.0.1", log_level: str = "warning", **config: Any
    ) -> None:
        """``config``: more ``uvicorn.Config`` settings (``ws="auto"`` for uvicorn's websockets)."""
        self.app = app
        self.host = host
        self._sock = bind_free_socket(host)
        self.port = self._sock.getsockname()[1]
        self._server = _TestServer(uvicorn_config(app, log_level=log_level, **config))
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start serving; return once the server accepts connections."""
        self._thread = threading.Thread(target=self._run, name="voice-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("test server did not start")
        if self._error is not None:
            raise RuntimeError("test server failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.01)
        self._ready.set()
        await task

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tasks(self) -> list[str]:
        """Names of the tasks alive on the server's loop (besides uvicorn's own)."""

        async def _names() -> list[str]:
            me = asyncio.current_task()
            return sorted(t.get_name() for t in asyncio.all_tasks() if t is not me)

        return self.call(_names())

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down and join its thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _LoopServer(_Base):
    def __init__(self, host: str, port: int, server: uvicorn.Server) -> None:
        self.host = host
        self.port = port
        self.server = server


@contextlib.asynccontextmanager
async def serve_in_loop(
    app: Any, *, host: str = "127.0.0.1", log_level: str = "warning", **config: Any
) -> AsyncIterator[_LoopServer]:
    """Serve ``app`` in the running event loop for the duration of the block.

    ``config``: more ``uvicorn.Config`` settings (``ws="auto"`` for uvicorn's websockets).
    """
    sock = bind_free_socket(host)
    server = _TestServer(uvicorn_config(app, log_level=log_level, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]), name="voice-test-uvicorn")
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError("server stopped during startup")
            await asyncio.sleep(0.005)
        yield _LoopServer(host, sock.getsockname()[1], server)
    finally:
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)
        sock.close()
