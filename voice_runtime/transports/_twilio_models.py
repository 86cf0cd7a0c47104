"""The 0.1.x module of Twilio REST models; kept so its imports still work.

The models live in :mod:`voice_runtime.transports.twilio_models` (and are re-exported by
:mod:`voice_runtime.transports.twilio_call`).
"""

from __future__ import annotations

from voice_runtime.transports.twilio_models import (
    TwilioCallListIncompleteError,
    TwilioCallNotFoundError,
    TwilioCallRow,
    TwilioRegion,
    validate_sid,
)

__all__ = [
    "TwilioCallListIncompleteError",
    "TwilioCallNotFoundError",
    "TwilioCallRow",
    "TwilioRegion",
    "validate_sid",
]
