"""Send an SMS through Twilio with the 0.1.x-compatible transport.

    python examples/send_sms.py +358401234567 "Your code is 1234"
    (needs TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER)

``python examples/send_sms.py --fake`` sends to a fake Twilio REST API on 127.0.0.1 (the real
twilio SDK over a real socket) and checks what it received.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from voice_runtime import get_sms_transport

FAKE_SENDER = "+15550001111"


def send(to: str, body: str, media_urls: list[str] | None = None) -> dict[str, str]:
    """Send one message; return ``{"message_sid", "status", "to"}``."""
    return get_sms_transport().send_sms(to, body, media_urls=media_urls)


def run_fake(to: str, body: str) -> int:
    """Send through a fake Twilio REST API and check the request it got."""
    from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest

    saved = dict(os.environ)
    with FakeTwilioRest() as fake:
        os.environ.update(fake.env())
        os.environ["TWILIO_PHONE_NUMBER"] = FAKE_SENDER
        try:
            result = send(to, body)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        message = fake.messages[result["message_sid"]]
    print(json.dumps(result))
    ok = (message.to, message.from_, message.body) == (to, FAKE_SENDER, body)
    return 0 if ok and result["status"] == "queued" else 1


def main(argv: list[str] | None = None) -> int:
    """Send NUMBER TEXT (or, with --fake, to a fake Twilio)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("number", nargs="?", default="+15550002222", help="recipient (E.164)")
    parser.add_argument("text", nargs="?", default="Your code is 1234", help="message body")
    parser.add_argument("--media-url", action="append", help="attach media (MMS)")
    parser.add_argument("--fake", action="store_true", help="send to a fake Twilio REST API")
    args = parser.parse_args(argv)
    if args.fake:
        return run_fake(args.number, args.text)
    print(json.dumps(send(args.number, args.text, args.media_url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
