"""The customer's side of the chat: a tiny pure machine, ``customer_step(state, event, now_ms)``.

Customers do not converse with the bot; they tap ``Pay with M-PESA`` / ``View details`` on an
invoice, or type something. Taps (and a typed ``pay`` / ``pay 1042``) become requests the payment
actor handles; any other text gets a hint naming their open invoices, at most once per
``hint_interval_ms`` so that a chatty customer is not answered by a bot on every line (the
merchant may be reading the same thread).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from invoiceiq.core import copy
from invoiceiq.core.conversation import Message
from invoiceiq.core.copy import Reply
from invoiceiq.core.model import Invoice
from invoiceiq.core.validate import clean_input, normalize_invoice_ref

__all__ = [
    "CustomerEffect",
    "CustomerEvent",
    "CustomerState",
    "DetailsRequested",
    "ListOpenInvoices",
    "Message",
    "OpenInvoices",
    "PayRequested",
    "Reply",
    "asks_to_pay",
    "customer_step",
    "pay_request",
]

HINT_INTERVAL_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class OpenInvoices:
    """The actor's answer to :class:`ListOpenInvoices`: this customer's open invoices."""

    invoices: tuple[Invoice, ...]
    sms: bool = False  # the customer wrote by SMS: no buttons, so say "reply PAY <id>"


CustomerEvent = Message | OpenInvoices


@dataclass(frozen=True, slots=True)
class ListOpenInvoices:
    """Load the customer's open invoices; answer with :class:`OpenInvoices`."""


@dataclass(frozen=True, slots=True)
class PayRequested:
    """Start (or reuse) an STK attempt. ``None``: the customer did not say which invoice."""

    invoice_id: str | None


@dataclass(frozen=True, slots=True)
class DetailsRequested:
    invoice_id: str


CustomerEffect = Reply | ListOpenInvoices | PayRequested | DetailsRequested


@dataclass(frozen=True, slots=True)
class CustomerState:
    last_hint_at_ms: int | None = None

    def to_dict(self) -> dict[str, int]:
        if self.last_hint_at_ms is None:
            return {"v": 1}
        return {"v": 1, "last_hint_at_ms": self.last_hint_at_ms}

    @classmethod
    def from_dict(cls, data: object) -> CustomerState:
        """Inverse of :meth:`to_dict`; anything else gives a fresh state (worst case: one hint)."""
        if not isinstance(data, Mapping) or data.get("v") != 1:
            return cls()
        last = data.get("last_hint_at_ms")
        return cls(last) if type(last) is int else cls()


# What a customer may type to mean "let me pay" without naming an invoice: the button's words.
_PAY_ALONE = frozenset({"", "now", "with m-pesa", "with mpesa"})


def pay_request(text: str) -> PayRequested | None:
    """What a customer's message asks to pay, if it asks: the Pay button's id
    (``pay_now:<id>``), or "pay", "pay now", "pay 1042" in words. ``text`` as cleaned input."""
    lowered = text.casefold()
    # Button ids: "pay_now:<id>" / "view_details:<id>" (copy.py puts the invoice id in every one).
    if lowered.startswith("pay_now:"):
        return PayRequested(normalize_invoice_ref(text[len("pay_now:"):]))
    words = lowered.split()
    if words and words[0] == "pay":
        rest = " ".join(words[1:])
        if rest in _PAY_ALONE:
            return PayRequested(None)
        invoice_id = normalize_invoice_ref(rest)
        if invoice_id is not None:
            return PayRequested(invoice_id)
    return None


def asks_to_pay(raw_text: str) -> bool:
    """Whether a customer's message, as received, is a Pay request (see :func:`pay_request`)."""
    return pay_request(clean_input(raw_text).strip()) is not None


def customer_step(
    state: CustomerState,
    event: CustomerEvent,
    now_ms: int,
    hint_interval_ms: int = HINT_INTERVAL_MS,
) -> tuple[CustomerState, tuple[CustomerEffect, ...]]:
    if isinstance(event, OpenInvoices):
        if not _hint_allowed(state, now_ms, hint_interval_ms):
            return state, ()
        open_ones = tuple(i for i in event.invoices if i.is_open)
        hint = copy.sms_customer_hint(open_ones) if event.sms else copy.customer_hint(open_ones)
        return CustomerState(last_hint_at_ms=now_ms), (hint,)
    if not isinstance(event, Message):
        raise TypeError(f"not a customer event: {event!r}")

    text = clean_input(event.text).strip()
    pay = pay_request(text)
    if pay is not None:
        return state, (pay,)
    lowered = text.casefold()
    if lowered.startswith("view_details:"):
        invoice_id = normalize_invoice_ref(text[len("view_details:"):])
        if invoice_id is not None:
            return state, (DetailsRequested(invoice_id),)
    # Free text. Within the hint interval there is nothing to say, so skip the lookup too.
    if not _hint_allowed(state, now_ms, hint_interval_ms):
        return state, ()
    return state, (ListOpenInvoices(),)


def _hint_allowed(state: CustomerState, now_ms: int, interval_ms: int) -> bool:
    last = state.last_hint_at_ms
    # A clock that went backwards (now < last) must not silence the bot for good.
    return last is None or not 0 <= now_ms - last < interval_ms
