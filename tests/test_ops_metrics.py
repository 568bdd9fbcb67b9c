"""What operators see: /metrics behind its token, no simulator in live mode, and counters that
mean the same thing before and after a restart. The real daemon in-process (tests/harness.py),
providers faked; every wait has a deadline."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (
    WA_ERRORS,
    AUTH,
    serving,
    until,
    CUSTOMER,
    MERCHANT,
    PHONE_ID,
    FakeProviders,
    Handle,
    make_settings,
    running_daemon,
    stk_callback,
)
from invoiceiq.clock import ManualClock
from invoiceiq.config import load_settings
from invoiceiq.daemon import Daemon
from invoiceiq.store import Tx, invoices

pytestmark = pytest.mark.anyio

METRICS_TOKEN = "metrics-token-for-tests-0123"
OTHER = "254722000111"
NOBODY = "254733000222"  # on neither WhatsApp nor SMS: their invoice is created, never sent
NOT_ON_WHATSAPP = (WA_ERRORS["131026"]["http_status"], WA_ERRORS["131026"]["body"])
WA_TRANSIENT = (WA_ERRORS["131000"]["http_status"], WA_ERRORS["131000"]["body"], {})


def sms_refused(msisdn: str) -> tuple[int, Any, dict[str, str]]:
    """Africa's Talking's 201 whose one recipient is refused for good (403 InvalidPhoneNumber)."""
    return 201, {"SMSMessageData": {"Message": "Sent to 0/1 Total Cost: KES 0", "Recipients": [
        {"statusCode": 403, "number": f"+{msisdn}", "status": "InvalidPhoneNumber", "cost": "0",
         "messageId": "None"}]}}, {}


# -- helpers ------------------------------------------------------------------------------------------


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(h: Handle, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await h.client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample's value, or None when the exposition does not have it at all."""
    return samples.get((name, frozenset(labels.items())))




async def new_invoice(h: Handle, msisdn: str, amount_kes: int) -> str:
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": msisdn, "amount_cents": amount_kes * 100, "description": "Cleaning service"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def invoice_status(h: Handle, invoice_id: str) -> str:
    response = await h.client.get(f"/invoices/{invoice_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


async def wait_status(h: Handle, invoice_id: str, status: str) -> None:
    async def check() -> bool:
        return await invoice_status(h, invoice_id) == status
    await until(check, f"invoice {invoice_id} to be {status}")


async def sql_val(h: Handle, sql: str, params: dict[str, Any] | None = None) -> Any:
    async def job(tx: Tx) -> Any:
        return await tx.val(sql, params)
    return await h.store.read(job)


async def gauge_reads(h: Handle, name: str, expected: float) -> Samples:
    """Wake the outbox until its (once a second) gauge says ``expected``; the last scrape."""
    async def check() -> Samples | None:
        h.daemon.dispatch.wake("outbox")
        samples = await scrape(h)
        return samples if value(samples, name) == expected else None
    return await until(check, f"{name} == {expected}")


@asynccontextmanager
async def sandbox_daemon(database_url: str) -> AsyncIterator[tuple[Daemon, httpx.AsyncClient]]:
    """A sandbox-mode daemon whose gateways reach its own simulators over real HTTP."""
    settings = load_settings(None, {"INVOICEIQ_MODE": "sandbox", "INVOICEIQ_SERVER_BIND": "127.0.0.1:0",
                                    "INVOICEIQ_SERVER_SHUTDOWN_GRACE_S": "2", "DATABASE_URL": database_url})
    daemon = Daemon(settings)
    async with serving(daemon) as client:
        yield daemon, client


# -- (a) the metrics token -------------------------------------------------------------------------------


async def test_metrics_token_refuses_and_counts_missing_or_wrong_tokens(database_url: str) -> None:
    settings = make_settings(database_url, INVOICEIQ_METRICS_TOKEN=METRICS_TOKEN)
    async with running_daemon(settings) as h:
        before = value(await scrape(h, METRICS_TOKEN), "invoiceiq_webhook_rejected_total", reason="metrics_auth")
        assert before is None  # no refusal yet: the labelled child does not exist

        refused = [
            {},                                                    # no token at all
            {"Authorization": "Bearer wrong-token"},               # a wrong one
            {"Authorization": f"Bearer {METRICS_TOKEN}x"},         # the right one, with a byte more
            {"Authorization": f"Basic {METRICS_TOKEN}"},           # the right secret, not as a bearer token
        ]
        for headers in refused:
            response = await h.client.get("/metrics", headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert "invoiceiq_" not in response.text  # no metric leaks into the refusal

        samples = await scrape(h, METRICS_TOKEN)
        assert value(samples, "invoiceiq_webhook_rejected_total", reason="metrics_auth") == len(refused)
        # The right token does not count as a refusal.
        samples = await scrape(h, METRICS_TOKEN)
        assert value(samples, "invoiceiq_webhook_rejected_total", reason="metrics_auth") == len(refused)
        assert value(samples, "invoiceiq_invoices_created_total") == 0


async def test_metrics_are_open_without_a_token(database_url: str) -> None:
    async with running_daemon(make_settings(database_url)) as h:
        samples = await scrape(h)  # no Authorization header
        assert value(samples, "invoiceiq_invoices_created_total") == 0
        assert value(samples, "invoiceiq_webhook_rejected_total", reason="metrics_auth") is None


# -- (b) no simulator in live mode -----------------------------------------------------------------------

SIMULATOR_PATHS = [
    ("GET", "/sandbox/"),
    ("GET", "/sandbox"),
    ("POST", f"/sandbox/graph/v25.0/{PHONE_ID}/messages"),
    ("POST", "/sandbox/at/version1/messaging"),
    ("GET", "/sandbox/daraja/oauth/v1/generate?grant_type=client_credentials"),
]
SIM_BODY = {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "text", "text": {"body": "hi"}}


async def test_live_mode_mounts_no_simulator(database_url: str) -> None:
    async with running_daemon(make_settings(database_url)) as h:
        assert h.daemon.settings.mode == "live"
        assert h.daemon.simulator is None and h.daemon.sim_config is None
        for method, path in SIMULATOR_PATHS:
            response = await h.client.request(method, path, json=SIM_BODY if method == "POST" else None)
            assert response.status_code == 404, (method, path, response.status_code, response.text[:200])
        # The daemon itself is up: it is the simulator that is missing, not the server.
        assert (await h.client.get("/readyz")).status_code == 200


async def test_sandbox_mode_answers_at_the_same_paths(database_url: str) -> None:
    # The control for the test above: these are the simulator's real paths.
    async with sandbox_daemon(database_url) as (daemon, client):
        assert daemon.simulator is not None
        for method, path in SIMULATOR_PATHS:
            response = await client.request(method, path, json=SIM_BODY if method == "POST" else None)
            assert response.status_code != 404, (method, path, response.text[:200])
        assert (await client.get("/sandbox/")).status_code == 200


# -- (c) counters survive a restart ----------------------------------------------------------------------


async def test_invoice_counters_equal_the_stored_counts_after_a_restart(database_url: str) -> None:
    settings = make_settings(database_url)
    clock = ManualClock()
    ids = itertools.count(1)  # one sequence of message ids across the restart, as at Meta
    first = FakeProviders(_ids=ids)
    first.wa_fail_for[NOBODY] = NOT_ON_WHATSAPP
    first.sms_failures.append(sms_refused(NOBODY))  # the SMS fallback is refused too
    async with running_daemon(settings, providers=first, clock=clock) as h:
        paid = await new_invoice(h, CUSTOMER, 2500)
        sent = await new_invoice(h, OTHER, 1000)
        failed = await new_invoice(h, NOBODY, 700)
        await wait_status(h, paid, "SENT")
        await wait_status(h, sent, "SENT")
        await wait_status(h, failed, "FAILED")

        # The customer taps Pay, Daraja takes the push, Safaricom calls back: PAID.
        await h.tap(CUSTOMER, f"pay_now:{paid}")
        await h.wait_for(lambda: len(first.daraja.pushes) == 1, what="the STK push")
        checkout = str(first.daraja.pushes[0]["_checkout"])
        response = await h.callback(stk_callback(checkout, 0, amount=2500, receipt="TKQ4ABC12D"))
        assert response.status_code == 200, response.text
        await wait_status(h, paid, "PAID")
        await h.settle()

        stored = await h.store.read(invoices.totals)
        assert stored == (3, 2, 1)  # created, sent, paid: three different numbers on purpose
        samples = await scrape(h)
        live = (value(samples, "invoiceiq_invoices_created_total"), value(samples, "invoiceiq_invoices_sent_total"),
                value(samples, "invoiceiq_invoices_paid_total"))
        assert live == stored

    second = FakeProviders(_ids=ids)
    async with running_daemon(settings, providers=second, clock=clock) as h:
        samples = await scrape(h)
        restored = (value(samples, "invoiceiq_invoices_created_total"),
                    value(samples, "invoiceiq_invoices_sent_total"),
                    value(samples, "invoiceiq_invoices_paid_total"))
        assert restored == await h.store.read(invoices.totals) == (3, 2, 1)
        assert value(samples, "invoiceiq_conversion_ratio") == 0.5
        await h.settle()
        assert second.sent == []  # nothing was sent again to make the numbers add up

        # And they go on counting from there.
        await new_invoice(h, OTHER, 300)
        await h.wait_for(lambda: len(second.to(OTHER)) == 1, what="the new invoice")
        await h.settle()
        samples = await scrape(h)
        assert (value(samples, "invoiceiq_invoices_created_total"),
                value(samples, "invoiceiq_invoices_sent_total")) == (4, 3)


# -- (d) message counters and the outbox gauge -----------------------------------------------------------


async def test_messages_total_and_outbox_pending_follow_a_sent_message(database_url: str) -> None:
    clock = ManualClock()
    providers = FakeProviders()
    providers.wa_failures.append(WA_TRANSIENT)  # the first send fails and waits for its retry
    async with running_daemon(make_settings(database_url), providers=providers, clock=clock) as h:
        samples = await scrape(h)
        assert value(samples, "invoiceiq_messages_total", channel="WHATSAPP", direction="OUT", event="sent") is None
        assert value(samples, "invoiceiq_outbox_pending") == 0

        invoice_id = await new_invoice(h, CUSTOMER, 2500)
        await until(lambda: sql_val(h, "SELECT COUNT(*) FROM outbox WHERE invoice_id = :i AND status = 'PENDING'"
                                       " AND attempts = 1", {"i": invoice_id}), "the failed first attempt")
        samples = await gauge_reads(h, "invoiceiq_outbox_pending", 1)
        assert value(samples, "invoiceiq_messages_total", channel="WHATSAPP", direction="OUT", event="sent") is None
        assert providers.sent == []

        clock.advance(60_000)  # past the retry's backoff
        h.daemon.dispatch.wake("outbox")
        # The invoice to the customer, then the confirmation to the merchant.
        await h.wait_for(lambda: len(providers.to(CUSTOMER)) == 1 and len(providers.to(MERCHANT)) == 1,
                         what="the invoice and its confirmation")
        await h.settle()
        samples = await gauge_reads(h, "invoiceiq_outbox_pending", 0)
        logged = await sql_val(h, "SELECT COUNT(*) FROM message_log WHERE channel = 'WHATSAPP'"
                                  " AND direction = 'OUT' AND event = 'sent'")
        assert logged == len(providers.sent) == 2
        assert value(samples, "invoiceiq_messages_total", channel="WHATSAPP", direction="OUT", event="sent") == 2
        assert value(samples, "invoiceiq_messages_total", channel="WHATSAPP", direction="OUT", event="failed") is None
        assert value(samples, "invoiceiq_messages_total", channel="SMS", direction="OUT", event="sent") is None
        assert value(samples, "invoiceiq_invoices_sent_total") == 1


async def test_the_sqlite_writers_group_commit_is_in_the_metrics(database_url: str) -> None:
    """invoiceiq_db_write_groups/_jobs: jobs per group shows the group commit at work; on
    PostgreSQL (a pool, no single writer) neither is exported."""
    async with running_daemon(make_settings(database_url)) as h:
        async with anyio.create_task_group() as tg:  # 20 webhooks at once: fewer groups than jobs
            for n in range(20):
                tg.start_soon(h.say, f"2547200000{n:02d}", "hello")
        await h.settle()
        samples = await scrape(h)
        groups = value(samples, "invoiceiq_db_write_groups_total")
        jobs = value(samples, "invoiceiq_db_write_jobs_total")
        if database_url.startswith("postgresql"):
            assert groups is None and jobs is None
            return
        assert groups is not None and jobs is not None
        assert jobs >= 20 + 20  # each webhook's job and each reply's, at least
        assert groups < jobs


async def test_scheduler_sweeps_count_each_pass_over_due_work(database_url: str) -> None:
    """invoiceiq_scheduler_sweeps_total moves with every pass (each 5 s of the clock when nothing
    is due), so that an alert can tell a scheduler that stopped: nothing due would fire."""
    clock = ManualClock()
    async with running_daemon(make_settings(database_url), clock=clock) as h:
        async def passes() -> float:
            return value(await scrape(h), "invoiceiq_scheduler_sweeps_total") or 0

        first = await until(passes, "the scheduler's first pass")
        assert await passes() == first  # the clock stands still: no pass
        for n in (1, 2, 3):
            clock.advance(5_000)
            await until(lambda n=n: _at_least(passes, first + n), f"pass {n + 1}")
        assert await passes() == first + 3


async def _at_least(read: Any, target: float) -> bool:
    return await read() >= target
