"""The pay-link page ``/p/<token>`` and its ``Pay with M-PESA`` form, over plain HTTP (no
JavaScript anywhere), and invoices made through the admin API (issue 4, items 5 and 6).

The page: merchant name, invoice number, amount, description and status; 404 for a token that
is not an invoice's; a paid invoice shows its receipt, a cancelled one says so. The POST: the
CSRF cookie and the form field must match (else 403, no STK push), a cross-site Origin is a 403,
more than 10 posts a minute from one address is a 429; success is a 303 back to the page and
exactly one STK push. The headers keep the token from leaking (no-referrer, no-store) and the
page from being framed.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from harness import (
    AUTH,
    until,
    CUSTOMER,
    MERCHANT,
    FakeProviders,
    Handle,
    Sent,
    inbound_text,
    make_settings,
    running_daemon,
    stk_callback,
)
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio

OTHER = "254722000111"
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "content-security-policy": CSP,
}
PROMPT_SENT = "The M-PESA prompt was sent to 0712\u2026678. Check your phone and enter your M-PESA PIN."
CSRF_FIELD = re.compile(r'<input type="hidden" name="csrf" value="([^"]+)">')


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture
def providers() -> FakeProviders:
    return FakeProviders()


@pytest.fixture
async def h(database_url: str, providers: FakeProviders) -> AsyncIterator[Handle]:
    async with running_daemon(make_settings(database_url), providers=providers) as handle:
        yield handle




async def count(h: Handle, sql: str, params: dict[str, Any] | None = None) -> int:
    async def job(tx: Tx) -> int:
        return int(await tx.val(sql, params) or 0)
    return await h.store.read(job)


async def settle(h: Handle) -> None:
    """Every inbox event processed, every send gone, and no STK push waiting for Daraja's answer."""
    async def idle() -> bool:
        busy = await count(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL)"
                              " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING'))"
                              " + (SELECT COUNT(*) FROM payments p JOIN stk_attempts a ON a.payment_id = p.id"
                              "    WHERE p.status = 'INITIATED' AND a.checkout_request_id IS NULL)")
        assert h.daemon.outbox is not None
        return busy == 0 and h.daemon.outbox.in_flight == 0
    await until(idle, "the daemon to settle")


async def new_invoice(h: Handle, msisdn: str = CUSTOMER, amount_kes: int = 2500,
                      description: str = "Cleaning service", name: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"msisdn": msisdn, "amount_cents": amount_kes * 100, "description": description}
    if name is not None:
        body["customer_name"] = name
    response = await h.client.post("/invoices", headers=AUTH, json=body)
    assert response.status_code == 201, response.text
    await settle(h)
    return response.json()


def token_of(invoice: dict[str, Any]) -> str:
    link = invoice["pay_link"]
    assert link.startswith("https://pay.test/p/")
    return link.removeprefix("https://pay.test/p/")


def csrf_cookie(response: httpx.Response) -> str | None:
    for header in response.headers.get_list("set-cookie"):
        name, _, rest = header.partition("=")
        if name.strip() == "iq_csrf":
            return rest.split(";", 1)[0]
    return None


async def open_page(h: Handle, token: str, query: str = "") -> tuple[httpx.Response, str | None, str | None]:
    """GET the page: the response, the CSRF cookie it set and the CSRF form field it holds."""
    response = await h.client.get(f"/p/{token}{query}")
    match = CSRF_FIELD.search(response.text)
    return response, csrf_cookie(response), match.group(1) if match else None


async def post_pay(h: Handle, token: str, *, cookie: str | None, field: str | None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
    sent_headers = dict(headers or {})
    if cookie is not None:
        sent_headers["Cookie"] = f"iq_csrf={cookie}"
    data = {"csrf": field} if field is not None else {}
    # The client's own jar stays out of it: the cookie is exactly what the test says.
    h.client.cookies.clear()
    return await h.client.post(f"/p/{token}/pay", data=data, headers=sent_headers)


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.headers.get(name))
    assert response.headers["content-type"] == "text/html; charset=utf-8"


def no_javascript(html: str) -> None:
    lowered = html.lower()
    assert "<script" not in lowered and "javascript:" not in lowered and " onclick" not in lowered


def template_params(s: Sent) -> list[str]:
    assert s.kind == "template", s.body
    body = [c for c in s.body["template"]["components"] if c["type"] == "body"]
    return [p["text"] for p in body[0]["parameters"]]


# -- the page -------------------------------------------------------------------------------------------


async def test_the_page_shows_the_invoice_and_a_pay_button_that_needs_no_javascript(h: Handle) -> None:
    invoice = await new_invoice(h, name="Mary Wanjiku", description="Deep clean <b>kitchen</b> & \"lounge\"")
    token = token_of(invoice)
    assert len(token) >= 24 and invoice["id"] not in token  # unguessable, not the invoice number
    response, cookie, field = await open_page(h, token)
    assert response.status_code == 200
    assert_security_headers(response)
    html = response.text
    assert '<meta name="viewport" content="width=device-width,initial-scale=1">' in html  # mobile first
    assert "<title>Invoice #1001</title>" in html
    assert "<h1>My Business</h1>" in html  # merchant.name
    assert '<p class="muted">Invoice #1001</p>' in html
    assert '<dt>Amount</dt><dd class="amount">KES 2,500</dd>' in html
    assert "<dt>For</dt><dd>Mary Wanjiku</dd>" in html
    # The description is the merchant's text: shown, never interpreted.
    assert "<dt>Item</dt><dd>Deep clean &lt;b&gt;kitchen&lt;/b&gt; &amp; &quot;lounge&quot;</dd>" in html
    assert "<dt>Status</dt><dd>Unpaid</dd>" in html
    assert f'<form method="post" action="/p/{token}/pay">' in html
    assert '<button type="submit" id="pay">Pay with M-PESA</button></form>' in html
    no_javascript(html)
    assert 'http-equiv="refresh"' not in html  # nothing to wait for yet
    # The CSRF value: a fresh random cookie, repeated in the form, HttpOnly and SameSite=Strict.
    assert cookie is not None and field == cookie and len(cookie) >= 32
    (set_cookie,) = response.headers.get_list("set-cookie")
    attributes = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "secure", "path"} <= attributes and "samesite=strict" in set_cookie.lower()
    assert "path=/p/" in set_cookie.lower()
    _, second_cookie, _ = await open_page(h, token)
    assert second_cookie != cookie


async def test_a_token_that_is_no_invoices_is_a_404(h: Handle) -> None:
    invoice = await new_invoice(h)
    token = token_of(invoice)
    for wrong in ("1001", token[:-1], token + "x", token.swapcase(), "A" * 65, "nope"):
        response = await h.client.get(f"/p/{wrong}")
        assert response.status_code == 404, wrong
        assert "<h1>Invoice not found</h1>" in response.text and "1001" not in response.text
        assert_security_headers(response)
        assert csrf_cookie(response) is None
    refused = await post_pay(h, "A" * 40, cookie="x" * 32, field="x" * 32)
    assert refused.status_code == 404
    await settle(h)
    assert h.providers.daraja.pushes == []


async def test_pay_with_the_csrf_cookie_and_field_starts_one_stk_push(h: Handle, providers: FakeProviders) -> None:
    invoice = await new_invoice(h)
    token = token_of(invoice)
    _, cookie, field = await open_page(h, token)
    response = await post_pay(h, token, cookie=cookie, field=field,
                              headers={"Origin": "https://pay.test", "Referer": f"https://pay.test/p/{token}"})
    assert response.status_code == 303
    assert re.fullmatch(rf"/p/{re.escape(token)}\?requested=\d+", response.headers["location"])
    # A double tap posts the same form again: still one prompt.
    again = await post_pay(h, token, cookie=cookie, field=field)
    assert again.status_code == 303
    await until(lambda: _pushes(providers, 1), "the STK push")
    await settle(h)
    (push,) = providers.daraja.pushes
    assert (push["PhoneNumber"], push["Amount"], push["AccountReference"]) == (int(CUSTOMER), 2500, "1001")
    assert await count(h, "SELECT COUNT(*) FROM stk_attempts WHERE source = 'paylink'") == 1
    # The page now says where the prompt went and refreshes itself; no second button meanwhile.
    page, new_cookie, new_field = await open_page(h, token, "?requested=1")
    assert page.status_code == 200 and PROMPT_SENT in page.text
    assert '<meta http-equiv="refresh" content="4">' in page.text
    assert new_field is None and new_cookie is None and "<form" not in page.text
    # The customer is not messaged about it (the page is the answer); only the invoice went out.
    assert [s.kind for s in providers.to(CUSTOMER)] == ["template"]


async def _pushes(providers: FakeProviders, n: int) -> bool:
    return len(providers.daraja.pushes) >= n


@pytest.mark.parametrize(("cookie", "field", "origin"), [
    ("COOKIE", None, None),              # no form field
    ("COOKIE", "", None),                # an empty one
    ("COOKIE", "wrong-value-0123456789abcdef", None),
    (None, "FIELD", None),               # no cookie (a cross-site post: SameSite=Strict kept it back)
    ("", "", None),
    ("COOKIE", "FIELD", "https://evil.example"),    # right values, posted from another site
    ("COOKIE", "FIELD", "http://pay.test"),         # not even the same scheme
    ("COOKIE", "FIELD", "https://pay.test.evil.example"),
])
async def test_a_forged_or_incomplete_post_is_refused_without_a_push(
        h: Handle, providers: FakeProviders, cookie: str | None, field: str | None, origin: str | None) -> None:
    invoice = await new_invoice(h)
    token = token_of(invoice)
    _, real_cookie, real_field = await open_page(h, token)
    use_cookie = real_cookie if cookie == "COOKIE" else cookie
    use_field = real_field if field in ("FIELD", "COOKIE") else field
    response = await post_pay(h, token, cookie=use_cookie, field=use_field,
                              headers={"Origin": origin} if origin else None)
    assert response.status_code == 403
    assert "<h1>Please try again</h1>" in response.text
    assert f'<a href="/p/{token}">Open the invoice</a> and tap Pay with M-PESA.' in response.text
    assert_security_headers(response)
    await settle(h)
    assert providers.daraja.pushes == []
    assert await count(h, "SELECT COUNT(*) FROM inbox WHERE actor = 'payment'") == 0


async def test_more_than_ten_posts_a_minute_from_one_address_are_refused(database_url: str) -> None:
    providers = FakeProviders()
    settings = make_settings(database_url, INVOICEIQ_SERVER_TRUSTED_PROXIES="127.0.0.1/32")
    async with running_daemon(settings, providers=providers) as h:
        invoice = await new_invoice(h)
        token = token_of(invoice)
        _, cookie, field = await open_page(h, token)
        client_a = {"X-Forwarded-For": "41.90.64.10"}
        for n in range(10):
            response = await post_pay(h, token, cookie=cookie, field="wrong", headers=client_a)
            assert response.status_code == 403, n
        limited = await post_pay(h, token, cookie=cookie, field=field, headers=client_a)
        assert limited.status_code == 429
        assert "<h1>Too many requests</h1>" in limited.text
        assert_security_headers(limited)
        # Another address is not held back by the first one's posts.
        other = await post_pay(h, token, cookie=cookie, field=field, headers={"X-Forwarded-For": "41.90.64.11"})
        assert other.status_code == 303
        await until(lambda: _pushes(providers, 1), "the STK push")
        await settle(h)
        assert len(providers.daraja.pushes) == 1
        # The page itself is still readable.
        assert (await h.client.get(f"/p/{token}", headers=client_a)).status_code == 200


async def test_a_paid_invoice_shows_its_receipt_and_no_button(h: Handle, providers: FakeProviders) -> None:
    invoice = await new_invoice(h)
    token = token_of(invoice)
    _, stale_cookie, stale_field = await open_page(h, token)  # a second tab, left open
    _, cookie, field = await open_page(h, token)
    assert (await post_pay(h, token, cookie=cookie, field=field)).status_code == 303
    await until(lambda: _pushes(providers, 1), "the STK push")
    await settle(h)
    assert (await h.callback(stk_callback(providers.daraja.pushes[0]["_checkout"], 0, amount=2500))).status_code == 200
    await until(lambda: _paid(h), "the invoice to be paid")
    await settle(h)
    page, new_cookie, new_field = await open_page(h, token)
    assert page.status_code == 200
    assert "<dt>Status</dt><dd>Paid</dd>" in page.text
    assert '<p class="note">Paid &#10004; Receipt: <strong>NLJ7RT61SV</strong>. Thank you!</p>' in page.text
    assert "<form" not in page.text and new_cookie is None and new_field is None
    assert 'http-equiv="refresh"' not in page.text
    # The other tab's form, posted after payment, starts nothing.
    assert (await post_pay(h, token, cookie=stale_cookie, field=stale_field)).status_code == 303
    await settle(h)
    assert len(providers.daraja.pushes) == 1


async def _paid(h: Handle) -> bool:
    return await count(h, "SELECT COUNT(*) FROM invoices WHERE status = 'PAID'") == 1


async def test_a_cancelled_invoice_says_so_and_cannot_be_paid(h: Handle, providers: FakeProviders) -> None:
    invoice = await new_invoice(h)
    token = token_of(invoice)
    _, cookie, field = await open_page(h, token)  # opened before the merchant cancels
    await h.say(MERCHANT, "cancel 1001")
    await settle(h)
    page, new_cookie, _ = await open_page(h, token)
    assert "<dt>Status</dt><dd>Cancelled</dd>" in page.text
    assert '<p class="note warn">This invoice was cancelled. There is nothing to pay.</p>' in page.text
    assert "<form" not in page.text and new_cookie is None
    assert (await post_pay(h, token, cookie=cookie, field=field)).status_code == 303
    await settle(h)
    assert providers.daraja.pushes == []


# -- invoices made through the admin API ------------------------------------------------------------------


async def test_an_api_invoice_is_delivered_like_a_chat_invoice_and_the_merchant_is_told(
        h: Handle, providers: FakeProviders) -> None:
    by_api = await new_invoice(h, CUSTOMER, 2500, "Cleaning service", name="Mary Wanjiku")
    (sent,) = providers.to(CUSTOMER)
    assert sent.body["template"]["name"] == "invoice_notification"
    assert sent.body["template"]["language"] == {"code": "en"}
    assert template_params(sent) == ["Mary Wanjiku", "2,500", "1001", by_api["pay_link"]]
    assert sent.button_ids == ["pay_now:1001"]
    confirmation = providers.to(MERCHANT)
    assert [s.text for s in confirmation] == [
        "Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."]
    assert confirmation[0].button_ids == ["remind 1001", "cancel 1001"]
    # The same invoice typed in the chat produces the same message, field for field.
    await h.say(MERCHANT, "invoice 0712345678 2500 Cleaning service")
    await settle(h)
    by_chat = providers.to(CUSTOMER)[1]
    assert by_chat.body["template"]["components"][1] == {**sent.body["template"]["components"][1], "parameters": [
        {"type": "payload", "payload": "pay_now:1002"}]}
    assert template_params(by_chat)[1:3] == ["2,500", "1002"]
    listed = (await h.client.get("/invoices/1001", headers=AUTH)).json()
    assert (listed["status"], listed["channel"]) == ("SENT", "WHATSAPP")


async def test_an_api_invoice_inside_the_window_is_the_interactive_message(h: Handle, providers: FakeProviders) -> None:
    response = await h.post_webhook(inbound_text(OTHER, "Hi, please send me the bill",
                                                 timestamp=int(h.daemon.clock.now_ms() // 1000)))
    assert response.status_code == 200
    await settle(h)
    before = len(providers.to(OTHER))  # the bot may answer the greeting with a hint
    await new_invoice(h, OTHER, 300, "Airtime top-up", name="John Otieno")
    (sent,) = providers.to(OTHER)[before:]
    assert sent.kind == "interactive"
    assert sent.text == "InvoiceIQ \u2014 Invoice #1001\nAmount: KES 300\nFor: John Otieno\nItem: Airtime top-up"
    assert sent.button_ids == ["pay_now:1001", "view_details:1001"]
    assert providers.texts(MERCHANT) == [
        "Invoice #1001 sent to 254722000111. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."]


async def test_an_api_invoice_to_someone_not_on_whatsapp_goes_by_sms_and_the_merchant_is_told_why(
        h: Handle, providers: FakeProviders) -> None:
    providers.wa_fail_for[CUSTOMER] = (400, {"error": {
        "message": "(#131026) Message undeliverable", "type": "OAuthException", "code": 131026,
        "error_data": {"messaging_product": "whatsapp", "details": "Message Undeliverable."}}})
    invoice = await new_invoice(h)
    assert [(s.kind, s.text) for s in providers.to(CUSTOMER)] == [
        ("sms", f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: {invoice['pay_link']}")]
    assert providers.texts(MERCHANT) == [
        "Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel.",
        "Invoice #1001 (KES 2,500) went to 0712\u2026678 by SMS because the number is not on WhatsApp.",
    ]


async def test_after_a_cancelled_prompt_the_page_stops_saying_a_prompt_is_on_its_way(
        h: Handle, providers: FakeProviders) -> None:
    invoice = await new_invoice(h)
    token = token_of(invoice)
    _, cookie, field = await open_page(h, token)
    assert (await post_pay(h, token, cookie=cookie, field=field)).status_code == 303
    await until(lambda: _pushes(providers, 1), "the STK push")
    await settle(h)
    assert PROMPT_SENT in (await open_page(h, token, "?requested=1"))[0].text
    # The customer cancels the M-PESA prompt on the phone (ResultCode 1032).
    assert (await h.callback(stk_callback(providers.daraja.pushes[0]["_checkout"], 1032))).status_code == 200
    await until(lambda: _attempt_over(h), "the attempt to be resolved")
    await settle(h)
    page, _, field_after = await open_page(h, token, "?requested=1")  # the page's own refresh
    assert field_after is not None  # the button is back, so a retry is possible
    assert "Sending the M-PESA prompt" not in page.text, page.text
    assert 'http-equiv="refresh"' not in page.text


async def _attempt_over(h: Handle) -> bool:
    return await count(h, "SELECT COUNT(*) FROM payments WHERE status = 'FAILED'") == 1


async def test_a_retry_within_the_phones_minute_is_refused_on_the_page_with_the_reason(
        h: Handle, providers: FakeProviders) -> None:
    """Daraja locks a phone for about a minute after a prompt: the page says so instead of
    showing "Sending the M-PESA prompt…" for a prompt that will never come."""
    invoice = await new_invoice(h)
    token = token_of(invoice)
    _, cookie, field = await open_page(h, token)
    assert (await post_pay(h, token, cookie=cookie, field=field)).status_code == 303
    await until(lambda: _pushes(providers, 1), "the STK push")
    assert (await h.callback(stk_callback(providers.daraja.pushes[0]["_checkout"], 1032))).status_code == 200
    await until(lambda: _attempt_over(h), "the attempt to be resolved")
    await settle(h)
    _, cookie, field = await open_page(h, token)
    response = await post_pay(h, token, cookie=cookie, field=field)
    assert response.status_code == 303
    assert response.headers["location"] == f"/p/{token}?refused=too_soon"
    page, _, field_after = await open_page(h, token, "?refused=too_soon")
    assert ("Please wait a minute before asking for another M-PESA prompt for Invoice #1001 (KES 2,500)."
            in page.text.replace("&#x27;", "'")), page.text
    assert "Sending the M-PESA prompt" not in page.text and field_after is not None
    await settle(h)
    assert len(providers.daraja.pushes) == 1
    assert await count(h, "SELECT COUNT(*) FROM inbox WHERE source = 'paylink'") == 1
