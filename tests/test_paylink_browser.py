"""The pay-link page in a real browser: headless Chromium with JavaScript switched off loads
``/p/<token>``, taps "Pay with M-PESA", and lands on the page saying the prompt was sent, with
exactly one STK push made (issue 4, item 5).

The daemon runs in-process (``running_daemon``) on a port bound here, with
``server.public_url`` = ``http://127.0.0.1:<port>``: the browser then sees the CSRF cookie as
not Secure-only and sends an Origin the daemon recognises. Live-mode settings insist on an
https public URL, so the test sets it on the loaded settings (``dataclasses.replace``).

Skipped with the reason when chromium/chromedriver are missing; failed instead when
INVOICEIQ_TEST_REQUIRE_BROWSER=1 (CI). The browser is driven from a worker thread: its calls
block, and the daemon answering them lives in this test's event loop.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from browser import Browser, eventually, free_port, require_browser, start_browser
from harness import ADMIN_TOKEN, CUSTOMER, MERCHANT, FakeProviders, make_settings, running_daemon

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

PROMPT_SENT = "The M-PESA prompt was sent to 0712\u2026678. Check your phone and enter your M-PESA PIN."
NO_JS_PROBE = "data:text/html,<title>scripts-off</title><script>document.title='scripts-on'</script>"


@pytest.fixture(autouse=True)
def _browser_installed() -> None:
    require_browser()  # skip without Chromium; fail instead under INVOICEIQ_TEST_REQUIRE_BROWSER=1


def tap_pay(b: Browser, page_url: str, pushes: list[dict[str, Any]]) -> dict[str, Any]:
    """The customer's side, in the browser: what they saw before and after tapping Pay."""
    b.go(NO_JS_PROBE)
    assert b.title() == "scripts-off", "JavaScript is not switched off in this browser"
    b.go(page_url)
    before = {
        "title": b.title(), "merchant": b.text("h1"), "number": b.text("p.muted"),
        "details": [b.text(f"dl > :nth-child({n})") for n in range(1, 9)],
        "button": b.text("button#pay"), "forms": len(b.find_all("form")),
        "cookies": {c["name"]: c for c in b.cookies()},
    }
    assert pushes == []
    b.click("button#pay")
    note = eventually(lambda: (t := b.text("p.note")) == PROMPT_SENT and t, 15, "the page to say the prompt was sent")
    return {"before": before, "url": b.url(), "note": note, "forms_after": len(b.find_all("form"))}


async def test_the_pay_link_page_loaded_and_submitted_in_chromium(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    loaded = make_settings(f"sqlite:///{tmp_path / 'invoiceiq.db'}", INVOICEIQ_SERVER_BIND=f"127.0.0.1:{port}")
    settings = replace(loaded, server=replace(loaded.server, public_url=base))
    providers = FakeProviders()
    async with running_daemon(settings, providers=providers) as h:
        created = await h.client.post("/invoices", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, json={
            "msisdn": "0712345678", "amount_cents": 250_000, "description": "Cleaning service",
            "customer_name": "Mary Wanjiku"})
        assert created.status_code == 201, created.text
        invoice = created.json()
        token = invoice["pay_link"].removeprefix(f"{base}/p/")
        assert invoice["pay_link"] == f"{base}/p/{token}"
        await h.wait_for_texts(MERCHANT, 1)  # delivered, confirmed: nothing else in flight

        def customer() -> dict[str, Any]:
            with start_browser(window="412,915", javascript=False) as b:  # a phone-sized window
                return tap_pay(b, invoice["pay_link"], providers.daraja.pushes)

        with anyio.fail_after(90):
            seen = await anyio.to_thread.run_sync(customer)
        await h.wait_for(lambda: len(providers.daraja.pushes) >= 1, what="the STK push")

        before = seen["before"]
        assert before["title"] == "Invoice #1001"
        assert (before["merchant"], before["number"]) == ("My Business", "Invoice #1001")
        assert before["details"] == ["Amount", "KES 2,500", "For", "Mary Wanjiku", "Item", "Cleaning service",
                                     "Status", "Unpaid"]
        assert (before["button"], before["forms"]) == ("Pay with M-PESA", 1)
        csrf = before["cookies"]["iq_csrf"]
        assert csrf["httpOnly"] is True and csrf["sameSite"] == "Strict" and csrf["path"] == "/p/"
        assert csrf["secure"] is False  # the public URL is http here; https makes it Secure
        # After the tap: back on the invoice page, which says where the prompt went.
        assert seen["url"].startswith(f"{base}/p/{token}?requested=")
        assert seen["note"] == PROMPT_SENT and seen["forms_after"] == 0
        (push,) = providers.daraja.pushes
        assert (push["PhoneNumber"], push["Amount"], push["AccountReference"]) == (int(CUSTOMER), 2500, "1001")
        assert push["CallBackURL"] == f"{base}/payments/stk/callback/{h.daemon.callback_secret}"
