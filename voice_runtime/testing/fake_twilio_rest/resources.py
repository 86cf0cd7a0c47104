"""The REST resources of the fake Twilio API: calls, recordings and messages (a mixin)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from voice_runtime.testing.fake_twilio_rest.records import (
    TERMINAL_CALL_STATUSES,
    FakeCall,
    FakeMessage,
    FakeRecording,
    FakeRequest,
    _Answer,
    _parse_filter_time,
    _sid,
    _time_matches,
)


class _Resources:
    """Resource handlers of :class:`FakeTwilioRest` (its state, read under its lock)."""

    _lock: threading.Lock
    _calls: dict[str, FakeCall]
    _recordings: dict[str, FakeRecording]
    _messages: dict[str, FakeMessage]

    if TYPE_CHECKING:  # provided by the conferences mixin

        def _join_from_twiml(self, call: FakeCall, twiml: str) -> None: ...

    # ----------------------------------------------------------------- resources

    def _find_call(self, request: FakeRequest, account: str, call_sid: str) -> FakeCall:
        with self._lock:
            call = self._calls.get(call_sid)
        if call is None or call.account_sid != account or call.api_host != request.api_host:
            raise _Answer(404, 20404, f"The requested resource {request.path} was not found")
        return call

    def _create_call(self, request: FakeRequest, account: str) -> FakeCall:
        to, from_ = request.field("To"), request.field("From")
        twiml, url = request.field("Twiml"), request.field("Url")
        if not to:
            raise _Answer(400, 21201, "No 'To' number is specified")
        if not from_:
            raise _Answer(400, 21213, "No 'From' number is specified")
        if not twiml and not url and not request.field("ApplicationSid"):
            raise _Answer(400, 21205, "Url parameter is required.")
        if twiml is not None and len(twiml) > 4000:
            raise _Answer(400, 21232, "Twiml parameter is too long (max 4000 characters)")
        call = FakeCall(
            sid=_sid("CA"),
            account_sid=account,
            api_host=request.api_host,
            to=to,
            from_=from_,
            twiml=twiml,
            url=url,
            method=request.field("Method"),
            params=request.form,
        )
        with self._lock:
            self._calls[call.sid] = call
        return call

    def _update_call(self, request: FakeRequest, call: FakeCall) -> dict[str, Any]:
        status = request.field("Status")
        with self._lock:
            if call.status in TERMINAL_CALL_STATUSES:
                raise _Answer(400, 21220, "Call is not in-progress. Cannot redirect.")
            if status is not None and status not in ("completed", "canceled"):
                raise _Answer(400, 20001, f"Invalid call status {status}")
            call.updates.append(request.form)
            if request.field("Twiml") is not None:
                call.twiml, call.url = request.field("Twiml"), None
                self._join_from_twiml(call, call.twiml or "")
            if request.field("Url") is not None:
                call.url, call.twiml = request.field("Url"), None
            if status is not None:
                call.status = status
                call.end_time = datetime.now(UTC)
            return call.to_json()

    def _list_calls(self, request: FakeRequest, account: str) -> dict[str, Any]:
        query = dict(request.query)
        try:
            page_size = min(max(int(query.get("PageSize", "50")), 1), 1000)
            page = max(int(query.get("Page", "0")), 0)
        except ValueError:
            raise _Answer(400, 20001, "Invalid paging parameters") from None
        filters: list[tuple[str, datetime, bool]] = []
        for key in ("StartTime>", "StartTime>=", "StartTime<", "StartTime<=", "StartTime"):
            if key in query:
                parsed = _parse_filter_time(query[key])
                if parsed is None:
                    raise _Answer(400, 20001, f"Invalid {key} filter")
                filters.append((key[len("StartTime") :], *parsed))
        with self._lock:
            candidates = [
                call
                for call in self._calls.values()
                if call.account_sid == account and call.api_host == request.api_host
            ]
        selected = [
            call
            for call in candidates
            if (query.get("To") in (None, call.to))
            and (query.get("From") in (None, call.from_))
            and (query.get("Status") in (None, call.status))
            and all(_time_matches(call.start_time, op, when, day) for op, when, day in filters)
        ]
        selected.sort(key=lambda call: call.date_created, reverse=True)
        chunk = selected[page * page_size : (page + 1) * page_size]
        base_query = [(k, v) for k, v in request.query if k not in ("Page", "PageToken")]

        def page_uri(number: int) -> str:
            extra = [("Page", str(number))]
            if number > 0:
                extra.append(("PageToken", f"PA{number}"))
            return f"{request.path}?{urlencode(base_query + extra)}"

        has_next = (page + 1) * page_size < len(selected)
        return {
            "calls": [call.to_json() for call in chunk],
            "page": page,
            "page_size": page_size,
            "start": page * page_size,
            "end": page * page_size + max(len(chunk) - 1, 0),
            "uri": page_uri(page),
            "first_page_uri": page_uri(0),
            "previous_page_uri": page_uri(page - 1) if page > 0 else None,
            "next_page_uri": page_uri(page + 1) if has_next else None,
        }

    def _create_recording(self, request: FakeRequest, call: FakeCall) -> dict[str, Any]:
        with self._lock:
            if call.status in TERMINAL_CALL_STATUSES:
                raise _Answer(400, 21220, "Call is not in-progress. Cannot start recording.")
            recording = FakeRecording(
                sid=_sid("RE"), account_sid=call.account_sid, call_sid=call.sid, params=request.form
            )
            self._recordings[recording.sid] = recording
            return recording.to_json()

    def _list_recordings(self, request: FakeRequest, call: FakeCall) -> dict[str, Any]:
        with self._lock:
            items = [r.to_json() for r in self._recordings.values() if r.call_sid == call.sid]
        return {
            "recordings": items,
            "page": 0,
            "page_size": 50,
            "start": 0,
            "end": max(len(items) - 1, 0),
            "uri": request.path,
            "first_page_uri": request.path,
            "previous_page_uri": None,
            "next_page_uri": None,
        }

    def _find_recording(
        self, request: FakeRequest, call: FakeCall, recording_sid: str
    ) -> FakeRecording:
        with self._lock:
            recording = self._recordings.get(recording_sid)
        if recording is None or recording.call_sid != call.sid:
            raise _Answer(404, 20404, f"The requested resource {request.path} was not found")
        return recording

    def _update_recording(self, request: FakeRequest, recording: FakeRecording) -> dict[str, Any]:
        status = request.field("Status")
        if status not in ("stopped", "paused", "in-progress"):
            raise _Answer(400, 20001, "Status must be stopped, paused or in-progress")
        with self._lock:
            if recording.status == "stopped":
                raise _Answer(400, 21220, "Recording is already stopped")
            recording.status = status
            return recording.to_json()

    def _create_message(self, request: FakeRequest, account: str) -> dict[str, Any]:
        to, from_ = request.field("To"), request.field("From")
        service = request.field("MessagingServiceSid")
        body, media = request.field("Body") or "", tuple(request.fields("MediaUrl"))
        if not to:
            raise _Answer(400, 21604, "A 'To' phone number is required.")
        if not from_ and not service:
            raise _Answer(400, 21603, "A 'From' phone number is required.")
        if not body and not media:
            raise _Answer(400, 21602, "Message body is required.")
        message = FakeMessage(
            sid=_sid("SM"),
            account_sid=account,
            to=to,
            from_=from_,
            body=body,
            media_urls=media,
            messaging_service_sid=service,
            status_callback=request.field("StatusCallback"),
            status="queued" if from_ else "accepted",
        )
        with self._lock:
            self._messages[message.sid] = message
        return message.to_json()
