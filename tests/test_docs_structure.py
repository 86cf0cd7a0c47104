"""The README and docs/ stay what a user walks: the two commands first, links that resolve,
a reference that lists every setting the code has, an architecture page that names every
module (test_docs_snippets.py runs the blocks)."""

from __future__ import annotations

import argparse
import inspect
import re
import runpy
import tomllib
from pathlib import Path

import pytest

from voice_runtime.cli import build_parser
from voice_runtime.config import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = [README, ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]

DEMO_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install ".[offline]" '
    "&& voice-runtime demo"
)
TEST_COMMAND = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[all,dev]" && pytest'
)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def test_readme_opens_with_the_two_commands() -> None:
    """The demo and test commands are the README's first two blocks, word for word."""
    text = README.read_text(encoding="utf-8")
    blocks = _blocks(text)
    assert blocks[0] == ("bash", DEMO_COMMAND + "\n")
    assert blocks[1] == ("bash", TEST_COMMAND + "\n")
    before = text[: text.index("```bash")].strip().splitlines()
    assert before[0] == "# voice_runtime" and len(before) <= 3, "nothing long above the demo"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the README's test command (CI checks what users run)."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert lines[-1] == TEST_COMMAND


def test_the_commands_name_what_pyproject_declares() -> None:
    """The extras the two commands install and the console script exist."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert {"offline", "all", "dev"} <= set(project["optional-dependencies"])
    assert "voice-runtime" in project["scripts"]


def test_readme_is_short_with_a_bot_of_20_lines() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 120
    python = [code for lang, code in _blocks(text) if lang == "python"]
    assert len(python) == 1, "the README shows one bot; the rest lives in docs/"
    assert len([line for line in python[0].splitlines() if line.strip()]) <= 20


def test_readme_links_every_docs_page() -> None:
    linked = {Path(t).name for t in _LINK.findall(README.read_text(encoding="utf-8"))}
    missing = sorted(p.name for p in DOCS.glob("*.md") if p.name not in linked)
    assert not missing, f"README.md links no {missing}"
    assert "CHANGELOG.md" in linked


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


LINKS = [
    pytest.param(doc, target, id=f"{doc.relative_to(ROOT)}->{target}")
    for doc in DOC_FILES
    for target in _LINK.findall(doc.read_text(encoding="utf-8"))
    if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize(("doc", "target"), LINKS)
def test_relative_link_resolves(doc: Path, target: str) -> None:
    file_part, _, anchor = target.partition("#")
    path = (doc.parent / file_part).resolve() if file_part else doc
    assert path.exists(), f"{doc.name} links {target}: no such file"
    if anchor:
        assert anchor in _anchors(path), f"{doc.name} links {target}: no such heading"


_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
IMAGES = [
    pytest.param(doc, target, id=f"{doc.relative_to(ROOT)}->{target}")
    for doc in DOC_FILES
    for target in _IMAGE.findall(doc.read_text(encoding="utf-8"))
    if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize(("doc", "target"), IMAGES)
def test_image_exists(doc: Path, target: str) -> None:
    """Screenshots and charts the pages show are in the repository."""
    assert (doc.parent / target).resolve().is_file(), f"{doc.name} shows {target}: no such file"


def test_readme_shows_the_console_and_the_phone() -> None:
    shown = {Path(t).name for t in _IMAGE.findall(README.read_text(encoding="utf-8"))}
    assert {"console.png", "phone.png"} <= shown


def _configuration() -> str:
    return (DOCS / "configuration.md").read_text(encoding="utf-8")


def test_configuration_lists_every_environment_variable() -> None:
    text = _configuration()
    missing = [v.name for v in ENV_VARS if f"`{v.name}`" not in text]
    assert not missing, f"docs/configuration.md does not list {missing}"


def test_configuration_lists_every_voice_server_option() -> None:
    from voice_runtime import VoiceServer

    text = _configuration()
    options = inspect.signature(VoiceServer.__init__).parameters
    missing = [name for name in options if name != "self" and f"| `{name}` |" not in text]
    assert not missing, f"docs/configuration.md has no row for VoiceServer({missing})"


def test_configuration_lists_every_command_and_option() -> None:
    text = _configuration()
    missing: list[str] = []
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if f"`{name}" not in text:
                    missing.append(name)
                for option in (s for a in sub._actions for s in a.option_strings):
                    if option.startswith("--") and option != "--help" and option not in text:
                        missing.append(f"{name} {option}")
    assert not missing, f"docs/configuration.md does not mention {missing}"


def test_changelog_names_the_current_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_the_subclassing_example_files_a_record_per_call(tmp_path: Path) -> None:
    """docs/calls.md's TelcoSession records each served call once, with its caller audio."""
    import asyncio

    from voice_runtime.testing import CallerSimulator

    text = (DOCS / "calls.md").read_text(encoding="utf-8")
    section = text[text.index("## Subclassing the session") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = tmp_path / "subclassing.py"
    script.write_text(code.group(1), encoding="utf-8")
    namespace = runpy.run_path(str(script), run_name="__docs__")
    server, records = namespace["server"], namespace["CALL_RECORDS"]

    async def call(url: str) -> str:
        async with CallerSimulator(url) as caller:
            assert await caller.wait_closed(10)
        return caller.call_sid

    with server.start_in_thread(port=0) as served:
        call_sid = asyncio.run(call(f"ws://127.0.0.1:{served.port}/voice"))
    assert len(records) == 1
    assert records[0][0] == call_sid and records[0][1] > 0


def _layout_tree() -> dict[str, int]:
    """The paths docs/architecture.md's layout tree names (relative to the repository), with
    the line each is on; directories end in ``/``."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text[text.index("## Layout") :]
    block = re.search(r"```text\n(voice_runtime/\n.*?)```", section, re.S)
    assert block is not None, "docs/architecture.md: no layout tree under ## Layout"
    named: dict[str, int] = {}
    parents: list[tuple[int, str]] = []  # (indent, directory path) of the open directories
    for number, line in enumerate(block.group(1).splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = (parents[-1][1] if parents else "") + name
        named[path] = number
        if name.endswith("/"):
            parents.append((indent, path))
    return named


def test_architecture_names_every_module() -> None:
    """Every module file of the package is in the layout tree, at its place: a new module
    cannot be added without saying what it is. (Package ``__init__.py`` files may be left
    out: the directory line says what the package is.)"""
    named = _layout_tree()
    modules = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "voice_runtime").rglob("*.py")
        if path.name != "__init__.py"
    )
    missing = [m for m in modules if m not in named]
    assert not missing, f"docs/architecture.md's layout tree does not name {missing}"


def test_architecture_names_only_what_exists() -> None:
    """The layout tree names no file or directory that is gone (or misplaced in the tree)."""
    stale = [path for path in _layout_tree() if not (ROOT / path).exists()]
    assert not stale, f"docs/architecture.md's layout tree names missing {stale}"
