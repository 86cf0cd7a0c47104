"""The package type-checks, and so does user code written against it.

mypy over voice_runtime (settings in pyproject.toml) finds nothing, and ``mypy --strict`` over
the examples and tests/typing_factories.py (what the factories return) finds nothing: a
user's strictly typed bot needs no casts or ignores. Run as tests so that the README's one
test command (and CI) checks types too. The cache lives in pytest's cache directory, so a
second run only rechecks what changed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mypy(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        pytest.fail('mypy is missing: pip install -e ".[dev]"')
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _cache(request: pytest.FixtureRequest, tmp_path: Path, name: str) -> Path:
    cache = getattr(request.config, "cache", None)
    return cache.mkdir(name) if cache is not None else tmp_path / name


def test_mypy_finds_no_errors_in_the_package(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    result = _mypy([], _cache(request, tmp_path, "mypy-package"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_over_the_examples_and_factory_types(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    examples = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.py"))
    # As a user's mypy sees an installed package: its own errors are not the user's to see.
    args = ["--strict", "--follow-imports=silent", *examples, "tests/typing_factories.py"]
    result = _mypy(args, _cache(request, tmp_path, "mypy-strict-examples"))
    assert result.returncode == 0, result.stdout + result.stderr
