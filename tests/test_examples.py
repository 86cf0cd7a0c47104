"""Every example runs end to end against FakeTwilioRest and the caller simulator (--fake)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def clean_env() -> dict[str, str]:
    """This environment without any Twilio or voice server settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "VOICE_"))}


def test_examples_run_against_fake_twilio() -> None:
    # Started together: each takes a couple of seconds of simulated call time.
    runs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / name), "--fake"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            cwd=EXAMPLES.parent,
        )
        for name in (
            "outbound_call.py",
            "inbound_app.py",
            "send_sms.py",
            "subclass_session.py",
            "listen_app.py",
            "ivr_menu.py",
        )
    }
    results = {}
    try:
        for name, proc in runs.items():
            out, err = proc.communicate(timeout=45)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, (code, out, err) in results.items():
        assert code == 0, f"{name} exited {code}\nstdout:\n{out}\nstderr:\n{err}"

    assert "confirmed: True" in results["outbound_call.py"][1]
    assert "call status completed" in results["outbound_call.py"][1]
    assert "hung up over REST: True" in results["inbound_app.py"][1]
    assert '"status": "queued"' in results["send_sms.py"][1]
    assert results["subclass_session.py"][1].count("record: CA") == 2
    # The server's offline STT understood the simulated caller (an async handler, no thread).
    # The first key cut the menu prompt; the account number ended with the hash key.
    assert "menu choice: 1" in results["ivr_menu.py"][1]
    assert "account number received: True (finish_key)" in results["ivr_menu.py"][1]
    assert "the bot heard: i would like to change my delivery address" in (
        results["listen_app.py"][1].lower()
    )


def test_examples_import_only_public_modules() -> None:
    import ast

    # The CLI modules are the command line's, not an API; private modules may change any time.
    not_public = {"voice_runtime.cli", "voice_runtime.control_cli"}
    bad = []
    for path in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] != "voice_runtime":
                    continue
                if module in not_public or any(p.startswith("_") for p in parts):
                    bad.append(f"{path.name}: {module}")
    assert bad == []
