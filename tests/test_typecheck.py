"""The package type-checks: mypy over voice_runtime (settings in pyproject.toml) finds nothing.

Run as a test so that the README's one test command (and CI) checks types too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_errors_in_the_package(tmp_path: Path) -> None:
    if shutil.which("mypy") is None and not _importable("mypy"):
        pytest.fail('mypy is missing: pip install -e ".[dev]"')
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
