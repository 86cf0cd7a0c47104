"""A bot that listens: an ``async def`` handler with speech recognition set on the server.

``VoiceServer(stt="offline")`` gives every call a local Whisper STT (the offline extra: no key,
no network); the handler awaits ``say_async`` / ``listen_async`` / ``hangup_async`` on the
event loop, with no thread of its own. Serve it::

    python examples/listen_app.py --port 8080 --public-url https://<public host>

Try it without a phone: ``python examples/listen_app.py --fake`` serves the app on a free port
and lets a simulated caller answer the question with synthesised speech.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from voice_runtime import CallerSimulator, CallHangupError, Conversation, VoiceServer, VoiceSession
from voice_runtime.mock.tts import MockTts
from voice_runtime.serving import BackgroundVoiceServer, serve_forever

QUESTION = "Hello! How can I help you today?"
ANSWER = "I would like to change my delivery address."

heard: list[str] = []  # what the bot understood, for the --fake run to show


async def handle_call(session: VoiceSession) -> None:
    """Ask one question, repeat the answer and hang up (on the event loop)."""
    conv = Conversation(session, MockTts(ms_per_char=15))
    try:
        await conv.say_async(QUESTION)
        text = await conv.listen_async(timeout=20)
        if text is None:
            await conv.say_async("I did not hear anything. Goodbye.")
        else:
            heard.append(text)
            await conv.say_async("Thank you. Goodbye.")
        await conv.hangup_async()
    except CallHangupError:
        pass  # the caller hung up first


voice = VoiceServer(on_call=handle_call, stt="offline")


async def caller(ws_url: str) -> CallerSimulator:
    """Dial in, wait for the question, answer it out loud and wait for the bot to hang up."""
    from voice_runtime.offline import synthesize_ulaw

    speech = synthesize_ulaw(ANSWER, "piper") + b"\xff" * 8000  # then a second of silence
    async with CallerSimulator(ws_url, silence_when_idle=False) as sim:
        await sim.wait_for_heard(200, timeout=20)
        await sim.wait_idle(0.6, timeout=20)  # the agent's echo tail has passed too
        await sim.send_audio(speech, realtime=False)
        await sim.wait_closed(60)
    return sim


def run_fake() -> int:
    """Serve the app and let a simulated caller answer the bot's question."""
    with BackgroundVoiceServer(voice) as server:
        ws_url = server.url.replace("http", "ws", 1) + "/voice"
        sim = asyncio.run(caller(ws_url))
    print(f"caller heard {sim.heard_ms / 1000:.2f} s of agent audio")
    print(f"the bot heard: {heard[0] if heard else '(nothing)'}")
    return 0 if heard and "address" in heard[0].lower() else 1


def main(argv: list[str] | None = None) -> int:
    """Serve the app, or with --fake run one simulated call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake", action="store_true", help="a simulated caller, no Twilio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default VOICE_SERVER_PORT (8080)")
    parser.add_argument("--public-url", help="public base URL (default VOICE_PUBLIC_URL)")
    args = parser.parse_args(argv)
    if args.fake:
        return run_fake()
    voice.public_url = args.public_url
    serve_forever(voice, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
