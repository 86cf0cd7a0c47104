"""An outbound call from a plain (sync) script: place it, wait for an answer, talk, hang up.

For a real call the server must be reachable from Twilio at --public-url (a tunnel to
--port), with TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER set::

    python examples/outbound_call.py +358401234567 --public-url https://<host> --tts elevenlabs

``python examples/outbound_call.py --fake`` runs the same script against a fake Twilio REST
API; a simulated phone answers the call (dials the TwiML's stream with a valid signature,
presses 1, ends the stream when the call is hung up over REST).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

from voice_runtime import (
    CallHangupError,
    CallNotAnsweredError,
    Conversation,
    TtsProvider,
    VoiceServer,
)
from voice_runtime.mock.tts import MockTts
from voice_runtime.serving import BackgroundVoiceServer
from voice_runtime.testing.fake_twilio_rest import FakeCall, FakeTwilioRest

REMINDER = "Hello, this is Acme. Your appointment is tomorrow at ten. Press 1 to confirm."


def remind(voice: VoiceServer, number: str, tts: TtsProvider) -> bool:
    """Call ``number``, read the reminder, return True when the callee pressed 1."""
    session = voice.place_call(number, timeout=30, machine_detection="Enable")
    print(f"calling, call SID {session.call_sid}")
    try:
        session.wait_for_ws_connect(timeout=60)
    except CallNotAnsweredError:
        print("no answer")
        return False
    conv = Conversation(session, tts)
    try:
        conv.say(REMINDER)
        confirmed = next(session.iter_dtmf(timeout=10), None) == "1"
        conv.say("Thank you, see you tomorrow." if confirmed else "We will call you again.")
        conv.hangup()  # after the last words were heard
    except CallHangupError:
        return False
    session.wait_until_disconnected(15)
    return confirmed


# --------------------------------------------------------------------------- the fake far end


def answer_calls(fake: FakeTwilioRest) -> list[threading.Thread]:
    """Answer every call created on the fake REST API with a simulated phone, as Twilio would."""
    # The simulated phone is shared with inbound_app.py, next to this file.
    from inbound_app import answer_like_a_phone, stream_of

    threads: list[threading.Thread] = []

    def created(call: FakeCall) -> None:
        url, params = stream_of(call.twiml or "")
        fake.set_call_status(call.sid, "in-progress")
        phone = answer_like_a_phone(fake, url, params, call.sid, press="1")
        thread = threading.Thread(target=asyncio.run, args=(phone,), name="simulated-phone")
        threads.append(thread)
        thread.start()

    fake.on_call_created(created)
    return threads


def run_fake() -> int:
    """Place one call against a fake Twilio; a simulated phone answers."""
    from inbound_app import fake_twilio

    tts = MockTts(ms_per_char=15)
    voice = VoiceServer()
    with fake_twilio() as fake, BackgroundVoiceServer(voice) as server:
        voice.public_url = server.url
        phones = answer_calls(fake)
        confirmed = remind(voice, "+15550002222", tts)
        for phone in phones:
            phone.join(10)
    (call,) = fake.calls.values()
    print(f"confirmed: {confirmed}; said {len(tts.spoken)} lines; call status {call.status}")
    return 0 if confirmed and call.status == "completed" and tts.spoken[0] == REMINDER else 1


def main(argv: list[str] | None = None) -> int:
    """Call a number (or, with --fake, a simulated phone) and read a reminder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("number", nargs="?", help="number to call (E.164)")
    parser.add_argument("--fake", action="store_true", help="fake Twilio and a simulated phone")
    parser.add_argument("--public-url", help="public base URL (default VOICE_PUBLIC_URL)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tts", default="elevenlabs", help="TTS provider (default elevenlabs)")
    args = parser.parse_args(argv)
    if args.fake:
        return run_fake()
    if not args.number:
        parser.error("NUMBER is required without --fake")
    from voice_runtime.tts import create_tts

    voice = VoiceServer(public_url=args.public_url)
    with BackgroundVoiceServer(voice, port=args.port):
        confirmed = remind(voice, args.number, create_tts(args.tts))
    print("confirmed" if confirmed else "not confirmed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
