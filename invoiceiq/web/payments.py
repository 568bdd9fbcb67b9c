"""M-PESA's STK callback and the internal ``POST /payments/stk/initiate``.

The callback is unsigned (Safaricom signs nothing): it is believed only at a secret URL,
optionally only from allowed addresses, only for a CheckoutRequestID we created, and its
amount is checked by the payment actor. It is stored (deduplicated by CheckoutRequestID)
before Safaricom gets its answer; the work happens in the payment actor.
"""

from __future__ import annotations

from typing import Any

import orjson
from quart import Blueprint, Response, request

from ..actors import effects
from ..core import settlement
from ..core.validate import normalize_invoice_ref
from ..gateways import mpesa
from ..observability import get_logger
from ..store import StoreError, Tx, inbox, invoices, payments
from .api import idempotency_key, idempotent, read_json_object
from .common import admin_denied, client_ip, decode_json, error, ip_allowed, json_response, secrets_equal, store_durably
from .context import services

bp = Blueprint("payments", __name__)
log = get_logger(__name__)
ACCEPTED = {"ResultCode": 0, "ResultDesc": "Accepted"}


@bp.post("/payments/stk/callback/<secret>")
async def callback(secret: str) -> Response:
    svc = services()
    if not secrets_equal(secret, svc.extras["callback_secret"]):
        svc.metrics.webhook_rejected.labels("mpesa_secret").inc()
        log.warning("webhook_rejected", provider="mpesa", reason="wrong_secret")
        return error(404, "not found")
    source = client_ip()
    if not ip_allowed(source, svc.settings.mpesa.callback_allow_ips):
        svc.metrics.webhook_rejected.labels("mpesa_source").inc()
        log.warning("webhook_rejected", provider="mpesa", reason="source_not_allowed", source=source)
        return error(403, "forbidden")
    raw = await request.get_data(cache=False)
    _, body = decode_json(raw)
    parsed = mpesa.parse_callback(body)
    if parsed is None:
        svc.metrics.webhook_rejected.labels("mpesa_unreadable").inc()
        log.warning("callback_unreadable", provider="mpesa", bytes=len(raw))
        # Acknowledged: Safaricom would only send the same unreadable body again.
        return json_response(ACCEPTED)
    payload: dict[str, Any] = {
        "checkout_request_id": parsed.checkout_request_id,
        "merchant_request_id": parsed.merchant_request_id,
        "result_code": parsed.result_code,
        "result_desc": parsed.result_desc,
        "amount_kes": parsed.amount_kes,
        "amount_invalid": parsed.amount_invalid,
        "mpesa_receipt": parsed.mpesa_receipt,
        "transaction_date": parsed.transaction_date,
        "phone": parsed.phone,
        "raw": body,
    }
    now = svc.clock.now_ms()

    async def store(tx: Tx) -> tuple[str | None, bool]:
        await payments.serialize_checkout(tx, parsed.checkout_request_id)
        attempt = await payments.for_callback(tx, parsed.checkout_request_id, parsed.phone)
        if attempt is not None and attempt.checkout_request_id is None:
            # The push's answer was lost, so we never learnt this id: tie it back by phone.
            await payments.adopt_checkout_id(tx, attempt.payment_id, parsed.checkout_request_id)
        # Unknown so far: kept aside as 'unmatched'; if its push's answer comes in later (a
        # callback can overtake it), the payment actor claims it (inbox.claim_unmatched).
        actor, key = ("payment", attempt.invoice_id) if attempt is not None else ("unmatched", "-")
        seq = await inbox.put(tx, source="mpesa", event_id=parsed.checkout_request_id, actor=actor,
                              actor_key=key, kind="callback", payload=payload, now_ms=now)
        if seq is not None and attempt is None:
            await inbox.mark_processed(tx, seq, now)
        return (attempt.invoice_id if attempt else None), seq is not None

    try:
        invoice_id, fresh = await store_durably(store)
    except StoreError:
        log.error("webhook_not_stored", provider="mpesa")
        return error(503, "storage unavailable, retry later")
    if not fresh:
        log.info("webhook_duplicate", provider="mpesa")
    elif invoice_id is None:
        log.warning("callback_for_unknown_checkout", provider="mpesa", result_code=parsed.result_code)
    else:
        log.info("callback_stored", invoice_id=invoice_id, result_code=parsed.result_code)
        svc.dispatch.kick("payment", invoice_id)
    return json_response(ACCEPTED)


REFUSALS = {
    settlement.PayVerdict.ALREADY_PAID: "the invoice is already paid",
    settlement.PayVerdict.CANCELLED: "the invoice is cancelled",
    settlement.PayVerdict.IN_FLIGHT: "an M-PESA prompt for this invoice is already in flight",
    settlement.PayVerdict.TOO_SOON: "an M-PESA prompt went to this phone less than a minute ago; try again shortly",
    settlement.PayVerdict.TOO_MANY: "too many M-PESA prompts to this phone lately; try again later",
}


@bp.post("/payments/stk/initiate")
async def initiate() -> Response:
    if (denied := admin_denied()) is not None:
        return denied
    key, bad = idempotency_key()
    if bad is not None:
        return bad
    if key is None:
        log.warning("api_request_refused", route=request.path, status=400, reason="no Idempotency-Key")
        return error(400, "an Idempotency-Key header is required")
    body, bad = await read_json_object()
    if bad is not None:
        return bad
    assert body is not None
    svc = services()
    ref = body.get("invoice_id")

    async def work(tx: Tx) -> tuple[int, dict[str, Any]]:
        invoice_id = normalize_invoice_ref(ref) if isinstance(ref, str) else None
        if invoice_id is None or set(body) - {"invoice_id"}:
            errors = {k: "unknown field" for k in sorted(set(body) - {"invoice_id"})}
            if invoice_id is None:
                errors["invoice_id"] = "must be an invoice number, e.g. 1042"
            return 422, {"error": "validation failed", "errors": errors}
        invoice = await invoices.get(tx, invoice_id)
        if invoice is None:
            return 404, {"error": "no such invoice"}
        # The rule the payment actor applies, answered to the API caller at once when it
        # refuses: no push, and no message to the customer.
        verdict = await effects.pay_verdict(tx, invoice, effects.push_limits(svc.settings), svc.clock.now_ms())
        if verdict is not settlement.PayVerdict.START:
            refusal: dict[str, Any] = {"error": REFUSALS[verdict], "reason": verdict.value,
                                       "invoice_id": invoice.id, "status": invoice.status.value}
            if verdict is settlement.PayVerdict.ALREADY_PAID:
                refusal["mpesa_receipt"] = invoice.mpesa_receipt
            return (429 if verdict in (settlement.PayVerdict.TOO_SOON, settlement.PayVerdict.TOO_MANY) else 409), refusal
        await inbox.put(tx, source="api", event_id=f"initiate:{key}", actor="payment", actor_key=invoice.id,
                        kind="pay_request", payload={"phone": invoice.msisdn, "via": "api"},
                        now_ms=svc.clock.now_ms())
        return 202, {"invoice_id": invoice.id, "status": "requested",
                     "detail": "the STK push is being sent; GET /invoices/<id> shows the outcome"}

    response = await idempotent("POST /payments/stk/initiate", key, body, work)
    if response.status_code == 202 and response.headers.get("Idempotent-Replayed") is None:
        data = orjson.loads(await response.get_data())
        svc.dispatch.kick("payment", data["invoice_id"])
    return response
