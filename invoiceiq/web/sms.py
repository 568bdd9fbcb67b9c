"""Africa's Talking callbacks: inbound SMS and delivery reports (form-encoded, unsigned).

Both are stored (deduplicated by their ids) before the 200 and handled by actors: an inbound
SMS by the customer's session (``PAY <id>`` starts the payment exactly like the WhatsApp
button), a delivery report by the delivery tracker. Unknown form fields are ignored; a
malformed report is logged and acknowledged, never answered 5xx.
"""

from __future__ import annotations

from quart import Blueprint, Response, request

from ..core.customer import asks_to_pay
from ..core.model import Channel, Direction
from ..gateways import sms as at
from ..observability import get_logger
from ..store import StoreError, Tx, inbox, messages
from .common import error, json_response, secrets_equal, store_durably
from .context import services

bp = Blueprint("sms", __name__)
log = get_logger(__name__)


def _refused() -> Response | None:
    """With ``sms.callback_token`` set, a callback without it is refused (and counted)."""
    svc = services()
    expected = svc.settings.sms.callback_token
    if expected and not secrets_equal(request.args.get("token"), expected):
        svc.metrics.webhook_rejected.labels("sms_token").inc()
        log.warning("webhook_rejected", provider="africastalking", reason="token", route=request.path)
        return error(403, "forbidden")
    return None


async def _form() -> dict[str, str]:
    form = await request.form
    return {key: form.get(key, "") for key in form}


@bp.post("/sms/inbound")
async def inbound() -> Response:
    if (refused := _refused()) is not None:
        return refused
    svc = services()
    sms = at.parse_inbound(await _form())
    if sms is None or not sms.from_msisdn:
        svc.metrics.webhook_rejected.labels("sms_unreadable").inc()
        log.warning("sms_inbound_unreadable")
        return json_response({"status": "ignored"})
    if sms.from_msisdn == svc.settings.merchant.msisdn:
        # The merchant's commands come over WhatsApp only (its sender is verified by Meta).
        log.info("sms_from_merchant_ignored")
        return json_response({"status": "ignored"})
    now = svc.clock.now_ms()
    payload = {"from": sms.from_msisdn, "kind": "sms", "text": sms.text, "channel": Channel.SMS.value}

    async def store(tx: Tx) -> bool:
        seq = await inbox.put(tx, source="sms", event_id=sms.id, actor="session", actor_key=sms.from_msisdn,
                              kind="sms", payload=payload, now_ms=now)
        if seq is None:
            return False
        await messages.log_message(tx, channel=Channel.SMS, direction=Direction.IN, event="inbound",
                                   payload={"sms_id": sms.id, **payload})
        return True

    try:
        fresh = await store_durably(store)
    except StoreError:
        log.error("webhook_not_stored", provider="africastalking")
        return error(503, "storage unavailable, retry later")
    svc.metrics.messages.labels("SMS", "IN", "inbound" if fresh else "duplicate").inc()
    if fresh:
        svc.dispatch.kick("session", sms.from_msisdn, urgent=asks_to_pay(sms.text or ""))
    return json_response({"status": "ok"})


@bp.post("/sms/status")
async def status() -> Response:
    if (refused := _refused()) is not None:
        return refused
    svc = services()
    report = at.parse_delivery_report(await _form())
    if report is None or not report.status:
        svc.metrics.webhook_rejected.labels("sms_unreadable").inc()
        log.warning("sms_report_unreadable")
        return json_response({"status": "ignored"})
    now = svc.clock.now_ms()
    payload = {"status": report.status, "code": report.failure_reason, "reason": report.failure_reason,
               "network_code": report.network_code}

    async def store(tx: Tx) -> bool:
        seq = await inbox.put(tx, source="sms", event_id=f"{report.id}:{report.status}", actor="delivery",
                              actor_key=report.id, kind="status", payload=payload, now_ms=now)
        return seq is not None

    try:
        fresh = await store_durably(store)
    except StoreError:
        log.error("webhook_not_stored", provider="africastalking")
        return error(503, "storage unavailable, retry later")
    if fresh:
        svc.dispatch.kick("delivery", "statuses")
    return json_response({"status": "ok"})
