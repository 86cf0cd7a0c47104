"""The console's server-sent event stream of one call: its recent events, then live ones.

Each SSE message is one :class:`~voice_runtime.events.CallEvent` as JSON (``to_dict``, with
``rel``: seconds since the call started), without call content unless the viewer asked for it;
``event: levels`` messages carry the caller and agent audio levels ten times a second. The
stream ends when the call ends, when the server drains, or when the viewer goes away.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from voice_runtime.console.board import CallBoard, CallCard, LevelTap
from voice_runtime.events import CALL_ENDED, CallEvent

if TYPE_CHECKING:
    from voice_runtime.server import VoiceServer

__all__ = ["KEEPALIVE_S", "LEVELS_EVERY_S", "call_event_stream"]

LEVELS_EVERY_S = 0.1
KEEPALIVE_S = 15.0
STREAM_QUEUE = 500


def _message(event: CallEvent, card: CallCard, content: bool) -> str:
    body = event.to_dict(content=content)
    body["rel"] = round(event.t - card.started_t, 3)
    return f"data: {json.dumps(body, default=str)}\n\n"


async def call_event_stream(
    server: VoiceServer, board: CallBoard, card: CallCard, *, content: bool
) -> AsyncIterator[str]:
    """The SSE text of one call's events (see the module docstring)."""
    yield "retry: 3000\n\n"
    if card.ended_t is not None:
        for event in list(card.events):
            yield _message(event, card, content)
        yield "event: end\ndata: {}\n\n"
        return
    session = server.registry.by_call_sid(card.call_sid)
    tap = LevelTap.watch(session) if session is not None else None
    # Subscribe before replaying the history, so no event falls between the two.
    stream = server.events.stream(call_sid=card.call_sid, maxsize=STREAM_QUEUE)
    try:
        async with stream:
            replayed = list(card.events)
            seen = {id(e) for e in replayed}
            for event in replayed:
                yield _message(event, card, content)
            last_sent = last_levels = time.monotonic()
            while not server.draining:
                got: CallEvent | None = None
                try:
                    got = await stream.get(LEVELS_EVERY_S)
                except TimeoutError:
                    pass  # a level tick; the stream stays open
                except StopAsyncIteration:
                    break
                now = time.monotonic()
                if got is not None and id(got) in seen:
                    seen.discard(id(got))  # already sent in the replay
                elif got is not None:
                    yield _message(got, card, content)
                    last_sent = now
                    if got.kind == CALL_ENDED:
                        break
                if tap is not None and now - last_levels >= LEVELS_EVERY_S:
                    last_levels = now
                    if session is not None and session._mixer is tap:
                        levels: dict[str, Any] = tap.read()
                        yield f"event: levels\ndata: {json.dumps(levels)}\n\n"
                        last_sent = now
                if now - last_sent > KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    last_sent = now
            yield "event: end\ndata: {}\n\n"
    finally:
        if tap is not None and session is not None:
            tap.unwatch(session)
