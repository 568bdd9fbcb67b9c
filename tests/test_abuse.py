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
    SMS_INBOUND,
    ADMIN_TOKEN,
    CUSTOMER,
    MERCHANT,
    FakeProviders,
    Handle,
    inbound_button,
    inbound_text,
    make_settings,
    running_daemon,
    sign,
)
from invoiceiq.clock import ManualClock
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STRANGER = "254733000111"   # neither the merchant nor any invoice's customer
TAPS = 1000
FLOOD = 2000


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


async def test_a_thousand_pay_taps_make_one_stk_push_and_at_most_one_reply_per_tap(h: Handle) -> None:
    """The bound the code gives: one STK push (the partial unique index on payments), and one
    answer per tap — "prompt sent" for the first, "already sent, check your phone" for each of
    the others (actors/payment.py _pay_request answers every Pay request it did not start)."""
    told, elapsed = await taps(h)
    assert len(h.providers.daraja.pushes) == 1
    assert [r["status"] for r in await rows(h, "SELECT status FROM payments")] == ["INITIATED"]
    prompt = [t for t in told if t.startswith("M-PESA prompt sent to")]
    already = [t for t in told if t.startswith("The M-PESA prompt for Invoice #1001")]
    assert len(prompt) == 1
    assert len(told) == len(prompt) + len(already)   # nothing else was said
    assert len(told) <= TAPS                          # the bound: one reply per tap
    print(f"\n{TAPS} taps: {len(h.providers.daraja.pushes)} STK push, {len(told)} replies to the customer, "
          f"{elapsed:.1f} s until everything settled")


async def test_pay_taps_get_a_handful_of_replies(h: Handle) -> None:
    told, _ = await taps(h, 50)  # 50 show it as well as 1,000 (one reply each), in a fraction of the time
    assert len(told) <= 5, len(told)


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
