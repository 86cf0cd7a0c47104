"""Subclassing VoiceSession: per-call start and shutdown hooks, used as the session_factory.

``TelcoSession`` keeps a call record: it stamps the start when the stream connects, counts the
caller's key presses, collects lifecycle events (call status, answering machine detection),
and files the record once when the call ends, whoever ended it. Every call gets its own
``TelcoSession`` from the factory, so records never mix.

    python examples/subclass_session.py --fake     # two simulated calls against a fake Twilio
    voice-runtime serve subclass_session:handle_call --session-factory \
        subclass_session:TelcoSession --app-dir examples
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from voice_runtime import CallHangupError, Conversation, SessionEvent, VoiceSession
from voice_runtime.mock.tts import MockTts

logger = logging.getLogger(__name__)

CALL_RECORDS: list[dict[str, Any]] = []
_records_lock = threading.Lock()


@dataclass
class TelcoSession(VoiceSession):
    """A VoiceSession that keeps and files a record of its call."""

    tenant: str = "acme"
    record: dict[str, Any] = field(default_factory=dict)

    def signal_ws_connected(self, stream_sid: str) -> None:
        """Start hook: the media stream is up (called by the transport)."""
        super().signal_ws_connected(stream_sid)
        self.record.update(tenant=self.tenant, started=time.time(), keys=0, events=[])

    def signal_dtmf(self, digit: str) -> None:
        """Count key presses (never log the digits themselves)."""
        self.record["keys"] = self.record.get("keys", 0) + 1
        super().signal_dtmf(digit)

    def emit_event(self, event: SessionEvent) -> None:
        """Keep call-status and machine-detection events in the record."""
        self.record.setdefault("events", []).append(event.kind)
        super().emit_event(event)

    def signal_disconnected(self) -> None:
        """Shutdown hook: file the record once, however the call ended."""
        first = not self.is_disconnected
        super().signal_disconnected()
        if first and "started" in self.record:
            self.record["seconds"] = round(time.time() - self.record["started"], 2)
            self.record["call_sid"] = self.call_sid
            with _records_lock:
                CALL_RECORDS.append(dict(self.record))
            logger.info("call record filed", extra={"call_sid": self.call_sid})


def handle_call(session: VoiceSession) -> None:
    """Greet, wait for one key, hang up."""
    conv = Conversation(session, MockTts(ms_per_char=15))
    try:
        conv.say("Welcome to Acme support. Press any key.")
        next(session.iter_dtmf(timeout=10), None)
        conv.say("Thank you.")
        conv.hangup()
    except CallHangupError:
        pass


def run_fake(calls: int = 2) -> int:
    """Serve the handler with TelcoSession against a fake Twilio; simulated callers ring in."""
    # The fake Twilio helpers are shared with inbound_app.py, next to this file.
    from inbound_app import call_in, fake_twilio

    from voice_runtime import VoiceServer
    from voice_runtime.serving import BackgroundVoiceServer

    voice = VoiceServer(on_call=handle_call, session_factory=TelcoSession)
    with fake_twilio() as fake, BackgroundVoiceServer(voice) as server:
        voice.public_url = server.url

        async def ring() -> list[Any]:
            callers = (f"+1555010{n:04d}" for n in range(calls))
            return await asyncio.gather(*(call_in(fake, server.url, c) for c in callers))

        sims = asyncio.run(ring())
    for record in CALL_RECORDS:
        print(f"record: {record['call_sid']} keys={record['keys']} seconds={record['seconds']}")
    filed = {r["call_sid"] for r in CALL_RECORDS}
    ok = filed == {s.call_sid for s in sims} and all(r["keys"] == 1 for r in CALL_RECORDS)
    return 0 if ok and len(CALL_RECORDS) == calls else 1


def main(argv: list[str] | None = None) -> int:
    """Run the example against a fake Twilio (--fake); otherwise explain how to serve it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", action="store_true", help="fake Twilio and simulated callers")
    parser.add_argument("--calls", type=int, default=2, help="simulated calls with --fake")
    args = parser.parse_args(argv)
    if args.fake:
        return run_fake(args.calls)
    print(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
