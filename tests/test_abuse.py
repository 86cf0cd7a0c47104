"""Attacks against a VoiceServer served the production way (a second process), each with a
legitimate call running beside it that must lose no frame. The harness is tests/abuse_kit.py;
areas have their own modules (test_abuse_*.py)."""

from __future__ import annotations

import time

from abuse_kit import PacedCaller, ServedApp, assert_no_frame_lost


def test_served_app_receives_every_frame_of_a_legitimate_call() -> None:
    with ServedApp() as app:
        caller = PacedCaller(app.ws_url + "/voice")
        caller.start()
        assert caller.started.wait(10)
        time.sleep(0.5)
        caller.stop()
        assert_no_frame_lost(app, caller)
        assert len(caller.sent) >= 160 * 10
        assert app.stop() == 0
