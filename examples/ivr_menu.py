"""An IVR menu: a recorded-call notice nobody can skip, then keypad choices and an account number.

``Conversation.say(..., interruptible=False)`` plays the notice whole; ``gather_digits`` reads
DTMF keys, and its spoken ``prompt`` stops at the first key (so callers who know the menu
need not wait). The handler is a plain function: it runs in a worker thread. Serve it::

    python examples/ivr_menu.py --port 8080 --public-url https://<public host>

Try it without a phone: ``python examples/ivr_menu.py --fake`` serves the app on a free port
and lets a simulated caller press keys.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from voice_runtime import CallerSimulator, CallHangupError, Conversation, VoiceServer, VoiceSession
from voice_runtime.mock.tts import MockTts
from voice_runtime.serving import BackgroundVoiceServer, serve_forever

NOTICE = "Welcome to Acme. This call may be recorded."
MENU = "For your account, press 1. For our opening hours, press 2."
ACCOUNT = "Please enter your account number, then press the hash key."
PRESSED = "1234"  # what the simulated caller types as an account number

outcome: dict[str, object] = {}  # what the bot understood, for the --fake run to show


def handle_call(session: VoiceSession) -> None:
    """Play the notice, take a menu choice, then an account number (worker thread)."""
    conv = Conversation(session, MockTts(ms_per_char=15))
    try:
        conv.say(NOTICE, interruptible=False)
        choice = conv.gather_digits(1, prompt=MENU, timeout=5)
        outcome["choice"] = choice.digits
        if choice.digits == "1":
            account = conv.gather_digits(10, prompt=ACCOUNT, timeout=5, inter_digit_timeout=3)
            # Digits are the caller's data: keep them out of logs, keep only what you need.
            outcome["account_ok"] = account.digits == PRESSED
            outcome["account_end"] = account.reason
            conv.say("Thank you. Your account is up to date.")
        elif choice.digits == "2":
            conv.say("We are open every day from nine to five.")
        else:
            conv.say("Sorry, I did not get a choice.")
        conv.say("Goodbye.")
        conv.hangup()
    except CallHangupError:
        pass  # the caller hung up first


voice = VoiceServer(on_call=handle_call)


async def caller(ws_url: str) -> CallerSimulator:
    """Dial in, press 1 during the menu, type the account number and wait for the goodbye."""
    notice_ms = len(MockTts(ms_per_char=15).audio_for(NOTICE)) / 8
    async with CallerSimulator(ws_url) as sim:
        await sim.wait_for_heard(notice_ms + 500, timeout=20)  # half a second into the menu
        await sim.send_dtmf("1")
        heard = sim.heard_ms
        await sim.wait_for_heard(heard + 300, timeout=20)  # the account prompt has begun
        for key in PRESSED + "#":
            await sim.send_dtmf(key)
        await sim.wait_closed(30)
    return sim


def run_fake() -> int:
    """Serve the app and let a simulated caller use the menu."""
    with BackgroundVoiceServer(voice) as server:
        ws_url = server.url.replace("http", "ws", 1) + "/voice"
        sim = asyncio.run(caller(ws_url))
    print(f"caller heard {sim.heard_ms / 1000:.2f} s of agent audio; prompts cut: {sim.clears}")
    print(f"menu choice: {outcome.get('choice')}")
    print(f"account number received: {outcome.get('account_ok')} ({outcome.get('account_end')})")
    return 0 if outcome.get("account_ok") else 1


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
