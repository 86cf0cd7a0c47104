"""Every code block in README.md and docs/*.md works as written, so the docs cannot rot.

- ```python blocks run (runpy, ``run_name="__docs__"`` so ``if __name__ == "__main__":`` parts
  do not), each in a temp working directory, with no voice_runtime variable (no credential)
  in the environment and only the package's fakes. A block that builds a ``VoiceServer`` with
  an ``on_call`` and does not call it itself gets one simulated call: the server is started
  on a free port, the CallerSimulator dials in, waits for the bot to speak, answers out loud,
  and the bot must end the call. No block may log an error (or a blocked event loop) unless
  it quotes that log line itself.
- ```bash / ```console / ```shell blocks: every ``voice-runtime ...`` command parses with the
  CLI's real argument parser; ``--help`` and ``--version`` ones run.
- ```text blocks are not checked.

New pages under docs/ are picked up automatically; a failure names the file and line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import runpy
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from voice_runtime.cli import build_parser, main
from voice_runtime.config import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)[^`]*$")
# A block that serves and calls its bot itself is not called a second time.
_SELF_CALLING = re.compile(r"CallerSimulator|serve_in_loop|start_in_thread|BackgroundVoiceServer")
_COMMAND_LANGS = {"bash", "sh", "shell", "console"}
_SEPARATORS = {"&&", "||", "|", ";", "&"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # line number of the first code line (1-based)
    lang: str
    code: str

    @property
    def where(self) -> str:
        """``file:line`` of the block, for test ids and failure messages."""
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path`` (indented ones, e.g. in lists, dedented)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        assert j < len(lines), f"{path.relative_to(ROOT)}:{i + 1}: code block never closed"
        found.append(Block(path, i + 2, opening["info"].lower(), "\n".join(body) + "\n"))
        i = j + 1
    return found


ALL_BLOCKS = [b for f in DOC_FILES for b in fenced_blocks(f)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("python", "py")]


def cli_commands(block: Block) -> list[list[str]]:
    """The argument lists of the ``voice-runtime`` commands in a shell block."""
    text = block.code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output, not a command
            line = line[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""  # "12#@3" is an argument; a lone "#" starts a comment
        tokens: list[str] = []
        for token in lexer:
            if token.startswith("#"):
                break
            tokens.append(token)
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in _SEPARATORS:
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
                segment.pop(0)  # VAR=value before the command
            if segment and segment[0] == "voice-runtime":
                commands.append(segment[1:])
            segment = []
    return commands


CLI_CASES = [
    pytest.param(b, argv, id=f"{b.where}:{' '.join(argv)[:60]}")
    for b in ALL_BLOCKS
    if b.lang in _COMMAND_LANGS
    for argv in cli_commands(b)
]


# --------------------------------------------------------------------------- python blocks


def without_main(code: str) -> str:
    """``code`` without its ``if __name__ == "__main__":`` part (it does not run here)."""
    kept: list[str] = []
    skipping = False
    for line in code.splitlines():
        if re.match(r"if __name__ == ['\"]__main__['\"]:", line):
            skipping = True
            continue
        if skipping and (not line.strip() or line[0].isspace()):
            continue
        skipping = False
        kept.append(line)
    return "\n".join(kept)


class _Errors(logging.Handler):
    """Collects ERROR records (a handler that failed, a provider that could not start) and
    the watchdog's warnings (a handler that blocked the event loop)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.name == "voice_runtime.watchdog":
            self.records.append(record)


@contextmanager
def errors_logged() -> Iterator[list[logging.LogRecord]]:
    """The failures any logger reports inside the block."""
    handler = _Errors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


@functools.cache
def caller_speech() -> bytes:
    """What the simulated caller says: real speech with the offline extra, else a tone."""
    from voice_runtime.audio import silence_ulaw, tone_ulaw

    try:
        from voice_runtime.offline import synthesize_ulaw

        speech = synthesize_ulaw("I would like a table for two tonight.", "piper")
    except ImportError:
        speech = tone_ulaw(300.0, 1000.0, -12.0)
    return speech + silence_ulaw(1000)


async def dial(url: str) -> tuple[float, bool]:
    """One call: hear the greeting, answer, and wait for the bot to end the call."""
    from voice_runtime.testing import CallerSimulator

    sim = CallerSimulator(
        url,
        parameters={"caller_number": "+15550100"},
        silence_when_idle=False,
        playback="instant",  # the bot's audio counts as heard at once: no real-time wait
    )
    async with sim:
        await sim.wait_for_heard(100, timeout=15)
        await sim.wait_idle(0.6, timeout=15)
        if not sim.closed:
            await sim.send_audio(caller_speech(), realtime=False)
        ended = await sim.wait_closed(20)
    return sim.heard_ms, ended


def call_the_bot(voice: object, where: str) -> None:
    """Serve ``voice`` on a free port and place one simulated call to it."""
    from voice_runtime import VoiceServer

    assert isinstance(voice, VoiceServer)
    with voice.start_in_thread(port=0) as server:
        heard_ms, ended = asyncio.run(dial(f"ws://127.0.0.1:{server.port}{voice.path}"))
    assert heard_ms > 0, f"{where}: the bot said nothing to a simulated caller"
    assert ended, f"{where}: the bot did not end the simulated call within 20 s"


_PASSED: set[str] = set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where for b in PYTHON_BLOCKS])
def test_python_block_runs(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    from voice_runtime import VoiceServer

    if block.code in _PASSED:  # the same code as another block (the README's bot, copied)
        return
    for var in ENV_VARS:  # no credentials, no public URL: only the fakes are reachable
        monkeypatch.delenv(var.name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    # A block may point the environment at a fake (os.environ.update(fake.env())).
    saved = dict(os.environ)
    request.addfinalizer(lambda: (os.environ.clear(), os.environ.update(saved)))
    # Named and padded like the doc, so a traceback points at the doc's own line.
    script = tmp_path / block.path.name
    script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
    with errors_logged() as errors:
        namespace = runpy.run_path(str(script), run_name="__docs__")
        if not _SELF_CALLING.search(without_main(block.code)):
            for value in list(namespace.values()):
                if isinstance(value, VoiceServer) and value.on_call is not None:
                    call_the_bot(value, block.where)
    # A block about failures quotes the line it logs; any other error line is a failure.
    unexpected = [r.getMessage() for r in errors if r.getMessage() not in block.code]
    assert not unexpected, f"{block.where} logged errors: " + "; ".join(unexpected)
    _PASSED.add(block.code)


# --------------------------------------------------------------------------- shell blocks


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


def test_blocks_with_an_unknown_language_are_not_skipped_silently() -> None:
    """Each block says what it is: checked (python, shell) or deliberately not (text)."""
    known = {
        "python",
        "py",
        "text",
        "json",
        "xml",
        "toml",
        "ini",
        "dotenv",
        "yaml",
        *_COMMAND_LANGS,
    }
    unknown = [f"{b.where} ({b.lang or 'no language'})" for b in ALL_BLOCKS if b.lang not in known]
    assert not unknown, "blocks without a checked or known language: " + ", ".join(unknown)
