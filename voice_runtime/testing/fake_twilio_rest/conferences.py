"""Conferences and their participants in the fake Twilio REST API (a mixin).

Paths and fields are Twilio's (``/2010-04-01/Accounts/{AC}/Conferences…``):

* ``GET Conferences.json`` (``FriendlyName``, ``Status`` filters), ``GET/POST
  Conferences/{CF}.json`` (``Status=completed`` ends it, ``AnnounceUrl``).
* ``POST Conferences/{CF or friendly name}/Participants.json`` dials a participant (a new
  outbound call; the conference is created on first use), ``GET`` lists them.
* ``GET/POST/DELETE Conferences/{CF}/Participants/{CA or label}.json``: fetch, update
  (``Hold``, ``HoldUrl``, ``Muted``, ``AnnounceUrl``, ``Coaching``, ``CallSidToCoach``, …),
  kick.

A call whose TwiML is updated to ``<Dial><Conference>name</Conference></Dial>`` joins that
conference as a connected participant. A dialled participant stays ``queued`` until the test
moves it with :meth:`set_participant_status` (``ringing``, ``connected``, ``failed``,
``complete``); each move posts a call status callback (``CallStatus``) to the participant's
``StatusCallback`` when one was given. An ``AnnounceUrl`` is fetched after the update is
answered, as Twilio does: a signed POST whose TwiML is kept in the participant's
``announcements``; a ``<Redirect>`` in it is followed (so the app learns it was played).
"""

from __future__ import annotations

import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from voice_runtime.testing.fake_twilio_rest.callbacks import SentCallback
from voice_runtime.testing.fake_twilio_rest.records import (
    _API_PREFIX,
    FakeCall,
    FakeRequest,
    _Answer,
    _rfc2822,
    _sid,
)

_CONFERENCES = re.compile(r"Conferences\.json")
_CONFERENCE = re.compile(r"Conferences/(?P<conf>[^/]+)\.json")
_PARTICIPANTS = re.compile(r"Conferences/(?P<conf>[^/]+)/Participants\.json")
_PARTICIPANT = re.compile(r"Conferences/(?P<conf>[^/]+)/Participants/(?P<part>[^/]+)\.json")
_PARTICIPANT_STATUSES = ("queued", "connecting", "ringing", "connected", "complete", "failed")
_CALL_STATUS_OF = {
    "queued": "queued",
    "connecting": "initiated",
    "ringing": "ringing",
    "connected": "in-progress",
    "complete": "completed",
    "failed": "failed",
}
_BOOL_FIELDS = ("Hold", "Muted", "EndConferenceOnExit", "BeepOnExit", "Coaching")


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() == "true"


@dataclass
class FakeParticipant:
    """A participant of a fake conference (keyed by its call SID)."""

    call_sid: str
    conference_sid: str
    account_sid: str
    label: str | None = None
    status: str = "queued"
    hold: bool = False
    muted: bool = False
    coaching: bool = False
    call_sid_to_coach: str | None = None
    start_conference_on_enter: bool = True
    end_conference_on_exit: bool = False
    params: tuple[tuple[str, str], ...] = ()
    updates: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    announcements: list[str] = field(default_factory=list)
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def param(self, name: str) -> str | None:
        """The first create parameter ``name``, or None."""
        return next((v for k, v in self.params if k == name), None)

    def to_json(self) -> dict[str, Any]:
        """The participant as Twilio's JSON resource."""
        return {
            "account_sid": self.account_sid,
            "call_sid": self.call_sid,
            "conference_sid": self.conference_sid,
            "label": self.label,
            "status": self.status,
            "hold": self.hold,
            "muted": self.muted,
            "coaching": self.coaching,
            "call_sid_to_coach": self.call_sid_to_coach,
            "start_conference_on_enter": self.start_conference_on_enter,
            "end_conference_on_exit": self.end_conference_on_exit,
            "queue_time": "0",
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(datetime.now(UTC)),
            "uri": (
                f"{_API_PREFIX}{self.account_sid}/Conferences/{self.conference_sid}"
                f"/Participants/{self.call_sid}.json"
            ),
        }


@dataclass
class FakeConference:
    """A conference of the fake, created by its first participant."""

    sid: str
    account_sid: str
    friendly_name: str
    status: str = "init"
    participants: dict[str, FakeParticipant] = field(default_factory=dict)
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))
    reason_ended: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The conference as Twilio's JSON resource."""
        path = f"{_API_PREFIX}{self.account_sid}/Conferences/{self.sid}"
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "friendly_name": self.friendly_name,
            "status": self.status,
            "region": "us1",
            "reason_conference_ended": self.reason_ended,
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(datetime.now(UTC)),
            "api_version": "2010-04-01",
            "uri": f"{path}.json",
            "subresource_uris": {"participants": f"{path}/Participants.json"},
        }


class _Conferences:
    """Conference handlers of :class:`FakeTwilioRest` (its state, read under its lock)."""

    auth_token: str
    _lock: threading.Lock
    _calls: dict[str, FakeCall]
    _conferences: dict[str, FakeConference]
    _participant_callbacks: list[Callable[[FakeParticipant], None]]
    _sent: list[SentCallback]

    if TYPE_CHECKING:  # provided by FakeTwilioRest

        def _post(self, url: str, form: Mapping[str, str]) -> SentCallback: ...

    # ----------------------------------------------------------------- test API

    @property
    def conferences(self) -> dict[str, FakeConference]:
        """Conferences by SID (a copy of the mapping; the conferences are live objects)."""
        with self._lock:
            return dict(self._conferences)

    def conference_named(self, friendly_name: str) -> FakeConference | None:
        """The newest conference called ``friendly_name``, or None."""
        with self._lock:
            found = [c for c in self._conferences.values() if c.friendly_name == friendly_name]
        return found[-1] if found else None

    def participant(self, call_sid: str) -> FakeParticipant | None:
        """The participant whose call is ``call_sid`` (in any live conference), or None."""
        with self._lock:
            for conference in self._conferences.values():
                if call_sid in conference.participants:
                    return conference.participants[call_sid]
        return None

    def set_participant_status(self, call_sid: str, status: str) -> SentCallback | None:
        """Move a dialled participant (``ringing``, ``connected``, ``failed``, ``complete``).

        Leaving (failed, complete) removes it from the conference. Posts the call status
        callback when the participant was created with ``StatusCallback`` (blocking: call it
        from a worker thread when the app's server runs in your loop).
        """
        if status not in _PARTICIPANT_STATUSES:
            raise ValueError(f"status must be one of {_PARTICIPANT_STATUSES}")
        with self._lock:
            participant = self._find_participant_locked(call_sid)
            joined = participant.status == "connected"
            participant.status = status
            call = self._calls.get(call_sid)
            if call is not None:
                call.status = _CALL_STATUS_OF[status]
            conference = self._conferences[participant.conference_sid]
            if status == "connected" and participant.start_conference_on_enter:
                conference.status = "in-progress"
            if status in ("failed", "complete"):
                self._leave_locked(conference, call_sid, joined)
            url = participant.param("StatusCallback")
        if url is None or call is None:
            return None
        return self._post(
            url,
            {
                "AccountSid": participant.account_sid,
                "CallSid": call_sid,
                "CallStatus": _CALL_STATUS_OF[status],
                "Direction": call.direction,
                "ApiVersion": "2010-04-01",
                "CallbackSource": "call-progress-events",
            },
        )

    def on_participant_created(
        self, callback: Callable[[FakeParticipant], None]
    ) -> Callable[[FakeParticipant], None]:
        """Call ``callback(participant)`` after each dialled participant was answered (201).

        Runs on the request's thread (errors kept in ``callback_errors``); a test can answer
        the leg from it with :meth:`set_participant_status`. Usable as a decorator.
        """
        with self._lock:
            self._participant_callbacks.append(callback)
        return callback

    def _participant_created(self, participant: FakeParticipant) -> None:
        with self._lock:
            callbacks = list(self._participant_callbacks)
        for callback in callbacks:
            callback(participant)

    # ----------------------------------------------------------------- internals

    def _find_participant_locked(self, call_sid: str) -> FakeParticipant:
        for conference in self._conferences.values():
            if call_sid in conference.participants:
                return conference.participants[call_sid]
        raise KeyError(call_sid)

    def _leave_locked(self, conference: FakeConference, call_sid: str, joined: bool) -> None:
        participant = conference.participants.pop(call_sid, None)
        if participant is None:
            return
        # Only someone who was in the conference ends it by leaving (a leg that never
        # answered does not), or the last one out.
        if (joined and participant.end_conference_on_exit) or not conference.participants:
            self._end_locked(conference, "participant-with-end-conference-on-exit-left")

    def _end_locked(self, conference: FakeConference, reason: str) -> None:
        conference.status = "completed"
        conference.reason_ended = conference.reason_ended or reason
        for sid in list(conference.participants):
            call = self._calls.get(sid)
            if call is not None and call.status not in ("completed", "failed", "canceled"):
                call.status = "completed"
                call.end_time = datetime.now(UTC)
        conference.participants.clear()

    def _conference_locked(self, account: str, key: str, create: bool) -> FakeConference:
        conference = self._conferences.get(key)
        if conference is None:
            live = [
                c
                for c in self._conferences.values()
                if c.friendly_name == key and c.status != "completed" and c.account_sid == account
            ]
            conference = live[-1] if live else None
        if conference is None and create:
            conference = FakeConference(_sid("CF"), account, key)
            self._conferences[conference.sid] = conference
        if conference is None or conference.account_sid != account:
            raise _Answer(404, 20404, "The requested resource was not found")
        return conference

    def _join_from_twiml(self, call: FakeCall, twiml: str) -> None:
        """A call given ``<Dial><Conference>`` TwiML joins that conference (caller holds lock)."""
        try:
            root = ET.fromstring(twiml)
        except ET.ParseError:
            return
        node = root.find("Dial/Conference")
        for conference in self._conferences.values():  # new TwiML: it leaves where it was
            if call.sid in conference.participants:
                self._leave_locked(conference, call.sid, joined=True)
        name = (node.text or "").strip() if node is not None else ""
        if node is None or not name:
            return
        conference = self._conference_locked(call.account_sid, name, create=True)
        conference.participants[call.sid] = FakeParticipant(
            call_sid=call.sid,
            conference_sid=conference.sid,
            account_sid=call.account_sid,
            label=node.get("participantLabel"),
            status="connected",
            muted=_flag(node.get("muted"), False),
            start_conference_on_enter=_flag(node.get("startConferenceOnEnter"), True),
            end_conference_on_exit=_flag(node.get("endConferenceOnExit"), False),
            params=tuple(sorted(node.attrib.items())),
        )
        if _flag(node.get("startConferenceOnEnter"), True):
            conference.status = "in-progress"

    def _route_conferences(
        self, request: FakeRequest, account: str, rest: str
    ) -> tuple[int, Any, Callable[[], None] | None]:
        method = request.method
        if _CONFERENCES.fullmatch(rest) and method == "GET":
            return 200, self._list_conferences(request, account), None
        if found := _CONFERENCE.fullmatch(rest):
            with self._lock:
                conference = self._conference_locked(account, found["conf"], create=False)
                if method == "POST" and request.field("Status") == "completed":
                    self._end_locked(conference, "conference-ended-via-api")
                if method in ("GET", "POST"):
                    return 200, conference.to_json(), None
        if found := _PARTICIPANTS.fullmatch(rest):
            if method == "POST":
                created = self._create_participant(request, account, found["conf"])
                return 201, created.to_json(), lambda: self._participant_created(created)
            if method == "GET":
                with self._lock:
                    conference = self._conference_locked(account, found["conf"], create=False)
                    items = [p.to_json() for p in conference.participants.values()]
                return 200, _page("participants", request.path, items), None
        if found := _PARTICIPANT.fullmatch(rest):
            return self._one_participant(request, account, found["conf"], found["part"])
        raise _Answer(404, 20404, f"The requested resource {request.path} was not found")

    def _list_conferences(self, request: FakeRequest, account: str) -> dict[str, Any]:
        name, status = request.param("FriendlyName"), request.param("Status")
        with self._lock:
            items = [
                c.to_json()
                for c in self._conferences.values()
                if c.account_sid == account
                and name in (None, c.friendly_name)
                and status in (None, c.status)
            ]
        return _page("conferences", request.path, items)

    def _create_participant(self, request: FakeRequest, account: str, key: str) -> FakeParticipant:
        to, from_ = request.field("To"), request.field("From")
        if not to:
            raise _Answer(400, 21201, "No 'To' number is specified")
        if not from_:
            raise _Answer(400, 21213, "No 'From' number is specified")
        with self._lock:
            conference = self._conference_locked(account, key, create=True)
            if conference.status == "completed":
                raise _Answer(400, 20001, "Conference is completed")
            call = FakeCall(
                sid=_sid("CA"),
                account_sid=account,
                api_host=request.api_host,
                to=to,
                from_=from_,
                params=request.form,
            )
            self._calls[call.sid] = call
            participant = FakeParticipant(
                call_sid=call.sid,
                conference_sid=conference.sid,
                account_sid=account,
                label=request.field("Label"),
                muted=_flag(request.field("Muted"), False),
                coaching=_flag(request.field("Coaching"), False),
                call_sid_to_coach=request.field("CallSidToCoach"),
                start_conference_on_enter=_flag(request.field("StartConferenceOnEnter"), True),
                end_conference_on_exit=_flag(request.field("EndConferenceOnExit"), False),
                params=request.form,
            )
            conference.participants[call.sid] = participant
            return participant

    def _one_participant(
        self, request: FakeRequest, account: str, key: str, part: str
    ) -> tuple[int, Any, Callable[[], None] | None]:
        with self._lock:
            conference = self._conference_locked(account, key, create=False)
            participant = conference.participants.get(part) or next(
                (p for p in conference.participants.values() if p.label == part), None
            )
            if participant is None:
                raise _Answer(404, 20404, f"The requested resource {request.path} was not found")
            if request.method == "GET":
                return 200, participant.to_json(), None
            if request.method == "DELETE":
                joined = participant.status == "connected"
                self._leave_locked(conference, participant.call_sid, joined)
                call = self._calls.get(participant.call_sid)
                if call is not None:
                    call.status = "completed" if participant.status == "connected" else "canceled"
                return 204, None, None
            if request.method != "POST":
                raise _Answer(405, 20004, "Method not allowed")
            participant.updates.append(request.form)
            for name in _BOOL_FIELDS:
                value = request.field(name)
                if value is not None:
                    attr = {"EndConferenceOnExit": "end_conference_on_exit"}.get(name)
                    attr = attr or name.lower()
                    if hasattr(participant, attr):
                        setattr(participant, attr, _flag(value, False))
            if request.field("CallSidToCoach") is not None:
                participant.call_sid_to_coach = request.field("CallSidToCoach")
            body = participant.to_json()
        url = request.field("AnnounceUrl")
        after = None if not url else (lambda: self._announce(participant, conference, url))
        return 200, body, after

    def _announce(self, participant: FakeParticipant, conference: FakeConference, url: str) -> None:
        """Fetch the announcement TwiML (and a ``<Redirect>`` in it), as Twilio plays it."""
        form = {
            "AccountSid": participant.account_sid,
            "ConferenceSid": conference.sid,
            "CallSid": participant.call_sid,
            "FriendlyName": conference.friendly_name,
        }
        for _ in range(3):  # a redirect chain is short; a loop must not hang the fake
            sent = self._post(url, form)
            with self._lock:
                participant.announcements.append(sent.body)
            try:
                redirect = ET.fromstring(sent.body).find("Redirect") if sent.body else None
            except ET.ParseError:
                return
            url = (redirect.text or "").strip() if redirect is not None else ""
            if not url:
                return


def _page(key: str, path: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: items,
        "page": 0,
        "page_size": 50,
        "start": 0,
        "end": max(len(items) - 1, 0),
        "uri": path,
        "first_page_uri": path,
        "previous_page_uri": None,
        "next_page_uri": None,
    }
