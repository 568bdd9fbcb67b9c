"""Data protection (issue 10, part 6): no secret in logs or rows, no bare phone number in logs,
phone numbers stored only where they are needed.

A full flow runs with real-looking values in every secret setting: a one-line invoice over
WhatsApp, a Pay tap, the STK push and its callback, both receipts; an invoice that falls back to
SMS, paid by an SMS ``PAY`` reply; delivery statuses; a failed login on the internal API, a
callback at a wrong secret and a wrong verify token. Everything logged (every logger, every
level, DEBUG included, through the daemon's JSON formatter as production writes it) and every
column of every row of every table is then scanned.

The secrets looked for are every secret setting, the generated callback secret, the Daraja
basic-auth header and STK password, and the Daraja access tokens the fake Daraja minted. Two
stored rows are allowed to hold one (``ALLOWED_SECRET_ROWS``): ``meta.mpesa_callback_secret``
and ``meta.daraja_token``; a secret anywhere else — a log line, ``message_log``, ``outbox``,
an ``inbox`` payload — fails.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest

from harness import (
    PUBLIC_URL,
    FakeDaraja,
    FakeProviders,
    Handle,
    inbound_button,
    inbound_text,
    make_settings,
    running_daemon,
    status_event,
    stk_callback,
)
from invoiceiq.clock import ManualClock
from invoiceiq.gateways import mpesa
from invoiceiq.observability import configure_logging
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio

MERCHANT = "254700000001"
CUSTOMER = "254712345678"
SMS_CUSTOMER = "254722000111"
SECRETS = {
    "WABA_TOKEN": "EAAGm0PX4ZCpsBAKq8ZBv7ZBZCmZAZCZBh3nZCqZBwZAZD9xYk2LhQ7bN0rT5uVwXyZ1",
    "WABA_APP_SECRET": "9f3c2b7a1e6d4c8b0a5f7e3d2c1b9a8f",
    "WABA_VERIFY_TOKEN": "vrfy-7Hq2kLm9Np3Rs5Tv8Wx",
    "SMS_API_KEY": "atsk_4f9a1c7e2b8d6f3a0c5e9b7d1f4a8c2e6b0d3f7a9c1e5b8d2f6a0c4e7b9d3f1a",
    "SMS_CALLBACK_TOKEN": "smscb-Jx8Kp2Qw5Rt7Yu9Io3",
    "MPESA_CONSUMER_KEY": "GtvR8bQx2YpL5nWm9Kd3Hs7Fj1Zc4Va6",
    "MPESA_CONSUMER_SECRET": "Qm7Zx3Lp9Nb5Vc1K",
    "MPESA_PASSKEY": "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919x",
    "ADMIN_TOKEN": "adm-Zq4Wn8Ek2Rv6Ty0Uj3Hc5Lp7",
    "INVOICEIQ_METRICS_TOKEN": "mtr-Bx5Nq9Ld3Kf7Gs1Pw4",
}
WRONG_TOKEN = "wrong-admin-Tg6Yh2Jk8Lm4"
# Where a phone number may be stored, and why (docs/security.md lists the same).
PHONE_COLUMNS = {
    ("invoices", "msisdn"): "whom the invoice is for (the brief's own column)",
    ("invoices", "description"): "only if the merchant typed one into the item text",
    ("customers", "msisdn"): "the name book and the WhatsApp 24-hour window",
    ("stk_attempts", "phone"): "the STK prompt's target; per-phone push limits",
    ("payments", "raw_request"): "the brief's raw STK request (PartyA, PhoneNumber)",
    ("payments", "raw_callback"): "the brief's raw callback (PhoneNumber)",
    ("outbox", "recipient"): "where a queued message goes",
    ("outbox", "order_key"): "the send-order key, the recipient (with the invoice id for the merchant's notices)",
    ("outbox", "content"): "message text that quotes the customer's number (the merchant's confirmations)",
    ("message_log", "payload"): "the brief's message log: sender, recipient and text of every message",
    ("inbox", "actor_key"): "the conversation an inbound event belongs to",
    ("inbox", "payload"): "the inbound event as received (sender, text)",
    ("conversations", "conv_key"): "one conversation per phone number",
    ("conversations", "state"): "the merchant's draft invoice (the customer's number) between steps",
    ("idempotency_keys", "response_body"): "the API's replayed answer (the invoice's msisdn)",
}


class Everything:
    """What ``invoiceiq serve`` writes with ``log.level = "debug"``: the daemon's own
    ``configure_logging`` (every logger through the JSON formatter, DEBUG and up, the chatty
    libraries it names held at WARNING), captured from its stream."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()


@pytest.fixture
def everything() -> Iterator[Everything]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
    captured = Everything()
    configure_logging("debug", captured.stream)
    try:
        yield captured
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class MintingDaraja(FakeDaraja):
    """The harness's fake Daraja, minting access tokens that look like Daraja's (28 letters and
    digits) and recording them, so that the scans can look for the tokens actually minted."""

    minted: list[str] = field(default_factory=list)

    def _oauth(self, request: httpx.Request) -> httpx.Response:
        self.token_requests += 1
        token = f"c9SQxWWhmdVRlyh0zh8gZDTk{self.token_requests:04d}"
        self.minted.append(token)
        return httpx.Response(200, json={"access_token": token, "expires_in": "3599"})


@dataclass
class Providers(FakeProviders):
    """The harness's fakes, checking the WhatsApp token this test configures."""

    daraja: FakeDaraja = field(default_factory=MintingDaraja)

    def _graph(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == f"Bearer {SECRETS['WABA_TOKEN']}"
        request.headers["Authorization"] = "Bearer " + "EAAG-test-token"
        return super()._graph(request)


async def all_rows(h: Handle) -> dict[str, list[dict[str, Any]]]:
    async def job(tx: Tx) -> dict[str, list[dict[str, Any]]]:
        if tx.dialect == "sqlite":
            names = [r["name"] for r in await tx.all("SELECT name FROM sqlite_master WHERE type = 'table'"
                                                      " AND name NOT LIKE :p", {"p": "sqlite_%"})]
        else:
            names = [r["table_name"] for r in await tx.all(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")]
        return {name: await tx.all(f"SELECT * FROM {name}") for name in names}
    return await h.store.read(job)


def phone_forms(msisdn: str) -> list[str]:
    national = msisdn[3:]
    return [msisdn, "0" + national, "+" + msisdn, national]


async def settle(h: Handle, timeout: float = 10.0) -> None:
    async def busy(tx: Tx) -> int:
        return int(await tx.val("SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL AND actor <> 'delivery')"
                                " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING'))") or 0)
    calm = 0
    with anyio.fail_after(timeout):
        while calm < 3:
            idle = await h.store.read(busy) == 0 and not any(r.busy for r in h.daemon.dispatch.registries.values())
            calm = calm + 1 if idle and (h.daemon.outbox is None or h.daemon.outbox.in_flight == 0) else 0
            await anyio.sleep(0.01)


@pytest.fixture
async def flow(database_url: str, everything: Everything) -> AsyncIterator[tuple[Handle, Everything, ManualClock]]:
    clock = ManualClock()
    providers = Providers()
    providers.wa_fail_for[SMS_CUSTOMER] = (400, {"error": {"message": "(#131026) Message undeliverable",
                                                           "code": 131026}})
    settings = make_settings(database_url, **SECRETS, MERCHANT_MSISDN=MERCHANT, INVOICEIQ_LOG_LEVEL="debug")
    async with running_daemon(settings, providers=providers, clock=clock) as h:
        admin = {"Authorization": f"Bearer {SECRETS['ADMIN_TOKEN']}"}
        # A one-line invoice, the Pay tap, the push, the callback, both receipts.
        async def say(sender: str, text: str) -> None:
            assert (await h.post_webhook(inbound_text(sender, text), secret=SECRETS["WABA_APP_SECRET"])).status_code == 200

        async def tap(sender: str, button: str) -> None:
            assert (await h.post_webhook(inbound_button(sender, button), secret=SECRETS["WABA_APP_SECRET"])).status_code == 200

        await say(MERCHANT, "invoice 0712345678 2500 Cleaning for Wanjiku")
        await h.wait_for(lambda: len(h.providers.to(MERCHANT)) >= 1, what="the confirmation")
        await tap(CUSTOMER, "pay_now:1001")
        await h.wait_for(lambda: len(h.providers.daraja.pushes) == 1, what="the push")
        checkout = h.providers.daraja.pushes[0]["_checkout"]
        assert (await h.callback(stk_callback(checkout, 0, amount=2500, receipt="TKQ4ABC12D"))).status_code == 200
        await h.wait_for(lambda: sum("Paid ✔" in s.text for s in h.providers.sent) == 2, what="both receipts")
        for sent in list(h.providers.sent):
            if sent.kind != "sms":
                await h.post_webhook(status_event(sent.message_id, "delivered", sent.to), secret=SECRETS["WABA_APP_SECRET"])
        # An invoice that falls back to SMS, paid by an SMS reply.
        await say(MERCHANT, "invoice 0722000111 1500 Plumbing")
        await h.wait_for(lambda: any(s.kind == "sms" for s in h.providers.to(SMS_CUSTOMER)), what="the SMS")
        sms = [s for s in h.providers.to(SMS_CUSTOMER) if s.kind == "sms"][0]
        token = SECRETS["SMS_CALLBACK_TOKEN"]
        await h.client.post(f"/sms/status?token={token}", data={"id": sms.message_id, "status": "Success",
                                                                 "phoneNumber": f"+{SMS_CUSTOMER}", "networkCode": "63902"})
        clock.advance(61_000)
        await h.client.post(f"/sms/inbound?token={token}", data={"from": f"+{SMS_CUSTOMER}", "to": "21345",
                                                                  "id": "sms-in-1", "text": "PAY 1002"})
        await h.wait_for(lambda: len(h.providers.daraja.pushes) == 2, what="the second push")
        second = h.providers.daraja.pushes[1]["_checkout"]
        await h.callback(stk_callback(second, 0, amount=1500, receipt="TKQ4ABC13E", phone=int(SMS_CUSTOMER)))
        await h.wait_for(lambda: sum("Paid" in s.text for s in h.providers.to(SMS_CUSTOMER)) >= 1, what="the SMS receipt")
        # The internal API, rightly and wrongly; a callback at a wrong secret; a wrong verify token.
        assert (await h.client.get("/invoices", headers=admin)).status_code == 200
        assert (await h.client.post("/invoices", headers={"Authorization": f"Bearer {WRONG_TOKEN}"},
                                    json={"msisdn": CUSTOMER, "amount_cents": 100, "description": "x"})).status_code == 401
        assert (await h.client.post(f"/payments/stk/callback/{WRONG_TOKEN}", json=stk_callback(checkout))).status_code == 404
        assert (await h.client.get("/whatsapp/webhook", params={"hub.mode": "subscribe", "hub.verify_token": WRONG_TOKEN,
                                                                "hub.challenge": "1"})).status_code == 403
        assert (await h.client.get("/metrics", headers={"Authorization": f"Bearer {SECRETS['INVOICEIQ_METRICS_TOKEN']}"})).status_code == 200
        invoice = (await h.client.get("/invoices/1001", headers=admin)).json()
        assert (await h.client.get(invoice["pay_link"].replace(PUBLIC_URL, ""))).status_code == 200
        await settle(h)
        yield h, everything, clock


def secret_values(h: Handle, clock: ManualClock) -> dict[str, str]:
    values = dict(SECRETS)
    values["WRONG_TOKEN (a failed login)"] = WRONG_TOKEN
    values["the generated callback secret"] = str(h.daemon.callback_secret)
    basic = base64.b64encode(f"{SECRETS['MPESA_CONSUMER_KEY']}:{SECRETS['MPESA_CONSUMER_SECRET']}".encode()).decode()
    values["Daraja basic auth"] = basic
    values["STK password"] = mpesa.password("174379", SECRETS["MPESA_PASSKEY"], mpesa.timestamp(clock.now_ms()))
    minted = daraja_tokens(h)
    assert minted, "the flow made STK pushes, so the fake Daraja minted an access token"
    for n, token in enumerate(minted, 1):
        values[daraja_token_name(n)] = token
    return {k: v for k, v in values.items() if len(v) >= 4}


def daraja_tokens(h: Handle) -> list[str]:
    daraja = h.providers.daraja
    assert isinstance(daraja, MintingDaraja)
    return list(daraja.minted)


def daraja_token_name(n: int) -> str:
    return f"Daraja access token #{n}"


# The stored rows where a secret is expected, each the one place for its secret; the same secret
# anywhere else (message_log, outbox, inbox payloads, another meta row...) fails the scan.
ALLOWED_SECRET_ROWS = {
    # Generated once and kept so that every process, and every restart, answers at the same URL.
    ("meta", "mpesa_callback_secret"): "the generated callback secret",
    # Daraja's access token, a short-lived bearer (expires in ~1 hour, refreshed 5 minutes early),
    # shared by every instance through the database because Daraja revokes the previous token
    # whenever one is minted: instances must not each mint their own (store/meta.py SharedToken).
    # Stored as "<token> <refresh_at_ms>". Its expiry bounds the harm of a database copy; the
    # database is protected as a secret store all the same (docs/security.md §3).
    ("meta", "daraja_token"): "the Daraja access token in use",
}


def daemon_lines(h: Handle, everything: Everything) -> list[str]:
    """Every line written (the test client's own requests would log at INFO through httpx,
    which configure_logging holds at WARNING like the daemon's own outbound client)."""
    return everything.lines


async def test_no_secret_in_any_log_line(flow: tuple[Handle, Everything, ManualClock]) -> None:
    h, everything, clock = flow
    lines = daemon_lines(h, everything)
    assert len(lines) > 20 and logging.getLogger().level == logging.DEBUG
    leaks = {name: [line[:200] for line in lines if value in line]
             for name, value in secret_values(h, clock).items()}
    assert {k: v for k, v in leaks.items() if v} == {}
    tokens = [r["pay_token"] for r in (await all_rows(h))["invoice_tracking"]]
    assert [line for line in lines for t in tokens if t in line] == []  # pay links are capabilities too


async def test_no_unmasked_phone_number_in_any_log_line(flow: tuple[Handle, Everything, ManualClock]) -> None:
    h, everything, _ = flow
    lines = daemon_lines(h, everything)
    for msisdn in (MERCHANT, CUSTOMER, SMS_CUSTOMER):
        for form in phone_forms(msisdn):
            found = [line[:240] for line in lines if re.search(rf"(?<!\d){re.escape(form)}(?!\d)", line)]
            assert found == [], (form, found[:3])
    # And masked numbers are still told apart (the last three digits).
    assert any("*********678" in line for line in lines)


async def test_no_secret_in_any_stored_row(flow: tuple[Handle, Everything, ManualClock]) -> None:
    h, _, clock = flow
    tables = await all_rows(h)
    secret = str(h.daemon.callback_secret)
    found: list[tuple[str, str, str, str]] = []  # (table, meta key or "", column, which secret)
    for table, table_rows in tables.items():
        for row in table_rows:
            key = str(row.get("key", "")) if table == "meta" else ""
            for column, value in row.items():
                text = json.dumps(value, default=str) if not isinstance(value, str) else value
                for name, needle in secret_values(h, clock).items():
                    if needle in text:
                        found.append((table, key, column, name))
    # Each stored secret is in its own allow-listed meta row (ALLOWED_SECRET_ROWS), and nowhere else:
    # the generated callback secret, and the Daraja access token in use (the last one minted).
    minted = daraja_tokens(h)
    expected = [("meta", "daraja_token", "value", daraja_token_name(len(minted))),
                ("meta", "mpesa_callback_secret", "value", "the generated callback secret")]
    assert sorted(found) == expected, found
    assert {(t, k) for t, k, *_ in found} == set(ALLOWED_SECRET_ROWS)
    stored = {r["key"]: r["value"] for r in tables["meta"]}
    assert stored["mpesa_callback_secret"] == secret
    token, _, refresh_at = stored["daraja_token"].rpartition(" ")
    assert token == minted[-1] and refresh_at.isdigit(), stored["daraja_token"]


async def test_phone_numbers_are_stored_only_where_needed(flow: tuple[Handle, Everything, ManualClock]) -> None:
    h, _, _ = flow
    tables = await all_rows(h)
    where: dict[tuple[str, str], int] = {}
    pattern = re.compile("|".join(rf"(?<!\d){re.escape(f)}(?!\d)" for m in (CUSTOMER, SMS_CUSTOMER, MERCHANT)
                                  for f in phone_forms(m)[:3]))
    for table, table_rows in tables.items():
        for row in table_rows:
            for column, value in row.items():
                text = json.dumps(value, default=str) if not isinstance(value, str) else value
                if pattern.search(text or ""):
                    where[(table, column)] = where.get((table, column), 0) + 1
    unexpected = sorted(set(where) - set(PHONE_COLUMNS))
    assert unexpected == [], unexpected
    print("\nphone numbers stored in:", ", ".join(f"{t}.{c} ({n} rows)" for (t, c), n in sorted(where.items())))


async def test_an_error_on_the_callback_route_does_not_log_the_callback_secret(
        database_url: str, everything: Everything, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unhandled error on the secret callback URL is logged as ``request_failed``: the
    line must not carry the URL's secret (nor an error page the pay token)."""
    def broken(body: object) -> None:
        raise RuntimeError("simulated bug while reading a callback")

    async with running_daemon(make_settings(database_url, **SECRETS), providers=Providers()) as h:
        monkeypatch.setattr(mpesa, "parse_callback", broken)
        response = await h.client.post(f"/payments/stk/callback/{h.daemon.callback_secret}", json=stk_callback("x"))
        assert response.status_code == 500
        lines = daemon_lines(h, everything)
        failed = [line for line in lines if '"request_failed"' in line]
        assert failed, "the error is logged"
        assert not any(str(h.daemon.callback_secret) in line for line in failed), failed[0][:300]
