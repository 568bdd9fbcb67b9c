"""Small immutable values shared by every floor of InvoiceIQ.

Nothing here does I/O. Money is always an ``int``: whole shillings (``*_kes``) where
M-PESA and the merchant speak, cents (``*_cents``) where the database stores it. Times
are ``int`` milliseconds since the Unix epoch (``*_ms``), taken from an injectable clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

CENTS_PER_KES = 100


def kes_to_cents(kes: int) -> int:
    return kes * CENTS_PER_KES


def cents_to_kes(cents: int) -> int:
    """Whole shillings; callers only store whole-shilling amounts (validated on the way in)."""
    return cents // CENTS_PER_KES


def format_kes(kes: int) -> str:
    """``2500`` -> ``2,500``: the way amounts appear in every message."""
    return f"{kes:,}"


class InvoiceStatus(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    PAID = "PAID"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


OPEN_INVOICE_STATUSES = (InvoiceStatus.PENDING, InvoiceStatus.SENT)


class PaymentStatus(StrEnum):
    INITIATED = "INITIATED"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"


class Channel(StrEnum):
    WHATSAPP = "WHATSAPP"
    SMS = "SMS"


class Direction(StrEnum):
    IN = "IN"
    OUT = "OUT"


@dataclass(frozen=True, slots=True)
class Button:
    """A reply button. ``id`` comes back verbatim when tapped; ``title`` is at most 20 chars."""

    id: str
    title: str


@dataclass(frozen=True, slots=True)
class Customer:
    msisdn: str
    name: str | None


@dataclass(frozen=True, slots=True)
class Invoice:
    id: str
    msisdn: str
    customer_name: str | None
    amount_cents: int
    description: str
    status: InvoiceStatus
    pay_token: str
    created_at_ms: int
    sent_at_ms: int | None = None
    paid_at_ms: int | None = None
    mpesa_receipt: str | None = None
    channel: Channel | None = None
    delivery_state: str | None = None
    last_reminder_at_ms: int | None = None

    @property
    def amount_kes(self) -> int:
        return cents_to_kes(self.amount_cents)

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_INVOICE_STATUSES

    def pay_url(self, public_base_url: str) -> str:
        """The pay-link page: its token, never the invoice number (which can be guessed)."""
        return pay_url(public_base_url, self.pay_token)


def pay_url(public_base_url: str, pay_token: str) -> str:
    return f"{public_base_url}/p/{pay_token}"
