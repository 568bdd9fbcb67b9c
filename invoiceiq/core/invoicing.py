"""Rules for the merchant's commands on an existing invoice (remind, cancel), without I/O.

The store applies each allowed change with a conditional UPDATE, so these rules decide what
to say and the database decides who wins a race.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .model import Invoice, InvoiceStatus


class Verdict(StrEnum):
    OK = "ok"
    PAID = "paid"
    CANCELLED = "cancelled"
    TOO_SOON = "too_soon"


@dataclass(frozen=True, slots=True)
class RemindVerdict:
    verdict: Verdict
    allowed_at_ms: int | None = None


def can_remind(invoice: Invoice, now_ms: int, interval_ms: int) -> RemindVerdict:
    """A reminder at most once per ``interval_ms``, and only for an invoice still to be paid."""
    if invoice.status is InvoiceStatus.PAID:
        return RemindVerdict(Verdict.PAID)
    if invoice.status is InvoiceStatus.CANCELLED:
        return RemindVerdict(Verdict.CANCELLED)
    last = invoice.last_reminder_at_ms
    if last is not None and now_ms - last < interval_ms:
        return RemindVerdict(Verdict.TOO_SOON, last + interval_ms)
    return RemindVerdict(Verdict.OK)


def can_cancel(invoice: Invoice) -> Verdict:
    """Anything not yet paid can be cancelled; money received is never undone by a cancel."""
    if invoice.status is InvoiceStatus.PAID:
        return Verdict.PAID
    if invoice.status is InvoiceStatus.CANCELLED:
        return Verdict.CANCELLED
    return Verdict.OK
