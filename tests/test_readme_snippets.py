"""README code blocks that users copy run as written (no NameError, no missing import)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


def test_the_subclassing_snippet_runs_and_builds_a_server() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_block_after("### Subclassing the session"), "README.md", "exec"), namespace)
    server = namespace["server"]
    session = server.session_factory()  # type: ignore[attr-defined]
    session.signal_disconnected()
    assert namespace["CALL_RECORDS"] == [(None, 0)]
