"""Invoices: the brief's ``invoices`` row plus its ``invoice_tracking`` row.

Every status change is one conditional UPDATE (``WHERE status IN (...)``), so two processes
racing to pay, cancel or send an invoice cannot both win.
"""

from __future__ import annotations

from typing import Any

from ..core.model import Channel, Invoice, InvoiceStatus, pay_url
from . import customers
from .db import Tx
from .ids import new_token

_SELECT = (
    "SELECT i.id, i.msisdn, i.customer_name, i.amount_cents, i.description, i.status,"
    " i.pay_ref, t.pay_token, t.created_at_ms, t.sent_at_ms, t.paid_at_ms, t.channel,"
    " t.delivery_state, t.last_reminder_at_ms"
    " FROM invoices i JOIN invoice_tracking t ON t.invoice_id = i.id"
)


def _invoice(row: dict[str, Any]) -> Invoice:
    return Invoice(
        id=row["id"], msisdn=row["msisdn"], customer_name=row["customer_name"],
        amount_cents=int(row["amount_cents"]), description=row["description"] or "",
        status=InvoiceStatus(row["status"]), pay_token=row["pay_token"],
        created_at_ms=int(row["created_at_ms"]), sent_at_ms=row["sent_at_ms"],
        paid_at_ms=row["paid_at_ms"], mpesa_receipt=row["pay_ref"],
        channel=Channel(row["channel"]) if row["channel"] else None,
        delivery_state=row["delivery_state"], last_reminder_at_ms=row["last_reminder_at_ms"],
    )


async def next_id(tx: Tx) -> str:
    """Invoice numbers are short and typable on a phone (`remind 1042`): an atomic counter."""
    value = await tx.val("UPDATE counters SET value = value + 1 WHERE name = 'invoice' RETURNING value")
    return str(value)


async def create(
    tx: Tx,
    *,
    msisdn: str,
    customer_name: str | None,
    amount_cents: int,
    description: str,
    now_ms: int,
    pay_base_url: str,
    source: str,
) -> Invoice:
    invoice_id = await next_id(tx)
    token = new_token()
    await tx.execute(
        "INSERT INTO invoices (id, customer_name, msisdn, amount_cents, currency, description, status, pay_link)"
        " VALUES (:id, :name, :m, :amt, 'KES', :desc, 'PENDING', :link)",
        {"id": invoice_id, "name": customer_name, "m": msisdn, "amt": amount_cents,
         "desc": description, "link": pay_url(pay_base_url, token)},
    )
    await tx.execute(
        "INSERT INTO invoice_tracking (invoice_id, pay_token, created_at_ms, source)"
        " VALUES (:id, :tok, :now, :src)",
        {"id": invoice_id, "tok": token, "now": now_ms, "src": source},
    )
    await customers.upsert(tx, msisdn, customer_name, now_ms)
    return Invoice(
        id=invoice_id, msisdn=msisdn, customer_name=customer_name, amount_cents=amount_cents,
        description=description, status=InvoiceStatus.PENDING, pay_token=token, created_at_ms=now_ms,
    )


async def get(tx: Tx, invoice_id: str) -> Invoice | None:
    row = await tx.one(f"{_SELECT} WHERE i.id = :id", {"id": invoice_id})
    return _invoice(row) if row else None


async def get_by_token(tx: Tx, token: str) -> Invoice | None:
    row = await tx.one(f"{_SELECT} WHERE t.pay_token = :tok", {"tok": token})
    return _invoice(row) if row else None


async def listing(tx: Tx, status: InvoiceStatus | None, limit: int) -> list[Invoice]:
    if status is None:
        rows = await tx.all(f"{_SELECT} ORDER BY t.created_at_ms DESC, i.id DESC LIMIT :lim", {"lim": limit})
    else:
        rows = await tx.all(
            f"{_SELECT} WHERE i.status = :st ORDER BY t.created_at_ms DESC, i.id DESC LIMIT :lim",
            {"st": status.value, "lim": limit})
    return [_invoice(r) for r in rows]


async def open_invoices(tx: Tx, msisdn: str | None = None, limit: int = 50) -> list[Invoice]:
    """PENDING or SENT invoices, oldest first (of one customer when ``msisdn`` is given)."""
    where = "i.status IN ('PENDING','SENT')" + (" AND i.msisdn = :m" if msisdn else "")
    rows = await tx.all(f"{_SELECT} WHERE {where} ORDER BY t.created_at_ms, i.id LIMIT :lim",
                        {"m": msisdn, "lim": limit} if msisdn else {"lim": limit})
    return [_invoice(r) for r in rows]


async def open_totals(tx: Tx, msisdn: str | None = None) -> tuple[int, int]:
    """(count, total amount in cents) of ALL open invoices, as :func:`open_invoices` defines
    them, however many there are (the listing is a page; the totals must not be)."""
    where = "status IN ('PENDING','SENT')" + (" AND msisdn = :m" if msisdn else "")
    row = await tx.one(f"SELECT COUNT(*) AS n, COALESCE(SUM(amount_cents), 0) AS total FROM invoices WHERE {where}",
                       {"m": msisdn} if msisdn else None)
    assert row is not None
    return int(row["n"] or 0), int(row["total"] or 0)


async def mark_sent(tx: Tx, invoice_id: str, channel: Channel, now_ms: int) -> bool:
    """PENDING -> SENT once a provider accepted the invoice; True only the first time."""
    row = await tx.one(
        "UPDATE invoices SET status = 'SENT', updated_at = CURRENT_TIMESTAMP"
        " WHERE id = :id AND status = 'PENDING' RETURNING id", {"id": invoice_id})
    if row is None:
        await set_delivery(tx, invoice_id, channel, "sent")
        return False
    await tx.execute(
        "UPDATE invoice_tracking SET sent_at_ms = :now, channel = :ch, delivery_state = 'sent'"
        " WHERE invoice_id = :id", {"now": now_ms, "ch": channel.value, "id": invoice_id})
    return True


async def set_delivery(tx: Tx, invoice_id: str, channel: Channel | None, state: str | None) -> None:
    await tx.execute(
        "UPDATE invoice_tracking SET channel = COALESCE(:ch, channel),"
        " delivery_state = COALESCE(:st, delivery_state) WHERE invoice_id = :id",
        {"ch": channel.value if channel else None, "st": state, "id": invoice_id})


async def cancel(tx: Tx, invoice_id: str, now_ms: int) -> bool:
    """Unpaid -> CANCELLED; False when it was paid, already cancelled or unknown."""
    row = await tx.one(
        "UPDATE invoices SET status = 'CANCELLED', updated_at = CURRENT_TIMESTAMP"
        " WHERE id = :id AND status IN ('PENDING','SENT','FAILED') RETURNING id", {"id": invoice_id})
    if row is None:
        return False
    await tx.execute("UPDATE invoice_tracking SET cancelled_at_ms = :now WHERE invoice_id = :id",
                     {"now": now_ms, "id": invoice_id})
    return True


async def mark_paid(tx: Tx, invoice_id: str, receipt: str, now_ms: int) -> bool:
    """Open -> PAID with the M-PESA receipt; False when it was not open."""
    row = await tx.one(
        "UPDATE invoices SET status = 'PAID', pay_ref = :rcpt, updated_at = CURRENT_TIMESTAMP"
        " WHERE id = :id AND status IN ('PENDING','SENT','FAILED') RETURNING id",
        {"id": invoice_id, "rcpt": receipt})
    if row is None:
        return False
    await tx.execute("UPDATE invoice_tracking SET paid_at_ms = :now WHERE invoice_id = :id",
                     {"now": now_ms, "id": invoice_id})
    return True


async def mark_failed(tx: Tx, invoice_id: str) -> bool:
    """PENDING/SENT -> FAILED when the invoice could not reach the customer on any channel
    (it stays payable through its pay link: money is never refused)."""
    row = await tx.one(
        "UPDATE invoices SET status = 'FAILED', updated_at = CURRENT_TIMESTAMP"
        " WHERE id = :id AND status IN ('PENDING','SENT') RETURNING id", {"id": invoice_id})
    if row is not None:
        await tx.execute("UPDATE invoice_tracking SET delivery_state = 'failed' WHERE invoice_id = :id",
                         {"id": invoice_id})
    return row is not None


async def claim_reminder(tx: Tx, invoice_id: str, now_ms: int, interval_ms: int) -> bool:
    """At most one reminder per ``interval_ms``: an atomic compare-and-set on the last one."""
    row = await tx.one(
        "UPDATE invoice_tracking SET last_reminder_at_ms = :now WHERE invoice_id = :id"
        " AND (last_reminder_at_ms IS NULL OR last_reminder_at_ms <= :limit) RETURNING invoice_id",
        {"now": now_ms, "id": invoice_id, "limit": now_ms - interval_ms})
    return row is not None


async def totals(tx: Tx) -> tuple[int, int, int]:
    """(created, sent, paid) counts for the metrics, whatever happened after sending."""
    row = await tx.one(
        "SELECT COUNT(*) AS created,"
        " SUM(CASE WHEN sent_at_ms IS NOT NULL THEN 1 ELSE 0 END) AS sent,"
        " SUM(CASE WHEN paid_at_ms IS NOT NULL THEN 1 ELSE 0 END) AS paid"
        " FROM invoice_tracking")
    assert row is not None
    return int(row["created"] or 0), int(row["sent"] or 0), int(row["paid"] or 0)

