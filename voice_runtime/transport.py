"""Transport and SMS factories: pick the module that talks to the phone network.

For the websocket side import directly::

    from voice_runtime.transports.twilio_ws import register_voice_websocket
    from voice_runtime.transports.twilio_call import initiate_outbound_call, build_stream_twiml

Modules are imported when asked for, so importing this module loads no vendor SDK.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_TRANSPORTS = {
    "twilio": "voice_runtime.transports.twilio_call",
    "mock": "voice_runtime.transports.mock_bridge",
}
_SMS_TRANSPORTS = {"twilio": "voice_runtime.transports.twilio_sms"}


def get_sms_transport(provider: str = "twilio") -> ModuleType:
    """Return the SMS transport for ``provider`` (an object with ``send_sms(to, body)``)."""
    module = _SMS_TRANSPORTS.get(provider)
    if module is None:
        raise ValueError(f"Unknown SMS transport: {provider}")
    return importlib.import_module(module)


def create_transport(provider: str = "twilio") -> ModuleType:
    """Return the call transport for ``provider``: ``twilio`` (REST calls) or ``mock``."""
    module = _TRANSPORTS.get(provider)
    if module is None:
        raise ValueError(f"Unknown transport: {provider}")
    return importlib.import_module(module)


__all__ = ["create_transport", "get_sms_transport"]
