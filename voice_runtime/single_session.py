"""The 0.1.x entry point: ``register_voice_websocket(app, session)``, one session, one call.

It is a thin :class:`~voice_runtime.server.VoiceServer`: one session, at most one call at a
time (a second stream gets 1013), no webhooks, no lifespan hooks, ``{path}`` served without a
route token and ``{path}/{token}`` with any token. It registers the 0.1.x route shape: the
``{path}/{token}`` route first, then ``{path}`` added last through ``app.websocket(path)``
with an endpoint that takes just the websocket (tests capture it from that decorator). A
session object that is not a :class:`~voice_runtime.session.VoiceSession` (a mock, a fake) is
served with the calls 0.1.x made (:class:`~voice_runtime._duck_call.DuckSessionCall`).
``voice_runtime.transports.twilio_ws.register_voice_websocket`` is this function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, WebSocket

from voice_runtime._callbacks import CallbackRunner
from voice_runtime._compat import is_voice_session
from voice_runtime._duck_call import DuckSessionCall
from voice_runtime.call_wiring import rest_hangup
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.transports.twilio_ws import StreamOptions

__all__ = ["SingleSessionServer", "register_voice_websocket"]

logger = logging.getLogger(__name__)


class SingleSessionServer(VoiceServer):
    """A :class:`VoiceServer` for one given session (see the module doc)."""

    # One call at a time, and 0.1.x code reads session.stt as soon as the stream connects:
    # the STT is built on the loop as it was.
    _stt_in_thread = False

    def __init__(
        self,
        app: Any,
        session: Any,
        *,
        path: str = "/voice",
        options: StreamOptions | None = None,
        hangup_regions: Any = None,
    ) -> None:
        if hangup_regions is not None:
            from voice_runtime.transports import twilio_call

            hangup_regions = twilio_call.validate_regions(hangup_regions)
        self.session = session
        super().__init__(
            app=app,
            session_factory=lambda: session,
            path=path,
            max_calls=1,
            allow_unrouted_streams=True,
            stream_options=options,
            hangup_regions=hangup_regions,
        )
        # No lifespan here to shut a pool down: the session's callbacks use the loop's executor.
        self.callbacks = CallbackRunner(loop_executor=True)

    async def _new_session(self) -> Any:
        return self.session  # the one given session: no user code to run

    def _wrap_lifespan(self, app: FastAPI) -> None:
        # 0.1.x added no startup or shutdown work to the user's app.
        return

    def _install(self, app: FastAPI) -> None:
        async def websocket_endpoint(websocket: WebSocket) -> None:
            await self._serve_stream(websocket, None)

        app.add_api_websocket_route(self.path + "/{token}", self._routed_endpoint)
        # Added last, with app.websocket(path), and taking just the websocket, as in 0.1.x.
        app.websocket(self.path)(websocket_endpoint)

    async def _routed_endpoint(self, websocket: WebSocket, token: str) -> None:
        # One session: the token names no route here (0.1.x served any token).
        await self._serve_stream(websocket, None)

    async def _run_call(self, websocket: Any, session: Any, expected: str | None) -> None:
        if is_voice_session(session):
            await super()._run_call(websocket, session, expected)
            return
        await DuckSessionCall(websocket, session, rest_hangup(self.hangup_regions)).run()


def register_voice_websocket(
    app: FastAPI,
    session: VoiceSession | None = None,
    *,
    hangup_regions: Any = None,
    path: str = "/voice",
    options: StreamOptions | None = None,
    session_factory: Callable[[], VoiceSession] | None = None,
    on_call: Callable[[VoiceSession], Any] | None = None,
) -> Any:
    """Serve Twilio media streams at ``path`` and ``{path}/{token}``.

    With ``session``: the single-session form of the 0.1.x package, one call at a time; a
    second stream that arrives while a call is live is refused (close code 1013); returns
    None, as 0.1.x did.
    With ``session_factory`` and/or ``on_call`` instead: every stream gets its own session,
    and the :class:`~voice_runtime.server.VoiceServer` that serves them is returned.
    """
    if session is None:
        return VoiceServer(
            app=app,
            on_call=on_call,
            session_factory=session_factory or VoiceSession,
            path=path,
            stream_options=options,
            hangup_regions=hangup_regions,
        )
    SingleSessionServer(app, session, path=path, options=options, hangup_regions=hangup_regions)
    return None
