"""Bounded replies (abuse protection) and the merchant's true ``unpaid`` totals.

* Every answer to a Pay request that starts no prompt (already paid, cancelled, prompt already
  out, a minute not yet passed, too many prompts, a lost in-flight race) is queued at most once
  per invoice per 10 seconds, whatever the number of taps: ``PaymentActor._pay_request`` run
  directly against a real store.
* The receipt-reuse check lives in the store (``payments.receipt_used_elsewhere``).
* ``unpaid`` counts and totals every open invoice, not the first page of them: the store query
  (``invoices.open_totals``), the copy, and the daemon answering the merchant.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from harness import MERCHANT, FakeProviders, Handle, make_settings, running_daemon
from invoiceiq.actors import payment as payment_actor
from invoiceiq.actors.payment import PaymentActor, _After
from invoiceiq.clock import ManualClock
from invoiceiq.core import copy
from invoiceiq.core.model import Invoice, PaymentStatus
from invoiceiq.observability import Metrics
from invoiceiq.store import Store, Tx, invoices, payments

pytestmark = pytest.mark.anyio
NOW = 1_764_158_400_000
PHONE = "254712345678"
TAPS = 50


# -- Pay answers: one per invoice per 10 seconds ---------------------------------------------------


async def new_invoice(store: Store, msisdn: str = PHONE, amount_cents: int = 250_000, at: int = NOW) -> Invoice:
    async def job(tx: Tx) -> Invoice:
        return await invoices.create(tx, msisdn=msisdn, customer_name=None, amount_cents=amount_cents,
                                     description="Cleaning", now_ms=at, pay_base_url="https://pay.test",
                                     source="test")
    return await store.write(job)


async def attempt(tx: Tx, invoice_id: str, at: int, resolve: bool = True) -> None:
    started = await payments.start(tx, invoice_id=invoice_id, phone=PHONE, amount_cents=250_000, now_ms=at,
                                   next_check_at_ms=at + 60_000, expire_at_ms=at + 600_000, source="test")
    assert started is not None
    if resolve:
        assert await payments.resolve(tx, started.payment_id, status=PaymentStatus.FAILED, result_code=1032,
                                      result_desc="cancelled", now_ms=at + 1000, only_if_initiated=True)


def actor(store: Store, database_url: str) -> PaymentActor:
    # Daraja is never called here (no prompt may start): any non-None stand-in will do.
    return PaymentActor(store=store, settings=make_settings(database_url), clock=ManualClock(NOW),
                        metrics=Metrics(), daraja=object(), wake_outbox=lambda: None,  # type: ignore[arg-type]
                        callback_url="https://pay.test/cb")


async def tap(store: Store, a: PaymentActor, invoice_id: str, now: int, via: str = "whatsapp") -> Any:
    async def job(tx: Tx) -> Any:
        invoice = await invoices.get(tx, invoice_id)
        assert invoice is not None
        return await a._pay_request(tx, invoice, {"phone": PHONE, "via": via}, now, _After())
    return await store.write(job)


async def answers(store: Store, invoice_id: str) -> list[str]:
    async def job(tx: Tx) -> list[str]:
        rows = await tx.all("SELECT content FROM outbox WHERE invoice_id = :inv AND kind = 'customer_reply'"
                            " ORDER BY id", {"inv": invoice_id})
        return [r["content"] for r in rows]
    return await store.write(job)


async def stkless_taps(store: Store, a: PaymentActor, invoice_id: str) -> list[str]:
    """TAPS taps at one instant, then TAPS more 10 s later: two answers, never a prompt."""
    for now in (NOW + 700_000, NOW + 710_000):
        for _ in range(TAPS):
            assert await tap(store, a, invoice_id, now) is True
    return await answers(store, invoice_id)


def said(content: str, reply: copy.Reply) -> bool:
    return bool(json.loads(content).get("body") == reply.text)


async def test_already_paid_is_answered_once_per_ten_seconds(store: Store, database_url: str) -> None:
    invoice = await new_invoice(store)
    await store.write(lambda tx: invoices.mark_paid(tx, invoice.id, "NLJ7RT61SV", NOW))
    told = await stkless_taps(store, actor(store, database_url), invoice.id)
    paid = replace(invoice, mpesa_receipt="NLJ7RT61SV")
    assert len(told) == 2 and all(said(t, copy.already_paid(paid)) for t in told), told
    assert "Receipt: NLJ7RT61SV" in json.loads(told[0])["body"]


async def test_cancelled_is_answered_once_per_ten_seconds(store: Store, database_url: str) -> None:
    invoice = await new_invoice(store)
    await store.write(lambda tx: invoices.cancel(tx, invoice.id, NOW))
    told = await stkless_taps(store, actor(store, database_url), invoice.id)
    assert len(told) == 2 and all(said(t, copy.pay_cancelled(invoice)) for t in told), told


async def test_in_flight_is_answered_once_per_ten_seconds(store: Store, database_url: str) -> None:
    invoice = await new_invoice(store)
    await store.write(lambda tx: attempt(tx, invoice.id, NOW + 650_000, resolve=False))
    told = await stkless_taps(store, actor(store, database_url), invoice.id)
    assert len(told) == 2 and all(said(t, copy.prompt_already_sent(invoice, PHONE)) for t in told), told


async def test_too_soon_is_answered_once_per_ten_seconds(store: Store, database_url: str) -> None:
    invoice = await new_invoice(store)
    await store.write(lambda tx: attempt(tx, invoice.id, NOW + 680_000))  # 20 s before the taps
    told = await stkless_taps(store, actor(store, database_url), invoice.id)
    assert len(told) == 2 and all(said(t, copy.wait_before_prompt(invoice)) for t in told), told


async def test_too_many_is_answered_once_per_ten_seconds(store: Store, database_url: str) -> None:
    invoice = await new_invoice(store)

    async def three(tx: Tx) -> None:  # three prompts in the last ten minutes, the last 2 min ago
        for ago in (400_000, 300_000, 200_000):
            await attempt(tx, invoice.id, NOW + 700_000 - ago)
    await store.write(three)
    told = await stkless_taps(store, actor(store, database_url), invoice.id)
    assert len(told) == 2 and all(said(t, copy.too_many_prompts(invoice, PHONE)) for t in told), told


async def test_a_lost_in_flight_race_is_answered_once_per_ten_seconds(
        store: Store, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process inserted the attempt after this one looked: ``payments.start`` refuses,
    and the actor answers "already sent" — bounded like the ordinary in-flight answer."""
    invoice = await new_invoice(store)
    # Over a minute before the taps, so that, unseen, it would not make them wait either.
    await store.write(lambda tx: attempt(tx, invoice.id, NOW + 600_000, resolve=False))

    async def not_seen(tx: Tx, invoice_id: str) -> None:
        return None
    monkeypatch.setattr(payment_actor.payments, "in_flight", not_seen)
    told = await stkless_taps(store, actor(store, database_url), invoice.id)
    assert len(told) == 2 and all(said(t, copy.prompt_already_sent(invoice, PHONE)) for t in told), told


async def test_a_new_answer_is_not_held_back_by_another_kind(store: Store, database_url: str) -> None:
    """The bound is per kind of answer: "already sent" then, once paid, "already paid" at once."""
    invoice = await new_invoice(store)
    a = actor(store, database_url)
    await store.write(lambda tx: attempt(tx, invoice.id, NOW, resolve=False))
    await tap(store, a, invoice.id, NOW + 1000)
    await store.write(lambda tx: invoices.mark_paid(tx, invoice.id, "NLJ7RT61SV", NOW + 2000))
    await tap(store, a, invoice.id, NOW + 3000)
    told = await answers(store, invoice.id)
    assert len(told) == 2
    assert said(told[0], copy.prompt_already_sent(invoice, PHONE))
    assert said(told[1], copy.already_paid(replace(invoice, mpesa_receipt="NLJ7RT61SV")))


async def test_the_pay_page_and_the_api_queue_no_answer(store: Store, database_url: str) -> None:
    invoice = await new_invoice(store)
    await store.write(lambda tx: invoices.mark_paid(tx, invoice.id, "NLJ7RT61SV", NOW))
    a = actor(store, database_url)
    for via in ("api", "paylink"):
        await tap(store, a, invoice.id, NOW, via=via)
    assert await answers(store, invoice.id) == []


# -- the receipt check lives in the store ----------------------------------------------------------


async def test_receipt_used_elsewhere(store: Store) -> None:
    first, second = await new_invoice(store), await new_invoice(store)

    async def job(tx: Tx) -> tuple[bool, bool, bool]:
        a = await payments.start(tx, invoice_id=first.id, phone=PHONE, amount_cents=250_000, now_ms=NOW,
                                 next_check_at_ms=NOW, expire_at_ms=NOW + 1, source="test")
        b = await payments.start(tx, invoice_id=second.id, phone=PHONE, amount_cents=250_000, now_ms=NOW,
                                 next_check_at_ms=NOW, expire_at_ms=NOW + 1, source="test")
        assert a is not None and b is not None
        await payments.resolve(tx, a.payment_id, status=PaymentStatus.SUCCESS, result_code=0, result_desc="ok",
                               now_ms=NOW, receipt="NLJ7RT61SV")
        return (await payments.receipt_used_elsewhere(tx, "NLJ7RT61SV", a.payment_id),
                await payments.receipt_used_elsewhere(tx, "NLJ7RT61SV", b.payment_id),
                await payments.receipt_used_elsewhere(tx, "OTHER00000", b.payment_id))
    assert await store.write(job) == (False, True, False)


def test_no_sql_outside_the_store_in_the_payment_actor() -> None:
    import inspect

    source = inspect.getsource(payment_actor)
    for verb in ("SELECT ", "UPDATE ", "INSERT ", "DELETE "):
        assert verb not in source, verb


# -- unpaid: the true count and total past one page ------------------------------------------------

OPEN = 130


async def many_invoices(store: Store) -> tuple[int, int]:
    """OPEN open invoices (of 1..OPEN shillings x 100) plus a paid and a cancelled one."""
    async def job(tx: Tx) -> tuple[int, int]:
        total = 0
        for n in range(OPEN):
            kes = (n + 1) * 100
            await invoices.create(tx, msisdn=f"2547120{n:05d}", customer_name=None, amount_cents=kes * 100,
                                  description="Job", now_ms=NOW + n, pay_base_url="https://pay.test", source="test")
            total += kes * 100
        for done in ("paid", "cancelled"):
            inv = await invoices.create(tx, msisdn=PHONE, customer_name=None, amount_cents=9_999_900,
                                        description=done, now_ms=NOW + 1000, pay_base_url="https://pay.test",
                                        source="test")
            if done == "paid":
                await invoices.mark_paid(tx, inv.id, "NLJ7RT61SV", NOW + 2000)
            else:
                await invoices.cancel(tx, inv.id, NOW + 2000)
        return OPEN, total
    return await store.write(job)


async def test_open_totals_count_and_sum_every_open_invoice(store: Store) -> None:
    assert await store.write(lambda tx: invoices.open_totals(tx)) == (0, 0)
    expected = await many_invoices(store)
    assert await store.write(lambda tx: invoices.open_totals(tx)) == expected
    page = await store.write(lambda tx: invoices.open_invoices(tx, None, limit=100))
    assert len(page) == 100  # the page is a page; the totals are not
    assert await store.write(lambda tx: invoices.open_totals(tx, "2547120" + "00007")) == (1, 800 * 100)


def test_unpaid_list_with_the_true_totals_counts_the_unlisted_ones() -> None:
    from invoiceiq.core.model import InvoiceStatus

    page = [Invoice(id=str(1001 + n), msisdn=PHONE, customer_name=None, amount_cents=100_000,
                    description="Job", status=InvoiceStatus.SENT, pay_token="t", created_at_ms=NOW)
            for n in range(100)]
    text = copy.unpaid_list(page, count=130, total_cents=130 * 100_000).text
    assert len(text) <= 1024
    assert text.startswith("130 unpaid invoices, KES 130,000 in total:\n")
    shown = text.count("\n#")
    assert 1 <= shown < 100
    assert text.endswith(f"\n\u2026and {130 - shown} more.")
    # Everything listed but a few unlisted (a short page): the "more" line names just those.
    few = copy.unpaid_list(page[:2], count=5, total_cents=5 * 100_000).text
    assert few == ("5 unpaid invoices, KES 5,000 in total:\n#1001 \u00b7 KES 1,000 \u00b7 0712\u2026678\n"
                   "#1002 \u00b7 KES 1,000 \u00b7 0712\u2026678\n\u2026and 3 more.")
    # Without the totals it is as before: the page is everything.
    assert copy.unpaid_list(page[:2]).text.startswith("2 unpaid invoices, KES 2,000 in total:")


@pytest.fixture
async def h(database_url: str) -> AsyncIterator[Handle]:
    async with running_daemon(make_settings(database_url), providers=FakeProviders(),
                              clock=ManualClock()) as handle:
        yield handle


async def test_the_merchants_unpaid_counts_and_totals_past_a_hundred(h: Handle) -> None:
    count, total_cents = await many_invoices(h.store)
    await h.say(MERCHANT, "unpaid")
    await h.wait_for(lambda: bool(h.providers.to(MERCHANT)), what="the unpaid list")
    (text,) = h.providers.texts(MERCHANT)
    assert text.startswith(f"{count} unpaid invoices, KES {total_cents // 100:,} in total:\n#1001 ")
    shown = text.count("\n#")
    more = int(text.rsplit("\u2026and ", 1)[1].split(" ")[0])
    assert shown + more == count == OPEN
