"""The outbox: every send is a row before it is attempted.

Rows are claimed with one atomic UPDATE (on PostgreSQL its subquery takes ``FOR UPDATE SKIP
LOCKED``), only the oldest unfinished row of each recipient is claimable (so messages reach a
person in the order they were written), and a claim is a lease: a process that dies while
sending leaves a row that another claim picks up once the lease has run out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.model import Channel, Direction
from . import messages
from .db import Tx, update_slice
from .jsonio import dumps, loads

# Delivery states only move forward (statuses arrive out of order and twice).
RANK = {"PENDING": 0, "SENDING": 1, "SENT": 2, "DELIVERED": 3, "READ": 4, "FAILED": 5, "CANCELLED": 5}
UNFINISHED = ("PENDING", "SENDING")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    recipient: str
    channel: Channel
    kind: str
    invoice_id: str | None
    content: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at_ms: int
    provider_message_id: str | None
    last_error: str | None
    fallback_of: int | None
    created_at_ms: int
    sent_form: str | None = None  # how it went: text | interactive | template | sms
    order_key: str | None = None


def _row(r: dict[str, Any]) -> OutboxRow:
    return OutboxRow(
        id=int(r["id"]), recipient=r["recipient"], channel=Channel(r["channel"]), kind=r["kind"],
        invoice_id=r["invoice_id"], content=loads(r["content"]) or {}, status=r["status"],
        attempts=int(r["attempts"]), next_attempt_at_ms=int(r["next_attempt_at_ms"]),
        provider_message_id=r["provider_message_id"], last_error=r["last_error"],
        fallback_of=r["fallback_of"], created_at_ms=int(r["created_at_ms"]), sent_form=r.get("sent_form"),
        order_key=r.get("order_key"),
    )


def per_invoice(recipient: str, invoice_id: str | None) -> str:
    """An order key for a busy recipient (the merchant): their notices about one invoice stay
    in order, notices about different invoices do not wait for each other (at 200 ms a send,
    one queue for the merchant would cap a campaign at about five invoices a second). Plain
    rows to that recipient (their chat) stay in order with everything."""
    return f"{recipient}|{invoice_id or '-'}"


async def enqueue(
    tx: Tx,
    *,
    recipient: str,
    channel: Channel,
    kind: str,
    content: dict[str, Any],
    now_ms: int,
    invoice_id: str | None = None,
    dedupe_key: str | None = None,
    fallback_of: int | None = None,
    order_key: str | None = None,
) -> int | None:
    """Queue a send (and log it as ``queued``); None if ``dedupe_key`` was queued before.

    Rows with one ``order_key`` (by default: one recipient) go out in the order queued."""
    row_id = await tx.val(
        "INSERT INTO outbox (recipient, order_key, channel, kind, invoice_id, content, status, next_attempt_at_ms,"
        " dedupe_key, fallback_of, created_at_ms, updated_at_ms)"
        " VALUES (:to, :ok, :ch, :kind, :inv, :content, 'PENDING', :now, :dk, :fb, :now, :now)"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        {"to": recipient, "ok": order_key or recipient, "ch": channel.value, "kind": kind,
         "inv": invoice_id, "content": dumps(content), "now": now_ms, "dk": dedupe_key, "fb": fallback_of},
    )
    if row_id is None:
        return None
    await messages.log_message(
        tx, channel=channel, direction=Direction.OUT, event="queued", invoice_id=invoice_id,
        payload={"outbox_id": int(row_id), "kind": kind, "to": recipient, "content": content})
    return int(row_id)


async def claim_due(tx: Tx, *, now_ms: int, limit: int, worker: str, lease_ms: int,
                    channels: tuple[Channel, ...] = (Channel.WHATSAPP, Channel.SMS)) -> list[OutboxRow]:
    """Claim up to ``limit`` sendable rows: due, not leased, first unfinished for their
    recipient, on one of ``channels`` (a paused channel's rows wait without losing attempts)."""
    if not channels:
        return []
    skip_locked = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
    # SQLite plans without statistics: name the partial index of unfinished rows, walked in
    # id order, so that a claim stops at its LIMIT instead of sorting every due row.
    walk = " INDEXED BY outbox_unfinished" if tx.dialect == "sqlite" else ""
    in_channels = ", ".join(f"'{c.value}'" for c in channels)
    unfinished = "p.recipient = o.recipient AND p.id < o.id AND p.status IN ('PENDING','SENDING')"
    rows = await tx.all(
        "UPDATE outbox SET status = 'SENDING', claimed_until_ms = :lease, claimed_by = :w,"
        " attempts = attempts + 1, updated_at_ms = :now"
        f" WHERE id IN (SELECT o.id FROM outbox o{walk}"
        "  WHERE o.status IN ('PENDING','SENDING') AND o.next_attempt_at_ms <= :now"
        f"   AND o.channel IN ({in_channels}) AND (o.status = 'PENDING' OR o.claimed_until_ms < :now)"
        # Ordering: an earlier unfinished row to the same recipient holds this one back if it
        # has the same order key, or if either of them is a plain (per-recipient) row: the
        # merchant's chat replies and their notices never overtake each other, while notices
        # about different invoices go side by side. Three questions, each one index seek
        # (outbox_order, outbox_recipient), rather than one walk of the recipient's backlog.
        f"   AND NOT EXISTS (SELECT 1 FROM outbox p WHERE {unfinished} AND p.order_key = o.order_key)"
        f"   AND NOT EXISTS (SELECT 1 FROM outbox p WHERE {unfinished} AND p.order_key = o.recipient)"
        f"   AND (o.order_key <> o.recipient OR NOT EXISTS (SELECT 1 FROM outbox p WHERE {unfinished}))"
        f"  ORDER BY o.id LIMIT :lim{skip_locked})"
        " RETURNING *",
        {"lease": now_ms + lease_ms, "w": worker, "now": now_ms, "lim": limit},
    )
    return sorted((_row(r) for r in rows), key=lambda r: r.id)


async def mark_sent(tx: Tx, row_id: int, provider_message_id: str | None, now_ms: int,
                    form: str | None = None) -> bool:
    """SENDING -> SENT (the provider accepted it). False if the claim was lost meanwhile."""
    done = await tx.one(
        "UPDATE outbox SET status = 'SENT', provider_message_id = :pid, sent_at_ms = :now, sent_form = :form,"
        " claimed_until_ms = NULL, last_error = NULL, updated_at_ms = :now"
        " WHERE id = :id AND status = 'SENDING' RETURNING id",
        {"pid": provider_message_id, "now": now_ms, "id": row_id, "form": form})
    return done is not None


async def mark_retry(tx: Tx, row_id: int, error: str, next_at_ms: int, now_ms: int, *, refund_attempt: bool = False) -> None:
    """Back to PENDING until ``next_at_ms``; ``refund_attempt`` when the failure was not the
    message's fault (the channel's credentials are broken), so its retries are not burnt."""
    refund = " - 1" if refund_attempt else ""
    await tx.execute(
        f"UPDATE outbox SET status = 'PENDING', attempts = attempts{refund}, next_attempt_at_ms = :next,"
        " claimed_until_ms = NULL, last_error = :err, updated_at_ms = :now"
        " WHERE id = :id AND status = 'SENDING'",
        {"next": next_at_ms, "err": error[:500], "now": now_ms, "id": row_id})


async def mark_failed(tx: Tx, row_id: int, error: str, now_ms: int) -> bool:
    done = await tx.one(
        "UPDATE outbox SET status = 'FAILED', claimed_until_ms = NULL, last_error = :err, updated_at_ms = :now"
        " WHERE id = :id AND status IN ('PENDING','SENDING','SENT','DELIVERED') RETURNING id",
        {"err": error[:500], "now": now_ms, "id": row_id})
    return done is not None


async def mark_skipped(tx: Tx, row_id: int, reason: str, now_ms: int) -> bool:
    """A claimed row that no longer needs sending (its invoice was paid or cancelled meanwhile)."""
    row = await tx.one(
        "UPDATE outbox SET status = 'CANCELLED', last_error = :r, updated_at_ms = :now"
        " WHERE id = :id AND status = 'SENDING' RETURNING id", {"r": reason, "now": now_ms, "id": row_id})
    return row is not None


async def advance_status(tx: Tx, provider_message_id: str, status: str, now_ms: int, error: str | None = None) -> OutboxRow | None:
    """Move the row sent as ``provider_message_id`` forward to ``status`` (never backwards).

    Returns the row as it is now if it moved, None if it did not (unknown id, duplicate, or
    an older status arriving late)."""
    rank = RANK[status]
    moved = await tx.one(
        "UPDATE outbox SET status = :st, last_error = COALESCE(:err, last_error), updated_at_ms = :now"
        " WHERE provider_message_id = :pid AND (CASE status"
        "  WHEN 'PENDING' THEN 0 WHEN 'SENDING' THEN 1 WHEN 'SENT' THEN 2 WHEN 'DELIVERED' THEN 3"
        "  WHEN 'READ' THEN 4 ELSE 5 END) < :rank RETURNING *",
        {"st": status, "err": error, "now": now_ms, "pid": provider_message_id, "rank": rank})
    return _row(moved) if moved else None


async def by_provider_id(tx: Tx, provider_message_id: str) -> OutboxRow | None:
    row = await tx.one("SELECT * FROM outbox WHERE provider_message_id = :pid", {"pid": provider_message_id})
    return _row(row) if row else None


async def get(tx: Tx, row_id: int) -> OutboxRow | None:
    row = await tx.one("SELECT * FROM outbox WHERE id = :id", {"id": row_id})
    return _row(row) if row else None


async def cancel_pending_for_invoice(tx: Tx, invoice_id: str, kinds: tuple[str, ...], now_ms: int) -> int:
    """Drop queued sends that no longer make sense (a reminder for a cancelled invoice)."""
    placeholders = ", ".join(f":k{i}" for i in range(len(kinds)))
    params: dict[str, Any] = {f"k{i}": k for i, k in enumerate(kinds)}
    params.update({"inv": invoice_id, "now": now_ms})
    rows = await tx.all(
        f"UPDATE outbox SET status = 'CANCELLED', updated_at_ms = :now WHERE invoice_id = :inv"
        f" AND status = 'PENDING' AND kind IN ({placeholders}) RETURNING id", params)
    return len(rows)


async def next_due_ms(tx: Tx, now_ms: int,
                      channels: tuple[Channel, ...] = (Channel.WHATSAPP, Channel.SMS)) -> int | None:
    """When a row on ``channels`` next becomes due: a retry's time or a lease running out, in
    the future. Rows due now but waiting behind one in flight are not counted: the end of that
    send wakes the outbox (counting them would make it spin)."""
    if not channels:
        return None
    in_channels = ", ".join(f"'{c.value}'" for c in channels)
    # A lease is claimable once it has run out, the millisecond after claimed_until_ms.
    due = "(CASE WHEN status = 'PENDING' THEN next_attempt_at_ms ELSE claimed_until_ms + 1 END)"
    return await tx.val(
        f"SELECT MIN({due}) FROM outbox WHERE status IN ('PENDING','SENDING') AND channel IN ({in_channels})"
        f" AND {due} > :now", {"now": now_ms})


async def pending_count(tx: Tx) -> int:
    return int(await tx.val("SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING')") or 0)


async def prune_content(tx: Tx, before_ms: int, limit: int = 5000) -> int:
    """Empty (to ``{}``) the content of sends created before ``before_ms`` that have left the
    outbox (sent, or given up): their text and the names and amounts in it are personal data,
    needed only while the send may still be made, or made again another way. The rows stay
    (what was sent to whom and when, and their dedupe keys). A row still to send is never
    touched, whatever its age. At most ``limit`` rows per call (``db.update_slice``); call
    until 0."""
    return await update_slice(
        tx, "outbox", "id", "content = '{}'",
        "status IN ('SENT','DELIVERED','READ','FAILED','CANCELLED') AND CAST(content AS TEXT) <> '{}'"
        " AND created_at_ms < :before", {"before": before_ms}, limit)


async def for_invoice(tx: Tx, invoice_id: str) -> list[OutboxRow]:
    rows = await tx.all("SELECT * FROM outbox WHERE invoice_id = :inv ORDER BY id", {"inv": invoice_id})
    return [_row(r) for r in rows]


async def for_recipient(tx: Tx, recipient: str) -> list[OutboxRow]:
    rows = await tx.all("SELECT * FROM outbox WHERE recipient = :to ORDER BY id", {"to": recipient})
    return [_row(r) for r in rows]
