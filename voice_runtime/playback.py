"""The playback ledger: what of the agent's audio was queued, sent and heard (sans-I/O).

No asyncio, no threads, no clock: the session and the transport call it on the event loop
and it answers with plain values. It owns

* the order of outbound marks relative to the audio queued before them (``after``);
* clear generations: a ``clear`` starts a new generation, and echoes of marks sent before it
  never count as heard;
* three positions on one axis, in milliseconds of μ-law audio: ``queued_ms`` (handed to the
  session), ``sent_ms`` (handed to the far end) and ``played_ms`` (confirmed by mark echoes);
* mark names: user marks ``f"{name}__{8 hex}"`` (the 0.1.x wire form), position marks
  ``vr~pos~{generation}~{ms}`` and end-of-call marks ``vr~end~{generation}~0``, and the
  parsing of their echoes;
* position-mark granularity: one owner (the transport asks :meth:`PlaybackLedger.position_due`
  after each message it sends), one setting (``mark_every_ms``);
* uninterruptible audio: while protection is open (:meth:`PlaybackLedger.protect_begin`) the
  audio queued extends ``protected_ms``; a barge-in clear is skipped while any of it is unheard.

:class:`Segment` is what the caller heard of one utterance; TTS ``speak`` results and the
realtime bridge both compute it with :meth:`Segment.at`.
"""

from __future__ import annotations

import collections
import uuid
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_MARK_EVERY_MS",
    "END_PREFIX",
    "POSITION_PREFIX",
    "Echo",
    "MarkStatus",
    "OutboundClear",
    "OutboundMark",
    "PlaybackLedger",
    "Segment",
    "parse_echo",
    "user_mark_name",
]

POSITION_PREFIX = "vr~pos~"
END_PREFIX = "vr~end~"
DEFAULT_MARK_EVERY_MS = 100.0
# A forged echo must not move playback past what was sent; this absorbs the 3-decimal rounding.
_SLACK_MS = 0.001

MarkStatus = Literal["played", "cleared", "disconnected", "timeout"]


@dataclass(eq=False)
class OutboundMark:
    """A mark handed to the transport, in order with the audio around it."""

    name: str
    after: int  # outbound chunks queued before this mark
    internal: bool = False
    sent_ms: float = 0.0
    generation: int = 0


class OutboundClear:
    """The transport should send a ``clear`` now."""

    __slots__ = ()


CLEAR = OutboundClear()


@dataclass(frozen=True)
class Segment:
    """One utterance on the playback axis: where it started, how long it is, what was heard."""

    start_ms: float
    audio_ms: float
    heard_ms: float
    interrupted: bool = False

    @classmethod
    def at(
        cls, start_ms: float, audio_ms: float, played_ms: float, *, interrupted: bool = False
    ) -> Segment:
        """The segment of ``audio_ms`` queued at ``start_ms`` when ``played_ms`` has played."""
        heard = min(max(played_ms - start_ms, 0.0), audio_ms)
        return cls(start_ms, audio_ms, heard, interrupted)

    @property
    def fully_heard(self) -> bool:
        """True when every millisecond of the segment has played (half a millisecond slack)."""
        return self.heard_ms >= self.audio_ms - 0.5

    @property
    def heard_fraction(self) -> float:
        """The share of the segment heard, 0.0 for an empty one."""
        return self.heard_ms / self.audio_ms if self.audio_ms else 0.0


@dataclass(frozen=True)
class Echo:
    """A parsed mark echo: ``kind`` is position, end, user or bad (unparseable internal mark)."""

    kind: Literal["position", "end", "user", "bad"]
    generation: int = 0
    ms: float = 0.0


_USER = Echo("user")
_BAD = Echo("bad")


def user_mark_name(mark_name: str) -> str:
    """The wire name of a user mark: ``f"{mark_name}__{8 hex chars}"``, unique per send."""
    return f"{mark_name}__{uuid.uuid4().hex[:8]}"


def parse_echo(name: str) -> Echo:
    """Classify an echoed mark name; internal names carry their generation and position."""
    if name.startswith(POSITION_PREFIX):
        kind: Literal["position", "end"] = "position"
    elif name.startswith(END_PREFIX):
        kind = "end"
    else:
        return _USER
    try:
        _, _, gen, ms = name.split("~")
        return Echo(kind, int(gen), float(ms))
    except ValueError:
        return _BAD if kind == "position" else Echo("end", -1, 0.0)


class PlaybackLedger:
    """Marks, clears and positions of one call's agent audio; see the module docstring."""

    __slots__ = (
        "clear_pending",
        "every_ms",
        "generation",
        "mark_every_ms",
        "marks",
        "played_ms",
        "protected_ms",
        "protecting",
        "queued_ms",
        "sent_ms",
        "_requested_ms",
        "last_position_ms",
    )

    def __init__(self, mark_every_ms: float = DEFAULT_MARK_EVERY_MS) -> None:
        self.mark_every_ms = mark_every_ms
        #: The granularity in force: the transport's ``mark_every_ms`` or a finer request.
        self.every_ms = mark_every_ms
        self.marks: collections.deque[OutboundMark] = collections.deque()
        self.clear_pending = 0
        self.generation = 0
        self.sent_ms = 0.0
        self.played_ms = 0.0
        self.queued_ms = 0.0
        self.last_position_ms = 0.0
        self._requested_ms = 0.0
        #: End of the uninterruptible audio on the playback axis, and how many protections
        #: are open (audio queued while one is open is uninterruptible).
        self.protected_ms = 0.0
        self.protecting = 0

    def reset(self) -> None:
        """Forget everything for the next call (the transport's granularity is kept)."""
        self.marks.clear()
        self.clear_pending = 0
        self.generation = 0
        self.sent_ms = self.played_ms = self.queued_ms = 0.0
        self.protected_ms = 0.0
        self.protecting = 0
        self.last_position_ms = 0.0
        self._requested_ms = 0.0
        self.every_ms = self.mark_every_ms

    # ------------------------------------------------------------------ queueing

    def note_queued(self, nbytes: int) -> None:
        """Record ``nbytes`` of μ-law agent audio queued for sending."""
        self.queued_ms += nbytes / 8.0

    def queue_mark(self, mark: OutboundMark, after: int) -> None:
        """Queue ``mark`` behind the ``after`` chunks queued so far."""
        mark.after = after
        self.marks.append(mark)

    def end_mark(self) -> OutboundMark:
        """A mark whose echo ends the call once the audio queued before it has played."""
        return OutboundMark(f"{END_PREFIX}{self.generation}~0", 0, internal=True)

    def request_granularity(self, every_ms: float) -> None:
        """Ask for position marks at least every ``every_ms`` in this call (finest wins)."""
        if every_ms > 0 and (not self._requested_ms or every_ms < self._requested_ms):
            self._requested_ms = every_ms
        self._update_every()

    def set_mark_every(self, every_ms: float) -> None:
        """Set the transport's position-mark granularity (a finer request still wins)."""
        self.mark_every_ms = every_ms
        self._update_every()

    def _update_every(self) -> None:
        requested = self._requested_ms
        self.every_ms = (
            requested if requested and requested < self.mark_every_ms else self.mark_every_ms
        )

    # ------------------------------------------------------------------ sending

    def next_mark(self, taken: int) -> OutboundMark | None:
        """The next mark whose audio has all been taken (``taken`` chunks), handed out; or None."""
        marks = self.marks
        if marks and marks[0].after <= taken:
            mark = marks.popleft()
            self.hand_out(mark)
            return mark
        return None

    def hand_out(self, mark: OutboundMark) -> None:
        """Stamp ``mark`` with the position and generation it is sent at."""
        mark.sent_ms = self.sent_ms
        mark.generation = self.generation
        self.last_position_ms = self.sent_ms

    def note_sent(self, nbytes: int) -> None:
        """Record ``nbytes`` of μ-law agent audio sent to the far end."""
        self.sent_ms += nbytes / 8.0

    def position_due(self, idle: bool) -> bool:
        """True when a position mark should follow the audio just sent.

        Due every ``mark_every_ms`` of sent audio, and when the audio ran out (``idle``) so the
        end of an utterance is always confirmed.
        """
        since = self.sent_ms - self.last_position_ms
        return since >= self.every_ms or (idle and since > 0.0)

    def position_name(self) -> str:
        """Name of a mark whose echo moves ``played_ms`` to the audio sent so far."""
        self.last_position_ms = self.sent_ms
        return f"{POSITION_PREFIX}{self.generation}~{self.sent_ms:.3f}"

    def take_clear(self) -> bool:
        """True (once per burst of requests) when the transport should send a ``clear``."""
        if self.clear_pending:
            self.clear_pending = 0
            self.last_position_ms = self.sent_ms
            return True
        return False

    # ------------------------------------------------------------------ clearing

    def clear(self, *, send: bool) -> list[OutboundMark]:
        """Start a new generation; return the marks not yet sent (they will never play).

        Sent and queued positions fall back to what was played; with ``send`` the transport
        is asked for a ``clear`` (only while a stream is up).
        """
        self.generation += 1
        marks = list(self.marks)
        self.marks.clear()
        self.sent_ms = self.queued_ms = self.protected_ms = self.played_ms
        self.last_position_ms = self.sent_ms
        if send:
            self.clear_pending += 1
        return marks

    # ------------------------------------------------------------------ uninterruptible audio

    def protect_begin(self) -> None:
        """Audio queued from now on (until :meth:`protect_end`) is uninterruptible."""
        self.protecting += 1

    def protect_end(self) -> None:
        """Close one :meth:`protect_begin`."""
        self.protecting = max(0, self.protecting - 1)

    def protect_through(self, ms: float) -> None:
        """Audio up to ``ms`` on the playback axis is uninterruptible."""
        self.protected_ms = max(self.protected_ms, ms)

    def uninterruptible_pending(self) -> bool:
        """True while uninterruptible audio may still be queued or is not yet heard."""
        return self.protecting > 0 or self.protected_ms > self.played_ms + 0.5

    # ------------------------------------------------------------------ echoes

    def echo(self, name: str) -> Echo:
        """Apply the echo of an internal mark to ``played_ms``; return what the name was."""
        echo = parse_echo(name)
        # A forged echo must not move playback past what was sent ("inf", "nan", 1e300).
        if (
            echo.kind in ("position", "end")
            and echo.generation == self.generation
            and echo.ms <= self.sent_ms + _SLACK_MS
        ):
            self.played_ms = max(self.played_ms, echo.ms)
        return echo

    def mark_played(self, mark: OutboundMark | None) -> bool:
        """Apply the echo of a user mark; False when a clear discarded its audio."""
        if mark is not None and mark.generation == self.generation:
            self.played_ms = max(self.played_ms, mark.sent_ms)
            return True
        return False

    # ------------------------------------------------------------------ reading

    def segment(self, start_ms: float, audio_ms: float, *, interrupted: bool = False) -> Segment:
        """What was heard of ``audio_ms`` queued at ``start_ms``, as of the last echo."""
        return Segment.at(start_ms, audio_ms, self.played_ms, interrupted=interrupted)

    def unconfirmed(self) -> bool:
        """True while sent audio has not been confirmed played."""
        return self.sent_ms > self.played_ms + 0.5
