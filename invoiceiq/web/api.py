"""The internal API for the merchant's own tools (admin bearer token, idempotency keys)."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from quart import Blueprint, Response, request

from ..actors import effects
from ..core import validate
from ..core.model import Invoice, InvoiceStatus, kes_to_cents
from ..observability import get_logger
from ..store import Tx, idempotency, invoices
from .common import admin_denied, decode_json, error, json_response
from .context import services

bp = Blueprint("api", __name__)
log = get_logger(__name__)

MAX_LIST = 200


def invoice_json(invoice: Invoice, pay_base_url: str) -> dict[str, Any]:
    return {
        "id": invoice.id,
        "msisdn": invoice.msisdn,
        "customer_name": invoice.customer_name,
        "amount_cents": invoice.amount_cents,
        "currency": "KES",
        "description": invoice.description,
        "status": invoice.status.value,
        "pay_link": invoice.pay_url(pay_base_url),
        "mpesa_receipt": invoice.mpesa_receipt,
        "channel": invoice.channel.value if invoice.channel else None,
        "delivery_state": invoice.delivery_state,
        "created_at_ms": invoice.created_at_ms,
        "sent_at_ms": invoice.sent_at_ms,
        "paid_at_ms": invoice.paid_at_ms,
    }


async def read_json_object() -> tuple[dict[str, Any] | None, Response | None]:
    raw = await request.get_data(cache=True)
    ok, body = decode_json(raw)
    if not ok or not isinstance(body, dict):
        log.warning("api_request_refused", route=request.path, status=400,
                    reason="body is not a JSON object (or nests too deep)")
        return None, error(400, "body must be a JSON object")
    return body, None


def validate_new_invoice(body: dict[str, Any], max_kes: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The chat's validators applied to the API's fields; one message per bad field."""
    errors: dict[str, str] = {}
    clean: dict[str, Any] = {}

    msisdn = body.get("msisdn")
    normalised = validate.normalize_msisdn(msisdn) if isinstance(msisdn, str) else None
    if normalised is None:
        errors["msisdn"] = "must be a Kenyan mobile number, e.g. 0712345678 or 254712345678"
    clean["msisdn"] = normalised

    amount = body.get("amount_cents")
    if not isinstance(amount, int) or isinstance(amount, bool):
        errors["amount_cents"] = "must be a whole number of cents"
    elif amount % 100 != 0:
        errors["amount_cents"] = "must be whole shillings (a multiple of 100 cents): M-PESA takes no cents"
    elif not 100 <= amount <= kes_to_cents(max_kes):
        errors["amount_cents"] = f"must be between 100 (KES 1) and {kes_to_cents(max_kes)} (KES {max_kes:,})"
    clean["amount_cents"] = amount

    description = body.get("description")
    try:
        if not isinstance(description, str):
            raise validate.ValidationError("description", "must be text")
        clean["description"] = validate.validate_description(description)
    except validate.ValidationError:
        errors["description"] = "must be 3–120 characters"

    name = body.get("customer_name")
    clean["customer_name"] = None
    if name is not None and name != "":
        try:
            if not isinstance(name, str):
                raise validate.ValidationError("name", "must be text")
            clean["customer_name"] = validate.validate_name(name)
        except validate.ValidationError:
            errors["customer_name"] = "must be 2–60 characters"

    unknown = sorted(set(body) - {"msisdn", "amount_cents", "description", "customer_name"})
    for field in unknown:
        errors[field] = "unknown field"
    return clean, errors


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


_REFUSED = frozenset({404, 409, 422, 429})


def _refusal_reason(status: int, answer: dict[str, Any]) -> str | None:
    """Why a request was refused, in words fit for the log, or None for a success."""
    if status not in _REFUSED:
        return None
    if status == 422:
        return "validation failed"
    return str(answer.get("reason") or answer.get("error") or status)


async def idempotent(scope: str, key: str | None, body: dict[str, Any],
                     work: Callable[[Tx], Awaitable[tuple[int, dict[str, Any]]]]) -> Response:
    """Run ``work`` once per Idempotency-Key: the first response (status and body) is replayed
    for the same key and body; the same key with another body is a 409."""
    svc = services()
    digest = request_hash(body)

    async def job(tx: Tx) -> tuple[int, str, dict[str, str], dict[str, Any] | None]:
        """(status, body as sent, headers, body as data when we have it: a replay has text only)."""
        if key is not None:
            stored = await idempotency.begin(tx, scope, key, digest, svc.clock.now_ms())
            if stored is not None:
                if stored.request_hash != digest:
                    reused = {"error": "Idempotency-Key reused with a different body"}
                    return 409, orjson.dumps(reused).decode(), {}, reused
                return stored.status_code, stored.body, {"Idempotent-Replayed": "true"}, None
        status, result = await work(tx)
        text = orjson.dumps(result).decode()
        if key is not None and status == 429:
            await idempotency.release(tx, scope, key)  # a retry with the same key may succeed later
        elif key is not None:
            await idempotency.finish(tx, scope, key, status, text)
        return status, text, {}, result

    status, text, headers, result = await svc.store.write(job)
    # A replayed refusal is parsed here, outside the write transaction, and only then.
    answer = result if result is not None else orjson.loads(text) if status in _REFUSED else {}
    if (reason := _refusal_reason(status, answer)) is not None:
        # Say why in the log too (field names only: values may be personal data).
        fields = sorted(answer.get("errors", {})) if status == 422 else []
        log.warning("api_request_refused", route=scope, status=status, fields=fields, reason=reason)
    return Response(text, status=status, content_type="application/json", headers=headers)


def idempotency_key() -> tuple[str | None, Response | None]:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None, None
    key = key.strip()
    if not 1 <= len(key) <= 255 or not key.isprintable():
        log.warning("api_request_refused", route=request.path, status=400, reason="malformed Idempotency-Key")
        return None, error(400, "Idempotency-Key must be 1-255 printable characters")
    return key, None


@bp.post("/invoices")
async def create_invoice() -> Response:
    if (denied := admin_denied()) is not None:
        return denied
    key, bad = idempotency_key()
    if bad is not None:
        return bad
    body, bad = await read_json_object()
    if bad is not None:
        return bad
    assert body is not None
    svc = services()
    clean, errors = validate_new_invoice(body, svc.settings.mpesa.max_amount)

    async def work(tx: Tx) -> tuple[int, dict[str, Any]]:
        if errors:
            return 422, {"error": "validation failed", "errors": errors}
        invoice = await effects.create_invoice(
            tx, svc.settings, svc.clock.now_ms(),
            msisdn=clean["msisdn"], customer_name=clean["customer_name"],
            amount_cents=clean["amount_cents"], description=clean["description"], source="api")
        return 201, invoice_json(invoice, svc.settings.server.public_base_url)

    response = await idempotent("POST /invoices", key, body, work)
    if response.status_code == 201 and response.headers.get("Idempotent-Replayed") is None:
        created = orjson.loads(await response.get_data())
        svc.metrics.invoices_created.inc()
        log.info("invoice_created", invoice_id=created["id"], source="api", amount_cents=created["amount_cents"])
        svc.dispatch.wake("outbox")
    return response


@bp.get("/invoices/<invoice_id>")
async def get_invoice(invoice_id: str) -> Response:
    if (denied := admin_denied()) is not None:
        return denied
    svc = services()
    ref = validate.normalize_invoice_ref(invoice_id)
    invoice = await svc.store.read(lambda tx: invoices.get(tx, ref)) if ref else None
    if invoice is None:
        return error(404, "no such invoice")
    return json_response(invoice_json(invoice, svc.settings.server.public_base_url))


@bp.get("/invoices")
async def list_invoices() -> Response:
    if (denied := admin_denied()) is not None:
        return denied
    svc = services()
    status_arg = request.args.get("status")
    status: InvoiceStatus | None = None
    if status_arg:
        try:
            status = InvoiceStatus(status_arg.upper())
        except ValueError:
            return json_response({"error": "validation failed", "errors": {
                "status": f"must be one of {', '.join(s.value for s in InvoiceStatus)}"}}, 422)
    limit_arg = request.args.get("limit", "50")
    if not limit_arg.isdigit() or not 1 <= int(limit_arg) <= MAX_LIST:
        return json_response({"error": "validation failed", "errors": {
            "limit": f"must be a whole number between 1 and {MAX_LIST}"}}, 422)
    found = await svc.store.scan(lambda tx: invoices.listing(tx, status, int(limit_arg)))
    base = svc.settings.server.public_base_url
    return json_response({"invoices": [invoice_json(i, base) for i in found]})
