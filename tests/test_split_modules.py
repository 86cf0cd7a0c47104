"""The split of server.py, twilio_call.py and the large fakes: old import paths keep working.

Also the units that came out of the split: the outbound call options object and the shared
free-port helper every fake serves on.
"""

from __future__ import annotations

import dataclasses
import importlib
import socket
from pathlib import Path

import pytest

import voice_runtime
from voice_runtime.testing._serve import bind_free_socket, close_server, port_of
from voice_runtime.transports.twilio_control import OutboundCallOptions

SPLIT_MODULES = (
    "voice_runtime.server",
    "voice_runtime.calls",
    "voice_runtime.webhooks",
    "voice_runtime.transports.twilio_call",
    "voice_runtime.transports.twilio_control",
    "voice_runtime.transports.twilio_listing",
    "voice_runtime.transports.twilio_twiml",
    "voice_runtime.testing._serve",
    "voice_runtime.testing.fake_elevenlabs",
    "voice_runtime.testing.fake_realtime",
    "voice_runtime.testing.fake_twilio_rest",
)


def _module_files(name: str) -> list[Path]:
    module = importlib.import_module(name)
    path = Path(module.__file__ or "")
    return sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]


@pytest.mark.parametrize("name", SPLIT_MODULES)
def test_split_modules_stay_small(name: str) -> None:
    for path in _module_files(name):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 600, f"{path.relative_to(Path(voice_runtime.__file__).parent)}: {lines}"


MAX_LINES = 600


def test_no_module_of_the_package_is_over_600_lines() -> None:
    root = Path(voice_runtime.__file__).parent
    over: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            over[name] = lines
    assert over == {}, f"modules over {MAX_LINES} lines: {over}"


def test_split_modules_keep_their_old_names() -> None:
    from voice_runtime.providers import base, stt_base
    from voice_runtime.realtime import agent_bridge, bridge, bridge_types
    from voice_runtime.transports import fastws, fastws_asgi

    for old, new in ((base, stt_base), (bridge, agent_bridge), (bridge, bridge_types)):
        assert all(getattr(old, n) is getattr(new, n) for n in new.__all__)
    assert fastws.EXTENSION is fastws_asgi.EXTENSION
    for module in (base, bridge, fastws):
        assert all(hasattr(module, n) for n in module.__all__)


def test_server_keeps_every_name_it_had() -> None:
    from voice_runtime import calls, server, webhooks

    assert server.CallRegistry is calls.CallRegistry and server.Route is calls.Route
    assert issubclass(server.VoiceServer, webhooks.WebhookRoutes)
    for name in ("MAX_WEBHOOK_BYTES", "MAX_WEBHOOK_FIELDS", "TWIML", "ENDED_STATUSES"):
        assert getattr(server, name) is getattr(webhooks, name)
    # benchmarks/bench_calls.py replaces the transport here; the stream endpoint reads it.
    from voice_runtime.transports.twilio_ws import MediaStreamCall

    assert server.MediaStreamCall is MediaStreamCall
    assert set(server.__all__) == {"CallRegistry", "Route", "VoiceServer"}


@pytest.mark.parametrize(
    "name", ["voice_runtime.testing.fake_realtime", "voice_runtime.testing.fake_twilio_rest"]
)
def test_fake_packages_export_what_the_modules_did(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing


def test_twilio_call_reexports_the_split_functions() -> None:
    from voice_runtime.transports import twilio_call, twilio_control, twilio_listing, twilio_twiml

    assert twilio_call.initiate_outbound_call is twilio_control.initiate_outbound_call
    assert twilio_call.list_calls is twilio_listing.list_calls
    assert twilio_call.build_stream_twiml is twilio_twiml.build_stream_twiml
    assert all(hasattr(twilio_call, n) for n in twilio_call.__all__)


def test_outbound_options_validate_before_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # No VOICE_STREAM_URL: a bad option is still the ValueError, found before settings.
    monkeypatch.delenv("VOICE_STREAM_URL", raising=False)
    with pytest.raises(ValueError, match="async_amd needs machine_detection"):
        OutboundCallOptions(phone="+15550001111", async_amd=True)
    with pytest.raises(ValueError, match="status_callback_events needs status_callback"):
        OutboundCallOptions(phone="+15550001111", status_callback_events=["ringing"])
    with pytest.raises(ValueError, match="timeout"):
        OutboundCallOptions(phone="+15550001111", timeout=601)


def test_outbound_options_are_frozen_and_keep_numbers_out_of_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "1" * 32)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "token")
    events = ["ringing"]
    options = OutboundCallOptions(
        phone="+15550001111",
        from_="+15550002222",
        stream_url="https://bot.example.com",
        status_callback="https://bot.example.com/twilio/status",
        status_callback_events=events,
    )
    events.append("completed")  # the options keep what was passed
    assert options.status_callback_events == ("ringing",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.phone = "+15550003333"  # type: ignore[misc]
    assert "5550001111" not in repr(options) and "5550002222" not in repr(options)
    kwargs = options.create_kwargs()
    assert kwargs["status_callback_event"] == ["ringing"]
    assert (kwargs["to"], kwargs["from_"]) == ("+15550001111", "+15550002222")


async def test_free_port_sockets_listen_and_differ() -> None:
    import asyncio

    first, second = bind_free_socket(), bind_free_socket()
    try:
        assert port_of(first) != port_of(second) and port_of(first) > 0
        accepted = asyncio.Event()

        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set()
            writer.close()

        server = await asyncio.start_server(on_connection, sock=first)
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(first))
        await asyncio.wait_for(accepted.wait(), 5)
        writer.close()
        await writer.wait_closed()
        await close_server(server)
        assert not server.is_serving()
    finally:
        first.close()
        second.close()


def test_blocking_socket_for_threaded_servers() -> None:
    sock = bind_free_socket(blocking=True)
    try:
        assert sock.getblocking() and sock.family == socket.AF_INET
    finally:
        sock.close()


def test_realtime_fakes_share_the_lifecycle_and_serve_on_a_thread() -> None:
    import threading

    from voice_runtime.testing._serve import FakeService
    from voice_runtime.testing.fake_elevenlabs import FakeElevenLabsTts, FakeScribeServer
    from voice_runtime.testing.fake_realtime import FakeOpenAIRealtime

    assert all(issubclass(c, FakeService) for c in (FakeOpenAIRealtime, FakeScribeServer))
    assert issubclass(FakeElevenLabsTts, FakeService)
    with FakeOpenAIRealtime() as fake:
        assert fake.port > 0
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5):
            pass
    assert not any(t.name == "FakeOpenAIRealtime" for t in threading.enumerate())
