"""Carrying out the core's decisions inside one store transaction.

Shared by the session actor (chat) and the internal API, so that an invoice made either way
is stored and queued for delivery by the very same code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core import copy, delivery, settlement
from ..core.model import Channel, Invoice
from ..store import Tx, invoices, outbox, payments

if TYPE_CHECKING:
    from ..config import Settings


async def create_invoice(
    tx: Tx,
    settings: Settings,
    now_ms: int,
    *,
    msisdn: str,
    customer_name: str | None,
    amount_cents: int,
    description: str,
    source: str,
) -> Invoice:
    """Store the invoice as PENDING and queue it to the customer, in the caller's transaction.

    The outbox decides at send time between the session message and the template (the
    24-hour window is judged when the message leaves, not when it was queued)."""
    invoice = await invoices.create(
        tx, msisdn=msisdn, customer_name=customer_name, amount_cents=amount_cents,
        description=description, now_ms=now_ms, pay_base_url=settings.server.public_base_url,
        source=source)
    await outbox.enqueue(
        tx, recipient=msisdn, channel=Channel.WHATSAPP, kind="invoice", invoice_id=invoice.id,
        content={"type": "invoice", "invoice_id": invoice.id, "purpose": "invoice"}, now_ms=now_ms,
        dedupe_key=f"invoice:{invoice.id}")
    return invoice


async def reply(tx: Tx, to: str, now_ms: int, message: copy.Reply, *, kind: str = "reply",
                invoice_id: str | None = None, dedupe_key: str | None = None, sms: str | None = None,
                order_key: str | None = None) -> int | None:
    """Queue a WhatsApp text or reply-button message to ``to`` (``sms``: its SMS fallback)."""
    return await outbox.enqueue(tx, recipient=to, channel=Channel.WHATSAPP, kind=kind,
                                content=delivery.reply_content(message, sms), now_ms=now_ms,
                                invoice_id=invoice_id, dedupe_key=dedupe_key, order_key=order_key)


async def tell_customer(tx: Tx, invoice: Invoice, now_ms: int, message: copy.Reply, *, kind: str,
                        dedupe_key: str | None = None, sms: str | None = None) -> int | None:
    """Queue ``message`` to the invoice's customer by the channel that reached them (WhatsApp
    until the invoice had to go by SMS); ``sms`` is its SMS form (default: its text)."""
    channel = invoice.channel or Channel.WHATSAPP
    return await outbox.enqueue(tx, recipient=invoice.msisdn, channel=channel, kind=kind,
                                content=delivery.reply_content(message, sms), now_ms=now_ms,
                                invoice_id=invoice.id, dedupe_key=dedupe_key)


async def tell_merchant(tx: Tx, settings: Settings, now_ms: int, message: copy.Reply, *,
                        invoice_id: str | None = None, dedupe_key: str | None = None,
                        kind: str = "notice") -> int | None:
    """Queue a WhatsApp message to the merchant (nothing when no merchant number is set)."""
    merchant = settings.merchant.msisdn
    if not merchant:
        return None
    return await reply(tx, merchant, now_ms, message, kind=kind, invoice_id=invoice_id, dedupe_key=dedupe_key,
                       order_key=outbox.per_invoice(merchant, invoice_id))


def push_limits(settings: Settings) -> settlement.PushLimits:
    m = settings.mpesa
    return settlement.PushLimits(m.push_min_interval_s * 1000, m.push_limit, m.push_window_s * 1000)


async def pay_verdict(tx: Tx, invoice: Invoice, limits: settlement.PushLimits, now_ms: int) -> settlement.PayVerdict:
    """``core.settlement.decide_pay`` on what the store knows now: the one rule for a Pay request,
    whether a WhatsApp tap, an SMS, the pay page or the internal API asks. (The in-flight
    answer is advisory here; the partial unique index on payments is what guarantees it.)"""
    in_flight = await payments.in_flight(tx, invoice.id)
    recent = await payments.recent_pushes(tx, invoice.msisdn, now_ms - limits.window_ms)
    return settlement.decide_pay(invoice, in_flight=in_flight is not None, recent_pushes_ms=recent,
                                 now_ms=now_ms, limits=limits)


async def push_verdict(tx: Tx, invoice: Invoice, limits: settlement.PushLimits, now_ms: int) -> settlement.PayVerdict:
    """``pay_verdict`` for the one place that then starts an attempt (the payment actor): with
    the phone's row serialised first (payments.lock_phone), so that its per-phone limits (a minute between prompts,
    three in ten minutes) hold across invoices and processes, not only per invoice."""
    await payments.lock_phone(tx, invoice.msisdn)
    return await pay_verdict(tx, invoice, limits, now_ms)
