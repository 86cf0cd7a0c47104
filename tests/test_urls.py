"""One http(s) ⇄ ws(s) helper: every place that turns a public URL into a websocket URL."""

from __future__ import annotations

from pathlib import Path

import pytest

import voice_runtime
from voice_runtime.urls import http_base, to_http, to_ws, ws_base


@pytest.mark.parametrize(
    ("url", "ws", "http"),
    [
        ("https://example.com/x", "wss://example.com/x", "https://example.com/x"),
        ("http://127.0.0.1:8080/v?a=1", "ws://127.0.0.1:8080/v?a=1", "http://127.0.0.1:8080/v?a=1"),
        ("wss://example.com", "wss://example.com", "https://example.com"),
        ("ws://h:9/p", "ws://h:9/p", "http://h:9/p"),
        ("HTTPS://Example.com", "wss://Example.com", "https://Example.com"),
        ("sip:help@example.com", "sip:help@example.com", "sip:help@example.com"),
    ],
)
def test_schemes_swap_and_the_rest_stays(url: str, ws: str, http: str) -> None:
    assert (to_ws(url), to_http(url)) == (ws, http)


def test_bases_are_stripped_and_lose_the_trailing_slash() -> None:
    assert ws_base("  https://example.com/api/ ") == "wss://example.com/api"
    assert http_base("wss://example.com/") == "https://example.com"


def test_no_module_swaps_schemes_by_hand() -> None:
    root = Path(voice_runtime.__file__).parent
    by_hand = ('.replace("https://", "wss://"', '.replace("wss://", "https://"', '"https": "wss"')
    offenders = [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if path.name != "urls.py" and any(s in path.read_text() for s in by_hand)
    ]
    assert offenders == []
