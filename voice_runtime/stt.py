"""STT factory: ``create_stt(provider, **kw)`` and ``get_stt_class(provider)``."""

from __future__ import annotations

import importlib
from typing import Any

_PROVIDERS: dict[str, tuple[str, str]] = {
    "elevenlabs": ("voice_runtime.providers.elevenlabs_stt", "PersistentSttSession"),
    "azure": ("voice_runtime.providers.azure_stt", "AzurePersistentStt"),
    "offline": ("voice_runtime.providers.offline_stt", "OfflineStt"),
    "mock": ("voice_runtime.mock.stt", "MockStt"),
}

__all__ = ["available_stt_providers", "create_stt", "get_stt_class"]


def available_stt_providers() -> list[str]:
    """Names accepted by :func:`create_stt`."""
    return sorted(_PROVIDERS)


def get_stt_class(provider: str = "elevenlabs") -> type[Any]:
    """Return the STT provider class without instantiating it."""
    try:
        module, name = _PROVIDERS[provider]
    except KeyError:
        raise ValueError(f"Unknown STT provider: {provider}") from None
    return getattr(importlib.import_module(module), name)


def create_stt(provider: str = "elevenlabs", **kwargs: Any) -> Any:
    """Create an STT provider; keyword arguments go to its constructor."""
    return get_stt_class(provider)(**kwargs)
