"""Warm transfer: hand a caller to a human agent through a Twilio Conference.

:func:`warm_transfer` (and :func:`warm_transfer_async`) does, with the twilio SDK's TwiML and
REST client:

1. Moves the caller into a new conference: the live call gets ``<Dial><Conference>`` TwiML
   (``startConferenceOnEnter=false``, so the caller hears ``hold_music_url`` — Twilio's own
   hold music when None — until the agent is there; ``endConferenceOnExit=true``). This ends
   the bot's media stream: the bot has left the call.
2. Dials the agent into it (REST: conference participants create, ``label="agent"``,
   ``startConferenceOnEnter=true``, ``endConferenceOnExit=true``) and follows the
   participant's status until it is ``connected`` or ``timeout`` seconds have passed.
3. With a ``summary``: puts the caller on hold (participant ``hold``/``hold_url``), whispers
   the summary to the agent only (participant ``announce_url``, a ``<Say>`` served by the
   VoiceServer at ``{webhook_prefix}/whisper/{token}/say``, signed like every webhook), waits
   until Twilio fetched the ``<Redirect>`` at its end (the whisper was played), and takes the
   caller off hold: caller and agent talk.
4. When the agent does not answer (or declines), the caller's call is redirected to a fresh
   ``<Connect><Stream>`` route and the agent's leg is removed: the caller comes back to the bot
   as a new media stream of the same call, handled by ``on_call`` like any other, with the
   call's custom parameters plus ``transfer=no_answer``.

Phone numbers are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime._sync import forbid_on_loop
from voice_runtime.config import settings
from voice_runtime.transports.twilio_models import (
    MissingTwilioCredentialError,
    TwilioRestError,
    validate_sid,
)
from voice_runtime.transports.xml_text import xml_safe
from voice_runtime.urls import http_base

if TYPE_CHECKING:
    from collections.abc import Callable

    from voice_runtime.realtime.tools import Tool
    from voice_runtime.server import VoiceServer
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

AGENT_LABEL = "agent"
RETURN_PARAMETER = "transfer"
"""Custom parameter of the stream that brings the caller back (value ``no_answer``)."""
_WHISPER_TTL_S = 600.0

__all__ = [
    "AGENT_LABEL",
    "RETURN_PARAMETER",
    "TransferResult",
    "conference_twiml",
    "warm_transfer",
    "warm_transfer_async",
    "warm_transfer_tool",
    "whisper_answer",
]


@dataclass(frozen=True)
class TransferResult:
    """What :func:`warm_transfer` did.

    ``outcome``: "connected" (the agent answered; the caller is with them), "no_answer" (the
    caller is back with the bot on a new stream) or "caller_gone" (the caller hung up).
    """

    outcome: str
    conference_name: str
    conference_sid: str | None = None
    agent_call_sid: str | None = None
    whispered: bool = False

    @property
    def connected(self) -> bool:
        """Whether the caller now talks to the agent."""
        return self.outcome == "connected"


# --------------------------------------------------------------------------- whispers


@dataclass
class _Whisper:
    text: str
    voice: str | None
    expires_at: float
    played: threading.Event


class _WhisperBook:
    """The whispers a server serves, by one-time token (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, _Whisper] = {}

    def add(self, text: str, voice: str | None) -> tuple[str, threading.Event]:
        now = time.monotonic()
        token = secrets.token_urlsafe(18)
        played = threading.Event()
        with self._lock:
            for key in [k for k, w in self._items.items() if w.expires_at < now]:
                del self._items[key]
            self._items[token] = _Whisper(text, voice, now + _WHISPER_TTL_S, played)
        return token, played

    def get(self, token: str) -> _Whisper | None:
        with self._lock:
            item = self._items.get(token)
        return item if item is not None and item.expires_at >= time.monotonic() else None

    def drop(self, token: str) -> None:
        with self._lock:
            self._items.pop(token, None)


_BOOKS_LOCK = threading.Lock()


def _book(server: Any) -> _WhisperBook:
    with _BOOKS_LOCK:
        book = vars(server).get("_whisper_book")
        if book is None:
            book = _WhisperBook()
            server._whisper_book = book
        return book


def _whisper_url(server: VoiceServer, token: str, step: str) -> str:
    base = http_base(server._public_base())
    return f"{base}{server.webhook_prefix}/whisper/{token}/{step}"


def whisper_answer(server: Any, token: str, step: str) -> str | None:
    """The TwiML of a whisper webhook (``say`` or ``done``); None for an unknown token."""
    from twilio.twiml.voice_response import VoiceResponse

    item = _book(server).get(token)
    if item is None or step not in ("say", "done"):
        return None
    response = VoiceResponse()
    if step == "say":
        response.say(xml_safe(item.text), voice=item.voice)
        # Twilio fetches this only after the <Say> has played: the whisper's "mark".
        response.redirect(_whisper_url(server, token, "done"), method="POST")
    else:
        item.played.set()
    return str(response)


# --------------------------------------------------------------------------- TwiML


def conference_twiml(name: str, hold_music_url: str | None = None) -> str:
    """TwiML that puts a call into conference ``name``, waiting with hold music."""
    from twilio.twiml.voice_response import Dial, VoiceResponse

    response = VoiceResponse()
    dial = Dial()
    dial.conference(
        name,
        wait_url=hold_music_url,
        wait_method="GET" if hold_music_url else None,
        start_conference_on_enter=False,
        end_conference_on_exit=True,
        beep=False,
    )
    response.append(dial)
    return str(response)


# --------------------------------------------------------------------------- the transfer


def _rest_modules() -> tuple[Any, Any]:
    from voice_runtime.transports import twilio_control, twilio_twiml

    return twilio_control, twilio_twiml


def warm_transfer(
    server: VoiceServer,
    session: VoiceSession,
    agent: str,
    *,
    summary: str | None = None,
    hold_music_url: str | None = None,
    timeout: float = 30.0,
    whisper_timeout: float = 60.0,
    caller_id: str | None = None,
    voice: str | None = None,
    poll_interval: float = 0.5,
    client: Any = None,
) -> TransferResult:
    """Transfer the caller of ``session`` to ``agent`` (a number, ``client:`` or ``sip:``).

    Blocking (REST requests and waits; never on the event loop thread). ``timeout``: how
    long the agent may take to answer; ``summary``: whispered to the agent only before the
    two are joined; ``caller_id`` overrides TWILIO_PHONE_NUMBER for the agent's leg;
    ``poll_interval``: how often the agent's participant status is read. See the module
    docstring for the steps and :class:`TransferResult` for the outcome.
    """
    forbid_on_loop(session.loop, "warm_transfer", "warm_transfer_async")
    call_sid = validate_sid(session.call_sid or "")
    if not isinstance(agent, str) or not agent.strip():
        raise ValueError("agent must be a non-blank number, client: or sip: address")
    if summary is not None and not summary.strip():
        raise ValueError("summary must not be blank")
    if timeout <= 0 or poll_interval <= 0 or whisper_timeout <= 0:
        raise ValueError("timeout, whisper_timeout and poll_interval must be positive")
    from_ = caller_id or settings().twilio_phone_number
    if not from_:
        raise MissingTwilioCredentialError("TWILIO_PHONE_NUMBER", "Twilio phone number")
    control, _ = _rest_modules()
    name = f"vr-transfer-{secrets.token_hex(8)}"
    params = dict(session.call_info.custom_parameters) if session.call_info is not None else {}
    with control._sync_client(client) as rest:
        control.update_call(call_sid, twiml=conference_twiml(name, hold_music_url), client=rest)
        with control._rest_errors():
            participant = rest.conferences(name).participants.create(
                from_=from_,
                to=agent,
                label=AGENT_LABEL,
                start_conference_on_enter=True,
                # When the agent hangs up, the caller is not left alone in silence.
                end_conference_on_exit=True,
                beep="false",
                timeout=max(5, min(600, round(timeout))),
            )
        conference_sid = str(participant.conference_sid)
        agent_sid = str(participant.call_sid)
        extra = {"call_sid": call_sid, "conference": name, "agent_call_sid": agent_sid}
        logger.info("warm transfer: agent dialled", extra=extra)
        if _wait_for_agent(rest, conference_sid, agent_sid, timeout, poll_interval):
            whispered = False
            if summary is not None:
                whispered = _whisper(
                    server, rest, conference_sid, call_sid, agent_sid,
                    (summary, voice, hold_music_url, whisper_timeout),
                )  # fmt: skip
            logger.info("warm transfer: agent connected", extra=extra)
            return TransferResult("connected", name, conference_sid, agent_sid, whispered)
        # The caller leaves first: removing an end-on-exit agent ends the conference, and a
        # call still in it would end with it.
        outcome = _back_to_bot(server, rest, call_sid, params)
        _remove_agent(rest, conference_sid, agent_sid)
        logger.info("warm transfer: agent did not answer", extra={**extra, "outcome": outcome})
        return TransferResult(outcome, name, conference_sid, agent_sid)


def _wait_for_agent(
    rest: Any, conference_sid: str, agent_sid: str, timeout: float, poll_interval: float
) -> bool:
    """Whether the agent's participant reached ``connected`` within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = rest.conferences(conference_sid).participants(agent_sid).fetch().status
        except Exception as exc:
            if getattr(exc, "status", None) == 404:
                return False  # the leg ended (declined, busy, failed) and left the conference
            raise
        if status == "connected":
            return True
        if status in ("complete", "failed"):
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        # Twilio tells nothing else about a ringing leg; reading it is the cheap way to know.
        time.sleep(min(poll_interval, remaining))


def _whisper(
    server: VoiceServer,
    rest: Any,
    conference_sid: str,
    caller_sid: str,
    agent_sid: str,
    what: tuple[str, str | None, str | None, float],
) -> bool:
    """Hold the caller, play the summary to the agent, wait until played, unhold."""
    summary, voice, hold_music_url, whisper_timeout = what
    book = _book(server)
    token, played = book.add(summary, voice)
    participants = rest.conferences(conference_sid).participants
    try:
        hold: dict[str, Any] = {"hold": True}
        if hold_music_url:
            hold.update(hold_url=hold_music_url, hold_method="GET")
        participants(caller_sid).update(**hold)
        participants(agent_sid).update(
            announce_url=_whisper_url(server, token, "say"), announce_method="POST"
        )
        done = played.wait(whisper_timeout)
        if not done:
            logger.warning("warm transfer: whisper not confirmed in time")
        participants(caller_sid).update(hold=False)
        return done
    finally:
        book.drop(token)


def _remove_agent(rest: Any, conference_sid: str, agent_sid: str) -> None:
    try:
        rest.conferences(conference_sid).participants(agent_sid).delete()
    except Exception as exc:
        if getattr(exc, "status", None) != 404:  # already gone is what we wanted
            logger.warning(
                "warm transfer: agent leg not removed", extra={"error": type(exc).__name__}
            )


def _back_to_bot(server: VoiceServer, rest: Any, call_sid: str, params: dict[str, str]) -> str:
    control, twiml = _rest_modules()
    parameters = {**params, RETURN_PARAMETER: "no_answer"}
    route = server.new_route(parameters=parameters, call_sid=call_sid)
    xml = twiml.build_route_stream_xml(
        server._public_base(), route.token, parameters=route.parameters, path=server.path
    )
    try:
        control.update_call(call_sid, twiml=xml, client=rest)
    except TwilioRestError as exc:
        if exc.code == 21220:  # the call is over: the caller hung up while waiting
            return "caller_gone"
        raise
    return "no_answer"


async def warm_transfer_async(
    server: VoiceServer, session: VoiceSession, agent: str, **options: Any
) -> TransferResult:
    """Async twin of :func:`warm_transfer` (same keywords).

    Runs in a worker thread that finishes the transfer even when the awaiting handler is
    cancelled (the caller must never be left in a conference nobody watches).
    """
    return await asyncio.to_thread(warm_transfer, server, session, agent, **options)


# --------------------------------------------------------------------------- realtime agents

# Transfers started by tools: kept referenced until done (the tool answers at once).
_BACKGROUND: set[asyncio.Future[TransferResult]] = set()


def warm_transfer_tool(
    server: VoiceServer,
    agent: str,
    *,
    name: str = "transfer_to_human",
    description: str | None = None,
    wait_for_playback_s: float = 5.0,
    on_result: Callable[[TransferResult], None] | None = None,
    **options: Any,
) -> Tool:
    """A realtime-agent tool that warm-transfers the caller to ``agent`` (a configured one).

    The model passes a ``summary`` for the agent (whispered to them alone). The tool lets the
    agent's queued words be heard (up to ``wait_for_playback_s``), starts the transfer and
    answers ``{"status": "transferring"}`` at once; ``on_result`` gets the
    :class:`TransferResult` when it is done. ``options`` go to :func:`warm_transfer`.
    """
    from voice_runtime.realtime.tools import Tool, ToolContext

    if not isinstance(agent, str) or not agent.strip():
        raise ValueError("agent must be a non-blank number, client: or sip: address")

    async def transfer_to_human(context: ToolContext, summary: str = "") -> dict[str, str]:
        session = context.session
        if session is None or not session.call_sid:
            return {"error": "transfer is not available: no live call"}
        if session.agent_audio_pending and not session.is_disconnected:
            try:  # the caller hears "let me connect you" before the line changes
                await session.send_mark_and_wait_async("vr-warm-transfer", wait_for_playback_s)
            except TimeoutError:
                pass
        kwargs = dict(options)
        if summary.strip():
            kwargs["summary"] = summary
        future = asyncio.ensure_future(warm_transfer_async(server, session, agent, **kwargs))
        _BACKGROUND.add(future)
        future.add_done_callback(lambda done: _transfer_done(done, on_result))
        return {"status": "transferring"}

    return Tool(
        name=name,
        description=description
        or (
            "Transfer the caller to a human colleague. Tell the caller first. Pass a short "
            "summary of the call for the colleague; only they hear it."
        ),
        parameters={
            "type": "object",
            "properties": {"summary": {"type": "string", "description": "for the colleague"}},
        },
        handler=transfer_to_human,
        timeout=wait_for_playback_s + 5.0,
    )


def _transfer_done(
    done: asyncio.Future[TransferResult], on_result: Callable[[TransferResult], None] | None
) -> None:
    _BACKGROUND.discard(done)
    if done.cancelled():
        return
    error = done.exception()
    if error is not None:
        logger.error("warm transfer failed", extra={"error": type(error).__name__})
        return
    if on_result is not None:
        try:
            on_result(done.result())
        except Exception:
            logger.exception("warm transfer on_result callback failed")
