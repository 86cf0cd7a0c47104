"""Every code block in README.md and docs/*.md works as written, so the docs cannot rot.

- ```python blocks run as tests/docs_kit.py describes: in a temp directory, without
  credentials, only against the package's fakes; a bot that is served gets one simulated
  call and must end it; no error logged, no blocked event loop, no thread left. Each block is
  its own test, named ``file:line``. (They run in this process: one process per file, all at
  once, was no faster on a 2-core machine and starved the event loops it checks.)
- ```bash / ```console / ```shell blocks: every ``voice-runtime ...`` command parses with the
  CLI's real argument parser; ``--help`` and ``--version`` ones run.
- ```text (and json, yaml, ...) blocks are not checked.

New pages under docs/ are picked up automatically.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from docs_kit import COMMAND_LANGS, ROOT, Block, cli_commands, doc_files, fenced_blocks, run_block

from voice_runtime.cli import build_parser, main

ALL_BLOCKS = [b for f in doc_files() for b in fenced_blocks(f)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]
CLI_CASES = [
    pytest.param(b, argv, id=f"{b.where}:{' '.join(argv)[:60]}")
    for b in ALL_BLOCKS
    if b.lang in COMMAND_LANGS
    for argv in cli_commands(b)
]
_PASSED: set[str] = set()  # code of blocks that passed (the README's bot is copied once)


@pytest.fixture(scope="session")
def offline_models_loaded() -> None:
    """Load the offline models once, up front: a bot's first call would otherwise load them
    on the event loop, which the watchdog (rightly) reports, but which is not the docs' fault."""
    try:
        from voice_runtime.offline import preload_all
    except ImportError:
        return
    try:
        preload_all()
    except ImportError:
        pass  # the offline extra is not installed: the blocks that need it fail and say so


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, offline_models_loaded: None) -> None:
    if block.code in _PASSED:
        return
    problem = run_block(block)
    if problem:
        pytest.fail(f"{block.where}: {problem}", pytrace=False)
    _PASSED.add(block.code)


def _runs_for_real(argv: list[str]) -> bool:
    return "--help" in argv or "-h" in argv or argv == ["--version"]


@pytest.mark.parametrize(("block", "argv"), CLI_CASES)
def test_cli_command_parses(
    block: Block,
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    if _runs_for_real(argv):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0, f"{block.where}: voice-runtime {' '.join(argv)} failed"
        assert capsys.readouterr().out.strip()
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        err = capsys.readouterr().err.strip().splitlines()
        pytest.fail(
            f"{block.where}: `voice-runtime {' '.join(argv)}` does not parse: "
            f"{err[-1] if err else exc}"
        )


def test_the_docs_have_blocks_of_each_kind() -> None:
    """The collectors find what they check (a broken fence pattern would check nothing)."""
    assert len(PYTHON_BLOCKS) >= 10
    assert len(CLI_CASES) >= 10
    assert {b.path.name for b in PYTHON_BLOCKS} >= {"README.md", "quickstart.md"}


def test_every_block_says_what_it_is() -> None:
    """Each block is checked (python, shell) or deliberately not (text, json, ...)."""
    known = {"python", "py", "text", "json", "xml", "toml", "ini", "dotenv", "yaml"}
    known |= COMMAND_LANGS
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in ALL_BLOCKS if b.lang not in known]
    assert not unknown, "blocks without a checked or known language: " + ", ".join(unknown)


def test_the_runner_reports_a_broken_block(tmp_path: Path) -> None:
    """A block that fails, or a bot that stays silent, fails with its file and line."""
    page = ROOT / "docs" / "broken.md"  # a path under docs/ so its name reads like a page
    silent = (
        "from voice_runtime import VoiceServer\n\n"
        "async def handle_call(session):\n    pass\n\n"
        "voice = VoiceServer(on_call=handle_call)\n"
    )
    with pytest.raises(NameError):
        run_block(Block(page, 3, "python", "print(undefined)\n"))
    assert "said nothing" in (run_block(Block(page, 9, "python", silent)) or "")
