"""The inbox: every provider event (and internal request) stored, deduped, then processed.

``put`` is the webhook's "durable before acknowledged" write and its dedupe in one atomic
statement: the ``(source, event_id)`` unique key decides which delivery is the first.
The owning actor calls ``mark_processed`` in the same transaction as the state change the
event causes, so an event is applied exactly once even across restarts and processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .db import Tx, update_slice
from .jsonio import dumps, loads


@dataclass(frozen=True, slots=True)
class InboxEvent:
    seq: int
    source: str
    event_id: str
    actor: str
    actor_key: str
    kind: str
    payload: dict[str, Any]
    received_at_ms: int


def _event(row: dict[str, Any]) -> InboxEvent:
    return InboxEvent(
        seq=int(row["seq"]), source=row["source"], event_id=row["event_id"], actor=row["actor"],
        actor_key=row["actor_key"], kind=row["kind"], payload=loads(row["payload"]) or {},
        received_at_ms=int(row["received_at_ms"]),
    )


async def put(
    tx: Tx,
    *,
    source: str,
    event_id: str,
    actor: str,
    actor_key: str,
    kind: str,
    payload: dict[str, Any],
    now_ms: int,
) -> int | None:
    """Store the event; its ``seq`` if it is new, None if this id was seen before."""
    return await tx.val(
        "INSERT INTO inbox (source, event_id, actor, actor_key, kind, payload, received_at_ms)"
        " VALUES (:src, :eid, :actor, :key, :kind, :payload, :now)"
        " ON CONFLICT (source, event_id) DO NOTHING RETURNING seq",
        {"src": source, "eid": event_id, "actor": actor, "key": actor_key, "kind": kind,
         "payload": dumps(payload), "now": now_ms},
    )


async def pending(tx: Tx, actor: str, actor_key: str, limit: int = 100) -> list[InboxEvent]:
    rows = await tx.all(
        "SELECT * FROM inbox WHERE actor = :actor AND actor_key = :key AND processed_at_ms IS NULL"
        " ORDER BY seq LIMIT :lim", {"actor": actor, "key": actor_key, "lim": limit})
    return [_event(r) for r in rows]


async def pending_for_actor(tx: Tx, actor: str, limit: int = 500) -> list[InboxEvent]:
    """Every waiting event of an actor that works in groups (delivery statuses), oldest first."""
    rows = await tx.all(
        "SELECT * FROM inbox WHERE actor = :actor AND processed_at_ms IS NULL ORDER BY seq LIMIT :lim",
        {"actor": actor, "lim": limit})
    return [_event(r) for r in rows]


async def mark_processed(tx: Tx, seq: int, now_ms: int) -> bool:
    """True for the one caller that processes the event; False if another already did."""
    row = await tx.one(
        "UPDATE inbox SET processed_at_ms = :now WHERE seq = :seq AND processed_at_ms IS NULL RETURNING seq",
        {"now": now_ms, "seq": seq})
    return row is not None


async def claim_unmatched(tx: Tx, source: str, event_id: str, actor: str, actor_key: str) -> bool:
    """Hand an event stored as unmatched (a callback that beat its push's answer) to its
    owner, now that we know it: unprocessed again, under the right actor and key."""
    row = await tx.one(
        "UPDATE inbox SET actor = :actor, actor_key = :key, processed_at_ms = NULL"
        " WHERE source = :src AND event_id = :eid AND actor = 'unmatched' RETURNING seq",
        {"actor": actor, "key": actor_key, "src": source, "eid": event_id})
    return row is not None


async def record_failure(tx: Tx, actor: str, actor_key: str, now_ms: int, *, give_up_after: int) -> InboxEvent | None:
    """Processing the oldest pending event of ``actor_key`` crashed: count it, and after
    ``give_up_after`` crashes set it aside (processed, marked dead) so that one poisoned event
    cannot block every later one of that conversation or invoice. Returns it if set aside."""
    first = await pending(tx, actor, actor_key, limit=1)
    if not first:
        return None
    event = first[0]
    failures = await tx.val("UPDATE inbox SET failures = failures + 1 WHERE seq = :seq RETURNING failures",
                            {"seq": event.seq})
    if int(failures or 0) < give_up_after:
        return None
    await tx.execute("UPDATE inbox SET processed_at_ms = :now, dead = 1 WHERE seq = :seq AND processed_at_ms IS NULL",
                     {"now": now_ms, "seq": event.seq})
    return event


async def unprocessed_keys(tx: Tx, received_before_ms: int, limit: int = 500) -> list[tuple[str, str]]:
    """(actor, key) pairs with events still waiting: what a restart (or a sweep) must resume."""
    rows = await tx.all(
        "SELECT actor, actor_key, MIN(seq) AS first FROM inbox WHERE processed_at_ms IS NULL"
        " AND received_at_ms <= :before GROUP BY actor, actor_key ORDER BY first LIMIT :lim",
        {"before": received_before_ms, "lim": limit})
    return [(r["actor"], r["actor_key"]) for r in rows]


async def count_unprocessed(tx: Tx) -> int:
    return int(await tx.val("SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL") or 0)


async def prune_payloads(tx: Tx, before_ms: int, limit: int = 5000) -> int:
    """Empty (to ``{}``) the payloads of events processed and received before ``before_ms``:
    message texts and raw callbacks are personal data, needed only until the event has been
    applied. The rows stay, because their ``(source, event_id)`` still deduplicates a provider
    that redelivers. At most ``limit`` rows per call (``db.update_slice``); call until 0."""
    return await update_slice(
        tx, "inbox", "seq", "payload = '{}'",
        "processed_at_ms IS NOT NULL AND received_at_ms < :before AND CAST(payload AS TEXT) <> '{}'",
        {"before": before_ms}, limit)
