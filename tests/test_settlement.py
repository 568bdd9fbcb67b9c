"""The payment rules of core/settlement.py, without I/O (issue 5).

``decide_pay``: what a Pay request does (already paid, cancelled, in flight, Daraja's
one-minute lock, the per-phone limit, or start). ``settle``: what a callback or a query answer
does to the attempt and to the invoice. ``next_query_ms``/``is_expired``: reconciliation timing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invoiceiq.core.model import Invoice, InvoiceStatus, PaymentStatus
from invoiceiq.core.settlement import (
    InvoiceEffect,
    PayVerdict,
    PushLimits,
    Result,
    Settlement,
    decide_pay,
    is_expired,
    next_query_ms,
    settle,
)

NOW = 1_764_158_400_000
LIMITS = PushLimits()  # 60 s apart, 3 in 10 minutes
INVOICE = Invoice(id="1001", msisdn="254712345678", customer_name=None, amount_cents=250_000,
                  description="Cleaning", status=InvoiceStatus.SENT, pay_token="tok", created_at_ms=NOW - 3_600_000,
                  sent_at_ms=NOW - 3_600_000)


def inv(status: InvoiceStatus) -> Invoice:
    return replace(INVOICE, status=status)


def decide(invoice: Invoice = INVOICE, *, in_flight: bool = False, recent: tuple[int, ...] = (),
           now: int = NOW, limits: PushLimits = LIMITS) -> PayVerdict:
    return decide_pay(invoice, in_flight=in_flight, recent_pushes_ms=recent, now_ms=now, limits=limits)


# -- decide_pay ------------------------------------------------------------------------------------


def test_defaults_are_darajas_rules() -> None:
    assert (LIMITS.min_interval_ms, LIMITS.limit, LIMITS.window_ms) == (60_000, 3, 600_000)


@pytest.mark.parametrize("status", [InvoiceStatus.SENT, InvoiceStatus.PENDING])
def test_an_open_invoice_with_no_recent_prompt_starts(status: InvoiceStatus) -> None:
    assert decide(inv(status)) is PayVerdict.START


def test_paid_wins_over_everything() -> None:
    busy = (NOW - 1000, NOW - 2000, NOW - 3000)
    assert decide(inv(InvoiceStatus.PAID), in_flight=True, recent=busy) is PayVerdict.ALREADY_PAID


def test_cancelled_wins_over_in_flight_and_limits() -> None:
    assert decide(inv(InvoiceStatus.CANCELLED), in_flight=True, recent=(NOW - 1000,)) is PayVerdict.CANCELLED


def test_in_flight_wins_over_the_limits() -> None:
    # The customer has a prompt on the phone: "check your phone", not "wait" or "too many".
    assert decide(in_flight=True) is PayVerdict.IN_FLIGHT
    assert decide(in_flight=True, recent=(NOW - 1000,)) is PayVerdict.IN_FLIGHT
    assert decide(in_flight=True, recent=(NOW - 1000, NOW - 2000, NOW - 3000)) is PayVerdict.IN_FLIGHT


def test_one_minute_between_prompts_to_a_phone() -> None:
    assert decide(recent=(NOW - 1,)) is PayVerdict.TOO_SOON
    assert decide(recent=(NOW - 59_999,)) is PayVerdict.TOO_SOON
    assert decide(recent=(NOW - 60_000,)) is PayVerdict.START
    assert decide(recent=(NOW - 60_001,)) is PayVerdict.START


def test_three_prompts_in_ten_minutes() -> None:
    two = (NOW - 500_000, NOW - 200_000)
    assert decide(recent=two) is PayVerdict.START
    three = (NOW - 500_000, NOW - 300_000, NOW - 200_000)
    assert decide(recent=three) is PayVerdict.TOO_MANY
    # The oldest leaves the window at exactly ten minutes.
    assert decide(recent=(NOW - 600_000, NOW - 300_000, NOW - 200_000)) is PayVerdict.START
    assert decide(recent=(NOW - 599_999, NOW - 300_000, NOW - 200_000)) is PayVerdict.TOO_MANY


def test_too_many_wins_over_too_soon() -> None:
    assert decide(recent=(NOW - 300_000, NOW - 200_000, NOW - 1000)) is PayVerdict.TOO_MANY


def test_prompts_outside_the_window_do_not_count() -> None:
    old = tuple(NOW - 600_000 - i * 1000 for i in range(10))
    assert decide(recent=old) is PayVerdict.START


def test_configured_limits_are_honoured() -> None:
    strict = PushLimits(min_interval_ms=120_000, limit=1, window_ms=3_600_000)
    assert decide(recent=(NOW - 90_000,), limits=strict) is PayVerdict.TOO_MANY
    assert decide(recent=(NOW - 3_600_000,), limits=strict) is PayVerdict.START
    lax = PushLimits(min_interval_ms=0, limit=100, window_ms=600_000)
    assert decide(recent=(NOW - 1, NOW - 2), limits=lax) is PayVerdict.START


@given(st.lists(st.integers(min_value=0, max_value=1_200_000), max_size=8))
def test_start_only_when_every_rule_allows(ages: list[int]) -> None:
    recent = tuple(NOW - a for a in ages)
    verdict = decide(recent=recent)
    in_window = [a for a in ages if a < 600_000]
    if len(in_window) >= 3:
        assert verdict is PayVerdict.TOO_MANY
    elif any(a < 60_000 for a in in_window):
        assert verdict is PayVerdict.TOO_SOON
    else:
        assert verdict is PayVerdict.START


# -- settle ------------------------------------------------------------------------------------------

OPEN = (InvoiceStatus.SENT, InvoiceStatus.PENDING)
ATTEMPT_STATES = list(PaymentStatus)


def success(amount: int | None = 2500, via: str = "callback", receipt: str | None = "TKQ4ABC12D") -> Result:
    return Result(0, "The service request is processed successfully.", amount_kes=amount, receipt=receipt, via=via)


def failure(code: int | None = 1032, via: str = "callback") -> Result:
    return Result(code, "Request cancelled by user", via=via)


@pytest.mark.parametrize("attempt", ATTEMPT_STATES)
@pytest.mark.parametrize("status", OPEN)
def test_success_for_the_invoice_amount_pays_whatever_the_attempt_state(
        attempt: PaymentStatus, status: InvoiceStatus) -> None:
    # Late after EXPIRED or FAILED, the money still counts.
    assert settle(inv(status), attempt, success()) == Settlement(PaymentStatus.SUCCESS, InvoiceEffect.PAY)


@pytest.mark.parametrize("attempt", ATTEMPT_STATES)
def test_success_on_a_cancelled_invoice_alerts_the_merchant(attempt: PaymentStatus) -> None:
    assert settle(inv(InvoiceStatus.CANCELLED), attempt, success()) == Settlement(
        PaymentStatus.SUCCESS, InvoiceEffect.PAID_AFTER_CANCEL)


@pytest.mark.parametrize("attempt", ATTEMPT_STATES)
def test_success_on_a_paid_invoice_is_a_double_payment(attempt: PaymentStatus) -> None:
    assert settle(inv(InvoiceStatus.PAID), attempt, success()) == Settlement(
        PaymentStatus.SUCCESS, InvoiceEffect.DOUBLE_PAYMENT)


@pytest.mark.parametrize("amount", [0, 1, 1500, 2499, 2501, 250_000])
def test_success_for_another_amount_is_a_mismatch(amount: int) -> None:
    assert settle(INVOICE, PaymentStatus.INITIATED, success(amount)) == Settlement(
        PaymentStatus.SUCCESS, InvoiceEffect.AMOUNT_MISMATCH)


def test_a_cancelled_invoice_is_reported_as_such_even_with_a_wrong_amount() -> None:
    assert settle(inv(InvoiceStatus.CANCELLED), PaymentStatus.INITIATED, success(1)).invoice is \
        InvoiceEffect.PAID_AFTER_CANCEL


def test_a_query_success_carries_no_amount_and_pays() -> None:
    assert settle(INVOICE, PaymentStatus.INITIATED, success(None, via="query", receipt=None)) == Settlement(
        PaymentStatus.SUCCESS, InvoiceEffect.PAY)


@pytest.mark.parametrize("code", [1, 2, 3, 4, 8, 17, 1019, 1025, 1032, 1037, 2001, 2028, 8006, None])
@pytest.mark.parametrize("via", ["callback", "query"])
def test_a_failure_of_a_live_attempt_fails_it_and_tells_the_customer(code: int | None, via: str) -> None:
    assert settle(INVOICE, PaymentStatus.INITIATED, failure(code, via)) == Settlement(
        PaymentStatus.FAILED, InvoiceEffect.TELL_FAILURE)


@pytest.mark.parametrize("attempt", [PaymentStatus.SUCCESS, PaymentStatus.FAILED, PaymentStatus.EXPIRED])
@pytest.mark.parametrize("status", list(InvoiceStatus))
def test_a_late_failure_changes_nothing(attempt: PaymentStatus, status: InvoiceStatus) -> None:
    # A success is never undone, and a customer is not told twice.
    assert settle(inv(status), attempt, failure()) == Settlement(attempt, InvoiceEffect.NONE)


# -- reconciliation timing -----------------------------------------------------------------------------


def test_first_query_after_query_after() -> None:
    assert next_query_ms(NOW, 0, first_after_ms=60_000) == NOW + 60_000
    assert next_query_ms(NOW, 0, first_after_ms=1_000) == NOW + 1_000


def test_second_query_backs_off() -> None:
    first = next_query_ms(NOW, 0, first_after_ms=60_000)
    second = next_query_ms(NOW, 1, first_after_ms=60_000)
    assert second - first >= 60_000


def test_query_times_keep_increasing_with_growing_gaps_capped_at_five_minutes() -> None:
    times = [next_query_ms(0, n, first_after_ms=60_000) for n in range(12)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g > 0 for g in gaps), times
    assert all(b >= a for a, b in zip(gaps, gaps[1:])), gaps
    assert max(gaps) <= 300_000 and gaps[-1] == 300_000, gaps
    assert times[:5] == [60_000, 180_000, 420_000, 720_000, 1_020_000]


def test_expiry_boundary() -> None:
    assert not is_expired(NOW, NOW + 599_999, 600_000)
    assert is_expired(NOW, NOW + 600_000, 600_000)
    assert is_expired(NOW, NOW + 3_600_000, 600_000)
    assert not is_expired(NOW, NOW - 1, 600_000)  # a clock that stepped back
