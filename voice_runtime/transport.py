"""Transport and SMS factories: pick the module that talks to the phone network.

For the websocket side import directly::

    from voice_runtime.transports.twilio_ws import register_voice_websocket
    from voice_runtime.transports.twilio_call import initiate_outbound_call, build_stream_twiml

Modules are imported when asked for, so importing this module loads no vendor SDK.
"""

from __future__ import annotations

from types import ModuleType
from typing import cast

from voice_runtime.contracts import SmsTransport
from voice_runtime.registry import Registry

TRANSPORTS = Registry(
    "transport",
    {
        "twilio": "voice_runtime.transports.twilio_call",
        "mock": "voice_runtime.transports.mock_bridge",
    },
)
SMS_TRANSPORTS = Registry("SMS transport", {"twilio": "voice_runtime.transports.twilio_sms"})


def get_sms_transport(provider: str = "twilio") -> SmsTransport:
    """Return the SMS transport for ``provider`` (an object with ``send_sms(to, body)``)."""
    return cast(SmsTransport, SMS_TRANSPORTS.load(provider))


def create_transport(provider: str = "twilio") -> ModuleType:
    """Return the call transport for ``provider``: ``twilio`` (REST calls) or ``mock``."""
    return TRANSPORTS.load(provider)


__all__ = ["SMS_TRANSPORTS", "TRANSPORTS", "create_transport", "get_sms_transport"]
