"""Forged requests change nothing (issue 10, part 2).

Every test starts from the same real state — invoice #1001 (KES 2,500) sent to the customer and
an STK attempt in flight for it — then sends forgeries and checks, on the database and on what
the fake providers saw, that no invoice, payment, attempt, outbox row or conversation changed
and no message or STK push went out. Positive controls (the same request done right) show that
each refusal is the defence at work, not a broken route.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

from harness import (
    AUTH,
    ADMIN_TOKEN,
    APP_SECRET,
    CUSTOMER,
    MERCHANT,
    FakeProviders,
    Handle,
    inbound_button,
    inbound_text,
    make_settings,
    running_daemon,
    sign,
    status_event,
    stk_callback,
)
from invoiceiq.clock import ManualClock
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio

ACK = {"ResultCode": 0, "ResultDesc": "Accepted"}
SAFARICOM_IP = "196.201.214.200"
SMS_TOKEN = "sms-callback-token-0123456789"
# Tables whose rows are the business state: none of them may change under a forgery.
STATE_TABLES = ("invoices", "invoice_tracking", "payments", "stk_attempts", "outbox", "conversations", "customers")
# Tables a refused request must not even touch (it is refused before anything is stored).
STORED_TABLES = ("inbox", "message_log")


# -- fixtures and helpers ------------------------------------------------------------------------


async def rows(h: Handle, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def job(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all(sql, params)
    return await h.store.read(job)


async def settle(h: Handle, timeout: float = 5.0) -> None:
    """No stored work waiting, nothing being sent, no keyed actor busy: three times in a row."""
    calm = 0
    with anyio.fail_after(timeout):
        while calm < 3:
            (row,) = await rows(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL AND actor <> 'delivery')"
                                   " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING')) AS n")
            busy = any(registry.busy for registry in h.daemon.dispatch.registries.values())
            idle = row["n"] == 0 and (h.daemon.outbox is None or h.daemon.outbox.in_flight == 0) and not busy
            calm = calm + 1 if idle else 0
            await anyio.sleep(0.01)


async def snapshot(h: Handle, tables: tuple[str, ...] = STATE_TABLES + STORED_TABLES) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for table in tables:
        found = await rows(h, f"SELECT * FROM {table}")
        state[table] = sorted(json.dumps(r, sort_keys=True, default=str) for r in found)
    state["sent"] = [(s.to, s.kind, s.message_id) for s in h.providers.sent]
    state["pushes"] = len(h.providers.daraja.pushes)
    return state


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert after[key] == before[key], f"{key} changed: {set(after[key]) ^ set(before[key]) if isinstance(after[key], list) else (before[key], after[key])}"


async def invoice_with_attempt(h: Handle) -> str:
    """Invoice #1001 for CUSTOMER, delivered, and the customer's Pay tap's STK attempt in flight."""
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": CUSTOMER, "amount_cents": 250000, "description": "Cleaning"})
    assert response.status_code == 201, response.text
    await h.wait_for(lambda: bool(h.providers.to(CUSTOMER)), what="the invoice")
    await h.tap(CUSTOMER, "pay_now:1001")
    await h.wait_for(lambda: bool(h.providers.daraja.pushes), what="the STK push")
    await settle(h)
    return str(h.providers.daraja.pushes[0]["_checkout"])


class Logs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == name]


@pytest.fixture
def logs() -> Iterator[Logs]:
    handler = Logs()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def daemon(database_url: str, clock: ManualClock, **env: str):  # type: ignore[no-untyped-def]
    return running_daemon(make_settings(database_url, **env), providers=FakeProviders(), clock=clock)


@pytest.fixture
async def h(database_url: str, clock: ManualClock) -> AsyncIterator[Handle]:
    async with daemon(database_url, clock) as handle:
        yield handle


def paid_callback(checkout: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("amount", 2500)
    kw.setdefault("receipt", "FORGED0001")
    return stk_callback(checkout, 0, **kw)


# -- WhatsApp: the X-Hub-Signature-256 HMAC ------------------------------------------------------

def _raw(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def forged_signatures(body: bytes) -> list[tuple[str, dict[str, str]]]:
    good = sign(body)
    other_body = body.replace(b'"', b' "', 1)
    return [
        ("unsigned", {}),
        ("empty header", {"X-Hub-Signature-256": ""}),
        ("no digest", {"X-Hub-Signature-256": "sha256="}),
        ("random digest", {"X-Hub-Signature-256": "sha256=" + "ab" * 32}),
        ("another secret", {"X-Hub-Signature-256": sign(body, "not-the-app-secret")}),
        ("the verify token as secret", {"X-Hub-Signature-256": sign(body, "verify-token-for-tests")}),
        ("an empty secret", {"X-Hub-Signature-256": "sha256=" + hmac.new(b"", body, hashlib.sha256).hexdigest()}),
        ("signature of other bytes", {"X-Hub-Signature-256": sign(other_body)}),
        ("sha1 of the right secret", {"X-Hub-Signature-256": "sha1=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha1).hexdigest()}),
        ("sha1 header only", {"X-Hub-Signature": "sha1=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha1).hexdigest()}),
        ("truncated digest", {"X-Hub-Signature-256": good[:-2]}),
        ("digest plus a byte", {"X-Hub-Signature-256": good + "0"}),
        ("two signatures", {"X-Hub-Signature-256": f"{sign(body, 'x')},{good}"}),
    ]


async def test_forged_whatsapp_webhooks_are_refused_and_change_nothing(h: Handle, logs: Logs) -> None:
    await invoice_with_attempt(h)
    before = await snapshot(h)
    forgeries = [
        inbound_text(MERCHANT, "invoice 0712345678 2500 Forged"),   # the merchant's command
        inbound_text(MERCHANT, "cancel 1001"),
        inbound_button(CUSTOMER, "pay_now:1001"),                     # a Pay tap (an STK push)
        inbound_text("254799999999", "hello"),                        # any number (a reply)
        status_event(h.providers.sent[0].message_id, "failed", CUSTOMER,   # a failure (SMS fallback)
                     [{"code": 131026, "title": "Message undeliverable"}]),
    ]
    refused = 0
    for payload in forgeries:
        body = _raw(payload)
        for label, headers in forged_signatures(body):
            response = await h.client.post("/whatsapp/webhook", content=body,
                                           headers={"Content-Type": "application/json", **headers})
            assert response.status_code == 401, (label, response.text)
            refused += 1
    await settle(h)
    assert_unchanged(before, await snapshot(h))
    # Each refusal is logged with its reason (and counted).
    reasons = [getattr(r, "context", {}).get("reason") for r in logs.events("webhook_rejected")]
    assert len(reasons) == refused
    assert set(reasons) == {"missing_signature", "bad_signature"}
    metrics = (await h.client.get("/metrics")).text
    assert 'invoiceiq_webhook_rejected_total{reason="whatsapp_bad_signature"}' in metrics

    # Control: the very same merchant command, signed with the app secret, does create an invoice.
    told = len(h.providers.to(MERCHANT))
    await h.post_webhook(forgeries[0])
    await h.wait_for(lambda: len(h.providers.to(MERCHANT)) > told, what="the merchant's confirmation")
    assert len(await rows(h, "SELECT id FROM invoices")) == 2


async def test_the_subscription_handshake_refuses_a_wrong_verify_token(h: Handle) -> None:
    for token in ("", "wrong", "verify-token-for-test", "VERIFY-TOKEN-FOR-TESTS", APP_SECRET):
        response = await h.client.get("/whatsapp/webhook", params={
            "hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "1158201444"})
        assert response.status_code == 403 and "1158201444" not in response.text
    ok = await h.client.get("/whatsapp/webhook", params={
        "hub.mode": "subscribe", "hub.verify_token": "verify-token-for-tests", "hub.challenge": "1158201444"})
    assert (ok.status_code, ok.text) == (200, "1158201444")


# -- M-PESA: the secret URL, the allow-list, known ids and amounts -------------------------------


async def test_callbacks_at_a_wrong_secret_are_404_and_change_nothing(h: Handle, logs: Logs) -> None:
    checkout = await invoice_with_attempt(h)
    secret = str(h.daemon.callback_secret)
    before = await snapshot(h)
    wrong = ["", "x", secret[:-1], secret + "x", secret.upper() if secret.upper() != secret else secret.lower(),
             secret[1:] + secret[0], "a" * len(secret), f"{secret}/extra", f"..%2F{secret}", "%00" + secret]
    for path in [f"/payments/stk/callback/{w}" for w in wrong] + [
            "/payments/stk/callback", f"/payments/stk/callback?secret={secret}", f"/payments/stk/{secret}",
            f"/payments/stk/callback/{secret}/"]:
        response = await h.client.post(path, json=paid_callback(checkout))
        assert response.status_code in (404, 405), (path, response.status_code)
        assert response.json() != ACK
    await settle(h)
    assert_unchanged(before, await snapshot(h))
    assert logs.events("webhook_rejected")  # with reason wrong_secret
    assert {getattr(r, "context", {}).get("reason") for r in logs.events("webhook_rejected")} == {"wrong_secret"}
    # The secret never appears in a log line, even refused ones (the test client's own httpx
    # lines, which quote the URLs it requests, are not the daemon's).
    leaked = [r for r in logs.records if r.name != "httpx"
              and (secret in str(getattr(r, "context", "")) or secret in r.getMessage())]
    assert leaked == [], [(r.name, r.getMessage()) for r in leaked]


async def test_callbacks_from_outside_the_allow_list_are_403_even_with_a_spoofed_forwarded_for(
        database_url: str, clock: ManualClock, logs: Logs) -> None:
    async with daemon(database_url, clock, INVOICEIQ_MPESA_CALLBACK_ALLOW_IPS=SAFARICOM_IP) as h:
        checkout = await invoice_with_attempt(h)
        before = await snapshot(h)
        path = f"/payments/stk/callback/{h.daemon.callback_secret}"
        for xff in (None, SAFARICOM_IP, f"{SAFARICOM_IP}, 127.0.0.1", f"127.0.0.1, {SAFARICOM_IP}", "196.201.214.0/24"):
            headers = {"X-Forwarded-For": xff} if xff else {}
            for extra in ({}, {"X-Real-IP": SAFARICOM_IP}, {"Forwarded": f"for={SAFARICOM_IP}"}):
                response = await h.client.post(path, json=paid_callback(checkout), headers={**headers, **extra})
                assert response.status_code == 403, (xff, extra, response.text)
        await settle(h)
        assert_unchanged(before, await snapshot(h))
        refusals = [r for r in logs.events("webhook_rejected") if getattr(r, "context", {}).get("reason") == "source_not_allowed"]
        assert refusals and all(r.context["source"] == "127.0.0.1" for r in refusals)  # type: ignore[attr-defined]


async def test_behind_a_trusted_proxy_only_the_hop_the_proxy_added_counts(database_url: str, clock: ManualClock) -> None:
    """Positive control for the allow-list (it does let Safaricom in), and the spoofing rule
    behind a proxy: the client's own X-Forwarded-For entries are never believed."""
    async with daemon(database_url, clock, INVOICEIQ_MPESA_CALLBACK_ALLOW_IPS=SAFARICOM_IP,
                      INVOICEIQ_SERVER_TRUSTED_PROXIES="127.0.0.1") as h:
        checkout = await invoice_with_attempt(h)
        before = await snapshot(h)
        path = f"/payments/stk/callback/{h.daemon.callback_secret}"
        # An attacker who writes Safaricom's address into X-Forwarded-For: our proxy appends the
        # attacker's real address after it, and that last hop is the one believed.
        for xff in (f"{SAFARICOM_IP}, 6.6.6.6", f"{SAFARICOM_IP}, 6.6.6.6, 127.0.0.1", "6.6.6.6", ""):
            response = await h.client.post(path, json=paid_callback(checkout), headers={"X-Forwarded-For": xff})
            assert response.status_code == 403, (xff, response.text)
        await settle(h)
        assert_unchanged(before, await snapshot(h))
        # Safaricom through our proxy: accepted, and the invoice is paid.
        response = await h.client.post(path, json=paid_callback(checkout, receipt="REAL00001"),
                                       headers={"X-Forwarded-For": f"10.0.0.1, {SAFARICOM_IP}"})
        assert (response.status_code, response.json()) == (200, ACK)
        await settle(h)
        (invoice,) = await rows(h, "SELECT status, pay_ref FROM invoices")
        assert (invoice["status"], invoice["pay_ref"]) == ("PAID", "REAL00001")


async def test_callbacks_for_unknown_checkout_ids_are_acknowledged_and_change_nothing(h: Handle, logs: Logs) -> None:
    checkout = await invoice_with_attempt(h)
    before = await snapshot(h, STATE_TABLES)
    # Unknown ids, near misses of ours, and our MerchantRequestID used as if it were the checkout id.
    for unknown in ("ws_CO_000000000000", checkout + "0", checkout[:-1], checkout.lower(), f" {checkout}", "mr-1",
                    "ws_CO_TEST000002"):
        response = await h.callback(paid_callback(unknown, phone=254799999999))
        assert (response.status_code, response.json()) == (200, ACK), unknown
    await settle(h)
    assert_unchanged(before, await snapshot(h, STATE_TABLES))
    assert len(logs.events("callback_for_unknown_checkout")) == 7


async def test_a_wrong_amount_does_not_pay_the_invoice(h: Handle) -> None:
    checkout = await invoice_with_attempt(h)
    mark = len(h.providers.sent)
    response = await h.callback(paid_callback(checkout, amount=1, receipt="LOWAMT0001"))
    assert (response.status_code, response.json()) == (200, ACK)
    await settle(h)
    (invoice,) = await rows(h, "SELECT status, pay_ref FROM invoices")
    assert (invoice["status"], invoice["pay_ref"]) == ("SENT", None)
    told = [(s.to, s.text) for s in h.providers.sent[mark:]]
    # No receipt to anyone; the merchant alone hears about the odd money (by design: the attempt
    # did move money, so it is recorded as SUCCESS and flagged, never as paying the invoice).
    assert not any("Paid ✔" in text for _, text in told)
    assert [to for to, _ in told] == [MERCHANT]
    (attempt,) = await rows(h, "SELECT p.status, p.mpesa_receipt FROM payments p")
    assert (attempt["status"], attempt["mpesa_receipt"]) == ("SUCCESS", "LOWAMT0001")


async def test_a_phone_that_does_not_match_the_attempt_does_not_pay_the_invoice(h: Handle) -> None:
    checkout = await invoice_with_attempt(h)
    mark = len(h.providers.sent)
    response = await h.callback(paid_callback(checkout, phone=254799999999, receipt="OTHERPH001"))
    assert (response.status_code, response.json()) == (200, ACK)
    await settle(h)
    (invoice,) = await rows(h, "SELECT status FROM invoices")
    assert invoice["status"] == "SENT"
    assert not any("Paid ✔" in s.text for s in h.providers.sent[mark:])


async def test_replays_after_success_change_nothing(h: Handle) -> None:
    checkout = await invoice_with_attempt(h)
    response = await h.callback(paid_callback(checkout, receipt="REAL00001"))
    assert response.json() == ACK
    await h.wait_for(lambda: sum("Paid ✔" in s.text for s in h.providers.sent) == 2, what="both receipts")
    await settle(h)
    before = await snapshot(h, STATE_TABLES)
    replays = [
        paid_callback(checkout, receipt="REAL00001"),                    # the same callback again
        paid_callback(checkout, receipt="REPLAY0002"),                   # another receipt
        paid_callback(checkout, amount=1, receipt="REPLAY0003"),          # another amount
        stk_callback(checkout, 1032),                                      # a late failure
        stk_callback(checkout, 0, amount=2500, receipt="REAL00001", phone=254799999999),
    ]
    for body in replays:
        for _ in range(3):
            response = await h.callback(body)
            assert (response.status_code, response.json()) == (200, ACK)
    # A replay of the customer's Pay tap (same wamid) and a fresh one: no new push, no change.
    await settle(h)
    assert_unchanged(before, await snapshot(h, STATE_TABLES))
    (invoice,) = await rows(h, "SELECT status, pay_ref FROM invoices")
    assert (invoice["status"], invoice["pay_ref"]) == ("PAID", "REAL00001")
    assert sum("Paid ✔" in s.text for s in h.providers.sent) == 2


async def test_the_receipt_of_one_invoice_cannot_pay_another(h: Handle) -> None:
    checkout = await invoice_with_attempt(h)
    assert (await h.callback(paid_callback(checkout, receipt="REAL00001"))).json() == ACK
    await settle(h)
    # A second invoice, its own attempt; a "success" for it reusing the first receipt.
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": "254722000111", "amount_cents": 250000, "description": "Second"})
    assert response.status_code == 201
    await h.wait_for(lambda: bool(h.providers.to("254722000111")), what="the second invoice")
    await h.tap("254722000111", "pay_now:1002")
    await h.wait_for(lambda: len(h.providers.daraja.pushes) == 2, what="the second push")
    await settle(h)
    second = str(h.providers.daraja.pushes[1]["_checkout"])
    mark = len(h.providers.sent)
    assert (await h.callback(paid_callback(second, receipt="REAL00001", phone=254722000111))).json() == ACK
    await settle(h)
    statuses = {r["id"]: r["status"] for r in await rows(h, "SELECT id, status FROM invoices")}
    assert statuses == {"1001": "PAID", "1002": "SENT"}
    assert not any("Paid ✔" in s.text for s in h.providers.sent[mark:])


# -- Africa's Talking: unsigned; a secret token in the callback URL when configured ---------------


async def test_sms_callbacks_without_the_configured_token_are_403_and_change_nothing(
        database_url: str, clock: ManualClock) -> None:
    async with daemon(database_url, clock, SMS_CALLBACK_TOKEN=SMS_TOKEN) as h:
        await invoice_with_attempt(h)
        before = await snapshot(h)
        forms = {
            "/sms/inbound": {"from": f"+{CUSTOMER}", "to": "21345", "id": "forged-1", "text": "PAY 1001",
                             "date": "2026-11-26 13:20:11"},
            "/sms/status": {"id": "ATXid_forged", "status": "Failed", "phoneNumber": f"+{CUSTOMER}",
                            "failureReason": "UserIsInactive"},
        }
        for route, form in forms.items():
            for query in ("", "?token=", "?token=wrong", f"?token={SMS_TOKEN[:-1]}", f"?token={SMS_TOKEN}x",
                          f"?Token={SMS_TOKEN}", f"?token={SMS_TOKEN.upper()}"):
                response = await h.client.post(route + query, data=form)
                assert response.status_code == 403, (route, query, response.text)
        await settle(h)
        assert_unchanged(before, await snapshot(h))
        # Control: with the token, the same inbound SMS is taken (and answered).
        response = await h.client.post(f"/sms/inbound?token={SMS_TOKEN}", data=forms["/sms/inbound"])
        assert response.json() == {"status": "ok"}


async def test_unauthenticated_sms_callbacks_send_nothing_in_the_default_live_configuration(
        h: Handle, clock: ManualClock) -> None:
    await invoice_with_attempt(h)
    # The attempt is answered (no longer in flight) and M-PESA's one-minute lock is over, so
    # that a new Pay request could push again.
    checkout = str(h.providers.daraja.pushes[0]["_checkout"])
    assert (await h.callback(stk_callback(checkout, 1032))).json() == ACK
    await settle(h)
    clock.advance(61_000)
    before = await snapshot(h, ("invoices", "payments", "stk_attempts"))
    sent = len(h.providers.sent)
    pushes = len(h.providers.daraja.pushes)
    for n in range(5):
        await h.client.post("/sms/inbound", data={"from": f"+25479000000{n}", "to": "21345", "id": f"forged-{n}",
                                                   "text": "hello"})
    await h.client.post("/sms/inbound", data={"from": f"+{CUSTOMER}", "to": "21345", "id": "forged-pay",
                                               "text": "PAY 1001"})
    await settle(h)
    assert len(h.providers.sent) == sent, [(s.to, s.text) for s in h.providers.sent[sent:]]
    assert len(h.providers.daraja.pushes) == pushes
    assert_unchanged(before, await snapshot(h, ("invoices", "payments", "stk_attempts")))


# -- the internal API and the pay page -----------------------------------------------------------


async def test_the_internal_api_refuses_missing_and_wrong_tokens(h: Handle, logs: Logs) -> None:
    await invoice_with_attempt(h)
    before = await snapshot(h)
    body = {"msisdn": "0712345678", "amount_cents": 100, "description": "Forged"}
    for auth in (None, "", "Bearer", "Bearer  x", f"Bearer {ADMIN_TOKEN[:-1]}", f"Bearer {ADMIN_TOKEN}x",
                 f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN, f"Bearer {ADMIN_TOKEN.upper()}", "Bearer verify-token-for-tests"):
        headers = {"Idempotency-Key": "k1"} | ({"Authorization": auth} if auth is not None else {})
        for method, path, payload in (("POST", "/invoices", body), ("POST", "/payments/stk/initiate", {"invoice_id": "1001"}),
                                      ("GET", "/invoices/1001", None), ("GET", "/invoices", None)):
            response = await h.client.request(method, path, json=payload, headers=headers)
            assert response.status_code == 401, (auth, path, response.status_code)
            assert "2547" not in response.text
    await settle(h)
    assert_unchanged(before, await snapshot(h))
    assert len(logs.events("api_auth_failed")) == 40


async def test_the_pay_page_refuses_cross_site_posts(h: Handle) -> None:
    await invoice_with_attempt(h)
    checkout = str(h.providers.daraja.pushes[0]["_checkout"])
    assert (await h.callback(stk_callback(checkout, 1032))).json() == ACK  # the attempt is over
    await settle(h)
    token = (await h.client.get("/invoices/1001", headers=AUTH)).json()["pay_link"].rsplit("/", 1)[-1]
    clock_before = len(h.providers.daraja.pushes)
    before = await snapshot(h, STATE_TABLES)
    attempts = [
        ({}, {"csrf": "v"}),                                                 # no cookie
        ({"Cookie": "iq_csrf=v"}, {}),                                       # no field
        ({"Cookie": "iq_csrf=v"}, {"csrf": "w"}),                            # mismatch
        ({"Cookie": "iq_csrf=v", "Origin": "https://evil.test"}, {"csrf": "v"}),  # another site
        ({"Cookie": "iq_csrf="}, {"csrf": ""}),                              # both empty
    ]
    for n, (headers, form) in enumerate(attempts):
        response = await h.client.post(f"/p/{token}/pay", data=form,
                                       headers={**headers, "X-Forwarded-For": f"10.0.0.{n}"})
        assert response.status_code == 403, (headers, form, response.status_code)
    await settle(h)
    assert_unchanged(before, await snapshot(h, STATE_TABLES))
    assert len(h.providers.daraja.pushes) == clock_before
