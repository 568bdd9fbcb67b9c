"""The merchant's chat as a pure state machine: ``step(state, event, now_ms, settings)``.

No I/O and no clock: the session actor loads a :class:`ConversationState` (``from_dict``), calls
:func:`step` with one event and the time, carries out the returned effects in one transaction and
stores the new state (``to_dict``). Everything the bot says comes from :mod:`invoiceiq.core.copy`.

Stages (brief 7.3; the brief's section 10 COLLECT/READY are PHONE..DESCRIPTION and REVIEW)::

    IDLE ──invoice / new invoice / [New Invoice]──> PHONE ──> NAME ──> AMOUNT ──> DESCRIPTION ──> REVIEW
    REVIEW ──send──> IDLE (CreateInvoice)         REVIEW ──edit amount / edit description──>
                                                      AMOUNT / DESCRIPTION ──> REVIEW (editing)
    IDLE ──invoice <name> <amount> <desc>──> PICK_CUSTOMER (FindCustomers; waiting for the answer)
    PICK_CUSTOMER ──CustomersFound: 1──> IDLE (CreateInvoice)   ──0 or too many──> IDLE (say so)
                  ──CustomersFound: 2..9──> PICK_CUSTOMER (list) ──<number>──> IDLE (CreateInvoice)
    any flow stage ──cancel──> IDLE        ──help──> same stage    ──15 min quiet──> IDLE

Timers live in the state (``nudge_at_ms``, ``close_at_ms``); the actor delivers :class:`TimerDue`
when ``state.due_ms <= now``. A ``TimerDue`` that finds nothing due is a no-op, so a duplicate or
late delivery is harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal, TypeVar

from invoiceiq.core import copy
from invoiceiq.core.commands import (
    BadInvoiceRef,
    BadOneLine,
    BareCancel,
    CancelInvoice,
    Help,
    OneLine,
    Remind,
    StartGuided,
    Status,
    Unknown,
    Unpaid,
    parse_command,
)
from invoiceiq.core.copy import Reply
from invoiceiq.core.model import Customer
from invoiceiq.core.validate import (
    AmountTooLarge,
    ValidationError,
    clean_input,
    normalize_msisdn,
    parse_amount_kes,
    validate_description,
    validate_name,
)

__all__ = [
    "ChatSettings",
    "ConversationState",
    "CreateInvoice",
    "CustomersFound",
    "Draft",
    "Effect",
    "Event",
    "FindCustomers",
    "InvoiceAction",
    "ListUnpaid",
    "Message",
    "RateWindow",
    "Reply",
    "Stage",
    "TimerDue",
    "step",
]

RATE_WINDOW_MS = 60_000


@dataclass(frozen=True, slots=True)
class ChatSettings:
    nudge_after_ms: int = 300_000  # 7.3.10: "no reply for 5 minutes"
    close_after_ms: int = 900_000  # 7.3.10: "no reply for 15 minutes"
    max_amount_kes: int = 250_000
    rate_limit_per_minute: int = 30


# ---------------------------------------------------------------------------------------------
# Events (in)


@dataclass(frozen=True, slots=True)
class Message:
    """Text the merchant typed, or the id of a button they tapped (the same thing, by design)."""

    text: str


@dataclass(frozen=True, slots=True)
class TimerDue:
    """Delivered by the actor once ``state.due_ms <= now_ms``; safe to deliver late or twice."""


@dataclass(frozen=True, slots=True)
class CustomersFound:
    """The actor's answer to :class:`FindCustomers`, delivered as the very next event."""

    query: str
    matches: tuple[Customer, ...]


Event = Message | TimerDue | CustomersFound


# ---------------------------------------------------------------------------------------------
# Effects (out). ``Reply`` (a message to the merchant) is copy.Reply, re-exported here.


@dataclass(frozen=True, slots=True)
class FindCustomers:
    """Look up saved customers by name; answer with :class:`CustomersFound`."""

    query: str


@dataclass(frozen=True, slots=True)
class CreateInvoice:
    """Create the invoice PENDING and queue it to the customer.

    No reply goes with it: the delivery layer sends the merchant ``copy.invoice_sent`` once the
    provider accepts the customer's message, so "sent" is never said before it is true.
    """

    msisdn: str
    customer_name: str | None
    amount_kes: int
    description: str


@dataclass(frozen=True, slots=True)
class InvoiceAction:
    """``remind``/``cancel``/``status`` an existing invoice; the actor replies with copy.py."""

    kind: Literal["remind", "cancel", "status"]
    invoice_id: str


@dataclass(frozen=True, slots=True)
class ListUnpaid:
    """``unpaid``; the actor replies with ``copy.unpaid_list``."""


Effect = Reply | FindCustomers | CreateInvoice | InvoiceAction | ListUnpaid


# ---------------------------------------------------------------------------------------------
# State


class Stage(StrEnum):
    IDLE = "IDLE"
    PHONE = "PHONE"
    NAME = "NAME"
    AMOUNT = "AMOUNT"
    DESCRIPTION = "DESCRIPTION"
    REVIEW = "REVIEW"
    PICK_CUSTOMER = "PICK_CUSTOMER"


@dataclass(frozen=True, slots=True)
class Draft:
    """The invoice being put together; fields fill in as the flow goes."""

    msisdn: str | None = None
    name: str | None = None
    amount_kes: int | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class RateWindow:
    """Fixed one-minute window of merchant messages, opened by the first message after the last.

    Fixed rather than sliding so that the state stays three numbers; the cost is that a burst
    straddling two windows can pass up to twice the limit in a short time, which is acceptable
    for a limit meant to stop runaway loops rather than to meter.
    """

    start_ms: int | None = None
    count: int = 0
    warned: bool = False


@dataclass(frozen=True, slots=True)
class ConversationState:
    stage: Stage = Stage.IDLE
    draft: Draft = field(default_factory=Draft)
    # True while answering "Edit Amount"/"Edit Description": the answer returns to REVIEW.
    editing: bool = False
    # PICK_CUSTOMER: the name typed in the one-line command, and the customers it matched
    # (empty while the actor's answer to FindCustomers is still to come).
    query: str | None = None
    candidates: tuple[Customer, ...] = ()
    nudge_at_ms: int | None = None
    close_at_ms: int | None = None
    rate: RateWindow = field(default_factory=RateWindow)

    @property
    def due_ms(self) -> int | None:
        """The earliest pending timer, or ``None`` (always ``None`` when IDLE)."""
        pending = [t for t in (self.nudge_at_ms, self.close_at_ms) if t is not None]
        return min(pending) if pending else None

    def to_dict(self) -> dict[str, int | str | list[list[str]]]:
        """A JSON-compatible dict of ints, strs and lists only (absent values are left out)."""
        d: dict[str, int | str | list[list[str]]] = {"v": _FORMAT, "stage": self.stage.value}
        optional: dict[str, int | str | None] = {
            "msisdn": self.draft.msisdn,
            "name": self.draft.name,
            "amount_kes": self.draft.amount_kes,
            "description": self.draft.description,
            "query": self.query,
            "nudge_at_ms": self.nudge_at_ms,
            "close_at_ms": self.close_at_ms,
            "rate_start_ms": self.rate.start_ms,
        }
        d.update({k: v for k, v in optional.items() if v is not None})
        if self.editing:
            d["editing"] = 1
        if self.candidates:
            d["candidates"] = [[c.msisdn, c.name or ""] for c in self.candidates]
        if self.rate.count:
            d["rate_count"] = self.rate.count
        if self.rate.warned:
            d["rate_warned"] = 1
        return d

    @classmethod
    def from_dict(cls, data: object) -> ConversationState:
        """Inverse of :meth:`to_dict`. Anything unknown, old or inconsistent falls back to IDLE.

        A stored state is outside data: it may predate a deploy or have been hand-edited. The
        rate window is kept when only the flow part is unusable, so a bad row cannot be used to
        reset the rate limit.
        """
        if not isinstance(data, Mapping) or data.get("v") != _FORMAT:
            return cls()
        try:
            rate = RateWindow(
                start_ms=_opt(data, "rate_start_ms", int),
                count=_opt(data, "rate_count", int) or 0,
                warned=bool(_opt(data, "rate_warned", int)),
            )
        except (TypeError, ValueError):
            rate = RateWindow()
        try:
            state = cls(
                stage=Stage(data["stage"]),
                draft=Draft(
                    msisdn=_opt(data, "msisdn", str),
                    name=_opt(data, "name", str),
                    amount_kes=_opt(data, "amount_kes", int),
                    description=_opt(data, "description", str),
                ),
                editing=bool(_opt(data, "editing", int)),
                query=_opt(data, "query", str),
                candidates=_candidates(data.get("candidates", [])),
                nudge_at_ms=_opt(data, "nudge_at_ms", int),
                close_at_ms=_opt(data, "close_at_ms", int),
                rate=rate,
            )
        except (KeyError, TypeError, ValueError):
            return cls(rate=rate)
        return state if _is_coherent(state) else cls(rate=rate)


_FORMAT = 1
_T = TypeVar("_T", int, str)


def _opt(data: Mapping[str, object], key: str, kind: type[_T]) -> _T | None:
    value = data.get(key)
    # type() and not isinstance(): True is an int to isinstance, and must not pass for one.
    if value is not None and type(value) is not kind:
        raise TypeError(f"{key}: expected {kind.__name__}")
    return value  # type: ignore[return-value]


def _candidates(raw: object) -> tuple[Customer, ...]:
    if not isinstance(raw, list):
        raise TypeError("candidates")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and all(type(x) is str for x in item)):
            raise TypeError("candidate")
        out.append(Customer(msisdn=item[0], name=item[1] or None))
    return tuple(out)


# What each stage needs from the draft to make sense; a stored state lacking it is discarded.
_REQUIRED: dict[Stage, tuple[str, ...]] = {
    Stage.IDLE: (),
    Stage.PHONE: (),
    Stage.NAME: ("msisdn",),
    Stage.AMOUNT: ("msisdn",),
    Stage.DESCRIPTION: ("msisdn", "amount_kes"),
    Stage.REVIEW: ("msisdn", "amount_kes", "description"),
    Stage.PICK_CUSTOMER: ("amount_kes", "description"),
}


def _is_coherent(s: ConversationState) -> bool:
    """Could :func:`step` have produced this state? (Used on states read back from storage.)"""
    d = s.draft
    if any(getattr(d, f) is None for f in _REQUIRED[s.stage]):
        return False
    if s.stage is Stage.IDLE:
        return s == ConversationState(rate=s.rate)  # nothing but the rate window survives IDLE
    if s.close_at_ms is None:  # a flow without its close timer would never end
        return False
    editable = s.stage in (Stage.AMOUNT, Stage.DESCRIPTION)
    if s.editing and (not editable or None in (d.msisdn, d.amount_kes, d.description)):
        return False  # editing happens from the review, so phone, amount and description are set
    picking = s.stage is Stage.PICK_CUSTOMER
    if picking != (s.query is not None) or (s.candidates and not picking):
        return False
    try:
        return (
            (d.msisdn is None or normalize_msisdn(d.msisdn) == d.msisdn)
            and (d.name is None or validate_name(d.name) == d.name)
            and (d.amount_kes is None or d.amount_kes >= 1)
            and (d.description is None or validate_description(d.description) == d.description)
            and (s.query is None or validate_name(s.query) == s.query)
            and all(normalize_msisdn(c.msisdn) == c.msisdn for c in s.candidates)
        )
    except ValidationError:
        return False


# ---------------------------------------------------------------------------------------------
# The machine

Step = tuple[ConversationState, tuple[Effect, ...]]


def step(state: ConversationState, event: Event, now_ms: int, settings: ChatSettings) -> Step:
    """One event in, the next state and the effects to carry out (in order) out."""
    if isinstance(event, Message):
        return _on_message(state, event.text, now_ms, settings)
    if isinstance(event, TimerDue):
        return _on_timer(state, now_ms)
    if isinstance(event, CustomersFound):
        return _on_customers_found(state, event)
    raise TypeError(f"not a conversation event: {event!r}")


def _on_message(state: ConversationState, text: str, now_ms: int, settings: ChatSettings) -> Step:
    rate = _count(state.rate, now_ms)
    if rate.count > settings.rate_limit_per_minute:
        # Over the limit: only the bookkeeping changes (no timers re-armed, no answer taken),
        # and the merchant hears about it once per window.
        if rate.warned:
            return replace(state, rate=rate), ()
        return replace(state, rate=replace(rate, warned=True)), (copy.RATE_LIMITED,)
    state = replace(state, rate=rate)
    words = " ".join(clean_input(text).split()).casefold()

    if state.stage is Stage.PICK_CUSTOMER and not state.candidates:
        # The lookup's answer never came (the actor died in between): start over from IDLE.
        state = _idle(state)
    if state.stage is Stage.IDLE:
        return _on_command(state, text, words, now_ms, settings)

    # During a flow only these are global (7.3.7); anything else answers the current step.
    if words == "cancel":
        return _idle(state), (copy.FLOW_CANCELLED,)
    if words == "help":
        # The brief's help text, then the current question again so the merchant can go on.
        return _arm(state, now_ms, settings), (copy.FLOW_HELP, _prompt(state))
    new_state, effects = _ANSWERS[state.stage](state, text, words, settings)
    if new_state.stage is not Stage.IDLE:
        new_state = _arm(new_state, now_ms, settings)
    return new_state, effects


def _count(rate: RateWindow, now_ms: int) -> RateWindow:
    start = rate.start_ms
    if start is None or not 0 <= now_ms - start < RATE_WINDOW_MS:  # new window (or clock jump)
        return RateWindow(start_ms=now_ms, count=1)
    return replace(rate, count=rate.count + 1)


def _on_timer(state: ConversationState, now_ms: int) -> Step:
    if state.close_at_ms is not None and state.close_at_ms <= now_ms:
        return _idle(state), (copy.SESSION_CLOSED,)
    if state.nudge_at_ms is not None and state.nudge_at_ms <= now_ms:
        return replace(state, nudge_at_ms=None), (copy.NUDGE,)  # once: not re-armed here
    return state, ()


def _on_customers_found(state: ConversationState, event: CustomersFound) -> Step:
    if state.stage is not Stage.PICK_CUSTOMER or state.candidates or event.query != state.query:
        return state, ()  # stale or duplicate answer
    amount, description = state.draft.amount_kes, state.draft.description
    assert amount is not None and description is not None and state.query is not None
    matches = event.matches
    if not matches:
        return _idle(state), (copy.no_customer_match(state.query),)
    if len(matches) == 1:
        (c,) = matches
        return _idle(state), (CreateInvoice(c.msisdn, c.name, amount, description),)
    if len(matches) > copy.MAX_PICK_CANDIDATES:
        return _idle(state), (copy.too_many_matches(state.query),)
    state = replace(state, candidates=tuple(matches))  # a list would break equality
    return state, (_prompt(state),)


def _idle(state: ConversationState) -> ConversationState:
    """Back to IDLE: draft and timers dropped, the rate window kept."""
    return ConversationState(rate=state.rate)


def _arm(state: ConversationState, now_ms: int, settings: ChatSettings) -> ConversationState:
    return replace(
        state,
        nudge_at_ms=now_ms + settings.nudge_after_ms,
        close_at_ms=now_ms + settings.close_after_ms,
    )


# IDLE: commands -----------------------------------------------------------------------------

# Words that only mean something inside a flow: a tap on a button of a session that has since
# closed or been cancelled. Saying the session closed is the honest answer.
_FLOW_WORDS = frozenset({"send", "skip", "edit amount", "edit description", "-"})


def _on_command(
    state: ConversationState, text: str, words: str, now_ms: int, settings: ChatSettings
) -> Step:
    match parse_command(text, settings.max_amount_kes):
        case StartGuided():
            state = _arm(replace(state, stage=Stage.PHONE), now_ms, settings)
            return state, (copy.ASK_PHONE,)
        case OneLine(msisdn=str() as msisdn, amount_kes=amount, description=description):
            # The actor may fill the name in from the customer book; the merchant gave none.
            return state, (CreateInvoice(msisdn, None, amount, description),)
        case OneLine(name_query=str() as query, amount_kes=amount, description=description):
            state = replace(
                state,
                stage=Stage.PICK_CUSTOMER,
                query=query,
                draft=Draft(amount_kes=amount, description=description),
            )
            return _arm(state, now_ms, settings), (FindCustomers(query),)
        case BadOneLine(field=bad, over_max=over_max):
            return state, (copy.one_line_error(bad, settings.max_amount_kes, over_max),)
        case Remind(invoice_id=invoice_id):
            return state, (InvoiceAction("remind", invoice_id),)
        case CancelInvoice(invoice_id=invoice_id):
            return state, (InvoiceAction("cancel", invoice_id),)
        case Status(invoice_id=invoice_id):
            return state, (InvoiceAction("status", invoice_id),)
        case BadInvoiceRef(verb=verb):
            return state, (copy.bad_invoice_ref(verb),)
        case Unpaid():
            return state, (ListUnpaid(),)
        case Help():
            return state, (copy.MERCHANT_HELP,)
        case BareCancel():
            return state, (copy.NOTHING_TO_CANCEL,)
        case Unknown() if words in _FLOW_WORDS:
            return state, (copy.SESSION_CLOSED,)
        case _:
            return state, (copy.UNKNOWN_COMMAND,)


# Flow: each stage's answer --------------------------------------------------------------------

_NEXT = {
    Stage.PHONE: Stage.NAME,
    Stage.NAME: Stage.AMOUNT,
    Stage.AMOUNT: Stage.DESCRIPTION,
    Stage.DESCRIPTION: Stage.REVIEW,
}

# "-" and "skip" per the brief; phones turn a typed "-" into a dash now and then.
_SKIP_NAME = frozenset({"-", "skip", "\u2013", "\u2014"})


def _prompt(state: ConversationState) -> Reply:
    """The question the current stage asks (used on entry and again after ``help``)."""
    d = state.draft
    match state.stage:
        case Stage.PHONE:
            return copy.ASK_PHONE
        case Stage.NAME:
            return copy.ASK_NAME
        case Stage.AMOUNT:
            return copy.ASK_AMOUNT
        case Stage.DESCRIPTION:
            return copy.ASK_DESCRIPTION
        case Stage.REVIEW:
            assert d.msisdn is not None and d.amount_kes is not None and d.description is not None
            return copy.review(d.msisdn, d.name, d.amount_kes, d.description)
        case Stage.PICK_CUSTOMER:
            assert state.query is not None and d.amount_kes is not None
            return copy.pick_customer(state.query, d.amount_kes, state.candidates)
    raise AssertionError(f"no prompt in {state.stage}")


def _advance(state: ConversationState, draft: Draft) -> Step:
    """A valid answer: store it, go on (or back to the review when editing), ask the next one."""
    stage = Stage.REVIEW if state.editing else _NEXT[state.stage]
    state = replace(state, stage=stage, draft=draft, editing=False)
    return state, (_prompt(state),)


def _answer_phone(state: ConversationState, text: str, words: str, settings: ChatSettings) -> Step:
    msisdn = normalize_msisdn(text)
    if msisdn is None:
        return state, (copy.INVALID_PHONE,)
    return _advance(state, replace(state.draft, msisdn=msisdn))


def _answer_name(state: ConversationState, text: str, words: str, settings: ChatSettings) -> Step:
    if words in _SKIP_NAME:
        return _advance(state, replace(state.draft, name=None))
    try:
        name = validate_name(text)
    except ValidationError:
        return state, (copy.INVALID_NAME,)
    return _advance(state, replace(state.draft, name=name))


def _answer_amount(state: ConversationState, text: str, words: str, settings: ChatSettings) -> Step:
    try:
        amount = parse_amount_kes(text, settings.max_amount_kes)
    except AmountTooLarge:
        return state, (copy.amount_too_large(settings.max_amount_kes),)
    except ValidationError:
        return state, (copy.INVALID_AMOUNT,)
    return _advance(state, replace(state.draft, amount_kes=amount))


def _answer_description(
    state: ConversationState, text: str, words: str, settings: ChatSettings
) -> Step:
    try:
        description = validate_description(text)
    except ValidationError:
        return state, (copy.INVALID_DESCRIPTION,)
    return _advance(state, replace(state.draft, description=description))


def _answer_review(state: ConversationState, text: str, words: str, settings: ChatSettings) -> Step:
    d = state.draft
    if words == "send":
        assert d.msisdn is not None and d.amount_kes is not None and d.description is not None
        return _idle(state), (CreateInvoice(d.msisdn, d.name, d.amount_kes, d.description),)
    if words in ("edit amount", "edit description"):
        stage = Stage.AMOUNT if words == "edit amount" else Stage.DESCRIPTION
        state = replace(state, stage=stage, editing=True)
        return state, (_prompt(state),)
    return state, (copy.review_hint(),)


def _answer_pick(state: ConversationState, text: str, words: str, settings: ChatSettings) -> Step:
    number = words.strip("#.) ")
    count = len(state.candidates)
    if number.isascii() and number.isdigit() and len(number) <= 2 and 1 <= int(number) <= count:
        c = state.candidates[int(number) - 1]
        d = state.draft
        assert d.amount_kes is not None and d.description is not None
        return _idle(state), (CreateInvoice(c.msisdn, c.name, d.amount_kes, d.description),)
    return state, (copy.pick_customer_invalid(count),)


_ANSWERS: dict[Stage, Callable[[ConversationState, str, str, ChatSettings], Step]] = {
    Stage.PHONE: _answer_phone,
    Stage.NAME: _answer_name,
    Stage.AMOUNT: _answer_amount,
    Stage.DESCRIPTION: _answer_description,
    Stage.REVIEW: _answer_review,
    Stage.PICK_CUSTOMER: _answer_pick,
}
