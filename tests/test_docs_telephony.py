"""Every ```python block of docs/telephony.md runs as written, with the package's fakes only."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "telephony.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_the_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / f"block_{index}.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for name in ("VOICE_STREAM_URL", "VOICE_PUBLIC_URL", "TWILIO_SKIP_SIGNATURE_VALIDATION"):
        monkeypatch.delenv(name, raising=False)
    runpy.run_path(str(script), run_name="__docs__")


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 4
