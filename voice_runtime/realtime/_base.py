"""Shared machinery of the websocket vendors: connect, read, send, close, emit events.

A vendor module subclasses :class:`WebSocketAgent` and fills in the URL, headers, the
handshake it sends, and one handler for each decoded JSON message. The base class owns the
socket and the event queue and keeps the promises of the agent protocol: idempotent calls,
nothing raised after close, a fatal :class:`AgentError` then :class:`SessionClosed` when the
vendor drops the socket.

Vendor messages are untrusted input. A handler reads fields through :func:`obj_field`,
:func:`str_field`, :func:`id_field` and :func:`list_field`, which raise
:class:`MalformedMessage` on a wrong type; the message is then dropped, counted in
:attr:`WebSocketAgent.bad_messages` and logged as one warning line (the first of each kind,
then one in a thousand), never as a traceback, and the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from voice_runtime.errors import (
    ConfigurationError,
    ProtocolError,
    ProviderConnectionError,
    ProviderError,
    is_retryable_status,
)
from voice_runtime.logutil import LogLimiter, redacting_ws_logger
from voice_runtime.realtime.agent import AgentOptions
from voice_runtime.realtime.events import AgentError, AgentEvent, SessionClosed, SessionOpened

logger = logging.getLogger(__name__)
_WS_LOGGER = redacting_ws_logger("websockets.client")

DEFAULT_CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Vendor error text reaches AgentError and exceptions: bounded, whatever the vendor sends.
MAX_ERROR_CHARS = 300
# Close codes blaming the client: protocol error, unsupported or invalid data, policy, too big.
_CLIENT_FAULT_CODES = frozenset({1002, 1003, 1007, 1008, 1009})

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "MAX_ERROR_CHARS",
    "MalformedMessage",
    "VendorFatal",
    "WebSocketAgent",
    "count_field",
    "deep_merge",
    "id_field",
    "list_field",
    "obj_field",
    "str_field",
]


class VendorFatal(ProviderError):
    """Raised by a message handler when the session cannot go on (never retryable)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message, retryable=False, code=code)


class MalformedMessage(ProtocolError, ValueError):
    """A vendor message field has the wrong type or content; the message is dropped.

    ``field`` names the field (a path the code chose, never vendor text); ``problem`` is
    ``wrong_type``, ``bad_base64`` or ``bad_value``.
    """

    def __init__(self, field: str, problem: str = "wrong_type") -> None:
        super().__init__(f"{problem}: {field}")
        self.field = field
        self.problem = problem


def obj_field(msg: Mapping[str, Any], key: str, *alias: str) -> dict[str, Any]:
    """``msg[key]`` (or the first alias present) as an object; {} when absent or null."""
    value = _get(msg, key, alias)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedMessage(key)
    return value


def str_field(msg: Mapping[str, Any], key: str, *alias: str) -> str:
    """``msg[key]`` (or the first alias present) as a string; "" when absent or null."""
    value = _get(msg, key, alias)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedMessage(key)
    return value


def id_field(msg: Mapping[str, Any], key: str) -> str | None:
    """An identifier: a non-empty string, or None when absent, null or empty."""
    return str_field(msg, key) or None


def list_field(msg: Mapping[str, Any], key: str, *alias: str) -> list[Any]:
    """``msg[key]`` (or the first alias present) as a list; [] when absent or null."""
    value = _get(msg, key, alias)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MalformedMessage(key)
    return value


def count_field(msg: Mapping[str, Any], key: str, where: str) -> int:
    """A token count: a non-negative number (0 when absent); ``where`` names it in errors."""
    value = msg.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedMessage(where)
    if not (math.isfinite(value) and value >= 0):
        raise MalformedMessage(where)
    return int(value)


def _get(msg: Mapping[str, Any], key: str, alias: tuple[str, ...]) -> Any:
    value = msg.get(key)
    for other in alias:
        if value is not None:
            break
        value = msg.get(other)
    return value


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``base`` recursively (``extra`` wins; None deletes a key)."""
    for key, value in extra.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        elif isinstance(value, Mapping):
            base[key] = deep_merge({}, value)
        else:
            base[key] = value
    return base


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebSocketAgent:
    """Base class of the websocket realtime agents (see the module docstring)."""

    provider: ClassVar[str] = ""
    supports_truncate: ClassVar[bool] = False

    def __init__(
        self,
        options: AgentOptions | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        allow_insecure: bool = False,
    ) -> None:
        self.options = options or AgentOptions()
        self.connect_timeout = connect_timeout
        self.allow_insecure = allow_insecure
        self.session_id: str | None = None
        self._ws: ClientConnection | None = None
        self._state = "new"
        self._closing = False
        self._events: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._start_task: asyncio.Future[None] | None = None
        self._finished = False
        self._opened = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # A vendor decides how many bad messages it sends: count all, log a few.
        self._bad = LogLimiter(first=1, every=1000)

    # ------------------------------------------------------------------ subclass hooks

    def _url(self) -> str:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        return {}

    async def _resolve_url(self) -> str:
        """The URL to open; vendors that fetch a signed URL override this."""
        return self._url()

    async def _on_connected(self) -> None:
        """Send the handshake (setup/session config) right after the socket opens."""

    async def _after_ready(self) -> None:
        """Run once the vendor confirmed the session (e.g. ask for the greeting)."""

    async def _handle(self, msg: dict[str, Any], received_at: float) -> None:
        raise NotImplementedError

    def _message_kind(self, msg: dict[str, Any]) -> str:
        """The kind of a message for counting (from a fixed set, never raw vendor text)."""
        return ""

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        """True once the session has ended."""
        return self._state == "closed"

    @property
    def is_open(self) -> bool:
        """True while the session is configured and usable."""
        return self._state == "open"

    @property
    def bad_messages(self) -> dict[str, int]:
        """How many vendor messages were dropped as unusable, by reason."""
        return dict(self._bad.counts)

    def _bad_message(self, reason: str) -> None:
        """Count one unusable vendor message; log the first of each reason, then rarely."""
        if self._bad.allow(reason):
            logger.warning(
                "unusable vendor message dropped",
                extra={
                    "provider": self.provider,
                    "reason": reason,
                    "count": self._bad.count(reason),
                },
            )

    def _malformed(self, msg: dict[str, Any], exc: MalformedMessage) -> None:
        kind = self._message_kind(msg)
        where = f"{kind}.{exc.field}" if kind and exc.field != kind else exc.field
        self._bad_message(f"{exc.problem}:{where}")

    def _emit(self, event: AgentEvent) -> None:
        if not self._finished:
            self._events.put_nowait(event)

    def _mark_ready(self, session_id: str | None = None) -> None:
        """Called by a handler when the vendor confirmed the session."""
        if session_id:
            self.session_id = session_id
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(None)
            self._opened = True
            self._emit(SessionOpened(self.provider, self.session_id))

    def _fail_handshake(self, exc: ProviderError) -> None:
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(exc)

    @property
    def _handshaking(self) -> bool:
        return self._ready is not None and not self._ready.done()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect and configure the session (idempotent; a no-op after close)."""
        if self._state == "closed" or self._state == "open":
            return
        if self._start_task is None:
            self._start_task = asyncio.ensure_future(self._start())
        task = self._start_task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and (me is None or not me.cancelling()):
                raise ProviderConnectionError(
                    "session closed while starting", provider=self.provider
                ) from None
            raise

    async def _start(self) -> None:
        self._state = "starting"
        self._loop = asyncio.get_running_loop()
        try:
            url = await self._resolve_url()
            self._check_transport_security(url)
            ws = await self._open(url)
        except BaseException:
            self._finish("connect failed", None)
            raise
        self._ws = ws
        self._ready = self._loop.create_future()
        # Read the outcome even when nobody awaits it any more (no "never retrieved" noise).
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._reader = asyncio.create_task(self._read_loop(ws), name=f"vr-rt-{self.provider}-read")
        try:
            await self._on_connected()
            await asyncio.wait_for(asyncio.shield(self._ready), self.connect_timeout)
        except TimeoutError:
            await self._abort()
            raise ProviderConnectionError(
                "vendor did not confirm the session in time", provider=self.provider
            ) from None
        except BaseException:
            await self._abort()
            raise
        if self._state == "closed":
            raise ProviderConnectionError("session closed during setup", provider=self.provider)
        self._state = "open"
        logger.info(
            "realtime session open", extra={"provider": self.provider, "session": self.session_id}
        )
        await self._after_ready()

    async def _open(self, url: str) -> ClientConnection:
        try:
            return await connect(
                url,
                additional_headers=self._headers() or None,
                logger=_WS_LOGGER,  # websockets logs handshake headers: never the key
                open_timeout=self.connect_timeout,
                max_size=MAX_MESSAGE_BYTES,
                compression=None,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=CLOSE_TIMEOUT_S,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ProviderError(
                f"vendor refused the websocket (HTTP {status})",
                provider=self.provider,
                retryable=is_retryable_status(status),
                status=status,
            ) from exc
        except InvalidURI as exc:
            raise ConfigurationError(f"{self.provider}: invalid realtime URL") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ProviderConnectionError(
                f"cannot connect: {type(exc).__name__}", provider=self.provider
            ) from exc

    def _check_transport_security(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme == "wss" or self.allow_insecure or _is_loopback(parts.hostname):
            return
        raise ConfigurationError(
            f"{self.provider}: refusing to send credentials over plain {parts.scheme}:// to a "
            f"non-loopback host; use wss:// or pass allow_insecure=True"
        )

    async def _read_loop(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        reason, code = "closed", None
        try:
            async for raw in ws:
                received_at = loop.time()
                try:
                    msg = json.loads(raw)
                except ValueError:
                    self._bad_message("not_json")
                    continue
                if not isinstance(msg, dict):
                    self._bad_message("not_an_object")
                    continue
                try:
                    await self._handle(msg, received_at)
                except VendorFatal as exc:
                    reason = str(exc)
                    self._report_fatal(str(exc), exc.code, retryable=False)
                    self._closing = True
                    with contextlib.suppress(Exception):
                        await ws.close(1000)
                    break
                except MalformedMessage as exc:
                    self._malformed(msg, exc)
                except Exception:
                    # A bug of ours, not the vendor's: the traceback matters, but only once.
                    if self._bad.allow("handler_failed"):
                        logger.exception(
                            "vendor message handling failed", extra={"provider": self.provider}
                        )
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            code = ws.close_code
            if not self._closing:
                reason = "connection lost"
                detail = ws.close_reason or ""
                message = f"vendor closed the connection (code {code}) {detail}".strip()
                # Codes that say "your request was wrong" will not get better by retrying.
                retryable = code not in _CLIENT_FAULT_CODES and not (code or 0) >= 4000
                self._report_fatal(message, "connection_lost", retryable=retryable)
            self._finish(reason, code)

    def _report_fatal(self, message: str, code: str | None, *, retryable: bool) -> None:
        if self._handshaking:
            cls_err: ProviderError
            if retryable:
                cls_err = ProviderConnectionError(message, provider=self.provider)
            else:
                cls_err = ProviderError(message, provider=self.provider, code=code)
            self._fail_handshake(cls_err)
            return
        logger.warning("realtime session failed", extra={"provider": self.provider, "code": code})
        self._emit(
            AgentError(message, fatal=True, code=code, retryable=retryable, provider=self.provider)
        )

    def _finish(self, reason: str, code: int | None) -> None:
        if self._finished:
            return
        self._state = "closed"
        if self._opened:
            self._events.put_nowait(SessionClosed(self.provider, reason, code))
        self._finished = True
        self._events.put_nowait(None)
        self._fail_handshake(
            ProviderConnectionError("session closed during setup", provider=self.provider)
        )
        logger.info("realtime session closed", extra={"provider": self.provider, "code": code})

    async def _abort(self) -> None:
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1000), CLOSE_TIMEOUT_S)
        await self._stop_reader()
        self._finish("aborted", None)

    async def _stop_reader(self) -> None:
        reader = self._reader
        if reader is None or reader is asyncio.current_task():
            return
        if not reader.done():
            try:
                await asyncio.wait_for(asyncio.shield(reader), CLOSE_TIMEOUT_S)
            except (TimeoutError, Exception):
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader

    async def close(self) -> None:
        """End the session (idempotent)."""
        if self._state == "new":
            self._finish("closed before start", None)
            return
        self._closing = True
        start = self._start_task
        if start is not None and not start.done():
            start.cancel()
            with contextlib.suppress(BaseException):
                await start
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(1000), CLOSE_TIMEOUT_S)
        await self._stop_reader()
        self._finish("closed by client", ws.close_code if ws is not None else None)

    # ------------------------------------------------------------------ I/O

    async def _send(self, obj: Mapping[str, Any]) -> bool:
        """Send one JSON message; False (never an exception) when the session is gone."""
        ws = self._ws
        if ws is None or self._state == "closed" or self._closing:
            return False
        try:
            await ws.send(json.dumps(obj, separators=(",", ":")))
        except ConnectionClosed:
            return False
        except websockets.exceptions.WebSocketException:
            logger.warning("vendor send failed", extra={"provider": self.provider})
            return False
        return True

    async def events(self) -> AsyncIterator[AgentEvent]:
        """The session's events until it closes."""
        queue = self._events
        while True:
            event = await queue.get()
            if event is None:
                queue.put_nowait(None)  # later iterators end at once too
                return
            yield event
