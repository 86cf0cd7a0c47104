"""FakePhone: the far end of calls placed on a FakeTwilioRest, played the way Twilio plays it.

For every call created on the fake it answers (status ``in-progress``), dials the call's
``<Connect><Stream>`` with a :class:`~voice_runtime.testing.simulator.CallerSimulator`
(signed with the fake's auth token), and plays ``audio`` into it: a greeting, a beep, a
caller's words. When the call is given new TwiML it does what Twilio does: the current
stream ends (``stop``), and a new ``<Connect><Stream>`` is dialled as a new stream of the
same call. A REST hang-up ends the stream. It runs its own event loop on a background
thread, so sync scripts and async tests can both use it::

    with FakeTwilioRest() as fake, FakePhone(fake, audio=greeting) as phone:
        ...  # place calls; phone.streams[call_sid] are the simulators, oldest first
"""

from __future__ import annotations

import asyncio
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from voice_runtime.testing.fake_twilio_rest.callbacks import sign
from voice_runtime.testing.fake_twilio_rest.records import TERMINAL_CALL_STATUSES, FakeCall

if TYPE_CHECKING:
    from voice_runtime.testing.fake_twilio_rest.conferences import FakeParticipant
    from voice_runtime.testing.fake_twilio_rest.server import FakeTwilioRest
    from voice_runtime.testing.simulator import CallerSimulator

__all__ = ["FakePhone"]

_STOP_TIMEOUT_S = 10.0


def _stream_of(twiml: str) -> tuple[str, dict[str, str]] | None:
    try:
        stream = ET.fromstring(twiml).find("Connect/Stream")
    except ET.ParseError:
        return None
    if stream is None or not stream.get("url"):
        return None
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return str(stream.get("url")), params


class FakePhone:
    """Answers the calls of a :class:`FakeTwilioRest` with caller simulators (see module doc).

    ``answer(call)`` may return False to leave a call unanswered. ``agents_answer=True``
    also answers every participant dialled into a conference (warm transfer agents): it is
    ``connected`` at once. Use it as a context manager
    (or :meth:`start` / :meth:`close`); closing hangs up every stream and joins its thread.
    """

    def __init__(
        self,
        fake: FakeTwilioRest,
        *,
        audio: bytes = b"",
        answer: Callable[[FakeCall], bool] | None = None,
        agents_answer: bool = False,
    ) -> None:
        self.fake = fake
        self.agents_answer = agents_answer
        self.audio = audio
        self.answer = answer
        self.streams: dict[str, list[CallerSimulator]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="FakePhone")
        self._lock = threading.Lock()
        self._closed = False
        self._pending: list[Any] = []

    def start(self) -> FakePhone:
        """Start answering calls; return self."""
        self._thread.start()
        self.fake.on_call_created(self._created)
        self.fake.on_call_updated(self._updated)
        self.fake.on_participant_created(self._participant)
        return self

    def __enter__(self) -> FakePhone:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = _STOP_TIMEOUT_S) -> Any:
        """Run ``coro`` on the phone's loop (e.g. ``sim.wait_for_heard(...)``); its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def latest(self, call_sid: str) -> CallerSimulator | None:
        """The newest stream of ``call_sid``, or None."""
        with self._lock:
            streams = self.streams.get(call_sid)
            return streams[-1] if streams else None

    def heard(self, call_sid: str) -> bytes:
        """The agent audio played on every stream of ``call_sid`` so far (μ-law)."""
        with self._lock:
            streams = list(self.streams.get(call_sid, ()))
        return b"".join(bytes(sim.heard) for sim in streams)

    def close(self) -> None:
        """Hang up every stream, stop the loop and join its thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        if not self._thread.is_alive():
            return
        for fut in pending:
            try:
                fut.result(_STOP_TIMEOUT_S)
            except Exception:  # noqa: S110 - a failed dial is the test's to see, not close()'s
                pass
        with self._lock:
            sims = [sim for streams in self.streams.values() for sim in streams]
        for sim in sims:
            self.run(sim.hangup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_STOP_TIMEOUT_S)
        self._loop.close()

    # ----------------------------------------------------------------- what Twilio does

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        with self._lock:
            if self._closed:
                coro.close()
                return
            self._pending.append(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _created(self, call: FakeCall) -> None:
        if self.answer is not None and not self.answer(call):
            return
        stream = _stream_of(call.twiml or "")
        if stream is None:
            return
        self.fake.set_call_status(call.sid, "in-progress")
        self._submit(self._dial(call.sid, *stream))

    def _participant(self, participant: FakeParticipant) -> None:
        with self._lock:
            closed = self._closed
        if self.agents_answer and not closed:
            self.fake.set_participant_status(participant.call_sid, "connected")

    def _updated(self, call: FakeCall) -> None:
        stream = None if call.status in TERMINAL_CALL_STATUSES else _stream_of(call.twiml or "")
        self._submit(self._next(call.sid, stream))

    async def _next(self, call_sid: str, stream: tuple[str, dict[str, str]] | None) -> None:
        current = self.latest(call_sid)
        if current is not None:
            await current.hangup()  # new TwiML or a hang-up: this stream is over
        if stream is not None:
            await self._dial(call_sid, *stream)

    async def _dial(self, call_sid: str, url: str, params: dict[str, str]) -> None:
        from voice_runtime.testing.simulator import CallerSimulator

        sim = CallerSimulator(
            url,
            call_sid=call_sid,
            account_sid=self.fake.account_sid,
            parameters=params,
            headers={"X-Twilio-Signature": sign(self.fake.auth_token, url, {})},
        )
        with self._lock:
            self.streams.setdefault(call_sid, []).append(sim)
        await sim.connect()
        if self.audio:
            await sim.send_audio(self.audio)
