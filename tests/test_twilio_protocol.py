"""The socket-free Media Streams parser and encoders."""

from __future__ import annotations

import base64
import json

import pytest

from voice_runtime.transports import twilio_protocol as proto

START = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": "MZ1",
    "start": {
        "accountSid": "AC1",
        "streamSid": "MZ1",
        "callSid": "CA1",
        "tracks": ["inbound"],
        "customParameters": {"tenant": "acme", "caller_number": "+15550100"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}


def started() -> proto.MediaStreamParser:
    p = proto.MediaStreamParser()
    p.parse(json.dumps(START))
    return p


def test_start_carries_call_info() -> None:
    p = proto.MediaStreamParser()
    assert isinstance(
        p.parse('{"event":"connected","protocol":"Call","version":"1.0.0"}'), proto.Connected
    )
    ev = p.parse(json.dumps(START))
    assert isinstance(ev, proto.Start)
    info = ev.call_info()
    assert (info.call_sid, info.stream_sid, info.account_sid) == ("CA1", "MZ1", "AC1")
    assert info.custom_parameters["tenant"] == "acme"
    assert info.caller_number == "+15550100"
    assert info.media_format.sample_rate == 8000 and info.tracks == ("inbound",)


def test_media_mark_dtmf_stop() -> None:
    p = started()
    payload = base64.b64encode(bytes(range(160))).decode()
    media = p.parse(
        json.dumps(
            {
                "event": "media",
                "sequenceNumber": "2",
                "streamSid": "MZ1",
                "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload},
            }
        )
    )
    assert isinstance(media, proto.Media)
    assert media.payload == bytes(range(160)) and media.timestamp == 20 and media.chunk == 1
    mark = p.parse('{"event":"mark","streamSid":"MZ1","mark":{"name":"a__1"}}')
    assert mark == proto.Mark("a__1", None)
    dtmf = p.parse(
        '{"event":"dtmf","streamSid":"MZ1","dtmf":{"track":"inbound_track","digit":"#"}}'
    )
    assert isinstance(dtmf, proto.Dtmf) and dtmf.digit == "#"
    stop = p.parse('{"event":"stop","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}')
    assert isinstance(stop, proto.Stop) and stop.call_sid == "CA1"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "not_json"),
        ("[1,2]", "not_object"),
        ('{"event":"bogus"}', "unknown_event"),
        ('{"no":"event"}', "missing_event"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":"@@@"}}', "bad_base64"),
        ('{"event":"media","streamSid":"OTHER","media":{"payload":""}}', "wrong_stream_sid"),
        ('{"event":"media","streamSid":"MZ1","media":{}}', "missing_field"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":5}}', "missing_field"),
        ('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"55"}}', "bad_dtmf"),
        ('{"event":"mark","streamSid":"MZ1","mark":{}}', "missing_field"),
        (json.dumps(START), "duplicate_start"),
    ],
)
def test_malformed_frames_raise_specific_reasons(frame: str, reason: str) -> None:
    for parse in ("parse", "parse_inbound"):  # the transport's hot path checks the same
        p = started()
        with pytest.raises(proto.MediaStreamError) as info:
            getattr(p, parse)(frame)
        assert info.value.reason == reason


def test_parse_inbound_gives_caller_audio_as_bytes_and_other_frames_as_parse_does() -> None:
    p = started()
    audio = bytes(range(160))
    payload = base64.b64encode(audio).decode()

    def media(track: object) -> str:
        body = {"payload": payload} if track is None else {"track": track, "payload": payload}
        return json.dumps({"event": "media", "streamSid": "MZ1", "media": body})

    assert p.parse_inbound(media("inbound")) == audio
    assert p.parse_inbound(media(None)) == audio  # no track: the caller's
    outbound = p.parse_inbound(media("outbound"))
    assert isinstance(outbound, proto.Media) and outbound.track == "outbound"
    mark = '{"event":"mark","streamSid":"MZ1","mark":{"name":"m"}}'
    assert p.parse_inbound(mark) == p.parse(mark) == proto.Mark("m", None)


def test_media_before_start_and_binary_frames() -> None:
    p = proto.MediaStreamParser()
    with pytest.raises(proto.MediaStreamError) as info:
        p.parse('{"event":"media","streamSid":"MZ1","media":{"payload":""}}')
    assert info.value.reason == "before_start"
    with pytest.raises(proto.MediaStreamError) as info:
        p.parse(b"\x00\x01")  # type: ignore[arg-type]
    assert info.value.reason == "binary_frame"


def test_encoders_produce_twilio_frames() -> None:
    media = json.loads(proto.encode_media("MZ1", b"\xff\x00"))
    assert media == {"event": "media", "streamSid": "MZ1", "media": {"payload": "/wA="}}
    assert json.loads(proto.encode_mark("MZ1", "m")) == {
        "event": "mark",
        "streamSid": "MZ1",
        "mark": {"name": "m"},
    }
    assert json.loads(proto.encode_clear("MZ1")) == {"event": "clear", "streamSid": "MZ1"}
    # A stream SID with characters JSON must escape still yields valid JSON.
    assert json.loads(proto.encode_media('M"Z', b""))["streamSid"] == 'M"Z'
