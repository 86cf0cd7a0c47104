"""One exception tree: every exception class the package defines derives from the root."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import voice_runtime
from voice_runtime.errors import ProtocolError, ProviderError, VoiceRuntimeError

# Private control flow inside a test double (FakeTwilioRest's ``_Answer``): raised and caught
# in the same request handler, never seen by a user. Named by package and class, so the
# fakes can be split into packages without touching this test.
_ALLOWED = {("voice_runtime.testing", "_Answer")}


def _allowed(module: str, cls: type) -> bool:
    return any(module.startswith(pkg) and cls.__name__ == name for pkg, name in _ALLOWED)


def _package_modules() -> list[str]:
    names = [voice_runtime.__name__]
    for info in pkgutil.walk_packages(voice_runtime.__path__, prefix="voice_runtime."):
        names.append(info.name)
    return names


def test_every_exception_class_derives_from_the_root() -> None:
    outside: list[str] = []
    for name in _package_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != name or not issubclass(cls, BaseException):
                continue
            if not issubclass(cls, VoiceRuntimeError) and not _allowed(name, cls):
                outside.append(f"{name}.{cls.__qualname__}")
    assert outside == []


def test_the_walk_sees_the_whole_package() -> None:
    names = set(_package_modules())
    assert {"voice_runtime.transports.fastws", "voice_runtime.realtime._base"} <= names


def test_websocket_protocol_error_is_rooted_and_keeps_its_old_name() -> None:
    from voice_runtime.transports import fastws

    assert fastws.ProtocolError is fastws.WebSocketProtocolError
    err = fastws.WebSocketProtocolError(1002, "bad frame")
    assert isinstance(err, ProtocolError)
    assert (err.code, err.reason, err.kind) == (1002, "bad frame", "protocol_error")


def test_vendor_fatal_is_a_terminal_provider_error() -> None:
    from voice_runtime.realtime._base import MalformedMessage, VendorFatal

    err = VendorFatal("audio format mismatch", "audio_format_mismatch")
    assert isinstance(err, ProviderError)
    assert not err.retryable
    assert (str(err), err.code) == ("audio format mismatch", "audio_format_mismatch")
    assert isinstance(MalformedMessage("x.y"), ValueError)


@pytest.mark.parametrize(
    ("name", "bases"),
    [
        ("TwilioCallNotFoundError", (RuntimeError,)),
        ("TwilioCallListIncompleteError", (RuntimeError,)),
        ("MissingTwilioCredentialError", (RuntimeError, ValueError)),
    ],
)
def test_twilio_errors_keep_their_compat_bases(name: str, bases: tuple[type, ...]) -> None:
    from voice_runtime.transports import twilio_models

    cls = getattr(twilio_models, name)
    assert issubclass(cls, VoiceRuntimeError)
    for base in bases:
        assert issubclass(cls, base)
