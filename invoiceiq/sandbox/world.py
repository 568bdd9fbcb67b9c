"""The simulated world: phones, what they show, the event log and the request journal.

Plain state and bookkeeping, no I/O: the provider modules change it and queue webhooks; the
console and the tests read it. Every change appends an event, so "something changed since
seq N" is one comparison.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

WA_WINDOW_S = 24 * 3600  # Meta's customer service window
EVENT_LOG_LIMIT = 5000  # the console shows recent history; the journal keeps every call


@dataclass(slots=True)
class ChatButton:
    id: str  # reply id (interactive), payload (template quick reply) or the URL (url button)
    title: str
    kind: Literal["reply", "quick_reply", "url"]
    url: str | None = None


@dataclass(slots=True)
class ChatMessage:
    """One bubble in a phone's WhatsApp thread (or a business message that never got there)."""

    id: str  # wamid
    from_phone: bool
    type: str  # as on the wire: text | interactive | template | button
    text: str
    at: float
    header: str | None = None
    footer: str | None = None
    buttons: list[ChatButton] = field(default_factory=list)
    status: str = "sent"  # business messages: sent | delivered | read | failed
    error_code: int | None = None
    context_id: str | None = None
    template: str | None = None
    biz_opaque: str | None = None
    category: str | None = None  # pricing category of a business message


@dataclass(slots=True)
class SmsMessage:
    id: str
    from_phone: bool
    peer: str  # sender id / short code on the other side
    text: str
    at: float


@dataclass(slots=True)
class StkTransaction:
    checkout_request_id: str
    merchant_request_id: str
    msisdn: str
    amount: int
    account_reference: str
    description: str
    callback_url: str
    shortcode: str
    party_b: str
    transaction_type: str
    created_at: float
    expires_at: float
    # pending: on the phone; ignored: dismissed, will time out silently; done: result known
    state: Literal["pending", "ignored", "done"] = "pending"
    result_code: int | None = None
    result_desc: str | None = None
    receipt: str | None = None
    resolved_at: float | None = None
    callback_dropped: bool = False


@dataclass(slots=True)
class Phone:
    msisdn: str
    name: str
    on_whatsapp: bool = True
    blacklisted: bool = False
    last_inbound_at: float | None = None  # last WhatsApp message this phone sent the business
    last_push_at: float | None = None
    thread: list[ChatMessage] = field(default_factory=list)
    sms: list[SmsMessage] = field(default_factory=list)
    prompt: str | None = None  # CheckoutRequestID of the M-PESA prompt on screen
    conversations: dict[str, tuple[str, float]] = field(default_factory=dict)

    def window_open(self, now: float) -> bool:
        return self.last_inbound_at is not None and now - self.last_inbound_at < WA_WINDOW_S


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    at: float
    kind: str
    summary: str
    msisdn: str | None = None
    ref: str | None = None  # what the event is about: a wamid (wa.out), a CheckoutRequestID (stk.prompt)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One provider API call as the simulator received and answered it."""

    seq: int
    at: float
    service: str  # whatsapp | daraja_oauth | daraja_push | daraja_query | sms
    method: str
    path: str
    body: Any  # parsed request (JSON object, form dict or raw text); credentials redacted
    status: int
    response: Any


REDACTED_KEYS = ("Password", "access_token")  # credentials never enter the journal


def _redacted(value: Any) -> Any:
    if isinstance(value, dict) and any(k in value for k in REDACTED_KEYS):
        return {k: "<redacted>" if k in REDACTED_KEYS else v for k, v in value.items()}
    return value


def normalise_msisdn(number: str) -> str:
    return number[1:] if number.startswith("+") else number


class World:
    def __init__(
        self, merchant_msisdn: str, merchant_name: str, now: Callable[[], float], on_change: Callable[[], None]
    ) -> None:
        self._merchant = (merchant_msisdn, merchant_name)
        self._now = now
        self._on_change = on_change
        self.phones: dict[str, Phone] = {}
        self.wa_messages: dict[str, ChatMessage] = {}  # every business/phone message by wamid
        self.wa_recipient: dict[str, str] = {}  # wamid of a business message -> msisdn
        self.stk: dict[str, StkTransaction] = {}
        self.events: deque[Event] = deque(maxlen=EVENT_LOG_LIMIT)
        self.journal: list[JournalEntry] = []
        self.seq = 0

    def clear(self) -> None:
        self.phones.clear()
        self.wa_messages.clear()
        self.wa_recipient.clear()
        self.stk.clear()
        self.events.clear()
        self.journal.clear()
        # seq keeps counting: a console polling with since=N must still see what comes next.
        self.log("sandbox.reset", "Sandbox reset: phones, chats, prompts and journal cleared")

    # -- phones ---------------------------------------------------------------------------
    def phone(self, msisdn: str) -> Phone:
        msisdn = normalise_msisdn(msisdn)
        found = self.phones.get(msisdn)
        if found is None:
            name = self._merchant[1] if msisdn == self._merchant[0] else f"Customer {msisdn[-4:]}"
            found = self.phones[msisdn] = Phone(msisdn=msisdn, name=name)
        return found

    # -- log and journal ------------------------------------------------------------------
    def log(self, kind: str, summary: str, msisdn: str | None = None, ref: str | None = None) -> Event:
        self.seq += 1
        event = Event(self.seq, self._now(), kind, summary, msisdn, ref)
        self.events.append(event)
        self._on_change()
        return event

    def events_since(self, since: int) -> list[Event]:
        """The events after ``since``, oldest first, in time proportional to how many they are
        (a console or a load driver long-polls this after every change; walking the whole log
        each time made a long run quadratic). Every ``log`` appends the next ``seq``, so the
        log holds consecutive numbers and the answer is its newest ``seq - since`` entries."""
        if not self.events:
            return []
        count = min(len(self.events), self.events[-1].seq - since)
        if count <= 0:
            return []
        newest = list(itertools.islice(reversed(self.events), count))
        newest.reverse()
        return newest

    def record_call(self, service: str, method: str, path: str, body: Any, status: int, response: Any) -> None:
        entry = JournalEntry(
            len(self.journal) + 1, self._now(), service, method, path, _redacted(body), status, _redacted(response)
        )
        self.journal.append(entry)

    # -- what tests assert on ----------------------------------------------------------------
    def calls(self, service: str | None = None) -> list[JournalEntry]:
        return [c for c in self.journal if service is None or c.service == service]

    def sent_whatsapp(self, to: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the Graph sends the simulator accepted (HTTP 200), optionally for one phone."""
        return [
            c.body
            for c in self.calls("whatsapp")
            if c.status == 200 and (to is None or normalise_msisdn(str(c.body.get("to", ""))) == normalise_msisdn(to))
        ]

    def stk_pushes(self, phone: str | None = None) -> list[dict[str, Any]]:
        """Bodies of the STK pushes Daraja accepted, optionally for one PhoneNumber."""
        return [
            c.body
            for c in self.calls("daraja_push")
            if c.status == 200 and (phone is None or str(c.body.get("PhoneNumber")) == normalise_msisdn(phone))
        ]

    def sms_sent(self, to: str | None = None) -> list[dict[str, str]]:
        """One entry per recipient Africa's Talking accepted (statusCode 101)."""
        out: list[dict[str, str]] = []
        for c in self.calls("sms"):
            if c.status != 201 or not isinstance(c.response, dict):
                continue
            for r in c.response["SMSMessageData"]["Recipients"]:
                if r["statusCode"] == 101 and (to is None or normalise_msisdn(r["number"]) == normalise_msisdn(to)):
                    out.append(
                        {
                            "to": r["number"],
                            "message": c.body.get("message", ""),
                            "from": c.body.get("from", ""),
                            "message_id": r["messageId"],
                        }
                    )
        return out


def phone_view(phone: Phone, stk: dict[str, StkTransaction], business_name: str, now: float) -> dict[str, Any]:
    """A phone as the console draws it (JSON-ready)."""
    prompt = None
    tx = stk.get(phone.prompt) if phone.prompt else None
    if tx is not None and tx.state == "pending":
        prompt = {
            "checkout_request_id": tx.checkout_request_id,
            "amount": tx.amount,
            "account_reference": tx.account_reference,
            "business_short_code": tx.shortcode,
            "party_b": tx.party_b,
            "business_name": business_name,
            "transaction_type": tx.transaction_type,
            "expires_in_s": max(0, round(tx.expires_at - now)),
        }
    return {
        "msisdn": phone.msisdn,
        "name": phone.name,
        "on_whatsapp": phone.on_whatsapp,
        "blacklisted": phone.blacklisted,
        "window_open": phone.window_open(now),
        "last_inbound_at": phone.last_inbound_at,
        "thread": [asdict(m) for m in phone.thread],
        "sms": [asdict(s) for s in phone.sms],
        "prompt": prompt,
    }
