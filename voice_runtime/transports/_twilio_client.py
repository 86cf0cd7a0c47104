"""The 0.1.x module that built Twilio REST clients; kept so its imports still work.

The builders live in :mod:`voice_runtime.transports.twilio_call`, and the functions there
look up ``twilio_call.build_twilio_client`` at call time: patch that name, not this one.
"""

from __future__ import annotations

from voice_runtime.transports._rest import DEFAULT_TIMEOUT_S
from voice_runtime.transports.twilio_call import build_explicit_twilio_client, build_twilio_client
from voice_runtime.transports.twilio_models import TwilioRegion

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TwilioRegion",
    "build_explicit_twilio_client",
    "build_twilio_client",
]
