"""The sandbox console of the real daemon, clicked through in a headless Chromium (issue 6).

``python -m invoiceiq serve`` in sandbox mode (a subprocess with its own SQLite file); the test
only uses the page, as a person would: the merchant types the README's one-line invoice, the
customer taps "Pay with M-PESA", enters a PIN in the M-PESA dialog, and both phones show the
receipt (brief 8.1).

Skipped with the reason when Chromium or chromedriver is missing, except under
INVOICEIQ_TEST_REQUIRE_BROWSER=1 (CI), where that is a failure (tests/browser.py).

With INVOICEIQ_TEST_SCREENSHOT=<path> the test also saves the console at 1280x800 once both
receipts are shown: that is how docs/img/sandbox-console.png (README "Try it") is made:

    INVOICEIQ_TEST_SCREENSHOT=docs/img/sandbox-console.png \\
        .venv/bin/python -m pytest -q tests/test_console_browser.py
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from browser import Browser, eventually, free_port, require_browser, start_browser

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
MERCHANT = "254711000111"
CUSTOMER = "254712345678"
WINDOW = (1280, 800)
SCREENSHOT_ENV = "INVOICEIQ_TEST_SCREENSHOT"


@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    require_browser()  # skip without Chromium; fail instead under INVOICEIQ_TEST_REQUIRE_BROWSER=1


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[str]:
    """The daemon as `make run` starts it (sandbox mode by default), on a free port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INVOICEIQ_", "WABA_", "MPESA_", "SMS_", "DATABASE_URL", "ADMIN_TOKEN", "MERCHANT_"))}
    env.update(INVOICEIQ_SERVER_BIND=f"127.0.0.1:{port}", DATABASE_URL=f"sqlite:///{tmp_path / 'invoiceiq.db'}",
               INVOICEIQ_MODE="sandbox")
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "invoiceiq", "serve"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            return httpx.get(base + "/readyz", timeout=1).status_code == 200

        eventually(ready, 30, "the daemon to be ready")
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    # Nairobi time in the browser too, so the chat clocks agree with M-PESA's SMS (EAT).
    monkeypatch.setenv("TZ", "Africa/Nairobi")
    with start_browser(window=f"{WINDOW[0]},{WINDOW[1]}") as b:
        set_viewport(b, *WINDOW)
        yield b


def set_viewport(b: Browser, width: int, height: int) -> None:
    """Make the page's viewport (not the window around it) ``width`` x ``height``."""
    b.go("about:blank")
    inner = b.js("return [window.innerWidth, window.innerHeight]")
    rect = b._call("GET", b._s("/window/rect"))  # W3C Get/Set Window Rect: tests/browser.py has neither
    b._call("POST", b._s("/window/rect"), {"width": rect["width"] + width - inner[0],
                                            "height": rect["height"] + height - inner[1]})
    assert b.js("return [window.innerWidth, window.innerHeight]") == [width, height]


def bubbles(b: Browser, role: str) -> list[dict[str, str]]:
    """The chat bubbles a phone shows: who wrote it and the text as drawn (links included)."""
    return b.js(
        "return Array.from(document.querySelectorAll('#' + arguments[0] + '-chat .msg')).map(m => ({"
        "from: m.dataset.from, status: m.dataset.status, text: m.querySelector('.body').textContent}))",
        role)


def shown(b: Browser, role: str, pattern: str) -> re.Match[str] | None:
    rx = re.compile(pattern)
    for bubble in bubbles(b, role):
        if bubble["from"] == "business" and (match := rx.fullmatch(bubble["text"])):
            return match
    return None


def test_merchant_invoices_customer_pays_with_pin_both_see_receipts(daemon: str, browser: Browser) -> None:
    b = browser
    b.go(daemon + "/sandbox/")
    banner = eventually(lambda: b.text("#banner"), what="the console")
    assert "SANDBOX" in banner and "no real money" in banner
    eventually(lambda: b.js("return document.getElementById('customer-number').value") == CUSTOMER,
               what="the console's first state")
    assert b.text("#merchant-number") == "+" + MERCHANT

    # The merchant types the README's one-line invoice.
    b.type("#merchant-input", "invoice 0712345678 2500 Cleaning")
    b.click("#merchant-send")
    confirmed = eventually(
        lambda: shown(b, "merchant", rf"Invoice #(\d+) sent to {CUSTOMER}\. Use 'remind \1' to nudge or 'cancel \1' "
                                     r"to cancel\."),
        15, "the merchant's confirmation")
    invoice_id = confirmed.group(1)

    # The customer's phone shows the invoice with its Pay button; tap it.
    pay = f'#customer-chat button.wa-button[data-button-title="Pay with M-PESA"][data-button-id="pay_now:{invoice_id}"]'
    eventually(lambda: b.find(pay), 15, "the Pay with M-PESA button")
    assert shown(b, "customer", rf"Hi Customer, you have a new invoice\.\nAmount: KES 2,500\nInvoice: #{invoice_id}\n"
                                rf"Pay here: {re.escape(daemon)}/p/\S+")
    b.click(pay)

    # The M-PESA PIN prompt: the right amount, account and business; enter a PIN and pay.
    eventually(lambda: b.js("return !document.getElementById('stk-dialog').hidden"), 15, "the M-PESA prompt")
    assert b.text("#stk-amount") == "2,500"
    assert b.text("#stk-account") == invoice_id
    assert b.text("#stk-merchant") == "InvoiceIQ Sandbox Shop"
    assert b.text("#stk-paybill") == "174379"
    b.type("#stk-pin", "1234")
    b.click("#stk-pay")
    eventually(lambda: b.js("return document.getElementById('stk-dialog').hidden"), what="the prompt to close")

    # Both phones show the receipt, word for word as in the brief (8.1), with the same M-PESA receipt.
    receipt_rx = rf"Paid \u2714 \u2014 Invoice #{invoice_id} \(KES 2,500\)\nReceipt: ([A-Z0-9]{{10}})\nThank you!"
    customer_receipt = eventually(lambda: shown(b, "customer", receipt_rx), 15, "the customer's receipt")
    merchant_receipt = eventually(lambda: shown(b, "merchant", receipt_rx), 15, "the merchant's receipt")
    receipt = customer_receipt.group(1)
    assert merchant_receipt.group(1) == receipt
    # ...and M-PESA's own confirmation SMS is in the customer's SMS inbox.
    sms = eventually(lambda: b.js("var li = document.querySelector('#customer-sms li[data-sms-id=\"' + arguments[0]"
                                  " + '\"]'); return li && li.textContent", receipt), what="the M-PESA SMS")
    assert f"{receipt} Confirmed. Ksh2,500.00 sent to InvoiceIQ Sandbox Shop for account {invoice_id}" in sms

    kinds = set(b.js("return Array.from(document.querySelectorAll('#event-log .event')).map(e => e.dataset.kind)"))
    assert {"wa.in", "wa.out", "stk.prompt", "stk.result"} <= kinds, kinds
    # The page marks what it shows as read: the receipt's ticks turn blue.
    eventually(lambda: any(m["status"] == "read" and m["text"].startswith("Paid") for m in bubbles(b, "customer")),
               what="the receipt to be read")

    if target := os.environ.get(SCREENSHOT_ENV, "").strip():
        save_screenshot(b, Path(target) if Path(target).is_absolute() else ROOT / target)


def save_screenshot(b: Browser, path: Path) -> None:
    """The viewport as a PNG, once the page has drawn everything and scrolled the chats down."""
    assert b.js("return [window.innerWidth, window.innerHeight]") == list(WINDOW)
    b.js("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);")
    # Two animation frames: whatever the last state drew is painted.
    b._call("POST", b._s("/execute/async"), {
        "script": "var done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(() => done(true)));",
        "args": []})
    png = base64.b64decode(b._call("GET", b._s("/screenshot")))  # W3C Take Screenshot
    assert png.startswith(b"\x89PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    print(f"saved {path} ({len(png)} bytes)")
