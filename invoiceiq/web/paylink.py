"""The pay-link page: ``/p/<token>`` shows an invoice and a Pay with M-PESA button.

For customers the WhatsApp buttons cannot reach (the SMS carries this link). The token is
unguessable (not the invoice number). It works without JavaScript: the button is a form
POST protected against cross-site forgery (a SameSite=Strict cookie that must match a
hidden field, and the Origin header when the browser sends one), rate-limited per address,
and the page refreshes itself while the M-PESA prompt is out.
"""

from __future__ import annotations

import html
import secrets
import time
from collections import deque

from quart import Blueprint, Response, redirect, request

from ..actors import effects
from ..core import copy, settlement, validate
from ..core.model import Invoice, InvoiceStatus, PaymentStatus, format_kes
from ..observability import get_logger
from ..store import StoreError, Tx, inbox, invoices, payments
from ..store.payments import Attempt
from .common import client_ip, secrets_equal, store_durably
from .context import services

bp = Blueprint("paylink", __name__)
log = get_logger(__name__)
CSRF_COOKIE = "iq_csrf"
RATE_LIMIT = 10          # pay requests per address...
RATE_WINDOW_S = 60.0     # ...per minute (per process; the payment actor stops duplicates anyway)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f3f5f4;color:#1b1b1b}
main{max-width:28rem;margin:0 auto;padding:1.25rem}
.card{background:#fff;border-radius:12px;padding:1.25rem;box-shadow:0 1px 3px rgba(0,0,0,.12)}
h1{font-size:1.1rem;margin:0 0 .25rem}.muted{color:#5f6b66;font-size:.9rem;margin:0 0 1rem}
dl{display:grid;grid-template-columns:auto 1fr;gap:.4rem 1rem;margin:0 0 1.25rem}dt{color:#5f6b66}dd{margin:0;font-weight:600}
.amount{font-size:1.6rem}button{width:100%;padding:.9rem;font-size:1.05rem;border:0;border-radius:8px;
background:#1f8f4e;color:#fff;font-weight:700}.note{padding:.8rem;border-radius:8px;background:#eef7f1;margin:0 0 1rem}
.warn{background:#fdf1e7}footer{margin-top:1rem;font-size:.8rem;color:#5f6b66;text-align:center}
"""


def _limited(address: str) -> bool:
    _recent: dict[str, deque[float]] = services().extras.setdefault("paylink_recent", {})
    now = time.monotonic()
    window = _recent.setdefault(address, deque())
    while window and now - window[0] > RATE_WINDOW_S:
        window.popleft()
    if len(window) >= RATE_LIMIT:
        return True
    window.append(now)
    if len(_recent) > 10_000:  # forget the quiet ones; this is a speed bump, not a ledger
        for key in [k for k, v in _recent.items() if not v][:5_000]:
            del _recent[key]
    return False


def _page(title: str, body: str, *, refresh: bool = False, status: int = 200, csrf: str | None = None) -> Response:
    refresh_tag = '<meta http-equiv="refresh" content="4">' if refresh else ""
    doc = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"{refresh_tag}<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}<footer>InvoiceIQ &middot; payments by M-PESA</footer></main></body></html>"
    )
    response = Response(doc, status=status, content_type="text/html; charset=utf-8")
    response.headers["Cache-Control"] = "no-store"
    # The token is in the URL: never hand it to another site.
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'")
    if csrf is not None:
        response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="Strict",
                            secure=services().settings.server.public_base_url.startswith("https://"),
                            path="/p/")
    return response


def _details(invoice: Invoice, merchant: str) -> str:
    e = html.escape
    name = f"<dt>For</dt><dd>{e(invoice.customer_name)}</dd>" if invoice.customer_name else ""
    return (
        f"<h1>{e(merchant)}</h1><p class=\"muted\">Invoice #{e(invoice.id)}</p>"
        f"<dl><dt>Amount</dt><dd class=\"amount\">KES {format_kes(invoice.amount_kes)}</dd>{name}"
        f"<dt>Item</dt><dd>{e(invoice.description)}</dd>"
        f"<dt>Status</dt><dd>{e(_status_word(invoice))}</dd></dl>"
    )


def _status_word(invoice: Invoice) -> str:
    return {InvoiceStatus.PAID: "Paid", InvoiceStatus.CANCELLED: "Cancelled"}.get(invoice.status, "Unpaid")


async def _load(token: str) -> tuple[Invoice | None, Attempt | None]:
    """The invoice and its latest payment attempt (in flight or not)."""
    async def job(tx: Tx) -> tuple[Invoice | None, Attempt | None]:
        invoice = await invoices.get_by_token(tx, token)
        if invoice is None:
            return None, None
        attempts = await payments.for_invoice(tx, invoice.id)
        return invoice, attempts[-1] if attempts else None
    return await services().store.read(job)


# Pay requests the page refuses itself, saying why (``?refused=``), instead of queueing them.
_REFUSED = frozenset({settlement.PayVerdict.TOO_SOON, settlement.PayVerdict.TOO_MANY})


@bp.get("/p/<token>")
async def show(token: str) -> Response:
    svc = services()
    invoice, attempt = await _load(token) if len(token) <= 64 else (None, None)
    if invoice is None:
        return _page("Invoice not found", "<div class=\"card\"><h1>Invoice not found</h1>"
                     "<p class=\"muted\">Check the link you were sent.</p></div>", status=404)
    merchant = svc.settings.merchant.name
    body = _details(invoice, merchant)
    e = html.escape
    csrf = None
    refresh = False
    if invoice.status is InvoiceStatus.PAID:
        body += f"<p class=\"note\">Paid &#10004; Receipt: <strong>{e(invoice.mpesa_receipt or '')}</strong>. Thank you!</p>"
    elif invoice.status is InvoiceStatus.CANCELLED:
        body += "<p class=\"note warn\">This invoice was cancelled. There is nothing to pay.</p>"
    elif attempt is not None and attempt.status is PaymentStatus.INITIATED:
        refresh = True
        body += (f"<p class=\"note\">The M-PESA prompt was sent to {e(validate.short_msisdn(attempt.phone))}. "
                 "Check your phone and enter your M-PESA PIN.</p>")
    else:
        csrf = secrets.token_urlsafe(24)
        requested = request.args.get("requested", "")
        asked_ms = int(requested) if requested.isdigit() and len(requested) <= 15 else None
        now = svc.clock.now_ms()
        refused = next((v for v in _REFUSED if v.value == request.args.get("refused")), None)
        if refused is not None:
            body += f"<p class=\"note warn\">{e(settlement.pay_answer(refused, invoice, invoice.msisdn).text)}</p>"
        elif asked_ms is not None and attempt is not None and attempt.requested_at_ms >= asked_ms - 1000:
            # Our request's attempt is over without paying: say so, offer the button again.
            code = attempt.result_code if attempt.result_code is not None else "other"
            failed = copy.stk_failed(invoice, code).text.split("\n")[0]
            body += f"<p class=\"note warn\">{e(failed)}</p>"
        elif asked_ms is not None and 0 <= now - asked_ms < 60_000:
            refresh = True
            body += "<p class=\"note\">Sending the M-PESA prompt to your phone&hellip;</p>"
        body += (f"<form method=\"post\" action=\"/p/{e(token)}/pay\">"
                 f"<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">"
                 "<button type=\"submit\" id=\"pay\">Pay with M-PESA</button></form>")
    return _page(f"Invoice #{invoice.id}", f"<div class=\"card\">{body}</div>", refresh=refresh, csrf=csrf)


@bp.post("/p/<token>/pay")
async def pay(token: str) -> Response:
    svc = services()
    address = client_ip()
    if _limited(address):
        svc.metrics.webhook_rejected.labels("paylink_rate").inc()
        log.warning("paylink_rate_limited", source=address)
        return _page("Please wait", "<div class=\"card\"><h1>Too many requests</h1>"
                     "<p class=\"muted\">Please wait a minute and try again.</p></div>", status=429)
    form = await request.form
    origin = request.headers.get("Origin")
    expected_origin = svc.settings.server.public_base_url
    forged = (not secrets_equal(form.get("csrf"), request.cookies.get(CSRF_COOKIE, ""))
              or (origin is not None and origin != "null" and origin.rstrip("/") != expected_origin.rstrip("/")
                  and origin != request.host_url.rstrip("/")))
    if forged:
        svc.metrics.webhook_rejected.labels("paylink_csrf").inc()
        log.warning("paylink_forgery_refused", source=address)
        return _page("Link expired", "<div class=\"card\"><h1>Please try again</h1><p class=\"muted\">"
                     f"<a href=\"/p/{html.escape(token)}\">Open the invoice</a> and tap Pay with M-PESA.</p></div>",
                     status=403)
    invoice, _ = await _load(token) if len(token) <= 64 else (None, None)
    if invoice is None:
        log.warning("paylink_unknown_token", source=address)
        return _page("Invoice not found", "<div class=\"card\"><h1>Invoice not found</h1></div>", status=404)
    now = svc.clock.now_ms()
    # One request per page load: a double click posts the same csrf value, stored once.
    event_id = f"paylink:{form.get('csrf')}"

    async def job(tx: Tx) -> settlement.PayVerdict:
        # The per-phone limits refuse here, where the customer can be told on this page; the
        # other answers (paid, cancelled, in flight) are what the page shows anyway.
        verdict = await effects.pay_verdict(tx, invoice, effects.push_limits(svc.settings), now)
        if verdict not in _REFUSED:
            await inbox.put(tx, source="paylink", event_id=event_id, actor="payment", actor_key=invoice.id,
                            kind="pay_request", payload={"phone": invoice.msisdn, "via": "paylink"}, now_ms=now)
        return verdict

    try:
        verdict = await store_durably(job)
    except StoreError:
        return _page("Try again", "<div class=\"card\"><h1>Please try again in a moment</h1></div>", status=503)
    if verdict in _REFUSED:
        log.info("paylink_pay_refused", invoice_id=invoice.id, verdict=verdict.value)
        return redirect(f"/p/{token}?refused={verdict.value}", 303)
    svc.dispatch.kick("payment", invoice.id)
    log.info("paylink_pay_requested", invoice_id=invoice.id)
    return redirect(f"/p/{token}?requested={now}", 303)
