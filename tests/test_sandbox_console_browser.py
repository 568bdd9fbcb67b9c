"""Click through the console in a headless Chromium: the merchant types, the customer taps
"Pay with M-PESA", enters a PIN in the M-PESA dialog and reads an SMS link.

Plays the daemon's part itself over the provider APIs, against ``python -m invoiceiq.sandbox``
mounted at /sandbox. Drives Chromium with tests/browser.py (W3C WebDriver over httpx), so it
needs no Python package beyond the project's; skipped where chromium/chromedriver are not
installed, and failed instead when INVOICEIQ_TEST_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from browser import Browser, eventually, free_port, require_browser, start_browser, stop_process
from invoiceiq.sandbox.daraja import stk_password
from invoiceiq.sandbox.wire import nairobi_stamp

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
MERCHANT = "254711000111"
CUSTOMER = "254712345678"


@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    require_browser()  # skip without Chromium; fail instead under INVOICEIQ_TEST_REQUIRE_BROWSER=1


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"status_delay_ms": 0, "callback_delay_ms": 0}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "invoiceiq.sandbox",
            "--bind",
            f"127.0.0.1:{port}",
            "--config",
            str(config),
            "--prefix",
            "/sandbox",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/sandbox"
    try:
        eventually(lambda: httpx.get(base + "/api/state", timeout=1).status_code == 200, 15, "the sandbox to listen")
        yield base
    finally:
        stop_process(proc)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with start_browser() as b:
        yield b


def test_click_through_an_invoice_and_a_payment(sandbox: str, browser: Browser) -> None:
    api = httpx.Client(base_url=sandbox, timeout=10)
    state = lambda: api.get("/api/state").json()  # noqa: E731
    phone = lambda m: next(p for p in state()["phones"] if p["msisdn"] == m)  # noqa: E731

    browser.go(sandbox)  # no trailing slash on purpose
    banner = eventually(lambda: browser.js("return document.getElementById('banner').textContent"), what="banner")
    assert "SANDBOX" in banner and "no real money" in banner
    eventually(
        lambda: browser.js("return document.getElementById('customer-number').value") == CUSTOMER, what="console state"
    )

    # The merchant types to the bot.
    browser.type("#merchant-input", "invoice 254712345678 1500 10 bags cement")
    browser.click("#merchant-send")
    eventually(
        lambda: phone(MERCHANT)["thread"] and phone(MERCHANT)["thread"][-1]["text"].startswith("invoice"),
        what="merchant message",
    )

    # The daemon sends the customer a template with the Pay button.
    graph = {"Authorization": "Bearer sandbox-wa-token"}
    template = {
        "messaging_product": "whatsapp",
        "to": CUSTOMER,
        "type": "template",
        "template": {
            "name": "invoice_notification",
            "language": {"code": "en"},
            "components": [
                {
                    "type": "body",
                    "parameters": [
                        {"type": "text", "text": t} for t in ("Wanjiku", "1,500", "INV-42", "http://pay.test/i/42")
                    ],
                },
                {
                    "type": "button",
                    "sub_type": "quick_reply",
                    "index": "0",
                    "parameters": [{"type": "payload", "payload": "pay:INV-42"}],
                },
            ],
        },
    }
    wamid = api.post("/graph/v25.0/106540352242922/messages", json=template, headers=graph).json()["messages"][0]["id"]
    pay = '#customer-chat [data-button-title="Pay with M-PESA"]'
    eventually(lambda: browser.find(pay), what="the Pay button")
    assert browser.js(f"return document.querySelector('{pay}').dataset.messageId") == wamid
    # Shown on screen, so it is read.
    eventually(lambda: phone(CUSTOMER)["thread"][0]["status"] == "read", what="read status")
    browser.click(pay)
    tap = eventually(lambda: [m for m in phone(CUSTOMER)["thread"] if m["from_phone"]], what="the tap")
    assert (tap[0]["type"], tap[0]["context_id"], tap[0]["text"]) == ("button", wamid, "Pay with M-PESA")

    # The daemon pushes the STK prompt; the customer pays with a PIN in the dialog.
    bearer = api.get(
        "/daraja/oauth/v1/generate?grant_type=client_credentials",
        auth=("sandbox-consumer-key", "sandbox-consumer-secret"),
    ).json()["access_token"]
    stamp = nairobi_stamp(time.time())
    secret = stk_password("174379", "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919", stamp)
    push = {
        "BusinessShortCode": "174379",
        "Password": secret,
        "Timestamp": stamp,
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 1500,
        "PartyA": CUSTOMER,
        "PartyB": "174379",
        "PhoneNumber": CUSTOMER,
        "CallBackURL": "http://127.0.0.1:9/cb",
        "AccountReference": "INV42",
        "TransactionDesc": "Invoice 42",
    }
    checkout_id = api.post(
        "/daraja/mpesa/stkpush/v1/processrequest", json=push, headers={"Authorization": f"Bearer {bearer}"}
    ).json()["CheckoutRequestID"]
    eventually(lambda: browser.js("return !document.getElementById('stk-dialog').hidden"), what="the PIN dialog")
    assert browser.js("return document.getElementById('stk-amount').textContent") == "1,500"
    assert browser.js("return document.getElementById('stk-account').textContent") == "INV42"
    browser.type("#stk-pin", "1234")
    browser.click("#stk-pay")
    query = {"BusinessShortCode": "174379", "Password": secret, "Timestamp": stamp, "CheckoutRequestID": checkout_id}
    answer = eventually(
        lambda: (
            (
                r := api.post(
                    "/daraja/mpesa/stkpushquery/v1/query", json=query, headers={"Authorization": f"Bearer {bearer}"}
                )
            ).status_code
            == 200
            and r.json()
        ),
        what="the payment",
    )
    assert answer["ResultCode"] == "0"
    eventually(lambda: browser.js("return document.getElementById('stk-dialog').hidden"), what="the dialog to close")

    # An SMS with a link shows in the inbox; the link opens in a new tab.
    sms = {"username": "sandbox", "to": "+" + CUSTOMER, "message": "Pay INV-42: http://pay.test/i/42"}
    assert (
        api.post(
            "/at/version1/messaging", data=sms, headers={"apiKey": "sandbox-at-api-key", "Accept": "application/json"}
        ).status_code
        == 201
    )
    link = eventually(
        lambda: browser.js("var a = document.querySelector('#customer-sms a'); return a && [a.href, a.target]"),
        what="the SMS link",
    )
    assert link == ["http://pay.test/i/42", "_blank"]

    # The not-on-WhatsApp switch reaches the simulator.
    browser.click("#customer-not-on-whatsapp")
    eventually(lambda: phone(CUSTOMER)["on_whatsapp"] is False, what="the switch")
    kinds = eventually(
        lambda: browser.js(
            "return Array.from(document.querySelectorAll('#event-log .event')).map(e => e.dataset.kind)"
        ),
        what="log",
    )
    assert {"wa.in", "wa.out", "stk.prompt", "stk.result", "sms.out"} <= set(kinds)
