"""Speech fallback (issue 18 item 7): a chain hands the call to the next provider mid-call.

The vendor is the fake ElevenLabs server made to fail for real (a dropped socket, then every
reconnect refused with 500; a TTS answering 500); the last resort is the offline engine
(skipped when its models are not installed) or the mock.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
from conftest import VoiceServer, wait_for

from voice_runtime.audio import tone_ulaw
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.providers.base import ECHO_TAIL_S
from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS
from voice_runtime.providers.fallback import FallbackStt, FallbackSwitch, FallbackTts
from voice_runtime.stt import create_stt
from voice_runtime.testing.fake_elevenlabs import FakeElevenLabsTts, FakeScribeServer, ScribePlan
from voice_runtime.tts import create_tts
from voice_runtime.types import SessionEvent

KEY = "test-key"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


OFFLINE_STT = _has("faster_whisper") and _has("piper")
OFFLINE_TTS = _has("espeakng_loader")


def _failing_scribe(drop_after_bytes: int) -> FakeScribeServer:
    """A Scribe that drops the first socket mid-call and refuses every reconnect with 500."""
    return FakeScribeServer(
        api_key=KEY,
        plans=[ScribePlan(drop_after_bytes=drop_after_bytes)],
        default_plan=ScribePlan(refuse_status=500),
    )


def _elevenlabs_stt(server: FakeScribeServer, delay: float = 0.01) -> PersistentSttSession:
    return PersistentSttSession(api_key=KEY, base_url=server.base_url, reconnect_base_delay=delay)


# ---------------------------------------------------------------------------- STT


async def test_stt_chain_replays_the_audio_since_the_last_commit_into_the_next_provider(
    voice_server: VoiceServer, caplog: pytest.LogCaptureFixture
) -> None:
    speech = bytes((i * 7) % 251 for i in range(8000))  # 1 s, every frame distinct
    async with _failing_scribe(drop_after_bytes=3200) as scribe:
        backup = MockStt()
        chain = create_stt([_elevenlabs_stt(scribe), backup])
        assert isinstance(chain, FallbackStt) and chain.names == ["elevenlabs", "mock"]
        switches: list[FallbackSwitch] = []
        chain.on_switch = switches.append
        errors: list[str] = []
        chain.on_error = errors.append
        events: list[SessionEvent] = []
        s = voice_server.session
        s.on_event = events.append
        s.stt_factory = lambda: chain
        async with voice_server.simulator(silence_when_idle=False) as sim:
            await s.wait_for_ws_connect_async(5)
            await sim.send_audio(speech, realtime=False)
            assert await wait_for(lambda: chain.switches == 1, 10)
            after = bytes(range(160)) * 10  # spoken after the switch
            await sim.send_audio(after, realtime=False)
            # The backup heard the whole utterance in order: nothing lost, nothing twice.
            assert await wait_for(lambda: bytes(backup.audio) == speech + after, 5)
            assert await wait_for(lambda: len(events) == 1, 5)
    assert errors == []
    assert switches[0].from_name == "elevenlabs" and switches[0].to_name == "mock"
    assert "reconnect_exhausted" in switches[0].reason
    assert events[0].kind == "speech_fallback"
    assert dict(events[0].data) == {
        "kind": "stt",
        "from": "elevenlabs",
        "to": "mock",
        "reason": switches[0].reason,
    }
    line = [r.getMessage() for r in caplog.records if "switching to" in r.getMessage()]
    assert line == [
        f"speech recognition provider elevenlabs failed ({switches[0].reason}); switching to mock"
    ]
    assert await wait_for(lambda: backup.stopped)


async def test_stt_chain_forgets_committed_audio_bounds_the_replay_and_reports_the_last_error() -> (
    None
):
    class Recording(MockStt):
        def __init__(self) -> None:
            super().__init__()
            self.speaking_calls: list[bool] = []

        def set_speaking(self, speaking: bool) -> None:
            self.speaking_calls.append(speaking)
            super().set_speaking(speaking)

    first, second = MockStt(), Recording()
    chain = FallbackStt([first, second], names=["a", "b"], replay_max_bytes=1600)
    committed: list[str] = []
    errors: list[str] = []
    chain.on_committed = committed.append
    chain.on_error = errors.append
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    await chain.start(inbound)
    for i in range(5):
        inbound.put_nowait(bytes([i]) * 160)
    assert await wait_for(lambda: first.frames == 5)
    first.inject("hello")  # final: the 5 frames before it need no replay
    assert await wait_for(lambda: committed == ["hello"])
    assert chain.replay_bytes == 0
    for i in range(5, 20):
        inbound.put_nowait(bytes([i]) * 160)
    assert await wait_for(lambda: first.frames == 20)
    assert chain.replay_bytes == 1600 and chain.replay_dropped_bytes == 5 * 160
    chain.set_speaking(True)
    assert first.on_error is not None
    first.on_error("quota_exceeded")
    assert await wait_for(lambda: second.frames == 10)
    # Only the newest 10 frames since the commit (the bound), in order.
    assert bytes(second.audio) == b"".join(bytes([i]) * 160 for i in range(10, 20))
    assert second.speaking_calls == [True]  # the echo discard state moved over too
    chain.set_speaking(False)
    await asyncio.sleep(ECHO_TAIL_S + 0.1)  # what is said just after the agent is echo
    first.inject("late")  # a replaced provider's words are not reported twice
    second.inject("still here")
    assert await wait_for(lambda: committed == ["hello", "still here"])
    assert second.on_error is not None
    second.on_error("auth_error")
    assert await wait_for(lambda: errors == ["auth_error"])
    assert chain.switches == 1
    inbound.put_nowait(None)
    await chain.stop()
    assert first.stopped and second.stopped


async def test_stt_chain_skips_a_provider_that_cannot_start() -> None:
    class Broken(MockStt):
        async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
            raise RuntimeError("no route to vendor")

    backup = MockStt()
    chain = create_stt([Broken(), backup])
    switches: list[FallbackSwitch] = []
    chain.on_switch = switches.append
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    await chain.start(inbound)
    inbound.put_nowait(b"\x01" * 160)
    assert await wait_for(lambda: backup.frames == 1)
    assert "could not start: RuntimeError" in switches[0].reason
    await chain.stop()


async def test_stt_chain_bounds_the_queue_of_a_provider_that_stops_reading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voice_runtime.providers import fallback

    class Stuck(MockStt):
        async def start(self, inbound_queue: asyncio.Queue[bytes | None]) -> None:
            self.queue = inbound_queue  # never read

    monkeypatch.setattr(fallback, "PROVIDER_QUEUE_FRAMES", 5)
    stuck = Stuck()
    chain = FallbackStt([stuck, MockStt()])
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    await chain.start(inbound)
    for i in range(12):
        inbound.put_nowait(bytes([i]) * 160)
    assert await wait_for(lambda: chain.dropped_frames == 7)
    assert stuck.queue.qsize() == 5 and stuck.queue.get_nowait() == bytes([7]) * 160
    await chain.stop()


@pytest.mark.skipif(not OFFLINE_STT, reason="offline speech engines not installed")
@pytest.mark.timeout(120)
async def test_words_spoken_while_elevenlabs_fails_are_transcribed_by_the_offline_stt(
    voice_server: VoiceServer,
) -> None:
    from voice_runtime.offline import synthesize_ulaw
    from voice_runtime.providers.offline_stt import OfflineStt
    from voice_runtime.testing.metrics import word_accuracy

    sentence = "Please call me back tomorrow morning."
    clip = synthesize_ulaw(sentence, "piper")
    async with _failing_scribe(drop_after_bytes=4000) as scribe:
        # Reconnect attempts back off 0.2 s, 0.4 s, 0.8 s: the caller goes on speaking (in
        # real time) for one and a half seconds while ElevenLabs is failing.
        chain = create_stt([_elevenlabs_stt(scribe, delay=0.2), OfflineStt()])
        heard: list[str] = []
        chain.on_committed = heard.append
        s = voice_server.session
        s.stt_factory = lambda: chain
        async with voice_server.simulator() as sim:
            await s.wait_for_ws_connect_async(5)
            await sim.send_audio(clip + b"\xff" * 8000)
            assert await wait_for(lambda: chain.switches == 1, 10)
            assert await wait_for(lambda: len(heard) >= 1, 30)
    assert len(scribe.connections[0].audio) == 4000  # ElevenLabs failed half a second in
    assert word_accuracy([(sentence, " ".join(heard))]) >= 0.8, heard
    assert "tomorrow" in " ".join(heard).lower()


# ---------------------------------------------------------------------------- TTS


def _tone(text: str) -> bytes:
    return tone_ulaw(440.0, 300.0, level_dbfs=-22.0)


async def test_tts_chain_speaks_with_the_next_provider_when_elevenlabs_fails_mid_call(
    voice_server: VoiceServer,
) -> None:
    async with FakeElevenLabsTts(api_key=KEY, audio_for=_tone) as server:
        vendor = ElevenLabsTTS(api_key=KEY, base_url=server.base_url)
        backup = MockTts(ms_per_char=10.0)
        chain = create_tts([vendor, backup])
        assert isinstance(chain, FallbackTts)
        errors: list[str] = []
        chain.on_error = errors.append
        events: list[SessionEvent] = []
        s = voice_server.session
        s.on_event = events.append
        async with voice_server.simulator() as sim:
            await s.wait_for_ws_connect_async(5)
            ok = await chain.speak_async("Welcome.", s)
            assert "error" not in ok and backup.spoken == []
            server.fail_status = 500  # the vendor breaks mid-call
            result = await asyncio.to_thread(chain.speak, "Your order has shipped.", s)
            assert "error" not in result and result["last_spoken"] == "Your order has shipped."
            assert backup.spoken == ["Your order has shipped."]
            assert sim.heard_ms >= ok["audio_ms"] + result["audio_ms"] - 1
            # Stays on the fallback: the vendor is not asked again for the next sentence.
            requests = len(server.requests)
            await chain.speak_async("Goodbye.", s)
            assert len(server.requests) == requests and backup.spoken[-1] == "Goodbye."
            assert await wait_for(lambda: len(events) == 1, 5)
        await vendor.aclose()
    assert errors == [] and chain.switches == 1
    assert events[0].kind == "speech_fallback" and events[0].data["kind"] == "tts"
    assert "HTTP 500" in events[0].data["reason"]


async def test_tts_chain_reports_the_last_providers_error_and_recovers_later(
    voice_server: VoiceServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        FakeElevenLabsTts(api_key=KEY, audio_for=_tone, fail_status=503) as one,
        FakeElevenLabsTts(api_key=KEY, audio_for=_tone, fail_status=500) as two,
    ):
        first = ElevenLabsTTS(api_key=KEY, base_url=one.base_url)
        second = ElevenLabsTTS(api_key=KEY, base_url=two.base_url)
        chain = FallbackTts([first, second], names=["one", "two"], recover_after_s=0.0)
        errors: list[str] = []
        chain.on_error = errors.append
        s = voice_server.session
        async with voice_server.simulator():
            await s.wait_for_ws_connect_async(5)
            result = await chain.speak_async("Nobody can say this.", s)
            assert "HTTP 500" in result["error"] and len(errors) == 1
            one.fail_status = None
            # recover_after_s=0: the next sentence tries the first provider again.
            again = await chain.speak_async("Back again.", s)
            assert "error" not in again and len(one.requests) == 2
        await first.aclose()
        await second.aclose()
    assert chain.switches == 1


@pytest.mark.skipif(not OFFLINE_TTS, reason="offline speech engines not installed")
async def test_offline_tts_is_the_last_resort_with_no_network(voice_server: VoiceServer) -> None:
    # Nothing listens on this port: the vendor cannot even be reached.
    vendor = ElevenLabsTTS(api_key=KEY, base_url="http://127.0.0.1:9", read_timeout=2.0)
    chain = create_tts([vendor, "offline"])
    s = voice_server.session
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        result = await chain.speak_async("Hello from the fallback voice.", s)
        assert "error" not in result and result["audio_ms"] > 500
        assert sim.heard_ms >= result["audio_ms"] - 1
    await vendor.aclose()
    assert chain.switches == 1 and chain.names == ["elevenlabs", "offline"]


def test_a_chain_needs_providers() -> None:
    from voice_runtime.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="at least one"):
        create_stt([])
    with pytest.raises(ConfigurationError, match="one name per provider"):
        FallbackTts([MockTts()], names=["a", "b"])


def test_a_server_stt_list_gives_every_call_its_own_chain() -> None:
    from voice_runtime.server import VoiceServer

    server = VoiceServer(stt=["mock", "mock"])
    assert server.stt_factory is not None
    first, second = server.stt_factory(), server.stt_factory()
    assert isinstance(first, FallbackStt) and isinstance(second, FallbackStt)
    assert first is not second
    with pytest.raises(ValueError, match="nosuch"):
        VoiceServer(stt=["mock", "nosuch"])
    with pytest.raises(ValueError, match="provider names"):
        VoiceServer(stt=[MockStt()])  # type: ignore[list-item]
