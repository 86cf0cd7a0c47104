"""The ASGI side of the lean websocket protocol: the scope, ASGI ``send`` and the app task.

Each function works on one :class:`voice_runtime.transports.fastws.VoiceWebSocketProtocol`
connection, which calls them; the socket, the frames and the direct media channel stay there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_local_addr,
    get_remote_addr,
    is_ssl,
)

from voice_runtime.transports.wscodec import Request

if TYPE_CHECKING:
    from voice_runtime.transports.fastws import VoiceWebSocketProtocol

__all__ = ["EXTENSION", "asgi_send", "build_scope", "run_app"]

# uvicorn's own websocket protocols log app failures here; so do we.
logger = logging.getLogger("uvicorn.error")

EXTENSION = "voice_runtime.fastws"


def build_scope(ws: VoiceWebSocketProtocol, req: Request) -> dict[str, Any]:
    """The ASGI websocket scope of ``ws`` for its parsed upgrade request ``req``."""
    path, _, query = req.target.partition("?")
    subprotocols: list[str] = []
    for name, value in req.headers:
        if name == b"sec-websocket-protocol":
            subprotocols += [t.strip() for t in value.decode("latin-1").split(",") if t.strip()]
    root = ws.config.root_path
    return {
        "type": "websocket",
        "asgi": {"version": ws.config.asgi_version, "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "wss" if is_ssl(ws.transport) else "ws",
        "server": get_local_addr(ws.transport),
        "client": get_remote_addr(ws.transport),
        "root_path": root,
        "path": root + unquote(path),
        "raw_path": root.encode("ascii") + path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "headers": req.headers,
        "subprotocols": subprotocols,
        "state": ws.app_state.copy(),
        "extensions": {"websocket.http.response": {}, EXTENSION: {"stream": ws}},
    }


async def asgi_send(ws: VoiceWebSocketProtocol, message: dict[str, Any]) -> None:
    """ASGI send on ``ws``: accept, deny with an HTTP response, send messages or close."""
    kind = message["type"]
    if not ws._writable and not ws.disconnected:
        await ws.wait_writable()
    if ws.disconnected and ws.accepted:
        raise ClientDisconnected()
    if ws._denial is not None:
        if kind != "websocket.http.response.body":
            raise RuntimeError(f"expected 'websocket.http.response.body', got {kind!r}")
        ws._denial[2].append(message.get("body", b""))
        if not message.get("more_body", False):
            status, headers, parts = ws._denial
            ws._denial = None
            ws.close_sent = True
            ws._write_response(status, b"".join(parts), headers)
            ws._disconnected(1006)
            ws._close_transport()
        return
    if not ws.accepted:
        if ws.disconnected or ws.close_sent:
            raise ClientDisconnected()
        if kind == "websocket.accept":
            ws._accept(message)
        elif kind == "websocket.close":
            ws._deny_with_403()
        elif kind == "websocket.http.response.start":
            status = int(message["status"])
            if not 100 <= status < 600:
                raise RuntimeError(f"invalid HTTP status {status}")
            headers = [(bytes(n), bytes(v)) for n, v in message.get("headers") or []]
            ws._denial = (status, headers, [])
        else:
            raise RuntimeError(
                "expected 'websocket.accept', 'websocket.close' or "
                f"'websocket.http.response.start', got {kind!r}"
            )
        return
    if ws.close_sent:
        raise RuntimeError(f"unexpected ASGI message {kind!r} after 'websocket.close'")
    if kind == "websocket.send":
        data = message.get("bytes")
        if data is not None:
            ws.send_bytes(data)
        else:
            ws.send_text(message.get("text") or "")
    elif kind == "websocket.close":
        ws._send_close(int(message.get("code") or 1000), message.get("reason") or "")
        ws._disconnected(int(message.get("code") or 1000))
    else:
        raise RuntimeError(f"expected 'websocket.send' or 'websocket.close', got {kind!r}")


async def run_app(ws: VoiceWebSocketProtocol) -> None:
    """Run the ASGI app on ``ws`` to its end, then close the connection the way it ended."""
    close_code = 1000
    try:
        result = await ws.app(ws.scope, ws.receive, ws.send)
    except ClientDisconnected:
        pass
    except BaseException:
        logger.exception("Exception in ASGI application")
        close_code = 1011  # the peer must not take an app crash for a normal end
        if not ws.accepted and ws._denial is None and not ws.close_sent:
            ws.close_sent = True
            ws._write_response(500, b"Internal Server Error")
    else:
        if not ws.accepted and not ws.close_sent:
            logger.error("ASGI callable returned without completing the websocket handshake")
            ws.close_sent = True
            ws._write_response(500, b"Internal Server Error")
        elif result is not None:
            logger.error("ASGI callable should return None, but returned %r", result)
    code = ws.disconnect_code
    if ws.accepted and not ws.close_sent and not ws.disconnected:
        ws._send_close(close_code)
        code = close_code  # what a direct-channel on_close hears, as the peer does
    if ws._close_timer is None:
        ws._close_transport()
    ws._disconnected(code)
