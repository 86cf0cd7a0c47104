"""Issue 16 item 6: the browser phone and the console in a real browser.

Debian's chromium, driven by Playwright for Python (the system browser, never a downloaded
one), plays a WAV of a spoken sentence as its microphone. The phone page speaks Twilio Media
Streams to the server's /voice route; the server transcribes with the offline STT and answers.
Screenshots of both pages go to ``SCREENSHOT_DIR`` when set (``SCREENSHOT_DIR=docs/img`` makes
the README's pictures), else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from voice_runtime import Conversation, VoiceServer, VoiceSession  # noqa: E402
from voice_runtime.audio import resample  # noqa: E402
from voice_runtime.mock.tts import MockTts  # noqa: E402
from voice_runtime.offline import tts_engine  # noqa: E402
from voice_runtime.serving import BackgroundVoiceServer  # noqa: E402
from voice_runtime.testing.metrics import word_accuracy  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SENTENCE = "I would like to change my delivery address."
REPLY = "Thank you. I heard every word, and I will change your delivery address right away."
LONG_REPLY = "Let me read you the whole delivery policy, which takes a while. " * 3
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"{CHROMIUM} is missing (Debian package chromium; .ci/run installs it)",
)


def speech_wav(path: Path, text: str) -> Path:
    """``text`` spoken by the offline TTS as a 48 kHz WAV, with silence around it."""
    audio, rate = tts_engine("piper").synthesize(text)
    speech = resample(audio, rate, 48000).astype(np.int16)
    pcm = np.concatenate([np.zeros(38400, np.int16), speech, np.zeros(72000, np.int16)])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(pcm.tobytes())
    return path


class Bot:
    """Listens once, answers with a long reply, records digits; thread-safe for the test."""

    def __init__(self) -> None:
        self.heard: list[str | None] = []
        self.replies: list[dict[str, Any]] = []
        self.digits: list[str] = []
        self.changed = threading.Condition()

    def _note(self, target: list[Any], value: Any) -> None:
        with self.changed:
            target.append(value)
            self.changed.notify_all()

    async def __call__(self, session: VoiceSession) -> None:
        loop = asyncio.get_running_loop()
        keys: asyncio.Queue[str] = asyncio.Queue()

        def pressed(digit: str) -> None:  # on a callback thread
            self._note(self.digits, digit)
            loop.call_soon_threadsafe(keys.put_nowait, digit)

        async def key(wanted: str) -> None:
            while await keys.get() != wanted:
                pass

        session.on_dtmf = pressed
        conv = Conversation(session, MockTts(ms_per_char=50))
        self._note(self.heard, await conv.listen_async(timeout=20))
        self._note(self.replies, await conv.say_async(REPLY))
        # "9": a long reply; "1" while it plays: the bot clears it (as barge-in would).
        await key("9")
        long_reply = asyncio.create_task(conv.say_async(LONG_REPLY))
        await key("1")
        session.request_clear_buffer()
        self._note(self.replies, await long_reply)
        await session.wait_until_disconnected_async()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


def wait_page(page: Any, script: str, timeout: float = 15.0) -> Any:
    """Poll ``script`` in the page until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(script)
        if value or time.monotonic() > deadline:
            return value
        page.wait_for_timeout(100)


@pytest.mark.timeout(90)
def test_a_call_from_the_browser_phone_is_heard_answered_and_shown_on_the_console(
    tmp_path: Path,
) -> None:
    pytest.importorskip("faster_whisper", reason="the offline STT is not installed")
    pytest.importorskip("piper", reason="the offline TTS (piper) is not installed")
    wav = speech_wav(tmp_path / "caller.wav", SENTENCE)
    shots = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    if not shots.is_absolute():
        shots = ROOT / shots
    shots.mkdir(parents=True, exist_ok=True)
    bot = Bot()
    voice = VoiceServer(on_call=bot, stt="offline", console=True)
    args = [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={wav}%noloop"]
    with (
        BackgroundVoiceServer(voice) as server,
        playwright_sync.sync_playwright() as pw,
    ):
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=args,
            viewport={"width": 1280, "height": 720},
        )
        try:
            console = browser.pages[0] if browser.pages else browser.new_page()
            console.goto(server.url + "/console")
            phone = browser.new_page()
            phone.goto(server.url + "/phone")
            phone.click("#call")

            # The operator opens the call as soon as it shows, with transcripts on.
            console.click("tr.call", timeout=10_000)
            console.check("#content")
            assert bot.wait(lambda: bool(bot.heard), 20), "the bot heard nothing"
            heard = bot.heard[0] or ""
            assert word_accuracy([(SENTENCE, heard)]) >= 0.8, heard

            # The reply plays in the page; a key press reaches on_dtmf while it plays.
            assert wait_page(phone, "window.phone.stats.speechBursts >= 1"), "no agent audio"
            phone.click("#keypad button[data-digit='7']")
            assert bot.wait(lambda: bot.digits == ["7"], 5), bot.digits
            latency = console.locator("tr.call td.latency")
            assert wait_page(console, "window.consoleState.rows[0]?.last_turn_ms > 0", 5)
            assert latency.inner_text().endswith(" ms"), latency.inner_text()
            # The console's meters moved with the reply's audio.
            assert wait_page(console, "window.consoleState.peak.agent > 0.01", 5)
            console.bring_to_front()  # a background tab does not repaint its meters
            console.wait_for_timeout(300)
            console.screenshot(path=str(shots / "console.png"))

            # say_async returns once the page echoed the reply's final mark (it was played).
            assert bot.wait(lambda: bool(bot.replies), 15), "the reply was not confirmed"
            assert not bot.replies[0].get("interrupted") and "error" not in bot.replies[0]
            assert wait_page(phone, "window.phone.timeline.some(e => e.kind === 'turn latency')")
            phone.bring_to_front()
            phone.wait_for_timeout(300)
            phone.screenshot(path=str(shots / "phone.png"))
            stats = phone.evaluate("window.phone.stats")
            assert stats["marksReceived"] > 0 and stats["marksEchoed"] == stats["marksReceived"]
            reply_ms = len(MockTts(ms_per_char=50).audio_for(REPLY)) / 8
            assert stats["playedMs"] >= 0.9 * reply_ms, (stats, reply_ms)
            assert stats["bytesReceived"] >= 0.9 * reply_ms * 8
            assert stats["errors"] == []

            # Clear: the page drops the queued reply and echoes its pending marks at once.
            played = stats["playedMs"]
            phone.click("#keypad button[data-digit='9']")
            assert wait_page(phone, f"window.phone.stats.playedMs > {played + 400}", 10)
            phone.click("#keypad button[data-digit='1']")
            assert bot.wait(lambda: len(bot.replies) == 2, 5), "the cleared reply never returned"
            assert wait_page(phone, "window.phone.stats.clears === 1", 5)
            echoed = "window.phone.stats.marksEchoed === window.phone.stats.marksReceived"
            assert wait_page(phone, echoed, 5), phone.evaluate("window.phone.stats")
            stats = phone.evaluate("window.phone.stats")
            long_ms = len(MockTts(ms_per_char=50).audio_for(LONG_REPLY)) / 8
            assert stats["playedMs"] < played + 0.5 * long_ms, stats
            timeline = phone.evaluate("window.phone.timeline")
            assert any(e["kind"] == "mark echoed (cleared)" for e in timeline), timeline

            phone.click("#hangup")
            assert wait_page(console, "window.consoleState.rows[0]?.live === false", 5)
        finally:
            browser.close()
    assert (shots / "console.png").stat().st_size > 0 and (shots / "phone.png").stat().st_size > 0


@pytest.mark.timeout(60)
def test_with_signatures_enforced_the_phone_opens_with_the_token_and_its_call_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "browser-test-auth-token")
    for name in ("TWILIO_SKIP_SIGNATURE_VALIDATION", "VOICE_PUBLIC_URL", "VOICE_STREAM_URL"):
        monkeypatch.delenv(name, raising=False)
    digits: list[str] = []
    calls: list[VoiceSession] = []
    changed = threading.Condition()

    async def bot(session: VoiceSession) -> None:
        def pressed(digit: str) -> None:
            with changed:
                digits.append(digit)
                changed.notify_all()

        session.on_dtmf = pressed
        with changed:
            calls.append(session)
            changed.notify_all()
        await session.wait_until_disconnected_async()

    voice = VoiceServer(on_call=bot, console=True)
    with (
        BackgroundVoiceServer(voice) as server,
        playwright_sync.sync_playwright() as pw,
    ):
        voice.public_url = server.url  # signed as Twilio would reach it: the token is needed
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            phone = browser.new_page()
            assert phone.goto(server.url + "/phone").status == 401
            phone.goto(f"{server.url}/phone?token={voice.console.token}")
            assert phone.url == server.url + "/phone"  # the token left the address bar
            phone.click("#call")
            with changed:
                assert changed.wait_for(lambda: bool(calls), 10), "the call never started"
            params = calls[0].call_info.custom_parameters
            assert params["caller"] == "browser-phone"
            phone.click("#keypad button[data-digit='#']")
            with changed:
                assert changed.wait_for(lambda: digits == ["#"], 5), digits
            phone.click("#hangup")
            assert wait_page(phone, "window.phone.stats.state === 'ended'", 5)
            assert phone.evaluate("window.phone.stats.errors") == []
        finally:
            browser.close()
