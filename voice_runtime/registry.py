"""A registry of named implementations, imported when first asked for.

One class behind the STT, TTS, transport and SMS factories: a name maps to ``"module"`` or
``"module:attribute"``, nothing is imported until the name is looked up (so importing the
factories loads no vendor SDK), and an unknown name is a ``ValueError`` that lists the known
ones, keeping the 0.1.x message prefix (``Unknown STT provider: …``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["Registry"]


class Registry:
    """Names → lazily imported modules or module attributes, for one kind of thing."""

    def __init__(self, kind: str, entries: Mapping[str, str]) -> None:
        self.kind = kind  # "STT provider", "SMS transport", … as the error message says it
        self._entries = dict(entries)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def register(self, name: str, target: str, *, replace: bool = False) -> None:
        """Add ``name`` → ``"module"`` or ``"module:attribute"``."""
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} name must be a non-empty string")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target

    def name_of(self, obj: object) -> str:
        """The registered name of ``obj``'s class, else the class name (for logs and events)."""
        cls = type(obj)
        target = f"{cls.__module__}:{cls.__qualname__}"
        for name, entry in self._entries.items():
            if entry == target:
                return name
        return cls.__name__

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def load(self, name: str) -> Any:
        """Import and return what ``name`` stands for; ValueError naming the known ones."""
        target = self._entries.get(name) if isinstance(name, str) else None
        if target is None:
            known = ", ".join(self.names())
            raise ValueError(f"Unknown {self.kind}: {name} (known: {known})")
        module, _, attribute = target.partition(":")
        loaded = importlib.import_module(module)
        return getattr(loaded, attribute) if attribute else loaded
