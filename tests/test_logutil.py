"""The log limiter and clip: attacker-controlled counts and strings stay bounded in logs."""

from __future__ import annotations

from voice_runtime.logutil import LogLimiter, clip


def test_limiter_logs_the_first_few_then_one_in_n_and_counts_all() -> None:
    limiter = LogLimiter(first=3, every=100)
    logged = [i for i in range(1, 1001) if limiter.allow("unknown_mark")]
    assert logged[:3] == [1, 2, 3]
    assert len(logged) == 3 + 9  # 103, 203, ..., 903
    assert limiter.count("unknown_mark") == 1000
    assert limiter.count("other") == 0


def test_clip_bounds_length_and_escapes_control_characters() -> None:
    assert clip("short") == "short"
    long = clip("x" * 10_000)
    assert len(long) == 64 and long.endswith("...")
    assert "\n" not in clip("a\nb\x00c") and len(clip("\x00" * 100)) <= 64
    assert len(clip({"k": "v" * 500})) <= 64
