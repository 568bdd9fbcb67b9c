"""The brief's ``message_log``: one row for every message and every delivery event."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..core.model import Channel, Direction
from .db import Tx, update_slice
from .ids import new_id
from .jsonio import dumps


async def log_message(
    tx: Tx,
    *,
    channel: Channel,
    direction: Direction,
    event: str,
    payload: dict[str, Any],
    invoice_id: str | None = None,
) -> str:
    """``payload`` holds what identifies the message (ids, kind, status) and its content for
    inbound/outbound messages; never a credential."""
    row_id = new_id("ml")
    await tx.execute(
        "INSERT INTO message_log (id, invoice_id, channel, direction, event, payload)"
        " VALUES (:id, :inv, :ch, :dir, :ev, :payload)",
        {"id": row_id, "inv": invoice_id, "ch": channel.value, "dir": direction.value,
         "ev": event, "payload": dumps(payload)},
    )
    return row_id


async def log_whatsapp_in(tx: Tx, wamid: str, stored: dict[str, Any], event: str = "inbound") -> str:
    """The row of a WhatsApp message received: its wamid and what the inbox keeps of it."""
    return await log_message(tx, channel=Channel.WHATSAPP, direction=Direction.IN, event=event,
                             payload={"wamid": wamid, **stored})


async def for_invoice(tx: Tx, invoice_id: str) -> list[dict[str, Any]]:
    return await tx.all(
        "SELECT id, channel, direction, event, payload, created_at FROM message_log"
        " WHERE invoice_id = :inv ORDER BY created_at, id", {"inv": invoice_id})


async def prune_payloads_batch(tx: Tx, before: datetime, limit: int = 5000) -> int:
    """Drop the content of messages logged before ``before`` (naive UTC), keeping the rows and
    their events; at most ``limit`` rows per call (``db.update_slice``), call until 0."""
    # SQLite stores CURRENT_TIMESTAMP as UTC text; asyncpg wants a datetime for TIMESTAMP.
    bound: Any = before.strftime("%Y-%m-%d %H:%M:%S") if tx.dialect == "sqlite" else before
    return await update_slice(tx, "message_log", "id", "payload = NULL",
                              "created_at < :before AND payload IS NOT NULL", {"before": bound}, limit)
