"""Payment rules, without I/O: when a Pay request may start an STK push, and what a result
(callback or query answer) does to the attempt and to the invoice.

The callback is only a hint: a query answer resolves an attempt exactly as a callback would,
and a success that arrives late (after expiry, after a failure, after a cancel) still records
the money. The database enforces the hard parts (one attempt in flight per invoice by a
partial unique index; each M-PESA receipt used once); these rules decide what to say.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from . import copy
from .model import Invoice, InvoiceStatus, PaymentStatus


class PayVerdict(StrEnum):
    START = "start"
    ALREADY_PAID = "already_paid"
    CANCELLED = "cancelled"
    IN_FLIGHT = "in_flight"
    TOO_SOON = "too_soon"          # Daraja locks a subscriber for about a minute after a push
    TOO_MANY = "too_many"          # our per-phone limit (default 3 prompts in 10 minutes)


@dataclass(frozen=True, slots=True)
class PushLimits:
    min_interval_ms: int = 60_000
    limit: int = 3
    window_ms: int = 600_000


def decide_pay(invoice: Invoice, *, in_flight: bool, recent_pushes_ms: tuple[int, ...], now_ms: int,
               limits: PushLimits) -> PayVerdict:
    """``recent_pushes_ms``: when prompts were sent to this invoice's phone lately (any invoice)."""
    if invoice.status is InvoiceStatus.PAID:
        return PayVerdict.ALREADY_PAID
    if invoice.status is InvoiceStatus.CANCELLED:
        return PayVerdict.CANCELLED
    if in_flight:
        return PayVerdict.IN_FLIGHT
    window = [t for t in recent_pushes_ms if now_ms - t < limits.window_ms]
    if len(window) >= limits.limit:
        return PayVerdict.TOO_MANY
    if any(now_ms - t < limits.min_interval_ms for t in window):
        return PayVerdict.TOO_SOON
    return PayVerdict.START


@dataclass(frozen=True, slots=True)
class Result:
    """What M-PESA said about one attempt: a callback, or a query's answer."""

    result_code: int | None
    result_desc: str
    amount_kes: int | None = None      # callbacks only
    receipt: str | None = None         # callbacks only
    via: str = "callback"              # "callback" | "query"
    payer: str | None = None           # callbacks only: the phone that paid


class InvoiceEffect(StrEnum):
    NONE = "none"
    PAY = "pay"                        # invoice -> PAID, receipts to both
    AMOUNT_MISMATCH = "amount_mismatch"  # money received, invoice not paid; alert the merchant
    PAYER_MISMATCH = "payer_mismatch"  # "paid" from a phone we never prompted: alert, do not settle
    PAID_AFTER_CANCEL = "paid_after_cancel"  # money for a cancelled invoice; alert the merchant
    DOUBLE_PAYMENT = "double_payment"  # money for an invoice already paid; alert the merchant
    TELL_FAILURE = "tell_failure"      # the attempt failed: tell the customer, offer a retry


@dataclass(frozen=True, slots=True)
class Settlement:
    attempt_status: PaymentStatus
    invoice: InvoiceEffect


def settle(invoice: Invoice, attempt_status: PaymentStatus, result: Result,
           prompted_phone: str | None = None) -> Settlement:
    """The new attempt status and what happens to the invoice, for any attempt state.

    A success is money received: it is recorded whatever the attempt's state (a late
    callback after EXPIRED or FAILED) and whatever the invoice's state. A success reported
    for another phone than the one prompted settles nothing: callbacks are unsigned, and the
    prompt only ever goes to the invoice's customer."""
    if result.result_code == 0:
        if result.payer and prompted_phone and result.payer != prompted_phone:
            return Settlement(PaymentStatus.SUCCESS, InvoiceEffect.PAYER_MISMATCH)
        if invoice.status is InvoiceStatus.CANCELLED:
            return Settlement(PaymentStatus.SUCCESS, InvoiceEffect.PAID_AFTER_CANCEL)
        if invoice.status is InvoiceStatus.PAID:
            return Settlement(PaymentStatus.SUCCESS, InvoiceEffect.DOUBLE_PAYMENT)
        if result.amount_kes is not None and result.amount_kes != invoice.amount_kes:
            return Settlement(PaymentStatus.SUCCESS, InvoiceEffect.AMOUNT_MISMATCH)
        return Settlement(PaymentStatus.SUCCESS, InvoiceEffect.PAY)
    if attempt_status is not PaymentStatus.INITIATED:
        # A late failure changes nothing: the attempt already ended (or succeeded).
        return Settlement(attempt_status, InvoiceEffect.NONE)
    return Settlement(PaymentStatus.FAILED, InvoiceEffect.TELL_FAILURE)


def next_query_ms(requested_at_ms: int, queries_done: int, *, first_after_ms: int) -> int:
    """When to ask Daraja again about an unanswered attempt: first after ``first_after_ms``,
    then backing off (x2, at most 5 minutes apart)."""
    due = requested_at_ms + first_after_ms
    for n in range(1, queries_done + 1):
        due += min(300_000, first_after_ms * 2 ** min(n, 16))
    return due


def is_expired(requested_at_ms: int, now_ms: int, expire_after_ms: int) -> bool:
    return now_ms - requested_at_ms >= expire_after_ms


def pay_answer(verdict: PayVerdict, invoice: Invoice, phone: str) -> copy.Reply:
    """What the customer is told when a Pay request starts no prompt: in chat, by SMS, or on
    the pay page (which shows the per-phone refusals itself)."""
    if verdict is PayVerdict.ALREADY_PAID:
        return copy.already_paid(invoice)
    if verdict is PayVerdict.CANCELLED:
        return copy.pay_cancelled(invoice)
    if verdict is PayVerdict.IN_FLIGHT:
        return copy.prompt_already_sent(invoice, phone)
    if verdict is PayVerdict.TOO_SOON:
        return copy.wait_before_prompt(invoice)
    if verdict is PayVerdict.TOO_MANY:
        return copy.too_many_prompts(invoice, phone)
    raise ValueError(f"{verdict.value} starts a prompt: there is nothing to answer")
