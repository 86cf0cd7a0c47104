"""Twilio call controls for the call behind one session: hang up, transfer, DTMF, recording.

The transport puts one on ``session.control`` when a stream starts. Each control is a REST
request on the session's call SID (credentials from TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN,
or an explicit ``client``); sync methods block (use them from worker threads), and each has
an ``*_async`` twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voice_runtime._sync import forbid_on_loop
from voice_runtime.errors import SessionError
from voice_runtime.transports import twilio_call

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

__all__ = ["CallControl"]


class CallControl:
    """Controls of the live call of ``session`` (see the module doc)."""

    def __init__(
        self, session: VoiceSession, *, client: Any = None, stream_url: str | None = None
    ) -> None:
        self.session = session
        self.client = client
        self.stream_url = stream_url
        self.recording_sid: str | None = None

    def _sid(self) -> str:
        sid = self.session.call_sid
        if not sid:
            raise SessionError("the session has no call SID yet: its stream has not started")
        return sid

    def _blocking(self, method: str) -> None:
        """A REST request held on the loop thread would stall every call: raise there."""
        forbid_on_loop(self.session.loop, f"CallControl.{method}", f"CallControl.{method}_async")

    def _stream_parameters(self) -> dict[str, str]:
        info = self.session.call_info
        return dict(info.custom_parameters) if info is not None else {}

    def hangup(self, *, after_playback: bool = False) -> None:
        """End the call; with ``after_playback`` once the queued audio has been heard."""
        self.session.request_disconnect(after_playback=after_playback)

    def transfer(self, target: str, *, caller_id: str | None = None) -> str:
        """Hand the call to a number or ``sip:`` address with ``<Dial>``; ends the stream."""
        self._blocking("transfer")
        return twilio_call.transfer_call(
            self._sid(), target, caller_id=caller_id, client=self.client
        )

    async def transfer_async(self, target: str, *, caller_id: str | None = None) -> str:
        """Async twin of :meth:`transfer`."""
        return await twilio_call.transfer_call_async(
            self._sid(), target, caller_id=caller_id, client=self.client
        )

    def send_digits(self, digits: str) -> str:
        """Play DTMF ``digits`` to the far end; the media stream then restarts as a new stream."""
        self._blocking("send_digits")
        return twilio_call.send_digits(
            self._sid(),
            digits,
            stream_url=self.stream_url,
            parameters=self._stream_parameters(),
            client=self.client,
        )

    async def send_digits_async(self, digits: str) -> str:
        """Async twin of :meth:`send_digits`."""
        return await twilio_call.send_digits_async(
            self._sid(),
            digits,
            stream_url=self.stream_url,
            parameters=self._stream_parameters(),
            client=self.client,
        )

    def start_recording(self, **options: Any) -> str:
        """Start a Twilio recording of the call; return (and remember) its SID."""
        self._blocking("start_recording")
        self.recording_sid = twilio_call.start_recording(self._sid(), client=self.client, **options)
        return self.recording_sid

    async def start_recording_async(self, **options: Any) -> str:
        """Async twin of :meth:`start_recording`."""
        self.recording_sid = await twilio_call.start_recording_async(
            self._sid(), client=self.client, **options
        )
        return self.recording_sid

    def stop_recording(self, recording_sid: str | None = None) -> None:
        """Stop a recording (default: the one this control started)."""
        self._blocking("stop_recording")
        twilio_call.stop_recording(self._sid(), self._recording(recording_sid), client=self.client)

    async def stop_recording_async(self, recording_sid: str | None = None) -> None:
        """Async twin of :meth:`stop_recording`."""
        await twilio_call.stop_recording_async(
            self._sid(), self._recording(recording_sid), client=self.client
        )

    def _recording(self, recording_sid: str | None) -> str:
        sid = recording_sid or self.recording_sid
        if not sid:
            raise SessionError("no recording to stop: start_recording() was not called")
        return sid
