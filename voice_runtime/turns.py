"""Turn-taking: when the caller's turn ended, and when a barge-in was a false alarm.

Three small, sans-I/O pieces (no asyncio, no threads, no clock of their own):

* :func:`looks_unfinished` and :class:`EndOfTurn`: a lexical end-of-turn heuristic. After an
  utterance that ends in a conjunction ("and", "but", "so"), a filler ("um"), a preposition
  or article, a comma, or a number being read out, the caller is probably not done, so the
  silence that ends the turn is longer (``unfinished_silence_ms``) than after a finished one
  (``silence_ms``).
* The prosodic cue (``EndOfTurn(prosody=True)``): an utterance whose pitch ends with a
  continuation rise (:func:`voice_runtime.audio.pitch.final_contour`, "I'd like a pizza, ...")
  counts as unfinished too, unless its text ends with a question mark (a yes/no question
  rises and is finished).
* :class:`TurnJoiner`: joins the utterances a VAD cut into one caller turn on the stream
  clock: an utterance that looks unfinished is held until either more speech comes (the two
  are transcribed together) or the longer silence ran out. The offline STT uses it; a
  benchmark drives it with synchronous transcription.
* :func:`pause_playback` / :func:`resume_playback` / :func:`discard_paused`: a tentative
  barge-in stops playback at once but keeps the unheard rest (bounded in bytes), so the agent
  resumes from the unheard point when the interruption turns out to be noise or a backchannel
  (see :class:`~voice_runtime.providers.bargein.BargeIn`'s ``resume_after_ms``).
"""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from voice_runtime.audio.pitch import ends_rising

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

__all__ = [
    "EndOfTurn",
    "SentTail",
    "TurnJoiner",
    "discard_paused",
    "ends_with_rise",
    "looks_unfinished",
    "pause_playback",
    "resume_playback",
]

# Words after which a caller who pauses is usually still mid-sentence.
_CONTINUATIONS = frozenset(
    [
        "and",
        "but",
        "so",
        "or",
        "nor",
        "because",
        "cause",
        "since",
        "although",
        "though",
        "while",
        "whereas",
        "if",
        "unless",
        "until",
        "then",
        "also",
        "plus",
        "um",
        "uh",
        "er",
        "erm",
        "uhm",
        "like",
        "the",
        "a",
        "an",
        "my",
        "your",
        "our",
        "their",
        "to",
        "of",
        "for",
        "with",
        "from",
        "at",
        "in",
        "on",
        "by",
        "about",
        "into",
        "onto",
        "than",
        "as",
        "is",
        "are",
        "was",
        "were",
        "am",
        "be",
        "been",
        "which",
        "whose",
        "where",
        "whether",
        "i",
        "i'm",
        "let's",
    ]
)
# Words that finish a sentence even though a continuation word ends it ("I think so").
_FINISHING_PAIRS = frozenset(
    {("think", "so"), ("hope", "so"), ("guess", "so"), ("believe", "so"), ("not", "so")}
)
_NUMBER_WORDS = frozenset(
    [
        "zero",
        "oh",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
        "thirty",
        "forty",
        "fifty",
        "sixty",
        "seventy",
        "eighty",
        "ninety",
        "hundred",
        "thousand",
        "double",
        "triple",
    ]
)
_NUMBER_CONTEXT = frozenset(
    ["number", "phone", "code", "account", "card", "pin", "zip", "digits", "extension", "id"]
)
_WORD = re.compile(r"[a-z0-9']+")


def _is_number(word: str) -> bool:
    return word in _NUMBER_WORDS or any(ch.isdigit() for ch in word)


def looks_unfinished(text: str) -> bool:
    """True when ``text`` reads like a sentence the caller has not finished yet.

    Trailing sentence punctuation is ignored (recognisers add a period to every fragment),
    but a trailing comma, dash or ellipsis counts as unfinished.
    """
    stripped = text.strip()
    if not stripped:
        return False
    if stripped.endswith((",", "-", "—", "...", "…", ":")):
        return True
    words = _WORD.findall(stripped.lower())
    if not words:
        return False
    last = words[-1]
    if _is_number(last):
        # A number being read out (digits come in groups with pauses between): a run of
        # numbers, a long digit group, or a number after "phone number", "code", "card"...
        run = 0
        for word in reversed(words):
            if not _is_number(word):
                break
            run += 1
        digits = sum(ch.isdigit() for ch in last)
        return run >= 2 or digits >= 3 or not _NUMBER_CONTEXT.isdisjoint(words)
    if len(words) >= 2 and (words[-2], last) in _FINISHING_PAIRS:
        return False
    if last == "maybe" and len(words) >= 3:  # "I was thinking that maybe ..."
        return True
    return last in _CONTINUATIONS


#: Seconds of an utterance's end the pitch tracker looks at (bounds its cost per utterance).
_PROSODY_TAIL_S = 1.5
#: Whether the rising-pause cue is on when not given (see docs/turn-taking.md for the numbers).
PROSODY_DEFAULT = False


def ends_with_rise(text: str, pcm: npt.NDArray[np.int16], sample_rate: int) -> bool:
    """True when the utterance ``pcm`` (reading ``text``) ends with a continuation rise.

    A text ending in "?" never counts (yes/no questions rise and are finished), and neither
    does an empty one (noise).
    """
    stripped = text.strip()
    if not stripped or stripped.endswith("?") or sample_rate not in (8000, 16000):
        return False
    return ends_rising(pcm[-int(_PROSODY_TAIL_S * sample_rate) :], sample_rate)


@dataclass(frozen=True)
class EndOfTurn:
    """How long a silence ends the caller's turn: short after a finished sentence, longer after
    an unfinished one (see :func:`looks_unfinished`; with ``prosody``, also after a rising
    pause, see :func:`ends_with_rise`)."""

    silence_ms: float = 500.0
    unfinished_silence_ms: float = 1600.0
    #: Longest turn held back waiting for more speech (seconds of audio); then it commits.
    max_turn_s: float = 30.0
    #: Also treat an utterance whose pitch ends rising as unfinished.
    prosody: bool = PROSODY_DEFAULT

    def __post_init__(self) -> None:
        if self.silence_ms <= 0 or self.unfinished_silence_ms < self.silence_ms:
            raise ValueError("need 0 < silence_ms <= unfinished_silence_ms")

    def unfinished(
        self, text: str, pcm: npt.NDArray[np.int16] | None = None, sample_rate: int = 8000
    ) -> bool:
        """True when the turn is probably not over after ``text`` (spoken as ``pcm``)."""
        if looks_unfinished(text):
            return True
        return self.prosody and pcm is not None and ends_with_rise(text, pcm, sample_rate)

    def silence_needed_ms(
        self, text: str, pcm: npt.NDArray[np.int16] | None = None, sample_rate: int = 8000
    ) -> float:
        """The silence after ``text`` (spoken as ``pcm``, when known) that ends the turn."""
        unfinished = self.unfinished(text, pcm, sample_rate)
        return self.unfinished_silence_ms if unfinished else self.silence_ms


class TurnJoiner:
    """Joins VAD utterances into one caller turn on the stream clock (one stream, one thread).

    Per utterance: :meth:`audio_for` gives the audio to transcribe (held audio first), then
    :meth:`transcribed` says whether to commit the text now or hold it. While holding,
    :meth:`speech_started` cancels the deadline and :meth:`due` commits once the longer
    silence ran out with no new speech. ``policy=None`` commits every utterance at once.
    """

    def __init__(self, policy: EndOfTurn | None) -> None:
        self.policy = policy
        self._held: list[npt.NDArray[np.int16]] = []
        self._held_samples = 0
        self._text = ""
        self.deadline: float | None = None  # stream seconds; None: nothing waits for it
        self.held_turns = 0  # utterances held back as unfinished (for operators and benches)

    @property
    def holding(self) -> bool:
        """True while an unfinished utterance waits for the rest of the turn."""
        return bool(self._held)

    def audio_for(self, pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
        """The audio to transcribe for the utterance ``pcm``: the held part of the turn first."""
        self.deadline = None
        if not self._held:
            return pcm
        return np.concatenate([*self._held, pcm])

    def transcribed(
        self, audio: npt.NDArray[np.int16], text: str, end_s: float, sample_rate: int
    ) -> str | None:
        """``audio`` (from :meth:`audio_for`, speech ending at ``end_s``) reads ``text``:
        the text to commit now, or None while the turn is held for more speech."""
        policy = self.policy
        if (
            policy is None
            or audio.size >= policy.max_turn_s * sample_rate
            or not policy.unfinished(text, audio, sample_rate)
        ):
            return self._take(text)
        self._held = [audio]
        self._held_samples = audio.size
        self._text = text
        self.deadline = end_s + policy.unfinished_silence_ms / 1000.0
        self.held_turns += 1
        return None

    def speech_started(self) -> None:
        """The caller speaks again: the held turn goes on (its deadline no longer applies)."""
        self.deadline = None

    def due(self, position_s: float, in_speech: bool) -> str | None:
        """The held text when its silence ran out at stream time ``position_s``, else None."""
        if self.deadline is not None and not in_speech and position_s >= self.deadline:
            return self._take(self._text)
        return None

    def flush(self) -> str | None:
        """End of stream: the held text, if any."""
        return self._take(self._text) if self._held else None

    def _take(self, text: str) -> str:
        self._held = []
        self._held_samples = 0
        self._text = ""
        self.deadline = None
        return text


class SentTail:
    """The agent audio handed to the transport most recently, by position, so a pause can
    take back what was sent but not yet heard (the transport sends a little ahead of
    playback, and a clear cuts the chunk it is sending). Bounded; a clear empties it."""

    __slots__ = ("_chunks", "_nbytes", "max_bytes")

    def __init__(self, max_bytes: int = 16_000) -> None:
        self.max_bytes = int(max_bytes)
        self._chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self._nbytes = 0

    def add(self, start_ms: float, chunk: bytes) -> None:
        """``chunk`` was sent starting at ``start_ms`` on the playback axis."""
        self._chunks.append((start_ms, chunk))
        self._nbytes += len(chunk)
        while self._nbytes > self.max_bytes and len(self._chunks) > 1:
            self._nbytes -= len(self._chunks.popleft()[1])

    def since(self, played_ms: float) -> bytes:
        """The audio sent from ``played_ms`` on (as much of it as is kept)."""
        out = bytearray()
        for start_ms, chunk in self._chunks:
            end_ms = start_ms + len(chunk) / 8.0
            if end_ms <= played_ms:
                continue
            skip = max(0, int(round((played_ms - start_ms) * 8.0)))
            out += chunk[skip:]
        return bytes(out)

    def clear(self) -> None:
        """Forget everything (after a clear, the axis restarts at the played position)."""
        self._chunks.clear()
        self._nbytes = 0


def pause_playback(session: VoiceSession, max_bytes: int) -> int:
    """Stop playback at once but keep what was not heard, to resume or discard later (loop).

    The far end gets a ``clear``; the audio sent but not yet heard (from the port's
    :class:`SentTail`), the audio queued locally and the marks between them are put back in
    order, at most ``max_bytes`` of audio (the end goes first, counted as dropped), and the
    port holds them until :func:`resume_playback` or :func:`discard_paused`. Agent audio
    queued meanwhile waits behind them. Returns the bytes held (0: nothing was playing).
    """
    port = session.port
    ledger = port.ledger
    out = session.outbound
    # An uninterruptible line is never paused: the barge-in then takes its usual (skipped) clear.
    if port.paused or not session.agent_audio_pending or ledger.uninterruptible_pending():
        return 0
    items: list[Any] = []
    room = max_bytes
    dropped = 0

    def keep(chunk: bytes) -> None:
        nonlocal room, dropped
        take = chunk[: max(room, 0)]
        dropped += len(chunk) - len(take)
        if take:
            items.append(take)
            room -= len(take)

    tail = port.sent_tail
    if tail is not None:
        keep(tail.since(ledger.played_ms))
    marks = list(ledger.marks)
    ledger.marks.clear()
    index = getattr(out, "taken_count", 0)
    while True:
        try:
            chunk = out.get_nowait()
        except asyncio.QueueEmpty:
            break
        while marks and marks[0].after <= index:
            items.append(marks.pop(0))
        keep(chunk)
        index += 1
    items.extend(marks)
    port.clear_local()  # the far end's buffer goes; positions fall back to what was heard
    for item in items:
        if isinstance(item, bytes):
            port.push_outbound(item)
        else:
            port.queue_mark(item)
    if dropped:
        port.count_outbound_drop("paused audio over its bound", dropped)
    port.paused = True
    return max_bytes - room


def resume_playback(session: VoiceSession) -> None:
    """Play what :func:`pause_playback` held, from the unheard point on (loop)."""
    port = session.port
    if port.paused:
        port.paused = False
        port.wakeup.set()


def discard_paused(session: VoiceSession) -> None:
    """Drop what :func:`pause_playback` held: its marks resolve as cleared (loop)."""
    if session.port.paused:
        session.port.clear_local()  # also ends the pause
