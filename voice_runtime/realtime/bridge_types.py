"""The realtime bridge's values: its options, its result, truncations and transcript lines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from voice_runtime.idle import IdlePolicy
from voice_runtime.playback import Segment
from voice_runtime.realtime.events import AgentError, Usage

__all__ = ["BridgeOptions", "BridgeResult", "TranscriptLine", "Truncation"]


@dataclass(frozen=True)
class BridgeOptions:
    """How the bridge behaves.

    * ``mark_every_ms``: None (default) keeps the transport's position marks (every 100 ms of
      audio, one owner and one granularity for every call: about 35 messages a second), so a
      truncation point is known to 100 ms; a smaller value asks the transport for finer marks
      (at most one per message it sends, 40 ms by default) at the cost of more messages.
      Sessions without a playback ledger (duck types) get a mark after every piece of this
      length (20 ms when None), as before.
    * ``hangup_on_fatal``: end the call (after queued audio plays) when the agent dies.
    * ``hangup_quiet_s`` / ``hangup_max_wait_s``: after ``end_call``, wait for the agent's
      goodbye (its next turn end, or this long without new audio; at most the max) before
      ending the call once that audio has played.
    * ``greeting_interruptible``: False makes the agent's first response (its greeting)
      uninterruptible: barge-in neither clears nor truncates it, and what the caller says
      over it still reaches the agent (``AgentBridge.protect_next_response`` does the same
      for a later response).
    * ``idle``: re-prompt a silent caller and hang up after the last prompt
      (:class:`~voice_runtime.idle.IdlePolicy`); counted once the agent's audio was heard,
      paused while a tool runs.
    """

    mark_every_ms: float | None = None
    hangup_on_fatal: bool = True
    start_agent: bool = True
    close_agent: bool = True
    hangup_quiet_s: float = 2.0
    hangup_max_wait_s: float = 15.0
    greeting_interruptible: bool = True
    idle: IdlePolicy | None = None


@dataclass(frozen=True)
class Truncation:
    """One barge-in truncation sent to the vendor."""

    item_id: str
    audio_end_ms: int
    played_ms: float


@dataclass(frozen=True)
class TranscriptLine:
    """A transcript for ``on_transcript``: who spoke, the text, and whether it is final."""

    role: Literal["user", "assistant"]
    text: str
    final: bool
    item_id: str | None = None


@dataclass(frozen=True)
class BridgeResult:
    """How a bridged call went.

    ``bad_messages`` counts the vendor messages the agent dropped as unusable, by reason.
    """

    provider: str
    reason: str  # call_ended, agent_closed, agent_failed, rejected
    duration_s: float
    usage: Usage
    error: AgentError | None = None
    barge_ins: int = 0
    truncations: tuple[Truncation, ...] = ()
    tool_calls: int = 0
    bad_messages: Mapping[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class AgentItem:
    """One assistant item's audio on the call's playback axis."""

    key: str
    item_id: str | None
    response_id: str | None
    start_ms: float  # session.queued_ms when its first audio was queued
    generation: int  # the session's clear generation then (a clear restarts the axis)
    queued_ms: float = 0.0
    done: bool = False
    protected: bool = False  # uninterruptible: barge-in neither clears nor truncates it

    def segment(self, played_ms: float) -> Segment:
        """This item on the playback axis when ``played_ms`` of the call has played."""
        return Segment.at(self.start_ms, self.queued_ms, played_ms)

    def heard_ms(self, played_ms: float) -> float:
        """What the caller heard of this item when ``played_ms`` of the call has played."""
        return self.segment(played_ms).heard_ms

    def fully_heard(self, played_ms: float) -> bool:
        """True when the item is complete and every byte of it has played."""
        return self.done and self.segment(played_ms).fully_heard
