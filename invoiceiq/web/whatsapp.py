"""The WhatsApp Cloud API webhook: verify, store, post to a mailbox, answer.

* ``GET``: Meta's subscription handshake (the verify token) -> the challenge, else 403.
* ``POST``: the ``X-Hub-Signature-256`` HMAC over the raw bytes, compared in constant time;
  missing or wrong -> 401 and nothing stored. Every message and status is stored in the
  inbox (deduplicated by its id), in one transaction, before the 200: if the database cannot
  take it we answer 503 so that Meta retries. Its message_log row is written by whoever
  applies it (the session actor, the delivery tracker; here for what needs no actor). A body
  that verifies but that we do not understand is logged and answered 200 (Meta retries
  non-2xx for days).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from ..core.customer import asks_to_pay
from ..core.delivery import window_start_ms
from ..gateways import whatsapp as wa
from ..observability import get_logger
from ..store import StoreError, Tx, customers, inbox, messages
from .common import decode_json, error, json_response, secrets_equal, store_durably
from .context import services

bp = Blueprint("whatsapp", __name__)
log = get_logger(__name__)

# Message kinds the bot acts on; the rest (images, locations, reactions...) are logged only.
ACTIONABLE = frozenset({"text", "button_reply", "quick_reply", "list_reply"})


@bp.get("/whatsapp/webhook")
async def verify() -> Response:
    svc = services()
    mode = request.args.get("hub.mode")
    token = request.args.get("hub.verify_token")
    challenge = request.args.get("hub.challenge", "")
    if mode == "subscribe" and secrets_equal(token, svc.settings.whatsapp.verify_token):
        log.info("whatsapp_subscription_verified")
        return Response(challenge, status=200, content_type="text/plain; charset=utf-8")
    svc.metrics.webhook_rejected.labels("whatsapp_verify_token").inc()
    log.warning("whatsapp_verification_refused", mode=mode)
    return Response("forbidden", status=403, content_type="text/plain; charset=utf-8")


@bp.post("/whatsapp/webhook")
async def receive() -> Response:
    svc = services()
    body = await request.get_data(cache=False)
    if not wa.verify_signature(svc.settings.whatsapp.app_secret, body,
                               request.headers.get("X-Hub-Signature-256")):
        reason = "missing_signature" if "X-Hub-Signature-256" not in request.headers else "bad_signature"
        svc.metrics.webhook_rejected.labels(f"whatsapp_{reason}").inc()
        log.warning("webhook_rejected", provider="whatsapp", reason=reason, bytes=len(body))
        return error(401, "invalid signature")
    readable, decoded = decode_json(body)
    if not readable:
        svc.metrics.webhook_rejected.labels("whatsapp_not_json").inc()
        log.warning("webhook_unreadable", provider="whatsapp", bytes=len(body))
        return json_response({"status": "ignored"})
    batch = wa.parse_webhook(decoded)
    for what in batch.ignored:
        log.info("webhook_part_ignored", provider="whatsapp", what=what[:200])
    for err in batch.errors:
        log.warning("whatsapp_error_event", code=err.code, title=err.title)

    now = svc.clock.now_ms()
    try:
        sessions, statuses, counts = await store_durably(lambda tx: _store(tx, batch, now))
    except StoreError:
        log.error("webhook_not_stored", provider="whatsapp", messages=len(batch.messages),
                  statuses=len(batch.statuses))
        return error(503, "storage unavailable, retry later")
    for event in counts:
        svc.metrics.messages.labels("WHATSAPP", "IN", event).inc()
    if sessions:
        # A Pay request goes ahead of the chat during a flood (runtime.Pressure); asked here,
        # after the commit, not inside the writer's group.
        paying = {m.from_msisdn for m in batch.messages if m.text is not None and asks_to_pay(m.text)}
        for key in sessions:
            svc.dispatch.kick("session", key, urgent=key in paying)
    if statuses:
        svc.dispatch.kick("delivery", "statuses")  # applied in groups, whichever message
    return json_response({"status": "ok"})


async def _store(tx: Tx, batch: wa.WebhookBatch, now: int) -> tuple[list[str], list[str], list[str]]:
    """Inbox + message_log for everything new in ``batch``; which keys to kick."""
    sessions: dict[str, None] = {}
    statuses: dict[str, None] = {}
    counts: list[str] = []
    for m in batch.messages:
        payload: dict[str, Any] = {"from": m.from_msisdn, "kind": m.kind, "text": m.text, "title": m.title,
                                   "context_id": m.context_id, "timestamp_s": m.timestamp_s}
        if not m.from_msisdn:
            payload["user_id"] = m.user_id  # Meta's usernames: known only by a business-scoped id
        seq = await inbox.put(tx, source="whatsapp", event_id=m.id, actor="session",
                              actor_key=m.from_msisdn or m.user_id or "", kind=m.kind, payload=payload, now_ms=now)
        if seq is None:
            counts.append("duplicate")
            log.info("webhook_duplicate", provider="whatsapp", kind=m.kind)
            continue
        event = "inbound" if m.from_msisdn else "inbound_without_phone"
        counts.append(event)
        if m.from_msisdn and m.kind in ACTIONABLE and m.text is not None:
            # The session actor logs the message and records the opened 24-hour window when it
            # applies it (as the delivery tracker logs a status): before the 200 only what
            # acknowledging needs, the inbox row (bench/README: the log row was a tenth of a
            # webhook's CPU in the daemon's own code).
            sessions[m.from_msisdn] = None
            continue
        # No session work: applied here, so logged here. Without a number there is nobody to
        # answer, invoice or open a 24-hour window for (stored so that Meta's retries are
        # recognised); a kind not for the bot still opens the customer's window.
        await messages.log_whatsapp_in(tx, m.id, payload, event)
        if m.from_msisdn:
            await customers.touch_inbound(tx, m.from_msisdn, window_start_ms(m.timestamp_s, now))
        await inbox.mark_processed(tx, seq, now)
        log.info("message_kind_ignored" if m.from_msisdn else "message_without_phone_ignored", kind=m.kind)
    for s in batch.statuses:
        first = s.errors[0] if s.errors else None
        payload = {"status": s.status, "recipient": s.recipient, "timestamp_s": s.timestamp_s,
                   "code": first.code if first else None,
                   "reason": (first.details or first.title) if first else None}
        seq = await inbox.put(tx, source="whatsapp", event_id=f"{s.message_id}:{s.status}", actor="delivery",
                              actor_key=s.message_id, kind="status", payload=payload, now_ms=now)
        if seq is None:
            counts.append("duplicate_status")
            continue
        statuses[s.message_id] = None
    return list(sessions), list(statuses), counts
