"""Twilio Media Streams without sockets: JSON text frames to typed events and back.

:class:`MediaStreamParser` turns one inbound text frame into one event or raises
:class:`MediaStreamError` with a short machine-readable ``reason``; the transport logs and
counts those and carries on. The ``encode_*`` functions build the outbound frames. Nothing
here touches a socket, so tests feed it strings.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from voice_runtime.errors import ProtocolError
from voice_runtime.types import CallInfo, MediaFormat

__all__ = [
    "MAX_MEDIA_BYTES",
    "Connected",
    "Dtmf",
    "Mark",
    "Media",
    "MediaStreamError",
    "MediaStreamParser",
    "Start",
    "Stop",
    "StreamEvent",
    "encode_clear",
    "encode_mark",
    "encode_media",
]


class MediaStreamError(ProtocolError):
    """An inbound frame we cannot use; ``reason`` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class Connected:
    """First message of every stream."""

    protocol: str = "Call"
    version: str = "1.0.0"


@dataclass(frozen=True, slots=True)
class Start:
    """The stream started; carries the call's metadata."""

    stream_sid: str
    call_sid: str
    account_sid: str | None
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    media_format: MediaFormat
    sequence_number: int | None = None

    def call_info(self) -> CallInfo:
        """The call metadata as a :class:`CallInfo`."""
        return CallInfo(
            call_sid=self.call_sid,
            stream_sid=self.stream_sid,
            account_sid=self.account_sid,
            tracks=self.tracks,
            custom_parameters=dict(self.custom_parameters),
            media_format=self.media_format,
        )


@dataclass(frozen=True, slots=True)
class Media:
    """One chunk of audio (raw μ-law bytes, base64 already decoded)."""

    payload: bytes
    track: str = "inbound"
    chunk: int | None = None
    timestamp: int | None = None
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A key the caller pressed."""

    digit: str
    track: str = "inbound_track"
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """Echo of a mark we sent: the audio before it was played, or a clear released it."""

    name: str
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class Stop:
    """The stream ended (caller hung up or the call was redirected)."""

    call_sid: str | None = None
    account_sid: str | None = None
    sequence_number: int | None = None


StreamEvent = Connected | Start | Media | Dtmf | Mark | Stop

_DIGITS = frozenset("0123456789*#ABCDabcdw")

#: Most μ-law bytes one inbound ``media`` frame may carry by default. Twilio sends 160
#: (20 ms); this tolerates other senders' larger frames (half a second) while a peer's
#: 47 kB frames are dropped and counted before their audio reaches any queue.
MAX_MEDIA_BYTES = 4096
#: Twilio SIDs are 34 characters; longer ones (or ones with control characters) are refused
#: so no peer-chosen SID reaches a log record or a registry key at any length.
MAX_SID_CHARS = 64


def _seq(data: dict[str, Any]) -> int | None:
    raw = data.get("sequenceNumber")
    if raw is None:
        return None
    try:
        return int(raw)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity
        return None


_raw_decode = json.JSONDecoder().raw_decode


def _opt_int(raw: Any) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError, OverflowError):
        return None


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise MediaStreamError("missing_field", f"{key!r} must be an object")
    return value


def _sid(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise MediaStreamError("missing_field", f"{key!r} must be a non-empty string")
    if len(value) > MAX_SID_CHARS or not value.isprintable():
        raise MediaStreamError("bad_sid", f"{key!r} is not a plausible SID")
    return value


@dataclass
class MediaStreamParser:
    """Stateful parser of one stream's inbound frames.

    Checks what a single frame cannot show alone: media before ``start``, a second
    ``start``, and frames whose ``streamSid`` is not this stream's. A ``media`` frame with
    more than ``max_media_bytes`` of audio is refused (reason ``oversized_media``).
    """

    stream_sid: str | None = None
    started: bool = False
    stopped: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    max_media_bytes: int = MAX_MEDIA_BYTES

    def parse(self, text: str | bytes) -> StreamEvent:
        """Parse one frame; raise MediaStreamError when it cannot be used."""
        return self._event(self._decode(text))

    def parse_inbound(self, text: str | bytes) -> bytes | StreamEvent:
        """Like :meth:`parse`, but caller audio comes back as its bytes, with no event object.

        The transport's hot path: a ``media`` frame of any track but ``outbound`` returns the
        decoded μ-law audio; every other frame returns what :meth:`parse` would.
        """
        data = self._decode(text)
        if data.get("event") == "media":
            media, audio = self._media_audio(data)
            if media.get("track") != "outbound":
                return audio
            return self._media_event(data, media, audio)
        return self._event(data)

    def _decode(self, text: str | bytes) -> dict[str, Any]:
        if not isinstance(text, str):
            raise MediaStreamError("binary_frame", "Media Streams frames are JSON text")
        try:
            data, end = _raw_decode(text)
            if end != len(text):
                # Trailing whitespace or garbage: json.loads decides, as for any frame.
                data = json.loads(text)
        except (ValueError, RecursionError):
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                # RecursionError: absurdly nested JSON must not end the stream.
                raise MediaStreamError("not_json", "frame is not valid JSON") from None
        if not isinstance(data, dict):
            raise MediaStreamError("not_object", "frame is not a JSON object")
        return data

    def _event(self, data: dict[str, Any]) -> StreamEvent:
        event = data.get("event")
        if event == "media":
            return self._media(data)
        if event == "mark":
            self._check_sid(data)
            mark = _obj(data, "mark")
            name = mark.get("name")
            if not isinstance(name, str):
                raise MediaStreamError("missing_field", "mark.name must be a string")
            return Mark(name, _seq(data))
        if event == "start":
            return self._start(data)
        if event == "dtmf":
            self._check_sid(data)
            body = _obj(data, "dtmf")
            digit = body.get("digit")
            if not isinstance(digit, str) or len(digit) != 1 or digit not in _DIGITS:
                raise MediaStreamError("bad_dtmf", "dtmf.digit must be one key")
            track = body.get("track")
            return Dtmf(digit, track if isinstance(track, str) else "inbound_track", _seq(data))
        if event == "stop":
            self._check_sid(data)
            self.stopped = True
            raw_stop = data.get("stop")
            body = raw_stop if isinstance(raw_stop, dict) else {}
            return Stop(body.get("callSid"), body.get("accountSid"), _seq(data))
        if event == "connected":
            return Connected(str(data.get("protocol", "Call")), str(data.get("version", "")))
        if not isinstance(event, str):
            raise MediaStreamError("missing_event", "frame has no 'event' string")
        raise MediaStreamError("unknown_event", "event type is not part of Media Streams")

    def _check_sid(self, data: dict[str, Any]) -> None:
        if not self.started:
            raise MediaStreamError("before_start", "message arrived before 'start'")
        sid = data.get("streamSid")
        if sid is not None and sid != self.stream_sid:
            raise MediaStreamError("wrong_stream_sid", "streamSid is not this stream's")

    def _media_audio(self, data: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        # The hot path (50 frames a second per call): the checks of _check_sid and _obj,
        # inlined.
        if not self.started:
            raise MediaStreamError("before_start", "message arrived before 'start'")
        sid = data.get("streamSid")
        if sid is not None and sid != self.stream_sid:
            raise MediaStreamError("wrong_stream_sid", "streamSid is not this stream's")
        media = data.get("media")
        if not isinstance(media, dict):
            raise MediaStreamError("missing_field", "'media' must be an object")
        payload = media.get("payload")
        if not isinstance(payload, str):
            raise MediaStreamError("missing_field", "media.payload must be a string")
        try:
            # What base64.b64decode(validate=True) does, without its wrapper.
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except ValueError:  # binascii.Error is a ValueError; so is non-ASCII text
            raise MediaStreamError("bad_base64", "media.payload is not valid base64") from None
        if len(audio) > self.max_media_bytes:
            raise MediaStreamError("oversized_media", "media.payload is over max_media_bytes")
        return media, audio

    def _media(self, data: dict[str, Any]) -> Media:
        return self._media_event(data, *self._media_audio(data))

    @staticmethod
    def _media_event(data: dict[str, Any], media: dict[str, Any], audio: bytes) -> Media:
        track = media.get("track")
        return Media(
            audio,
            track if isinstance(track, str) else "inbound",
            _opt_int(media.get("chunk")),
            _opt_int(media.get("timestamp")),
            _seq(data),
        )

    def _start(self, data: dict[str, Any]) -> Start:
        if self.started:
            raise MediaStreamError("duplicate_start", "stream already started")
        body = _obj(data, "start")
        stream_sid = _sid(data.get("streamSid") or body.get("streamSid"), "streamSid")
        call_sid = _sid(body.get("callSid"), "callSid")
        tracks_raw = body.get("tracks", ["inbound"])
        tracks = (
            tuple(t for t in tracks_raw if isinstance(t, str))
            if isinstance(tracks_raw, list)
            else ("inbound",)
        )
        params_raw = body.get("customParameters") or {}
        params = (
            {str(k): str(v) for k, v in params_raw.items()} if isinstance(params_raw, dict) else {}
        )
        raw_fmt = body.get("mediaFormat")
        fmt_raw: dict[str, Any] = raw_fmt if isinstance(raw_fmt, dict) else {}
        fmt = MediaFormat(
            encoding=str(fmt_raw.get("encoding", "audio/x-mulaw")),
            sample_rate=_opt_int(fmt_raw.get("sampleRate")) or 8000,
            channels=_opt_int(fmt_raw.get("channels")) or 1,
        )
        account = body.get("accountSid")
        if not isinstance(account, str) or len(account) > MAX_SID_CHARS:
            account = None
        self.stream_sid = stream_sid
        self.started = True
        return Start(
            stream_sid=stream_sid,
            call_sid=call_sid,
            account_sid=account,
            tracks=tracks or ("inbound",),
            custom_parameters=params,
            media_format=fmt,
            sequence_number=_seq(data),
        )


# The C string encoder json.dumps uses for a str, without json.dumps's per-call setup:
# the outbound frames below are built for every 40 ms of audio of every call.
_json_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _sid_json(stream_sid: str) -> str:
    return _json_str(stream_sid)


def encode_media(stream_sid: str, audio: bytes) -> str:
    """Build an outbound ``media`` frame carrying raw μ-law ``audio``."""
    # Built by hand: base64 needs no JSON escaping and this runs for every 20 ms frame.
    payload = base64.b64encode(audio).decode("ascii")
    return (
        '{"event":"media","streamSid":'
        + _sid_json(stream_sid)
        + ',"media":{"payload":"'
        + payload
        + '"}}'
    )


def encode_mark(stream_sid: str, name: str) -> str:
    """Build an outbound ``mark`` frame."""
    return (
        '{"event":"mark","streamSid":'
        + _json_str(stream_sid)
        + ',"mark":{"name":'
        + _json_str(name)
        + "}}"
    )


def encode_clear(stream_sid: str) -> str:
    """Build an outbound ``clear`` frame."""
    return '{"event":"clear","streamSid":' + _json_str(stream_sid) + "}"
