"""The console's picture of the server's calls, kept from the call event stream.

:class:`CallBoard` subscribes to ``server.events`` and keeps, per live call, a small card
(state, turns, turn latency) and its recent events; ended calls stay on the board for a while
so an operator sees how they ended. Everything is bounded: events per call, ended calls kept.
:class:`LevelTap` gives the caller and agent audio levels of a call someone is watching.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from voice_runtime.audio import ulaw_decode
from voice_runtime.events import (
    AGENT_AUDIO_QUEUED,
    BARGE_IN,
    CALL_ENDED,
    CALL_STARTED,
    CALLER_SPEECH_ENDED,
    CALLER_SPEECH_STARTED,
    DTMF,
    ERROR,
    TRANSCRIPT_COMMITTED,
    TURN_LATENCY,
    CallEvent,
)

if TYPE_CHECKING:
    from voice_runtime.server import VoiceServer
    from voice_runtime.session import VoiceSession

__all__ = ["CallBoard", "CallCard", "LevelTap"]

EVENTS_PER_CALL = 400
ENDED_KEPT = 20
LATENCIES_KEPT = 50
# A live card whose call the registry no longer knows is closed after this long without events
# (a call that ended without its call_ended event must not stay "live" forever).
STALE_S = 30.0

_STATE_BY_KIND = {
    CALL_STARTED: "connected",
    CALLER_SPEECH_STARTED: "caller speaking",
    BARGE_IN: "caller speaking",
    CALLER_SPEECH_ENDED: "thinking",
    TRANSCRIPT_COMMITTED: "thinking",
    AGENT_AUDIO_QUEUED: "agent speaking",
}


@dataclass
class CallCard:
    """What the console shows for one call."""

    call_sid: str
    started_t: float
    started_wall: float
    direction: str = ""
    source: str = "twilio"
    state: str = "connected"
    ended_t: float | None = None
    end_reason: str = ""
    turns: int = 0
    latencies_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCIES_KEPT)
    )
    barge_ins: int = 0
    errors: int = 0
    dtmf: int = 0
    last_event_t: float = 0.0
    events: collections.deque[CallEvent] = field(
        default_factory=lambda: collections.deque(maxlen=EVENTS_PER_CALL)
    )

    def apply(self, event: CallEvent) -> None:
        """Update the card with one of its call's events."""
        self.events.append(event)
        self.last_event_t = event.t
        kind = event.kind
        if kind == TURN_LATENCY:
            total = event.data.get("total_ms")
            if isinstance(total, int | float) and math.isfinite(total):
                self.turns += 1
                self.latencies_ms.append(float(total))
        elif kind == BARGE_IN:
            self.barge_ins += 1
        elif kind == ERROR:
            self.errors += 1
        elif kind == DTMF:
            self.dtmf += 1
        elif kind == CALL_ENDED:
            self.ended_t = event.t
            self.end_reason = str(event.data.get("reason", ""))
            self.state = "ended"
            return
        self.state = _STATE_BY_KIND.get(kind, self.state)

    def row(self, now: float, session: VoiceSession | None) -> dict[str, Any]:
        """The card as a JSON-ready row of the calls table (no call content)."""
        state = self.state
        if state == "agent speaking" and session is not None:
            ledger = session.port.ledger
            if ledger.queued_ms - ledger.played_ms < 40.0:  # its last audio has been heard
                state = "listening"
        lat = list(self.latencies_ms)
        end = self.ended_t if self.ended_t is not None else now
        return {
            "call_sid": self.call_sid,
            "direction": self.direction,
            "source": self.source,
            "state": state,
            "live": self.ended_t is None,
            "started": self.started_wall,
            "duration_s": round(max(0.0, end - self.started_t), 1),
            "end_reason": self.end_reason,
            "turns": self.turns,
            "last_turn_ms": round(lat[-1]) if lat else None,
            "mean_turn_ms": round(sum(lat) / len(lat)) if lat else None,
            "barge_ins": self.barge_ins,
            "dtmf": self.dtmf,
            "errors": self.errors,
        }


class CallBoard:
    """Live and recently ended calls of one server, from its event stream."""

    def __init__(self, server: VoiceServer) -> None:
        self.server = server
        self.live: dict[str, CallCard] = {}
        self.ended: collections.OrderedDict[str, CallCard] = collections.OrderedDict()
        self._unsubscribe = server.events.subscribe(self._on_event)

    def close(self) -> None:
        """Stop listening to the server's events."""
        self._unsubscribe()

    def _on_event(self, event: CallEvent) -> None:
        sid = event.call_sid
        if not sid:
            return  # server-wide (draining)
        card = self.live.get(sid)
        if card is None:
            if event.kind != CALL_STARTED:
                return
            card = self._new_card(event)
            self.live[sid] = card
        card.apply(event)
        if card.ended_t is not None:
            del self.live[sid]
            self.ended[sid] = card
            self.ended.move_to_end(sid)
            while len(self.ended) > ENDED_KEPT:
                self.ended.popitem(last=False)

    def _new_card(self, event: CallEvent) -> CallCard:
        card = CallCard(event.call_sid, event.t, event.wall)
        session = self.server.registry.by_call_sid(event.call_sid)
        info = session.call_info if session is not None else None
        if info is not None:
            params = info.custom_parameters
            card.direction = str(params.get("direction", ""))[:16]
            if params.get("caller") == "browser-phone":
                card.source = "browser phone"
        return card

    def card(self, call_sid: str) -> CallCard | None:
        """The card of a live or recently ended call."""
        return self.live.get(call_sid) or self.ended.get(call_sid)

    def rows(self) -> list[dict[str, Any]]:
        """The calls table: live calls first (newest first), then the recently ended."""
        now = time.monotonic()
        registry = self.server.registry
        for sid, card in list(self.live.items()):
            if registry.by_call_sid(sid) is None and now - card.last_event_t > STALE_S:
                card.ended_t, card.state, card.end_reason = now, "ended", "unknown"
                del self.live[sid]
                self.ended[sid] = card
        live = sorted(self.live.values(), key=lambda c: -c.started_t)
        ended = sorted(self.ended.values(), key=lambda c: -(c.ended_t or 0.0))
        return [c.row(now, registry.by_call_sid(c.call_sid)) for c in (*live, *ended)]


class LevelTap:
    """Audio levels of one call while the console watches it (a session mixer tap).

    Installed with ``session.set_mixer`` only while a viewer watches; it keeps the bytes since
    the last reading (at most one second per side) and forwards to a mixer already set.
    """

    CAP = 8000
    WINDOW_S = 0.08

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self._read_at = 0.0
        self._levels = {"caller": 0.0, "agent": 0.0}
        self._caller = bytearray()
        self._agent = bytearray()
        self.viewers = 0

    def write_caller(self, data: bytes) -> None:
        """A caller frame (event loop thread)."""
        if len(self._caller) < self.CAP:
            self._caller += data
        if self.inner is not None:
            self.inner.write_caller(data)

    def write_agent(self, data: bytes) -> None:
        """An agent chunk as it is sent (event loop thread)."""
        if len(self._agent) < self.CAP:
            self._agent += data
        if self.inner is not None:
            self.inner.write_agent(data)

    def read(self) -> dict[str, float]:
        """RMS levels (0..1) of each side over the last reading window.

        Viewers of the same call share a window: one reading within ``WINDOW_S`` of the last
        gets the same levels (each reading would otherwise see only the bytes since another's).
        """
        now = time.monotonic()
        if now - self._read_at < self.WINDOW_S:
            return self._levels
        self._read_at = now
        self._levels = {"caller": _rms(self._caller), "agent": _rms(self._agent)}
        self._caller.clear()
        self._agent.clear()
        return self._levels

    @classmethod
    def watch(cls, session: VoiceSession) -> LevelTap:
        """The session's tap, installed on first use; one more viewer."""
        tap = session._mixer
        if not isinstance(tap, LevelTap):
            tap = cls(tap)
            session.set_mixer(tap)
        tap.viewers += 1
        return tap

    def unwatch(self, session: VoiceSession) -> None:
        """One viewer fewer; the last one restores the session's own mixer."""
        self.viewers -= 1
        if self.viewers <= 0 and session._mixer is self:
            session.set_mixer(self.inner)


def _rms(ulaw: bytearray) -> float:
    if not ulaw:
        return 0.0
    pcm = ulaw_decode(bytes(ulaw)).astype(np.float32) / 32768.0
    return round(float(np.sqrt(np.mean(pcm * pcm))), 4)
