"""Provider faults (issue 10, part 4): outages, throttling, expired tokens, lost answers.

The faults are injected in the fake providers (``FaultyProviders`` below: the harness's fakes,
scripted by the ManualClock time), and time is moved through the backoffs instead of waited.
After each scenario:

* every outbox row is SENT (exactly one accepted provider request for it, and no accepted
  request without its row) or FAILED/CANCELLED with a reason in ``last_error``;
* every payment is resolved: no ``INITIATED`` payment, every attempt with ``resolved_at_ms``
  and a ``result_desc`` saying how it ended.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from harness import (
    AUTH,
    CUSTOMER,
    MERCHANT,
    FakeDaraja,
    FakeProviders,
    Handle,
    make_settings,
    running_daemon,
    stk_callback,
)
from invoiceiq.clock import ManualClock
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio

SECOND = 1000
MINUTE = 60 * SECOND
# A fault: given the request and the clock's time, an httpx.Response to answer with, an exception
# to raise (a timeout), or None to behave normally.
Fault = Callable[[httpx.Request, int], "httpx.Response | Exception | None"]


def graph_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "OAuthException", "code": code,
                                                  "fbtrace_id": "AbCdEf"}}, headers=headers)


@dataclass
class FaultyDaraja(FakeDaraja):
    push_fault: Fault | None = None
    query_fault: Fault | None = None
    clock: ManualClock | None = None
    push_calls: int = 0

    def _push(self, request: httpx.Request) -> httpx.Response:
        self.push_calls += 1
        if self.push_fault is not None and self.clock is not None:
            outcome = self.push_fault(request, self.clock.now_ms())
            if isinstance(outcome, Exception):
                if getattr(outcome, "processed", False):
                    super()._push(request)  # Daraja took it: the prompt is on the phone, the answer is lost
                raise outcome
            if outcome is not None:
                return outcome
        return super()._push(request)

    def _query(self, request: httpx.Request) -> httpx.Response:
        if self.query_fault is not None and self.clock is not None:
            outcome = self.query_fault(request, self.clock.now_ms())
            if isinstance(outcome, Exception):
                raise outcome
            if outcome is not None:
                return outcome
        return super()._query(request)


@dataclass
class FaultyProviders(FakeProviders):
    clock: ManualClock = field(default_factory=ManualClock)
    wa_fault: Fault | None = None
    sms_fault: Fault | None = None
    attempts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.daraja = FaultyDaraja(clock=self.clock)

    def _graph(self, request: httpx.Request) -> httpx.Response:
        self.attempts["whatsapp"] += 1
        if self.wa_fault is not None:
            outcome = self.wa_fault(request, self.clock.now_ms())
            if isinstance(outcome, Exception):
                if getattr(outcome, "processed", False):
                    super()._graph(request)  # Meta sent it; only the answer is lost
                raise outcome
            if outcome is not None:
                return outcome
        return super()._graph(request)

    def _sms(self, request: httpx.Request) -> httpx.Response:
        self.attempts["sms"] += 1
        if self.sms_fault is not None:
            outcome = self.sms_fault(request, self.clock.now_ms())
            if isinstance(outcome, Exception):
                raise outcome
            if outcome is not None:
                return outcome
        return super()._sms(request)


def lost_answer(request: httpx.Request) -> httpx.ReadTimeout:
    exc = httpx.ReadTimeout("answer lost", request=request)
    exc.processed = True  # type: ignore[attr-defined]
    return exc


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def providers() -> FaultyProviders:
    return FaultyProviders()


@pytest.fixture
async def h(database_url: str, providers: FaultyProviders) -> AsyncIterator[Handle]:
    async with running_daemon(make_settings(database_url), providers=providers, clock=providers.clock) as handle:
        yield handle


async def rows(h: Handle, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def job(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all(sql, params)
    return await h.store.read(job)


async def quiet(h: Handle, timeout: float = 10.0) -> None:
    """Nothing due now is waiting or running (rows due later may wait: time is frozen)."""
    now = h.daemon.clock.now_ms()
    calm = 0
    with anyio.fail_after(timeout):
        while calm < 3:
            (row,) = await rows(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL AND actor <> 'delivery')"
                                   " + (SELECT COUNT(*) FROM outbox WHERE status = 'SENDING' OR (status = 'PENDING'"
                                   "    AND next_attempt_at_ms <= :now))"
                                   " + (SELECT COUNT(*) FROM stk_attempts WHERE resolved_at_ms IS NULL"
                                   "    AND next_check_at_ms <= :now) AS n", {"now": now})
            busy = any(r.busy for r in h.daemon.dispatch.registries.values())
            outbox = h.daemon.outbox
            paused = outbox is not None and any(until > now for until in outbox._paused_until.values())
            idle = (row["n"] == 0 or paused) and not busy and (outbox is None or outbox.in_flight == 0)
            calm = calm + 1 if idle else 0
            await anyio.sleep(0.01)


async def advance(h: Handle, clock: ManualClock, total_ms: int, step_ms: int = 5 * SECOND) -> None:
    """Move time on ``total_ms`` in steps, letting the daemon do what falls due at each step."""
    end = clock.now_ms() + total_ms
    while clock.now_ms() < end:
        clock.set(min(end, clock.now_ms() + step_ms))
        if h.daemon.outbox is not None:
            h.daemon.outbox.waker.wake()
        h.daemon.dispatch.wake("scheduler")
        await quiet(h)


async def new_invoice(h: Handle, msisdn: str = CUSTOMER, amount_cents: int = 250000) -> str:
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": msisdn, "amount_cents": amount_cents, "description": "Cleaning"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def assert_delivered_once_or_failed(h: Handle) -> list[dict[str, Any]]:
    """The outbox promise: each row SENT once (one accepted request, carrying its provider id)
    or FAILED/CANCELLED with a reason; and nothing accepted that no row accounts for."""
    outbox = await rows(h, "SELECT id, recipient, channel, kind, status, attempts, last_error, provider_message_id"
                           " FROM outbox ORDER BY id")
    accepted = Counter(s.message_id for s in h.providers.sent)
    for row in outbox:
        if row["status"] in ("SENT", "DELIVERED", "READ"):
            assert accepted[row["provider_message_id"]] == 1, row
        else:
            assert row["status"] in ("FAILED", "CANCELLED"), row
            assert row["last_error"], row
    ids = {r["provider_message_id"] for r in outbox}
    assert [m for m in accepted if m not in ids] == [], "an accepted send that no outbox row accounts for"
    return outbox


async def assert_payments_resolved(h: Handle) -> list[dict[str, Any]]:
    found = await rows(h, "SELECT p.status, p.mpesa_receipt, a.result_code, a.result_desc, a.resolved_at_ms,"
                          " a.checkout_request_id FROM payments p JOIN stk_attempts a ON a.payment_id = p.id"
                          " ORDER BY a.requested_at_ms")
    for row in found:
        assert row["status"] != "INITIATED" and row["resolved_at_ms"] is not None, row
        assert row["result_desc"], row
    return found


def texts(h: Handle, msisdn: str) -> list[str]:
    return [s.text for s in h.providers.to(msisdn)]


# -- WhatsApp ------------------------------------------------------------------------------------


async def test_whatsapp_down_for_minutes_then_back_delivers_everything_once(
        h: Handle, providers: FaultyProviders) -> None:
    clock = providers.clock
    back_at = clock.now_ms() + 5 * MINUTE

    def outage(request: httpx.Request, now: int) -> httpx.Response | Exception | None:
        if now >= back_at:
            return None
        # 500s, 503s, refused connections and connect timeouts, in turn: nothing reaches Meta.
        n = providers.attempts["whatsapp"] % 4
        if n == 0:
            return httpx.Response(500, json={"error": {"message": "An unknown error occurred", "code": 1}})
        if n == 1:
            return httpx.Response(503, text="Service Unavailable")
        if n == 2:
            return httpx.ConnectError("refused", request=request)
        return httpx.ConnectTimeout("connect timeout", request=request)

    providers.wa_fault = outage
    ids = [await new_invoice(h, f"25471100000{n}") for n in range(3)]
    await quiet(h)
    assert providers.sent == []
    await advance(h, clock, 11 * MINUTE, step_ms=10 * SECOND)
    outbox = await assert_delivered_once_or_failed(h)
    # All three invoices (templates) and the merchant's three confirmations went out, once each.
    assert all(r["status"] == "SENT" for r in outbox), outbox
    assert sorted(s.to for s in providers.sent if s.kind == "template") == [f"25471100000{n}" for n in range(3)]
    assert len(h.providers.to(MERCHANT)) == 3
    statuses = {r["id"]: r["status"] for r in await rows(h, "SELECT id, status FROM invoices")}
    assert statuses == {i: "SENT" for i in ids}
    assert providers.attempts["whatsapp"] > 6  # it really was retried through the outage


async def test_whatsapp_read_timeouts_with_lost_answers_send_again_at_least_once(
        h: Handle, providers: FaultyProviders) -> None:
    """A read timeout after Meta took the message: the daemon cannot know, retries, and the
    customer gets it twice. This pins the at-least-once behaviour (the Cloud API has no
    idempotency key); the outbox row itself is SENT once, with the second request's id."""
    clock = providers.clock
    lost = {"left": 1}

    def flaky(request: httpx.Request, now: int) -> Exception | None:
        if lost["left"]:
            lost["left"] -= 1
            return lost_answer(request)
        return None

    providers.wa_fault = flaky
    await new_invoice(h)
    await quiet(h)
    await advance(h, clock, MINUTE)
    (invoice_row,) = [r for r in await rows(h, "SELECT * FROM outbox WHERE kind = 'invoice'")]
    assert invoice_row["status"] == "SENT"
    to_customer = [s for s in providers.sent if s.to == CUSTOMER]
    assert len(to_customer) == 2                     # delivered twice: at least once, not exactly once
    assert invoice_row["provider_message_id"] == to_customer[-1].message_id


async def test_throttling_honours_retry_after(h: Handle, providers: FaultyProviders) -> None:
    clock = providers.clock
    start = clock.now_ms()
    script = [graph_error(400, 130429, "(#130429) Rate limit hit", {"Retry-After": "120"}),
              graph_error(429, 80007, "(#80007) Rate limit issues", {"Retry-After": "300"})]
    seen: list[int] = []

    def throttled(request: httpx.Request, now: int) -> httpx.Response | None:
        seen.append(now - start)
        return script.pop(0) if script else None

    providers.wa_fault = throttled
    await new_invoice(h)
    await quiet(h)
    await advance(h, clock, 10 * MINUTE, step_ms=10 * SECOND)
    await assert_delivered_once_or_failed(h)
    assert len(seen) >= 3
    assert seen[1] - seen[0] >= 120 * SECOND, seen   # not before Meta's Retry-After
    assert seen[2] - seen[1] >= 300 * SECOND, seen
    assert [s.kind for s in providers.to(CUSTOMER)] == ["template"]


async def test_an_expired_token_pauses_whatsapp_without_burning_messages_then_recovers(
        h: Handle, providers: FaultyProviders) -> None:
    clock = providers.clock
    fixed = {"at": None}

    def expired(request: httpx.Request, now: int) -> httpx.Response | None:
        if fixed["at"] is None or now < fixed["at"]:
            return graph_error(401, 190, "Error validating access token: Session has expired")
        return None

    providers.wa_fault = expired
    for n in range(3):
        await new_invoice(h, f"25472200000{n}")
    await quiet(h)
    ready = await h.client.get("/readyz")
    assert ready.status_code == 503 and "credentials rejected (190)" in ready.json()["checks"]["channels"]
    # Paused: over twenty minutes of a rejected token cost the messages none of their attempts.
    # The bound the code gives: one claim round per minute-long pause (each due row tried once,
    # up to the outbox's max_in_flight), so 3 queued messages make ~3 requests a minute.
    await advance(h, clock, 20 * MINUTE, step_ms=30 * SECOND)
    tries = providers.attempts["whatsapp"]
    assert tries <= 3 * 22, tries
    pending = await rows(h, "SELECT status, attempts FROM outbox WHERE kind = 'invoice'")
    assert [r["status"] for r in pending] == ["PENDING"] * 3 and all(r["attempts"] <= 1 for r in pending), pending
    fixed["at"] = clock.now_ms()
    await advance(h, clock, 3 * MINUTE, step_ms=10 * SECOND)
    outbox = await assert_delivered_once_or_failed(h)
    assert all(r["status"] == "SENT" for r in outbox)
    assert (await h.client.get("/readyz")).status_code == 200


async def test_an_undeliverable_whatsapp_message_falls_back_to_sms_once(h: Handle, providers: FaultyProviders) -> None:
    providers.wa_fail_for[CUSTOMER] = (400, {"error": {"message": "(#131026) Message undeliverable", "code": 131026}})
    await new_invoice(h)
    await quiet(h)
    await advance(h, providers.clock, MINUTE)
    outbox = await assert_delivered_once_or_failed(h)
    assert [(r["channel"], r["status"]) for r in outbox if r["kind"] == "invoice"] == [("WHATSAPP", "FAILED"),
                                                                                        ("SMS", "SENT")]
    assert [s.kind for s in providers.to(CUSTOMER)] == ["sms"]


# -- Africa's Talking ----------------------------------------------------------------------------


async def test_africastalking_down_then_back_sends_the_fallback_once(h: Handle, providers: FaultyProviders) -> None:
    clock = providers.clock
    back_at = clock.now_ms() + 4 * MINUTE
    providers.wa_fail_for[CUSTOMER] = (400, {"error": {"message": "(#131026) Message undeliverable", "code": 131026}})

    def down(request: httpx.Request, now: int) -> httpx.Response | Exception | None:
        if now >= back_at:
            return None
        n = providers.attempts["sms"] % 3
        if n == 0:
            return httpx.Response(503, text="Service Unavailable")
        if n == 1:
            return httpx.ConnectError("refused", request=request)
        return httpx.Response(201, json={"SMSMessageData": {"Message": "Sent to 0/1", "Recipients": [
            {"statusCode": 500, "number": f"+{CUSTOMER}", "status": "InternalServerError", "cost": "0",
             "messageId": "None"}]}}, headers={"Content-Type": "application/json"})

    providers.sms_fault = down
    await new_invoice(h)
    await quiet(h)
    await advance(h, clock, 10 * MINUTE, step_ms=10 * SECOND)
    await assert_delivered_once_or_failed(h)
    assert [s.kind for s in providers.to(CUSTOMER)] == ["sms"]
    assert providers.attempts["sms"] > 3
    (invoice,) = await rows(h, "SELECT status FROM invoices")
    assert invoice["status"] == "SENT"


async def test_africastalking_down_for_good_fails_with_a_reason_and_tells_the_merchant(
        h: Handle, providers: FaultyProviders) -> None:
    providers.wa_fail_for[CUSTOMER] = (400, {"error": {"message": "(#131026) Message undeliverable", "code": 131026}})
    providers.sms_fault = lambda request, now: httpx.Response(503, text="Service Unavailable")
    invoice_id = await new_invoice(h)
    await quiet(h)
    await advance(h, providers.clock, 40 * MINUTE, step_ms=30 * SECOND)
    outbox = await assert_delivered_once_or_failed(h)
    sms = [r for r in outbox if r["channel"] == "SMS" and r["kind"] == "invoice"]
    assert [(r["status"], r["attempts"]) for r in sms] == [("FAILED", 10)]
    assert "503" in sms[0]["last_error"]
    (invoice,) = await rows(h, "SELECT status FROM invoices")
    assert invoice["status"] == "FAILED"
    assert any(f"#{invoice_id}" in t for t in texts(h, MERCHANT))


# -- Daraja --------------------------------------------------------------------------------------


def spike_arrest(request: httpx.Request, now: int) -> httpx.Response:
    return httpx.Response(500, json={"requestId": "r", "errorCode": "500.003.02",
                                     "errorMessage": "Error Occurred - Spike Arrest Violation"})


async def tap_pay(h: Handle, invoice_id: str = "1001") -> None:
    await h.tap(CUSTOMER, f"pay_now:{invoice_id}")
    await quiet(h)


async def test_stk_push_spike_arrest_fails_the_attempt_and_a_later_tap_pays(
        h: Handle, providers: FaultyProviders) -> None:
    clock = providers.clock
    daraja = providers.daraja
    assert isinstance(daraja, FaultyDaraja)
    daraja.push_fault = spike_arrest
    await new_invoice(h)
    await quiet(h)
    await tap_pay(h)
    attempts = await assert_payments_resolved(h)
    assert [(a["status"], a["result_desc"]) for a in attempts] == [("FAILED", "push refused: 500.003.02")]
    assert "did not go through" in texts(h, CUSTOMER)[-1]
    daraja.push_fault = None
    clock.advance(MINUTE + SECOND)  # M-PESA's one-minute lock per phone
    await tap_pay(h)
    checkout = str(daraja.pushes[-1]["_checkout"])
    assert (await h.callback(stk_callback(checkout, 0, amount=2500))).status_code == 200
    await quiet(h)
    attempts = await assert_payments_resolved(h)
    assert [a["status"] for a in attempts] == ["FAILED", "SUCCESS"]
    assert (await rows(h, "SELECT status FROM invoices"))[0]["status"] == "PAID"
    await assert_delivered_once_or_failed(h)


async def test_stk_push_timeouts_resolve_every_attempt(h: Handle, providers: FaultyProviders) -> None:
    """A connect timeout (the push never left): FAILED at once. A read timeout (Daraja may have
    prompted the phone): kept in flight; the callback then adopts it by phone; without one
    it expires, and no second prompt is sent meanwhile."""
    clock = providers.clock
    daraja = providers.daraja
    assert isinstance(daraja, FaultyDaraja)
    await new_invoice(h)
    await new_invoice(h, "254733444555")
    await quiet(h)

    daraja.push_fault = lambda request, now: httpx.ConnectTimeout("connect timeout", request=request)
    await tap_pay(h, "1001")
    daraja.push_fault = lambda request, now: lost_answer(request)
    clock.advance(MINUTE + SECOND)
    await tap_pay(h, "1001")                         # the answer is lost; the prompt is on the phone
    await h.tap("254733444555", "pay_now:1002")      # lost as well, and never called back
    await quiet(h)
    daraja.push_fault = None
    pushes_before = daraja.push_calls
    await tap_pay(h, "1001")                         # in flight: no second prompt
    assert daraja.push_calls == pushes_before
    # Safaricom's callback for invoice 1001's prompt arrives with an id we never learnt.
    lost_checkout = str(daraja.pushes[0]["_checkout"])
    assert (await h.callback(stk_callback(lost_checkout, 0, amount=2500))).status_code == 200
    await quiet(h)
    await advance(h, clock, 11 * MINUTE, step_ms=30 * SECOND)  # past mpesa.expire_after_s for 1002
    attempts = await assert_payments_resolved(h)
    by_status = sorted((a["status"], a["result_desc"]) for a in attempts)
    assert by_status == [("EXPIRED", "no answer from M-PESA"), ("FAILED", "push refused: timeout"),
                         ("SUCCESS", "The service request is processed successfully.")], by_status
    statuses = {r["id"]: r["status"] for r in await rows(h, "SELECT id, status FROM invoices")}
    assert statuses == {"1001": "PAID", "1002": "SENT"}
    await assert_delivered_once_or_failed(h)


async def test_query_timeouts_and_spike_arrests_then_an_answer_resolve_the_attempt(
        h: Handle, providers: FaultyProviders) -> None:
    """The callback never comes; the status queries time out or are spike-arrested for a while,
    then Daraja answers: the attempt is resolved by the query and the invoice paid once."""
    clock = providers.clock
    daraja = providers.daraja
    assert isinstance(daraja, FaultyDaraja)
    await new_invoice(h)
    await quiet(h)
    await tap_pay(h)
    checkout = str(daraja.pushes[0]["_checkout"])
    answer_from = clock.now_ms() + 4 * MINUTE
    faults = [lambda r: httpx.ReadTimeout("slow", request=r), lambda r: spike_arrest(r, 0),
              lambda r: httpx.ConnectTimeout("connect", request=r)]
    refused = Counter[str]()

    def flaky(request: httpx.Request, now: int) -> httpx.Response | Exception | None:
        if now < answer_from:
            refused["query"] += 1
            return faults[refused["query"] % 3](request)
        return None

    daraja.query_fault = flaky
    daraja.query_answers[checkout] = 0
    await advance(h, clock, 9 * MINUTE, step_ms=15 * SECOND)
    attempts = await assert_payments_resolved(h)
    assert refused["query"] >= 2  # a timeout and a spike arrest before the answer (queries back off)
    assert [(a["status"], a["result_code"]) for a in attempts] == [("SUCCESS", 0)]
    assert (await rows(h, "SELECT status FROM invoices"))[0]["status"] == "PAID"
    assert sum(t.startswith("Paid ✔") for t in texts(h, CUSTOMER)) == 1
    assert sum(t.startswith("Paid ✔") for t in texts(h, MERCHANT)) == 1
    await assert_delivered_once_or_failed(h)


async def test_query_failures_until_expiry_end_the_attempt_as_expired(h: Handle, providers: FaultyProviders) -> None:
    clock = providers.clock
    daraja = providers.daraja
    assert isinstance(daraja, FaultyDaraja)
    daraja.query_fault = lambda request, now: httpx.ReadTimeout("slow", request=request)
    await new_invoice(h)
    await quiet(h)
    await tap_pay(h)
    await advance(h, clock, 12 * MINUTE, step_ms=30 * SECOND)
    attempts = await assert_payments_resolved(h)
    assert [(a["status"], a["result_desc"]) for a in attempts] == [("EXPIRED", "no answer from M-PESA")]
    # The customer may pay again afterwards: the next tap pushes.
    before = len(daraja.pushes)
    daraja.query_fault = None
    await tap_pay(h)
    assert len(daraja.pushes) == before + 1
