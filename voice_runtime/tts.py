"""TTS factory: ``create_tts(provider, **kw)``."""

from __future__ import annotations

import importlib
from typing import Any

_PROVIDERS: dict[str, tuple[str, str]] = {
    "elevenlabs": ("voice_runtime.providers.elevenlabs_tts", "ElevenLabsTTS"),
    "azure": ("voice_runtime.providers.azure_tts", "AzureTTS"),
    "offline": ("voice_runtime.providers.offline_tts", "OfflineTts"),
    "mock": ("voice_runtime.mock.tts", "MockTts"),
}

__all__ = ["available_tts_providers", "create_tts", "get_tts_class"]


def available_tts_providers() -> list[str]:
    """Names accepted by :func:`create_tts`."""
    return sorted(_PROVIDERS)


def get_tts_class(provider: str = "elevenlabs") -> type[Any]:
    """Return the TTS provider class without instantiating it."""
    try:
        module, name = _PROVIDERS[provider]
    except KeyError:
        raise ValueError(f"Unknown TTS provider: {provider}") from None
    return getattr(importlib.import_module(module), name)


def create_tts(provider: str = "elevenlabs", **kwargs: Any) -> Any:
    """Create a TTS provider; keyword arguments go to its constructor."""
    return get_tts_class(provider)(**kwargs)
