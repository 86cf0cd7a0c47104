"""An inbound call app: a FastAPI app with a VoiceServer, one session per call, a tiny IVR.

Serve it (point your Twilio number's voice webhook at https://<public host>/twilio/voice)::

    python examples/inbound_app.py --port 8080 --public-url https://<public host> --tts elevenlabs
    voice-runtime serve inbound_app:handle_call --app-dir examples      # the handler alone
    uvicorn --app-dir examples inbound_app:app \
        --ws voice_runtime.transports.fastws:VoiceWebSocketProtocol         # plain uvicorn

Try it without a phone or a Twilio account: ``python examples/inbound_app.py --fake`` starts a
fake Twilio REST API, serves the app on a free port and lets a simulated caller dial in
(signed webhook, signed media stream, a key press, a REST hang-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping

import httpx
from fastapi import FastAPI

from voice_runtime import (
    CallerSimulator,
    CallHangupError,
    Conversation,
    TtsProvider,
    VoiceServer,
    VoiceSession,
)
from voice_runtime.mock.tts import MockTts
from voice_runtime.serving import BackgroundVoiceServer, serve_forever
from voice_runtime.testing import FakeTwilioRest

OUR_NUMBER = "+15550001111"
GREETING = "Thanks for calling Acme. Press 1 for our opening hours."
HOURS = "We are open from nine to five, Monday to Friday."

# Which TTS each call uses; main() switches it with --tts.
make_tts: Callable[[], TtsProvider] = MockTts


def handle_call(session: VoiceSession) -> None:
    """Greet the caller, answer one key press, say goodbye and hang up (a worker thread)."""
    conv = Conversation(session, make_tts())
    try:
        conv.say(GREETING)
        for digit in session.iter_dtmf(timeout=15):
            if digit == "1":
                conv.say(HOURS)
            break
        conv.say("Goodbye.")
        conv.hangup()
    except CallHangupError:
        pass  # the caller hung up first


def caller_details(form: Mapping[str, str]) -> dict[str, str]:
    """Extra <Parameter>s for each call's stream, from Twilio's webhook form."""
    return {"caller_country": form.get("FromCountry", "")}


app = FastAPI(title="Acme hotline")
voice = VoiceServer(app=app, on_call=handle_call, inbound_parameters=caller_details)


@app.get("/")
def index() -> dict[str, object]:
    """A route of the app itself, next to the ones VoiceServer added."""
    return {"service": "acme-hotline", "live_calls": voice.registry.live_count}


# --------------------------------------------------------------------------- the fake far end


@contextlib.contextmanager
def fake_twilio() -> Iterator[FakeTwilioRest]:
    """A FakeTwilioRest with this process's environment pointed at it (restored after)."""
    saved = dict(os.environ)
    with FakeTwilioRest() as fake:
        os.environ.update(fake.env())
        os.environ["TWILIO_PHONE_NUMBER"] = OUR_NUMBER
        os.environ.pop("TWILIO_SKIP_SIGNATURE_VALIDATION", None)
        try:
            yield fake
        finally:
            os.environ.clear()
            os.environ.update(saved)


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    """The <Stream url> and <Parameter>s of a <Connect><Stream> answer."""
    stream = ET.fromstring(twiml).find("Connect/Stream")
    if stream is None:
        raise RuntimeError("the answer has no <Connect><Stream>")
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    return stream.attrib["url"], params


def sign(fake: FakeTwilioRest, url: str, params: Mapping[str, str]) -> dict[str, str]:
    """The X-Twilio-Signature header Twilio would send."""
    from twilio.request_validator import RequestValidator

    return {"X-Twilio-Signature": RequestValidator(fake.auth_token).compute_signature(url, params)}


async def answer_like_a_phone(
    fake: FakeTwilioRest, url: str, params: dict[str, str], call_sid: str, press: str = "1"
) -> CallerSimulator:
    """Open the call's media stream as Twilio does, press a key after the greeting, and end
    the stream when the call is hung up over REST."""
    sim = CallerSimulator(url, call_sid=call_sid, parameters=params, headers=sign(fake, url, {}))
    await sim.connect()
    try:
        await sim.wait_for_heard(200, timeout=10)
        await sim.wait_idle(0.3, timeout=15)
        await sim.send_dtmf(press)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not sim.closed and loop.time() < deadline:
            if fake.calls[call_sid].status == "completed":
                break
            await asyncio.sleep(0.02)
    finally:
        await sim.hangup()
    return sim


async def call_in(fake: FakeTwilioRest, base_url: str, caller: str) -> CallerSimulator:
    """Ring the app like Twilio does: post the voice webhook, then dial the stream."""
    call = fake.add_call(OUR_NUMBER, from_=caller, status="in-progress", direction="inbound")
    form = {
        "AccountSid": fake.account_sid,
        "CallSid": call.sid,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "From": caller,
        "To": OUR_NUMBER,
        "FromCountry": "US",
    }
    webhook = base_url + "/twilio/voice"
    async with httpx.AsyncClient() as http:
        answer = await http.post(webhook, data=form, headers=sign(fake, webhook, form))
    answer.raise_for_status()
    url, params = stream_of(answer.text)
    return await answer_like_a_phone(fake, url, params, call.sid)


def quick_tts() -> TtsProvider:
    """A mock voice that speaks fast, so a simulated call takes a couple of seconds."""
    return MockTts(ms_per_char=15)


def run_fake() -> int:
    """Serve the app against a fake Twilio and let a simulated caller call in."""
    global make_tts
    make_tts = quick_tts
    with fake_twilio() as fake, BackgroundVoiceServer(voice) as server:
        voice.public_url = server.url
        sim = asyncio.run(call_in(fake, server.url, caller="+15550100200"))
    said = quick_tts()
    assert isinstance(said, MockTts)
    expected_ms = sum(len(said.audio_for(t)) for t in (GREETING, HOURS, "Goodbye.")) / 8
    hung_up = fake.calls[sim.call_sid].status == "completed"
    print(f"caller heard {sim.heard_ms / 1000:.2f} s of agent audio; hung up over REST: {hung_up}")
    return 0 if hung_up and sim.heard_ms >= expected_ms else 1


def main(argv: list[str] | None = None) -> int:
    """Serve the app, or with --fake run one simulated call against a fake Twilio."""
    global make_tts
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", action="store_true", help="fake Twilio and a simulated caller")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default VOICE_SERVER_PORT (8080)")
    parser.add_argument("--public-url", help="public base URL (default VOICE_PUBLIC_URL)")
    parser.add_argument("--tts", default="mock", help="TTS provider: mock, elevenlabs, azure")
    args = parser.parse_args(argv)
    if args.fake:
        return run_fake()
    provider: str = args.tts  # argparse values are untyped: name the type once
    if provider != "mock":
        from voice_runtime.tts import create_tts

        def make_tts() -> TtsProvider:
            return create_tts(provider)

    voice.public_url = args.public_url
    serve_forever(voice, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
