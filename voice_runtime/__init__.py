"""voice_runtime: phone calls over Twilio Media Streams.

Import the public API from here. See the README for a tour.
"""

from voice_runtime.audio import AudioMixer, mix_frames
from voice_runtime.errors import (
    CallHangupError,
    CallNotAnsweredError,
    ConfigurationError,
    LoopThreadError,
    MissingCredentialError,
    MissingStreamUrlError,
    NoEventLoopError,
    ProtocolError,
    ProviderError,
    VoiceRuntimeError,
)
from voice_runtime.providers import SttProvider, TtsProvider
from voice_runtime.session import VoiceSession
from voice_runtime.stt import create_stt, get_stt_class
from voice_runtime.transport import create_transport, get_sms_transport
from voice_runtime.tts import create_tts
from voice_runtime.types import CallInfo, MediaFormat, SessionEvent

__version__ = "0.2.0"

__all__ = [
    "AudioMixer",
    "CallHangupError",
    "CallInfo",
    "CallNotAnsweredError",
    "ConfigurationError",
    "LoopThreadError",
    "MediaFormat",
    "MissingCredentialError",
    "MissingStreamUrlError",
    "NoEventLoopError",
    "ProtocolError",
    "ProviderError",
    "SessionEvent",
    "SttProvider",
    "TtsProvider",
    "VoiceRuntimeError",
    "VoiceSession",
    "create_stt",
    "create_transport",
    "create_tts",
    "get_sms_transport",
    "get_stt_class",
    "mix_frames",
]
