"""Per-call wiring of the server layer: what a call needs beyond moving frames.

A media stream (:class:`~voice_runtime.transports.twilio_ws.MediaStreamCall`) only moves
frames. When a stream starts, :class:`CallWiring` builds the session's STT in a worker thread
(the loop serves other calls meanwhile; the handler starts once it is set) from
``stt_factory`` (wrapped in an :class:`~voice_runtime.stt_tee.SttTee` when
``stt_secondary_factory`` is set), calls ``on_stt_ready(stt)`` and starts it on
``session.inbound``; it installs :class:`~voice_runtime.transports.call_control.CallControl`
on ``session.control``; its ``hangup`` ends a call over the Twilio REST API (through
``twilio_ws.hangup_call``, the 0.1.x patch point). After the call it stops the STT and drops
one built from the factory, so the next call gets a new one. ``VoiceServer`` and
``register_voice_websocket`` both use it; ``VoiceServer(stt=...)`` reaches every session
through :func:`stt_factory_for` and the ``stt_factory`` argument here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from voice_runtime._compat import maybe_await
from voice_runtime._sync import cancel_and_wait
from voice_runtime.errors import ConfigurationError, MissingCredentialError
from voice_runtime.events import attach
from voice_runtime.logutil import describe_error

__all__ = [
    "CallWiring",
    "build_stt",
    "hangup_call_now",
    "make_stt",
    "rest_hangup",
    "start_stt",
    "stt_factory_for",
]

logger = logging.getLogger(__name__)

STT_STOP_TIMEOUT_S = 5.0


def hangup_call_now() -> Callable[..., Any]:
    """``twilio_ws.hangup_call`` when a test replaced it, else ``twilio_call.hangup_call``.

    monkeypatch's undo leaves behind the function it read from ``twilio_call``; that is no
    replacement, so a later patch of ``twilio_call.hangup_call`` still takes effect.
    """
    from voice_runtime.transports import twilio_call, twilio_ws

    replaced = vars(twilio_ws).get("hangup_call")
    code = getattr(replaced, "__code__", None)
    genuine = code is not None and (code.co_name, code.co_filename) == (
        "hangup_call",
        twilio_call.__file__,
    )
    return twilio_call.hangup_call if replaced is None or genuine else replaced


def rest_hangup(regions: Any) -> Callable[[str], Awaitable[bool]] | None:
    """A coroutine function that ends a call over REST, or None without credentials."""
    from voice_runtime.config import settings

    cfg = settings()
    if regions is None and not (cfg.twilio_account_sid and cfg.twilio_auth_token):
        return None

    async def hangup(call_sid: str) -> bool:
        hangup_call = hangup_call_now()
        if regions is None:
            await asyncio.to_thread(hangup_call, call_sid)
        else:
            await asyncio.to_thread(hangup_call, call_sid, regions=regions)
        return True

    return hangup


def stt_factory_for(
    stt: str | Sequence[str] | Callable[[], Any] | None,
) -> Callable[[], Any] | None:
    """A factory of STT providers from a provider name, a fallback list of names, or a factory.

    An unknown name fails here, when the server is built, not on the first call. A list
    (``["elevenlabs", "offline"]``) gives every call its own fallback chain (``create_stt``).
    """
    if stt is None or callable(stt):
        return stt
    from voice_runtime.stt import create_stt, get_stt_class

    if isinstance(stt, (list, tuple)):
        # Names only: a provider object in the list would be shared by every call.
        if not stt or not all(isinstance(name, str) for name in stt):
            raise ConfigurationError("an stt fallback list must hold provider names")
        for name in stt:
            get_stt_class(name)
        names = list(stt)

        def create_chain() -> Any:
            return create_stt(names)

        return create_chain
    if not isinstance(stt, str):
        raise ConfigurationError("stt must be a provider name, a list of names, a factory or None")

    cls = get_stt_class(stt)

    def create() -> Any:
        return cls()

    return create


def make_stt(session: Any) -> Any:
    """A new STT from the session's factories (an SttTee with a secondary); any thread."""
    primary = session.stt_factory()
    secondary = getattr(session, "stt_secondary_factory", None)
    if secondary is not None:
        from voice_runtime.stt_tee import SttTee

        return SttTee(primary, secondary())
    return primary


def build_stt(session: Any) -> tuple[Any, bool]:
    """The session's STT, built from its factories when it has none; (stt, built_here)."""
    if getattr(session, "stt", None) is not None or session.stt_factory is None:
        return getattr(session, "stt", None), False
    session.stt = make_stt(session)
    return session.stt, True


def bind_stt(session: Any, stt: Any) -> None:
    """Tell an STT that reports to its call (a fallback chain's switches) which call it is."""
    bind = getattr(stt, "bind_session", None)
    if callable(bind):
        bind(session)


def stt_ready(session: Any, stt: Any) -> None:
    """Call the session's ``on_stt_ready(stt)``; a failing callback is logged."""
    bind_stt(session, stt)
    ready = getattr(session, "on_stt_ready", None)
    if callable(ready):
        try:
            ready(stt)
        except Exception:
            logger.exception("on_stt_ready callback failed")


async def start_stt(stt: Any, inbound: Any, call_sid: Any) -> None:
    """Start the call's STT; a failure is logged and reported to its ``on_error``.

    The call goes on. A missing key is reported as ``auth_error``, what the vendor answered
    an empty key with in 0.1.x, so code that watches ``on_error`` still hears of it.
    """
    try:
        await maybe_await(stt.start(inbound))
    except Exception as exc:
        logger.exception(
            "STT failed to start: %s", describe_error(exc), extra={"call_sid": call_sid}
        )
        on_error = getattr(stt, "on_error", None)
        if callable(on_error):
            reason = "auth_error" if isinstance(exc, MissingCredentialError) else "start_failed"
            try:
                on_error(reason)
            except Exception:
                logger.exception("STT on_error callback failed", extra={"call_sid": call_sid})


async def stop_stt(session: Any, built_here: bool) -> None:
    """Stop the session's STT (bounded); drop it when it was built for this call."""
    stt: Any = getattr(session, "stt", None)
    if not callable(getattr(stt, "stop", None)):
        return
    try:
        await asyncio.wait_for(maybe_await(stt.stop()), STT_STOP_TIMEOUT_S)
    except Exception:
        call_sid = getattr(session, "call_sid", None)
        logger.warning(
            "STT stop failed",
            exc_info=True,
            extra={"call_sid": call_sid if isinstance(call_sid, str) else None},
        )
    if built_here:
        session.stt = None


class CallWiring:
    """The wiring of one call on a real :class:`~voice_runtime.session.VoiceSession`.

    Pass :attr:`hangup`, :meth:`on_start` and :meth:`finish` (as ``on_end``) to the
    ``MediaStreamCall``; await :meth:`finish` again after its ``run()`` (a no-op by then).
    """

    def __init__(
        self,
        session: Any,
        hangup_regions: Any = None,
        *,
        stt_factory: Callable[[], Any] | None = None,
        in_thread: bool = True,
    ) -> None:
        self.session = session
        self.in_thread = in_thread  # build the STT in a worker thread (False: on the loop)
        # The server's STT, unless the session brings its own (its STT or its factory).
        if stt_factory is not None and session.stt is None and session.stt_factory is None:
            session.stt_factory = stt_factory
        self.hangup = rest_hangup(hangup_regions)
        self._built_stt = False
        self._finished = False
        self._tasks: list[asyncio.Task[Any]] = []
        if session.control is None:
            from voice_runtime.transports.call_control import CallControl

            session.control = CallControl(session)

    def on_start(self, then: Callable[[Any], Any] | None = None) -> Callable[[Any], Any]:
        """The stream's ``on_start``: start the STT, then run ``then(session)``."""

        def started(session: Any) -> Any:
            if self.in_thread and session.stt is None and session.stt_factory is not None:
                task = asyncio.create_task(self._build_then_start(then), name="vr-stt-build")
                self._tasks.append(task)
                return None
            stt, self._built_stt = build_stt(session)
            if stt is not None:
                self._start(stt)
            return then(session) if then is not None else None

        return started

    def _start(self, stt: Any) -> None:
        attach(stt, self.session.port.events)
        task = asyncio.create_task(self._ready_then_start(stt), name="vr-stt-start")
        self._tasks.append(task)

    async def _build_then_start(self, then: Callable[[Any], Any] | None) -> None:
        # A factory may load a model (the offline STT: hundreds of ms), so it runs in a worker
        # thread and the loop keeps serving other calls. This call's audio waits meanwhile in
        # its bounded inbound queue; the handler starts once session.stt is set, as before.
        session = self.session
        try:
            # A failing factory is logged there; the call goes on without speech recognition.
            stt = await session.port.callbacks.call(make_stt, session, what="stt_factory")
        except asyncio.CancelledError:
            # The call ended during the build: its handler still runs (and sees the end).
            if then is not None:
                then(session)
            raise
        # Set here, on the loop: a build that the end of the call overtook leaves no STT behind.
        if stt is not None and session.stt is None and not self._finished:
            session.stt, self._built_stt = stt, True
            self._start(stt)
        if then is not None:
            await maybe_await(then(session))

    async def _ready_then_start(self, stt: Any) -> None:
        # on_stt_ready runs off the loop (it is user code) and before the STT starts, so the
        # handlers it attaches see the first transcript.
        session = self.session
        bind_stt(session, stt)
        ready = getattr(session, "on_stt_ready", None)
        if callable(ready):
            await session.port.callbacks.call(ready, stt, what="on_stt_ready")
        await start_stt(stt, session.inbound, session.call_sid)

    async def finish(self, _session: Any = None) -> None:
        """Stop the call's STT and every task the wiring started (once)."""
        if self._finished:
            return
        self._finished = True
        await stop_stt(self.session, self._built_stt)
        self._built_stt = False
        await cancel_and_wait(self._tasks)
