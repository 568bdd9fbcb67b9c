"""Africa's Talking callbacks through the real daemon (issue 4): ``POST /sms/inbound`` and
``POST /sms/status``, and the SMS texts the daemon sends.

* ``PAY 1001`` (or ``PAY`` with exactly one open invoice) starts the payment exactly as the
  WhatsApp button does: one STK push, answered by SMS; ``PAY`` with several open invoices gets
  the hint naming them; other text gets a short reply by SMS.
* Unknown form fields are tolerated, malformed forms never answer 5xx, the merchant's number
  is ignored, and ``sms.callback_token`` (when set) refuses callbacks without ``?token=``.
* Delivery reports are recorded in ``message_log`` and move the outbox row (Success ->
  DELIVERED, Failed -> FAILED with the reason); duplicates change nothing.
* Every SMS is GSM-7 within 160 characters, and the invoice, reminder and receipt texts carry
  the invoice number, the amount and the pay link.

The customers here are "not on WhatsApp" (the Graph API answers 131026 for them), so their
invoices reach them by SMS, as in real life for whoever texts back.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from harness import (
    WA_ERRORS,
    AUTH,
    until,
    SMS_INBOUND,
    SMS_STATUS,
    CUSTOMER,
    MERCHANT,
    FakeProviders,
    Handle,
    make_settings,
    running_daemon,
    stk_callback,
)
from invoiceiq.core import copy
from invoiceiq.store import Tx
from invoiceiq.store.jsonio import loads

pytestmark = pytest.mark.anyio

NOT_ON_WHATSAPP = (WA_ERRORS["131026"]["http_status"], WA_ERRORS["131026"]["body"])
OTHER = "254722000111"
STRANGER = "254733000222"
SHORT_CODE = "21345"
CALLBACK_TOKEN = "sms-callback-token-0123456789"
_sms_ids = itertools.count(1)


# -- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture
def providers() -> FakeProviders:
    fake = FakeProviders()
    for msisdn in (CUSTOMER, OTHER, STRANGER):
        fake.wa_fail_for[msisdn] = NOT_ON_WHATSAPP
    return fake


@pytest.fixture
async def h(database_url: str, providers: FakeProviders) -> AsyncIterator[Handle]:
    async with running_daemon(make_settings(database_url), providers=providers) as handle:
        yield handle




async def q(h: Handle, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def job(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all(sql, params)
    return await h.store.read(job)


async def count(h: Handle, sql: str, params: dict[str, Any] | None = None) -> int:
    found = await q(h, sql, params)
    return int(next(iter(found[0].values())) or 0)


async def settle(h: Handle) -> None:
    """Every inbox event processed, every due send gone, and no payment push in progress."""
    async def idle() -> bool:
        busy = await count(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL)"
                              " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING'))"
                              " + (SELECT COUNT(*) FROM payments p JOIN stk_attempts a ON a.payment_id = p.id"
                              "    WHERE p.status = 'INITIATED' AND a.checkout_request_id IS NULL) AS busy")
        assert h.daemon.outbox is not None
        return busy == 0 and h.daemon.outbox.in_flight == 0
    await until(idle, "the daemon to settle")


async def new_invoice(h: Handle, msisdn: str = CUSTOMER, amount_kes: int = 2500,
                      description: str = "Cleaning service") -> dict[str, Any]:
    """An invoice through the admin API, delivered (by SMS: these customers are not on WhatsApp)."""
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": msisdn, "amount_cents": amount_kes * 100, "description": description})
    assert response.status_code == 201, response.text
    await settle(h)
    return response.json()


def inbound_form(sender: str, text: str, **extra: str) -> dict[str, str]:
    """What Africa's Talking posts for an incoming message (sms_at_inbound.txt)."""
    form = {"date": "2026-11-26 13:20:11", "from": f"+{sender}", "id": f"5a9c1e7f-3b2d-4c8a-9e6f-{next(_sms_ids):012d}",
            "linkId": "", "text": text, "to": SHORT_CODE, "networkCode": "63902"}
    form.update(extra)
    return form


async def text_in(h: Handle, sender: str, text: str, **extra: str) -> dict[str, str]:
    form = inbound_form(sender, text, **extra)
    response = await h.client.post(SMS_INBOUND, data=form)
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok"}
    await settle(h)
    return form


def sms_to(providers: FakeProviders, msisdn: str) -> list[str]:
    return [s.text for s in providers.to(msisdn) if s.kind == "sms"]


def prompt_sent(invoice_id: str, amount: str, short: str) -> str:
    return (f"M-PESA prompt sent to {short} for Invoice #{invoice_id} (KES {amount}).\n"
            "Enter your M-PESA PIN on your phone to pay.")


def invoice_sms(invoice: dict[str, Any], amount: str, item: str) -> str:
    return f"Invoice #{invoice['id']}, KES {amount} for {item}. Pay with M-PESA: {invoice['pay_link']}"


# -- inbound: PAY ------------------------------------------------------------------------------------


async def test_pay_with_the_invoice_number_starts_the_payment_like_the_whatsapp_button(
        h: Handle, providers: FakeProviders) -> None:
    by_sms = await new_invoice(h, CUSTOMER)
    assert sms_to(providers, CUSTOMER) == [invoice_sms(by_sms, "2,500", "Cleaning service")]
    # Fields Africa's Talking may add one day (and a premium linkId) are no reason to refuse it.
    form = await text_in(h, CUSTOMER, "PAY 1001", linkId="SampleLinkId123", cost="KES 0.00", keyword="PAY",
                         surprise="\u2603")
    (push,) = providers.daraja.pushes
    secret = h.daemon.callback_secret
    assert {k: v for k, v in push.items() if k not in ("Timestamp", "Password", "_checkout")} == {
        "BusinessShortCode": 174379, "TransactionType": "CustomerPayBillOnline", "Amount": 2500,
        "PartyA": int(CUSTOMER), "PartyB": 174379, "PhoneNumber": int(CUSTOMER),
        "CallBackURL": f"https://pay.test/payments/stk/callback/{secret}",
        "AccountReference": "1001", "TransactionDesc": "Invoice 1001"}
    # The answer goes back the way the question came: by SMS, in GSM-7.
    assert sms_to(providers, CUSTOMER)[1:] == [prompt_sent("1001", "2,500", "0712...678")]
    assert await count(h, "SELECT COUNT(*) FROM stk_attempts WHERE source = 'sms'") == 1
    inbound = await q(h, "SELECT payload FROM message_log WHERE channel = 'SMS' AND direction = 'IN'"
                         " AND event = 'inbound'")
    assert [(loads(r["payload"])["text"], loads(r["payload"])["sms_id"]) for r in inbound] == [("PAY 1001", form["id"])]
    # Africa's Talking redelivers the same message: nothing new.
    again = await h.client.post(SMS_INBOUND, data=form)
    assert again.status_code == 200
    await settle(h)
    assert len(providers.daraja.pushes) == 1 and len(sms_to(providers, CUSTOMER)) == 2

    # The same request by WhatsApp button, for another customer's invoice: the same push.
    providers.wa_fail_for.pop(OTHER)
    await new_invoice(h, OTHER)
    await h.tap(OTHER, "pay_now:1002")
    await settle(h)
    by_button = providers.daraja.pushes[1]
    ignore = ("Timestamp", "Password", "_checkout", "PartyA", "PhoneNumber", "AccountReference", "TransactionDesc")
    assert {k: v for k, v in by_button.items() if k not in ignore} == {
        k: v for k, v in push.items() if k not in ignore}
    assert (by_button["PhoneNumber"], by_button["AccountReference"]) == (int(OTHER), "1002")

    # Paid: the receipt goes by SMS too, with the pay link.
    await h.callback(stk_callback(push["_checkout"], 0, amount=2500))
    await until(lambda: _has(providers, CUSTOMER, 3), "the receipt")
    await settle(h)
    assert sms_to(providers, CUSTOMER)[2:] == [
        f"Paid - Invoice #1001 (KES 2,500). Receipt: NLJ7RT61SV. Thank you! Details: {by_sms['pay_link']}"]


async def _has(providers: FakeProviders, msisdn: str, n: int) -> bool:
    return len(sms_to(providers, msisdn)) >= n


PAY_WORDS = ["PAY", "pay", "  Pay  ", "Pay now", "PAY 1001", "pay #1001", "Pay inv-1001"]


async def test_pay_alone_with_exactly_one_open_invoice_pays_that_one(h: Handle, providers: FakeProviders) -> None:
    # One customer per way of saying it, each with one open invoice.
    customers = [f"2547120000{n:02d}" for n in range(len(PAY_WORDS))]
    for n, msisdn in enumerate(customers):
        providers.wa_fail_for[msisdn] = NOT_ON_WHATSAPP
        await new_invoice(h, msisdn, 100 + n)
    for n, (msisdn, text) in enumerate(zip(customers, PAY_WORDS, strict=True)):
        await text_in(h, msisdn, text.replace("1001", str(1001 + n)))
        push = providers.daraja.pushes[-1]
        assert (len(providers.daraja.pushes), push["PhoneNumber"], push["AccountReference"], push["Amount"]) == (
            n + 1, int(msisdn), str(1001 + n), 100 + n), text
        assert sms_to(providers, msisdn)[1:] == [prompt_sent(str(1001 + n), str(100 + n), f"0712...0{n:02d}")], text


async def test_pay_with_two_open_invoices_names_them_and_starts_nothing(h: Handle, providers: FakeProviders) -> None:
    await new_invoice(h, CUSTOMER, 2500, "Cleaning service")
    await new_invoice(h, CUSTOMER, 300, "Airtime top-up")
    await text_in(h, CUSTOMER, "PAY")
    assert providers.daraja.pushes == []
    assert sms_to(providers, CUSTOMER)[2:] == [
        "Unpaid: #1001 (KES 2,500), #1002 (KES 300). Reply PAY 1001 (or another number) to Pay with M-PESA."]
    # Naming one of them starts that one.
    await text_in(h, CUSTOMER, "PAY 1002")
    assert [(p["AccountReference"], p["Amount"]) for p in providers.daraja.pushes] == [("1002", 300)]
    assert sms_to(providers, CUSTOMER)[3:] == [prompt_sent("1002", "300", "0712...678")]


async def test_pay_for_someone_elses_or_an_unknown_invoice_starts_nothing(h: Handle, providers: FakeProviders) -> None:
    await new_invoice(h, CUSTOMER, 2500)
    await new_invoice(h, OTHER, 300, "Airtime top-up")
    await text_in(h, CUSTOMER, "PAY 1002")  # OTHER's invoice: no prompt on anyone's phone
    await text_in(h, CUSTOMER, "PAY 9999")
    assert providers.daraja.pushes == []
    hint = "Invoice #1001 (KES 2,500) is unpaid. Reply PAY 1001 to Pay with M-PESA."
    assert sms_to(providers, CUSTOMER)[1:] == [hint, hint]
    assert sms_to(providers, OTHER)[1:] == []


async def test_other_text_gets_a_short_reply_by_sms(h: Handle, providers: FakeProviders) -> None:
    await new_invoice(h, CUSTOMER)
    await text_in(h, CUSTOMER, "Thanks, I will pay on Friday")
    assert sms_to(providers, CUSTOMER)[1:] == ["Invoice #1001 (KES 2,500) is unpaid. Reply PAY 1001 to Pay with M-PESA."]
    # Someone without invoices.
    await text_in(h, STRANGER, "Hello?")
    assert sms_to(providers, STRANGER) == ["You have no open invoices right now. Thank you!"]
    # A chatty customer is not answered on every line (customer_hint_interval_s).
    await text_in(h, CUSTOMER, "ok")
    assert len(sms_to(providers, CUSTOMER)) == 2
    assert providers.daraja.pushes == []
    for text in sms_to(providers, CUSTOMER) + sms_to(providers, STRANGER):
        assert (copy.gsm7_length(text) or 999) <= 160, text


async def test_the_merchants_own_number_is_ignored(h: Handle, providers: FakeProviders) -> None:
    for sender in (f"+{MERCHANT}", MERCHANT):
        response = await h.client.post(SMS_INBOUND, data=inbound_form(
            MERCHANT, "invoice 0712345678 2500 Cleaning service", **{"from": sender}))
        assert response.status_code == 200 and response.json() == {"status": "ignored"}
    await settle(h)
    assert await count(h, "SELECT COUNT(*) FROM inbox") == 0
    assert await count(h, "SELECT COUNT(*) FROM invoices") == 0
    assert providers.sent == [] and providers.requests == []


MALFORMED_INBOUND: list[tuple[bytes, str | None]] = [
    (b"", "application/x-www-form-urlencoded"),
    (b"id=&from=&text=", "application/x-www-form-urlencoded"),
    (b"from=%2B254712345678&text=PAY", "application/x-www-form-urlencoded"),           # no id
    (b"id=abc-1&text=PAY", "application/x-www-form-urlencoded"),                        # no from
    (b"id=abc-2&from=not+a+number&text=PAY", "application/x-www-form-urlencoded"),
    (b"id=abc-3&from=%2B254712345678%00&text=PAY", "application/x-www-form-urlencoded"),
    (b"\xff\xfe\x00\x01garbage=\xc3(", "application/x-www-form-urlencoded"),
    (b"%%%===&&&%zz", "application/x-www-form-urlencoded"),
    (b'{"id": "abc-4", "from": "+254712345678", "text": "PAY"}', "application/json"),
    (b'{"id": "abc-5", "from": "+254712345678", "text": "PAY"}', "application/x-www-form-urlencoded"),
    (b"--x\r\nContent-Disposition: form-data; name=\"id\"\r\n\r\n", "multipart/form-data; boundary=x"),
    (b"id=abc-6&from=%2B254712345678", None),
]

MALFORMED_REPORTS: list[tuple[bytes, str | None]] = [
    (b"", "application/x-www-form-urlencoded"),
    (b"status=Success&phoneNumber=%2B254712345678", "application/x-www-form-urlencoded"),  # no id
    (b"id=ATXid_1", "application/x-www-form-urlencoded"),                                  # no status
    (b"id=&status=", "application/x-www-form-urlencoded"),
    (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded"),
    (b"id=%E0%A4%A&status=%", "application/x-www-form-urlencoded"),
    (b'{"id": "ATXid_1", "status": "Success"}', "application/json"),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
    (b"id=ATXid_1&status=Success&retryCount=99999999999999999999", "application/x-www-form-urlencoded"),
    (b"id=ATXid_2&status=Success", None),
]


async def test_malformed_callbacks_never_get_a_5xx(h: Handle, providers: FakeProviders) -> None:
    for path, cases in ((SMS_INBOUND, MALFORMED_INBOUND), (SMS_STATUS, MALFORMED_REPORTS)):
        for body, content_type in cases:
            headers = {"Content-Type": content_type} if content_type else {}
            response = await h.client.post(path, content=body, headers=headers)
            assert response.status_code < 500, (path, body, response.status_code, response.text)
    # A wrong method is a 405, not a crash.
    assert (await h.client.get(SMS_INBOUND)).status_code == 405
    # No inbound message was stored; a report is kept only with an id and a status (those for
    # messages we never sent are dropped by the delivery tracker later).
    stored = await q(h, "SELECT actor, actor_key, payload FROM inbox WHERE source = 'sms' ORDER BY seq")
    assert [r["actor"] for r in stored] == ["delivery", "delivery"]
    assert stored[1]["actor_key"] == "ATXid_1" and loads(stored[1]["payload"])["status"] == "Success"
    assert all(r["actor_key"] and loads(r["payload"])["status"] for r in stored)
    assert providers.sent == [] and providers.daraja.pushes == []


async def test_a_callback_token_when_set_refuses_callbacks_without_it(database_url: str) -> None:
    providers = FakeProviders()
    providers.wa_fail_for[CUSTOMER] = NOT_ON_WHATSAPP
    settings = make_settings(database_url, SMS_CALLBACK_TOKEN=CALLBACK_TOKEN)
    async with running_daemon(settings, providers=providers) as h:
        await new_invoice(h, CUSTOMER)
        mid = providers.to(CUSTOMER)[0].message_id
        report = {"id": mid, "status": "Success", "phoneNumber": f"+{CUSTOMER}", "networkCode": "63902"}
        for suffix in ("", "?token=", "?token=wrong-token-0123456789", f"?TOKEN={CALLBACK_TOKEN}"):
            refused = await h.client.post(f"/sms/inbound{suffix}", data=inbound_form(CUSTOMER, "PAY 1001"))
            assert refused.status_code == 403, suffix
            assert (await h.client.post(f"/sms/status{suffix}", data=report)).status_code == 403, suffix
        await settle(h)
        assert await count(h, "SELECT COUNT(*) FROM inbox WHERE source = 'sms'") == 0
        assert providers.daraja.pushes == []
        ok = await h.client.post(f"/sms/inbound?token={CALLBACK_TOKEN}", data=inbound_form(CUSTOMER, "PAY 1001"))
        assert ok.status_code == 200
        assert (await h.client.post(f"/sms/status?token={CALLBACK_TOKEN}", data=report)).status_code == 200
        await settle(h)
        assert [p["AccountReference"] for p in providers.daraja.pushes] == ["1001"]
        assert await count(h, "SELECT COUNT(*) FROM outbox WHERE provider_message_id = :m AND status = 'DELIVERED'",
                           {"m": mid}) == 1


# -- delivery reports ---------------------------------------------------------------------------------


async def post_report(h: Handle, **form: str) -> None:
    response = await h.client.post(SMS_STATUS, data=form)
    assert response.status_code == 200, response.text
    await settle(h)


async def outbox_by_mid(h: Handle, mid: str) -> dict[str, Any]:
    (row,) = await q(h, "SELECT * FROM outbox WHERE provider_message_id = :m", {"m": mid})
    return row


async def report_log(h: Handle, mid: str) -> list[tuple[str, str, str | None]]:
    found = await q(h, "SELECT event, payload FROM message_log WHERE channel = 'SMS' AND direction = 'OUT'")
    out = []
    for r in found:
        payload = loads(r["payload"]) or {}
        if payload.get("provider_message_id") == mid and "status" in payload:
            out.append((r["event"], payload["status"], payload.get("reason")))
    return sorted(out)


async def test_delivery_reports_move_the_row_forward_and_are_logged_once(h: Handle, providers: FakeProviders) -> None:
    await new_invoice(h, CUSTOMER)
    mid = providers.to(CUSTOMER)[0].message_id
    assert (await outbox_by_mid(h, mid))["status"] == "SENT"
    await post_report(h, id=mid, status="Buffered", phoneNumber=f"+{CUSTOMER}", networkCode="63902", retryCount="0")
    assert (await outbox_by_mid(h, mid))["status"] == "SENT"
    await post_report(h, id=mid, status="Success", phoneNumber=f"+{CUSTOMER}", networkCode="63902", retryCount="0",
                      someNewField="x")
    assert (await outbox_by_mid(h, mid))["status"] == "DELIVERED"
    invoice = (await h.client.get("/invoices/1001", headers=AUTH)).json()
    assert (invoice["channel"], invoice["delivery_state"]) == ("SMS", "delivered")
    # Africa's Talking repeats itself, and a late "Sent" arrives after the "Success".
    await post_report(h, id=mid, status="Success", phoneNumber=f"+{CUSTOMER}", networkCode="63902")
    await post_report(h, id=mid, status="Sent", phoneNumber=f"+{CUSTOMER}", networkCode="63902")
    assert (await outbox_by_mid(h, mid))["status"] == "DELIVERED"
    assert await report_log(h, mid) == [("buffered", "Buffered", None), ("sent", "Sent", None),
                                        ("success", "Success", None)]
    assert await count(h, "SELECT COUNT(*) FROM inbox WHERE actor = 'delivery' AND actor_key = :m", {"m": mid}) == 3
    assert len(providers.to(CUSTOMER)) == 1  # a report never resends anything


async def test_a_failed_report_fails_the_row_with_the_reason_and_tells_the_merchant(
        h: Handle, providers: FakeProviders) -> None:
    await new_invoice(h, OTHER, 300, "Airtime top-up")
    mid = providers.to(OTHER)[0].message_id
    await post_report(h, id=mid, status="Failed", phoneNumber=f"+{OTHER}", networkCode="63902",
                      failureReason="UserIsInactive", retryCount="3")
    await post_report(h, id=mid, status="Failed", phoneNumber=f"+{OTHER}", networkCode="63902",
                      failureReason="UserIsInactive", retryCount="3")  # again
    await post_report(h, id=mid, status="Success", phoneNumber=f"+{OTHER}", networkCode="63902")  # too late
    row = await outbox_by_mid(h, mid)
    assert row["status"] == "FAILED" and "UserIsInactive" in row["last_error"]
    assert await report_log(h, mid) == [("failed", "Failed", "UserIsInactive"), ("success", "Success", None)]
    assert (await h.client.get("/invoices/1001", headers=AUTH)).json()["status"] == "FAILED"
    assert [t for t in providers.texts(MERCHANT) if "could not be delivered" in t] == [
        "Invoice #1001 (KES 300) could not be delivered to 0722\u2026111 by WhatsApp or SMS.\n"
        "Check the number, then send a new invoice."]
    assert len(providers.to(OTHER)) == 1


# -- the SMS texts ---------------------------------------------------------------------------------------


async def test_every_sms_is_one_gsm7_message_and_invoice_texts_carry_number_amount_and_link(
        h: Handle, providers: FakeProviders) -> None:
    fancy = "Caf\u00e9 \u2014 \u201cdeluxe\u201d deep-clean \U0001f9f9 of 3 rooms, windows & the balcony (2nd floor)"
    first = await new_invoice(h, CUSTOMER, 250_000, fancy)
    second = await new_invoice(h, OTHER, 300, "Airtime top-up")
    # The merchant nudges the first customer and cancels the second invoice.
    await h.say(MERCHANT, "remind 1001")
    await h.say(MERCHANT, "cancel 1002")
    await settle(h)
    await text_in(h, CUSTOMER, "PAY")
    (push,) = providers.daraja.pushes
    await h.callback(stk_callback(push["_checkout"], 0, amount=250_000))
    await until(lambda: _has(providers, CUSTOMER, 4), "the receipt")
    await settle(h)
    link = first["pay_link"]
    assert link.startswith("https://pay.test/p/") and len(link) == len("https://pay.test/p/") + 24
    assert sms_to(providers, CUSTOMER) == [
        f"Invoice #1001, KES 250,000 for Caf\u00e9 - \"deluxe\" deep-clean ? of 3 rooms, windows & the balcony (... "
        f"Pay with M-PESA: {link}",
        f"Reminder: Invoice #1001, KES 250,000 is still unpaid. Pay with M-PESA: {link}",
        prompt_sent("1001", "250,000", "0712...678"),
        f"Paid - Invoice #1001 (KES 250,000). Receipt: NLJ7RT61SV. Thank you! Details: {link}",
    ]
    assert sms_to(providers, OTHER) == [
        invoice_sms(second, "300", "Airtime top-up"),
        "Invoice #1002 (KES 300) has been cancelled. You don't need to pay it.",
    ]
    every = [s for s in providers.sent if s.kind == "sms"]
    assert len(every) == 6
    for s in every:
        length = copy.gsm7_length(s.text)
        assert length is not None and length <= 160, (length, s.text)
    for text in sms_to(providers, CUSTOMER)[:2] + sms_to(providers, CUSTOMER)[3:]:
        assert "Invoice #1001" in text and "KES 250,000" in text and link in text
    # Every one of them is in the message log, and no credential is.
    logged = await q(h, "SELECT event, payload FROM message_log WHERE channel = 'SMS' AND direction = 'OUT'")
    assert sum(1 for r in logged if r["event"] == "sent") == 6
    secret = h.daemon.callback_secret
    assert secret
    everything = " ".join(str(r["payload"]) for r in await q(h, "SELECT payload FROM message_log"))
    for credential in ("at-api-key-for-tests", "EAAG-test-token", "test_app_secret", "cs-test", secret):
        assert credential not in everything, credential


async def test_a_failed_payment_tells_an_sms_customer_how_to_try_again_by_sms(
        h: Handle, providers: FakeProviders) -> None:
    invoice = await new_invoice(h, CUSTOMER)
    await text_in(h, CUSTOMER, "PAY 1001")
    (push,) = providers.daraja.pushes
    await h.callback(stk_callback(push["_checkout"], 1032))
    await until(lambda: _has(providers, CUSTOMER, 3), "the failure notice")
    await settle(h)
    notice = sms_to(providers, CUSTOMER)[2]
    assert notice.startswith("You cancelled the M-PESA prompt for Invoice #1001 (KES 2,500).")
    assert "PAY 1001" in notice or invoice["pay_link"] in notice, notice
