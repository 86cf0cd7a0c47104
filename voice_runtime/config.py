"""The one place that reads environment variables.

Everything else takes explicit arguments and falls back to :func:`settings`, which reads
the environment at call time (never at import), so tests and apps can change variables
before constructing objects.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from voice_runtime.errors import ConfigurationError

_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class EnvVar:
    """One documented environment variable."""

    name: str
    default: str | None
    meaning: str


ENV_VARS: tuple[EnvVar, ...] = (
    EnvVar("VOICE_STREAM_URL", None, "public base URL of this server (https:// or wss://)"),
    EnvVar("VOICE_SERVER_PORT", "8080", "port the voice server listens on"),
    EnvVar("VOICE_PUBLIC_URL", None, "public base URL Twilio uses for webhooks (signatures)"),
    EnvVar("TWILIO_ACCOUNT_SID", None, "Twilio account SID (AC…)"),
    EnvVar("TWILIO_AUTH_TOKEN", None, "Twilio auth token; enables signature checks"),
    EnvVar("TWILIO_PHONE_NUMBER", None, "the Twilio number calls and SMS come from"),
    EnvVar("TWILIO_SKIP_SIGNATURE_VALIDATION", "", "1/true disables signature checks (dev only)"),
    EnvVar("TWILIO_HTTP_TIMEOUT", "15", "seconds before a Twilio REST request times out"),
    EnvVar("TWILIO_REGION", None, "Twilio region for REST requests (e.g. ie1)"),
    EnvVar("TWILIO_EDGE", None, "Twilio edge location for REST requests (e.g. dublin)"),
    EnvVar("TWILIO_API_BASE_URL", None, "override of https://api.twilio.com (fakes, proxies)"),
    EnvVar("ELEVENLABS_API_KEY", None, "ElevenLabs API key"),
    EnvVar("ELEVENLABS_VOICE_ID", "21m00Tcm4TlvDq8ikWAM", "ElevenLabs TTS voice"),
    EnvVar("ELEVENLABS_MODEL", "eleven_multilingual_v2", "ElevenLabs TTS model"),
    EnvVar("STT_MODEL_ID", "scribe_v2_realtime", "ElevenLabs realtime STT model"),
    EnvVar("STT_LANGUAGE_CODE", None, "language hint for the ElevenLabs STT"),
    EnvVar("OPENAI_API_KEY", None, "OpenAI Realtime API key"),
    EnvVar("GEMINI_API_KEY", None, "Gemini Live API key"),
    EnvVar("GOOGLE_API_KEY", None, "Gemini Live API key, when GEMINI_API_KEY is unset"),
    EnvVar("XAI_API_KEY", None, "xAI Grok voice API key"),
    EnvVar("ELEVENLABS_AGENT_ID", None, "ElevenLabs Agents agent id"),
    EnvVar("AZURE_SPEECH_KEY", None, "Azure Speech subscription key"),
    EnvVar("AZURE_SPEECH_REGION", "westeurope", "Azure Speech region"),
    EnvVar("AZURE_TTS_VOICE", "fi-FI-NooraNeural", "Azure TTS voice"),
    EnvVar("VOICE_MONITOR", "", "1/true plays both call legs through ffplay"),
    EnvVar("TRANSPORT", "twilio", "twilio, or mock for the loopback bridge"),
    EnvVar("VOICE_REDIS_URL", None, "Redis URL of the cluster; unset: one process, no Redis"),
    EnvVar("VOICE_INSTANCE_URL", None, "this instance's own public base URL"),
    EnvVar("VOICE_INSTANCE_ID", None, "this instance's id in the cluster (default: random)"),
    EnvVar("VOICE_CLUSTER_SECRET", None, "HMAC key of route tokens (same on every instance)"),
    EnvVar("VOICE_CLUSTER_HEARTBEAT_S", "2", "seconds between cluster heartbeats"),
)


@dataclass(frozen=True)
class Settings:
    """A snapshot of every voice_runtime environment variable (secrets are left out of repr)."""

    voice_stream_url: str | None = None
    voice_server_port: int = 8080
    voice_public_url: str | None = None
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_phone_number: str | None = None
    twilio_skip_signature_validation: bool = False
    twilio_http_timeout: float = 15.0
    twilio_region: str | None = None
    twilio_edge: str | None = None
    twilio_api_base_url: str | None = None
    elevenlabs_api_key: str | None = field(default=None, repr=False)
    elevenlabs_voice_id: str = "21m00Tcm4TlvDq8ikWAM"
    elevenlabs_model: str = "eleven_multilingual_v2"
    stt_model_id: str = "scribe_v2_realtime"
    stt_language_code: str | None = None
    openai_api_key: str | None = field(default=None, repr=False)
    gemini_api_key: str | None = field(default=None, repr=False)
    google_api_key: str | None = field(default=None, repr=False)
    xai_api_key: str | None = field(default=None, repr=False)
    elevenlabs_agent_id: str | None = None
    azure_speech_key: str | None = field(default=None, repr=False)
    azure_speech_region: str = "westeurope"
    azure_tts_voice: str = "fi-FI-NooraNeural"
    voice_monitor: bool = False
    transport: str = "twilio"
    voice_redis_url: str | None = field(default=None, repr=False)
    voice_instance_url: str | None = None
    voice_instance_id: str | None = None
    voice_cluster_secret: str | None = field(default=None, repr=False)
    voice_cluster_heartbeat_s: float = 2.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every documented variable from ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name.upper(), f.type, raw)
        return cls(**values)  # type: ignore[arg-type]


def _convert(name: str, kind: object, raw: str) -> object:
    kind = str(kind)
    if kind == "bool":
        return raw.strip().lower() in _TRUE
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    if kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None
        if name == "TWILIO_HTTP_TIMEOUT" and (not math.isfinite(value) or value <= 0):
            raise ConfigurationError(f"{name} must be a finite positive number, got {raw!r}")
        return value
    return raw


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Return the settings as the environment says now."""
    return Settings.from_env(environ)


def env_value(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """One documented variable's raw value (stripped), or None when unset or blank."""
    if name not in {v.name for v in ENV_VARS}:
        raise KeyError(f"{name} is not a documented voice_runtime variable")
    env = os.environ if environ is None else environ
    value = env.get(name, "").strip()
    return value or None


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Read a boolean flag variable (1/true/yes/on)."""
    env = os.environ if environ is None else environ
    return env.get(name, "").strip().lower() in _TRUE


class _CurrentStr(str):
    """A setting handed out as a module constant (so setting it back is no override)."""

    __slots__ = ()


class _CurrentInt(int):
    """An integer setting handed out as a module constant."""

    __slots__ = ()


_NO_OVERRIDE = object()


class _ModuleConstant:
    """One 0.1.x constant as a data descriptor on its module's class."""

    def __init__(self, owner: ModuleConstants, name: str) -> None:
        self._owner = owner
        self._name = name

    def __get__(self, module: object, kind: type | None = None) -> Any:
        if module is None:
            return self
        return self._owner.current(self._name)

    def __set__(self, module: object, value: object) -> None:
        self._owner.set(self._name, value)

    def __delete__(self, module: object) -> None:
        self._owner.set(self._name, _NO_OVERRIDE)


class ModuleConstants:
    """The 0.1.x module constants (``elevenlabs_tts.ELEVENLABS_API_KEY`` …) backed by settings.

    0.1.x read them from the environment at import. Here each is a property of its module:
    reading gives a value set on the module (``monkeypatch.setattr``, ``patch.object``) or
    else the setting now, and :meth:`value` gives constructors the same. Setting back what a
    read handed out (monkeypatch's undo before pytest 9.2) or deleting it removes the
    override, so no stale value outlives a test.
    """

    def __init__(self, module: str, names: Mapping[str, str]) -> None:
        self._fields = dict(names)  # constant name -> Settings field
        self._overrides: dict[str, object] = {}
        target = sys.modules[module]
        attrs = {name: _ModuleConstant(self, name) for name in self._fields}
        target.__class__ = type(type(target).__name__, (type(target),), attrs)

    def set(self, name: str, value: object) -> None:
        """Override ``name`` (``_NO_OVERRIDE`` or a value a read handed out removes it)."""
        if value is _NO_OVERRIDE or isinstance(value, (_CurrentStr, _CurrentInt)):
            self._overrides.pop(name, None)
        else:
            self._overrides[name] = value

    def current(self, name: str) -> Any:
        """What ``module.NAME`` reads: the override, else the setting now (marked as such)."""
        if name in self._overrides:
            return self._overrides[name]
        value = getattr(settings(), self._fields[name])
        if isinstance(value, int) and not isinstance(value, bool):
            return _CurrentInt(value)
        return _CurrentStr("" if value is None else value)

    def value(self, name: str, current: Settings | None = None) -> Any:
        """For constructors: the override when one is set, else the setting (None if unset)."""
        if name in self._overrides:
            return self._overrides[name]
        return getattr(current or settings(), self._fields[name])


__all__ = ["ENV_VARS", "EnvVar", "ModuleConstants", "Settings", "env_flag", "env_value", "settings"]
