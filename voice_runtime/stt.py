"""STT factory: ``create_stt(provider, **kw)`` and ``get_stt_class(provider)``.

``provider`` is a registered name, or a list of names and providers for a fallback chain
(:class:`~voice_runtime.providers.fallback.FallbackStt`). The result is typed: the provider
class for a literal name (``create_stt("mock")`` is a ``MockStt``), else ``SttProvider``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from voice_runtime.contracts import SttProvider
from voice_runtime.registry import Registry

if TYPE_CHECKING:
    from voice_runtime.mock.stt import MockStt
    from voice_runtime.providers.azure_stt import AzurePersistentStt
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
    from voice_runtime.providers.fallback import FallbackStt
    from voice_runtime.providers.offline_stt import OfflineStt

STT_PROVIDERS = Registry(
    "STT provider",
    {
        "elevenlabs": "voice_runtime.providers.elevenlabs_stt:PersistentSttSession",
        "azure": "voice_runtime.providers.azure_stt:AzurePersistentStt",
        "offline": "voice_runtime.providers.offline_stt:OfflineStt",
        "mock": "voice_runtime.mock.stt:MockStt",
    },
)

__all__ = ["STT_PROVIDERS", "available_stt_providers", "create_stt", "get_stt_class"]


def available_stt_providers() -> list[str]:
    """Names accepted by :func:`create_stt`."""
    return STT_PROVIDERS.names()


@overload
def get_stt_class(provider: Literal["elevenlabs"] = ...) -> type[PersistentSttSession]: ...
@overload
def get_stt_class(provider: Literal["azure"]) -> type[AzurePersistentStt]: ...
@overload
def get_stt_class(provider: Literal["offline"]) -> type[OfflineStt]: ...
@overload
def get_stt_class(provider: Literal["mock"]) -> type[MockStt]: ...
@overload
def get_stt_class(provider: str) -> type[SttProvider]: ...
def get_stt_class(provider: str = "elevenlabs") -> type[Any]:
    """Return the STT provider class without instantiating it."""
    return cast("type[Any]", STT_PROVIDERS.load(provider))


@overload
def create_stt(provider: Literal["elevenlabs"] = ..., **kwargs: Any) -> PersistentSttSession: ...
@overload
def create_stt(provider: Literal["azure"], **kwargs: Any) -> AzurePersistentStt: ...
@overload
def create_stt(provider: Literal["offline"], **kwargs: Any) -> OfflineStt: ...
@overload
def create_stt(provider: Literal["mock"], **kwargs: Any) -> MockStt: ...
@overload
def create_stt(provider: str, **kwargs: Any) -> SttProvider: ...
@overload
def create_stt(provider: Sequence[str | SttProvider], **kwargs: Any) -> FallbackStt: ...
def create_stt(provider: str | Sequence[str | SttProvider] = "elevenlabs", **kwargs: Any) -> Any:
    """Create an STT provider; keyword arguments go to its constructor.

    A list (``["elevenlabs", "offline"]``) makes a fallback chain: names are created with no
    arguments, provider objects are used as they are, and the keyword arguments go to the
    :class:`~voice_runtime.providers.fallback.FallbackStt`.
    """
    if not isinstance(provider, str):
        from voice_runtime.providers.fallback import FallbackStt

        chain = [create_stt(p) if isinstance(p, str) else p for p in provider]
        names = [p if isinstance(p, str) else STT_PROVIDERS.name_of(p) for p in provider]
        return FallbackStt(chain, names=names, **kwargs)
    return get_stt_class(provider)(**kwargs)
