"""Abuse (issue 10, part 3): taps in their thousands, strangers typing merchant commands, floods.

The real daemon on loopback, providers faked, time on a ManualClock (so "in a minute" is exact:
the clock does not move while the taps arrive). Figures are printed (``-s``) for the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from harness import (
    AUTH,
    SMS_INBOUND,
    CUSTOMER,
    MERCHANT,
    FakeProviders,
    Handle,
    inbound_button,
    inbound_text,
    make_settings,
    running_daemon,
    sign,
    stk_callback,
)
from invoiceiq.clock import ManualClock
from invoiceiq.store import Tx, invoices

pytestmark = pytest.mark.anyio

STRANGER = "254733000111"   # neither the merchant nor any invoice's customer
TAPS = 1000
FLOOD = 2000
# actors/session.py TAP_HINTS_PER_INTERVAL: hints answering taps, per sender per hint interval.
TAP_HINTS_PER_INTERVAL = 3


async def rows(h: Handle, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def job(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all(sql, params)
    return await h.store.read(job)


async def settle(h: Handle, timeout: float = 30.0) -> None:
    calm = 0
    with anyio.fail_after(timeout):
        while calm < 3:
            (row,) = await rows(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL AND actor <> 'delivery')"
                                   " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING')) AS n")
            busy = any(r.busy for r in h.daemon.dispatch.registries.values())
            calm = calm + 1 if row["n"] == 0 and not busy and (h.daemon.outbox is None or h.daemon.outbox.in_flight == 0) else 0
            await anyio.sleep(0.02)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def h(database_url: str, clock: ManualClock) -> AsyncIterator[Handle]:
    async with running_daemon(make_settings(database_url), providers=FakeProviders(), clock=clock) as handle:
        yield handle


def signed(payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return body, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body)}


async def post_all(h: Handle, payloads: list[dict[str, Any]], concurrency: int = 16,
                   progress: Any = None) -> list[int]:
    """POST every payload to the webhook over ``concurrency`` keep-alive connections at once
    (a worker per connection: httpcore's pool costs O(pending^2) with thousands of requests
    queued in it, and in-process that CPU would be taken from the daemon under test)."""
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=str(h.client.base_url), limits=limits, timeout=60) as client:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](len(payloads))
        for p in payloads:
            send.send_nowait(p)
        send.close()

        async def worker() -> None:
            async for payload in receive:
                body, headers = signed(payload)
                statuses.append((await client.post("/whatsapp/webhook", content=body, headers=headers)).status_code)
                if progress is not None:
                    progress(len(statuses))

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
    return statuses


async def new_invoice(h: Handle, msisdn: str = CUSTOMER) -> dict[str, Any]:
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": msisdn, "amount_cents": 250000, "description": "Cleaning"})
    assert response.status_code == 201, response.text
    await h.wait_for(lambda: bool(h.providers.to(msisdn)), what="the invoice")
    await settle(h)
    return dict(response.json())


# -- a thousand Pay taps -------------------------------------------------------------------------


async def taps(h: Handle, n: int = TAPS) -> tuple[list[str], float]:
    await new_invoice(h)
    mark = len(h.providers.to(CUSTOMER))
    started = time.perf_counter()
    statuses = await post_all(h, [inbound_button(CUSTOMER, "pay_now:1001") for _ in range(n)])
    assert statuses == [200] * n
    await settle(h, timeout=60)
    elapsed = time.perf_counter() - started
    return [s.text for s in h.providers.to(CUSTOMER)[mark:]], elapsed


async def test_a_thousand_pay_taps_make_one_stk_push_and_a_handful_of_replies(h: Handle) -> None:
    """One STK push (the partial unique index on payments) and a bounded number of answers:
    "prompt sent" for the first tap, then "already sent, check your phone" at most once per
    invoice per 10 seconds (actors/payment.py ``answer_dedupe_key``). The clock does not move
    while the taps arrive: one window, so at most one such answer."""
    told, elapsed = await taps(h)
    assert len(h.providers.daraja.pushes) == 1
    assert [r["status"] for r in await rows(h, "SELECT status FROM payments")] == ["INITIATED"]
    prompt = [t for t in told if t.startswith("M-PESA prompt sent to")]
    already = [t for t in told if t.startswith("The M-PESA prompt for Invoice #1001")]
    assert len(prompt) == 1
    assert len(told) == len(prompt) + len(already)   # nothing else was said
    assert len(already) <= 1
    assert len(told) <= 3                             # the bound: a handful, not one per tap
    print(f"\n{TAPS} taps: {len(h.providers.daraja.pushes)} STK push, {len(told)} replies to the customer, "
          f"{elapsed:.1f} s until everything settled")


async def test_pay_taps_get_a_handful_of_replies(h: Handle) -> None:
    told, _ = await taps(h, 50)
    assert len(told) <= 2, told


async def flood_of_taps(h: Handle, sender: str, buttons: list[str], n: int) -> list[str]:
    """``n`` taps (cycling through ``buttons``; a button id or typed text) from ``sender``, all
    at one instant on the ManualClock; what ``sender`` was told because of them."""
    mark = len(h.providers.to(sender))
    payloads = [inbound_button(sender, b) if ":" in b else inbound_text(sender, b)
                for b in (buttons[k % len(buttons)] for k in range(n))]
    assert await post_all(h, payloads) == [200] * n
    await settle(h, timeout=60)
    return [s.text for s in h.providers.to(sender)[mark:]]


PAID_ANSWER = "Invoice #1001 (KES 2,500) is already paid. Receipt: NLJ7RT61SV. Thank you!"
CANCELLED_ANSWER = "Invoice #1001 (KES 2,500) was cancelled, so there is nothing to pay."
WAIT_ANSWER = "Please wait a minute before asking for another M-PESA prompt for Invoice #1001 (KES 2,500)."


async def test_two_hundred_taps_on_a_paid_invoice_get_one_already_paid(h: Handle, clock: ManualClock) -> None:
    await new_invoice(h)
    await h.store.write(lambda tx: invoices.mark_paid(tx, "1001", "NLJ7RT61SV", clock.now_ms()))
    told = await flood_of_taps(h, CUSTOMER, ["pay_now:1001", "pay 1001"], 200)
    assert told == [PAID_ANSWER]
    assert h.providers.daraja.pushes == []
    # Ten seconds on, one more tap is answered again (the bound is a rate, not silence).
    clock.advance(10_000)
    assert await flood_of_taps(h, CUSTOMER, ["pay_now:1001"], 20) == [PAID_ANSWER]


async def test_taps_after_cancel_get_one_answer(h: Handle, clock: ManualClock) -> None:
    await new_invoice(h)
    await h.store.write(lambda tx: invoices.cancel(tx, "1001", clock.now_ms()))
    told = await flood_of_taps(h, CUSTOMER, ["pay_now:1001", "pay 1001", "pay"], 200)
    # "pay" alone: no open invoice left, so the (bounded) hint; the others: "cancelled".
    assert told.count(CANCELLED_ANSWER) == 1
    assert len(told) <= 1 + TAP_HINTS_PER_INTERVAL, told
    assert set(told) <= {CANCELLED_ANSWER, "You have no open invoices right now. Thank you!"}
    assert h.providers.daraja.pushes == []


async def test_taps_within_the_minute_after_a_failed_prompt_get_one_answer(h: Handle, clock: ManualClock) -> None:
    await new_invoice(h)
    await h.tap(CUSTOMER, "pay_now:1001")
    await h.wait_for(lambda: len(h.providers.daraja.pushes) == 1, what="the push")
    await settle(h)
    response = await h.callback(stk_callback(h.providers.daraja.pushes[0]["_checkout"], 1032))
    assert response.status_code == 200
    await settle(h)
    clock.advance(20_000)
    told = await flood_of_taps(h, CUSTOMER, ["pay_now:1001"], 200)
    assert told == [WAIT_ANSWER]
    assert len(h.providers.daraja.pushes) == 1


async def test_a_stranger_tapping_pay_and_view_gets_a_handful_of_hints(h: Handle, clock: ManualClock) -> None:
    await new_invoice(h)
    before = await state(h)
    told = await flood_of_taps(h, STRANGER, ["pay_now:1001", "view_details:1001", "pay 1001", "pay"], 200)
    assert 1 <= len(told) <= TAP_HINTS_PER_INTERVAL, told
    assert set(told) == {"You have no open invoices right now. Thank you!"}
    # Later taps within the hour: nothing more.
    clock.advance(600_000)
    assert await flood_of_taps(h, STRANGER, ["pay_now:1001", "view_details:1001"], 50) == []
    assert h.providers.daraja.pushes == []
    assert await state(h) == before


async def test_a_customer_tapping_view_details_gets_one_answer(h: Handle) -> None:
    await new_invoice(h)
    told = await flood_of_taps(h, CUSTOMER, ["view_details:1001"], 200)
    assert len(told) == 1 and "#1001" in told[0], told


async def test_a_stranger_typing_pay_by_sms_gets_a_handful_of_hints(h: Handle) -> None:
    await new_invoice(h)
    for n in range(30):
        response = await h.client.post(SMS_INBOUND, data={"from": f"+{STRANGER}", "id": f"sms-pay-{n}",
                                                              "text": "PAY 1001", "to": "21345"})
        assert response.status_code == 200
    await settle(h)
    told = [s for s in h.providers.to(STRANGER)]
    assert 1 <= len(told) <= TAP_HINTS_PER_INTERVAL, [s.text for s in told]
    assert {(s.kind, s.text) for s in told} == {("sms", "You have no open invoices right now. Thank you!")}


# -- strangers typing the merchant's commands ----------------------------------------------------


MERCHANT_COMMANDS = ["invoice 0712345678 2500 Cleaning", "invoice", "new invoice", "0712345678", "2500",
                     "cancel 1001", "remind 1001", "status 1001", "unpaid", "help", "send", "1", "Cancel",
                     "pay 1001", "pay_now:1001", "view_details:1001"]


async def state(h: Handle) -> list[Any]:
    return [await rows(h, f"SELECT * FROM {t}") for t in ("invoices", "invoice_tracking", "payments", "stk_attempts")]


async def test_a_stranger_typing_merchant_commands_creates_and_changes_nothing(h: Handle) -> None:
    await new_invoice(h)
    before = await state(h)
    for text in MERCHANT_COMMANDS:
        await h.say(STRANGER, text)
        await h.tap(STRANGER, "pay_now:1001")
        await h.tap(STRANGER, "cancel 1001")
    await settle(h)
    assert await state(h) == before
    assert h.providers.daraja.pushes == []
    told = h.providers.texts(STRANGER)
    # A hint at most once an hour for free text, and the stranger never hears of #1001 (which
    # is somebody else's): their Pay taps get the same "no open invoices" hint.
    assert told and all("1001" not in t and "2,500" not in t for t in told)
    assert set(told) == {"You have no open invoices right now. Thank you!"}
    # Nothing went to the merchant or the customer because of it.
    convs = await rows(h, "SELECT conv_key, role FROM conversations WHERE conv_key = :k", {"k": STRANGER})
    assert [c["role"] for c in convs] == ["customer"]


async def test_the_invoices_own_customer_cannot_cancel_or_remind_it(h: Handle) -> None:
    await new_invoice(h)
    before = await state(h)
    for text in ("cancel 1001", "remind 1001", "invoice 0712345678 1 Cheaper", "unpaid"):
        await h.say(CUSTOMER, text)
    await h.tap(CUSTOMER, "cancel 1001")
    await h.tap(CUSTOMER, "remind 1001")
    await settle(h)
    assert await state(h) == before


async def test_merchant_commands_by_sms_are_ignored_even_from_the_merchants_number(h: Handle) -> None:
    await new_invoice(h)
    before = await state(h)
    sent = len(h.providers.sent)
    for n, (sender, text) in enumerate([(MERCHANT, "invoice 0712345678 2500 Cleaning"), (MERCHANT, "cancel 1001"),
                                        (STRANGER, "invoice 0712345678 2500 Cleaning"), (STRANGER, "cancel 1001")]):
        response = await h.client.post(SMS_INBOUND, data={"from": f"+{sender}", "id": f"sms-{n}", "text": text,
                                                              "to": "21345"})
        assert response.status_code == 200
    await settle(h)
    assert await state(h) == before
    # The stranger gets the "no open invoices" hint by SMS once; the merchant's SMS is ignored.
    assert [(s.to, s.kind) for s in h.providers.sent[sent:]] == [(STRANGER, "sms")]


# -- a flood from one sender cannot starve the merchant ------------------------------------------


async def test_a_flood_from_one_customer_does_not_starve_the_merchants_conversation(h: Handle) -> None:
    """2,000 messages from one customer over 16 concurrent connections; the merchant writes when
    half of them are in. Keyed actors take turns (runtime.Registry) and outbox rows go out
    oldest-first per recipient, so the merchant's answer must not wait for the flood."""
    flood = [inbound_text(CUSTOMER, f"spam {n}") for n in range(FLOOD)]
    half = anyio.Event()
    done: dict[str, float] = {}

    def progress(n: int) -> None:
        if n >= FLOOD // 2:
            half.set()

    async def flood_in() -> None:
        statuses = await post_all(h, flood, concurrency=16, progress=progress)
        assert statuses == [200] * FLOOD
        done["posted"] = time.perf_counter()

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(flood_in)
        await half.wait()
        sent_at = time.perf_counter()
        await h.say(MERCHANT, "help")
        await h.wait_for(lambda: bool(h.providers.to(MERCHANT)), timeout=30, what="the merchant's answer")
        answered = time.perf_counter() - sent_at
        (row,) = await rows(h, "SELECT COUNT(*) AS n FROM inbox WHERE actor = 'session' AND actor_key = :k"
                               " AND processed_at_ms IS NULL", {"k": CUSTOMER})
        flood_waiting = int(row["n"])
        still_posting = "posted" not in done
    await settle(h, timeout=60)
    total = time.perf_counter() - started
    stored = (await rows(h, "SELECT COUNT(*) AS n FROM inbox WHERE actor_key = :k", {"k": CUSTOMER}))[0]["n"]
    print(f"\nflood of {FLOOD} over 16 connections: merchant answered in {answered * 1000:.0f} ms while the flood "
          f"was {'still being posted' if still_posting else 'posted'} ({flood_waiting} stored and unprocessed); "
          f"flood posted after {done['posted'] - started:.1f} s, all worked off after {total:.1f} s")
    assert stored == FLOOD                                 # nothing of the flood was lost either
    assert still_posting or flood_waiting > 0             # the merchant was served during the flood
    assert answered < 5.0
    # The flood itself earned the customer one hint (then an hour of silence), not 2,000 replies.
    assert len(h.providers.to(CUSTOMER)) <= 1
