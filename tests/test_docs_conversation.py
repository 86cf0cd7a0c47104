"""Every python block of docs/conversation.md runs as written, against the package's fakes."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "conversation.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_doc_has_an_example_per_feature() -> None:
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_doc_block_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / f"block_{index}.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__docs__")
    out = capsys.readouterr().out
    expected = [
        "cleared 0 times",
        "['Hello, how can I help?', 'Are you still there?', 'I have not heard",
        "['max_digits']",
    ][index]
    assert expected in out
