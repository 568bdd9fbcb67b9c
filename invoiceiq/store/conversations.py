"""Conversation rows: the state machine's state as JSON, a version, and the next due timer.

A step is a compare-and-set on ``version``: two processes that load the same version cannot
both save, the loser gets ``Conflict`` and re-runs its step on the winner's state. On
PostgreSQL the row is also locked (``FOR UPDATE``) so that the race is rare to begin with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .db import Conflict, Tx
from .jsonio import dumps, loads

NEW = -1  # version of a conversation that has no row yet


@dataclass(frozen=True, slots=True)
class ConversationRow:
    key: str
    role: str
    state: dict[str, Any]
    version: int
    due_at_ms: int | None


async def load(tx: Tx, key: str, role: str) -> ConversationRow:
    lock = " FOR UPDATE" if tx.dialect == "postgresql" else ""
    row = await tx.one(
        f"SELECT conv_key, role, state, version, due_at_ms FROM conversations WHERE conv_key = :k{lock}",
        {"k": key})
    if row is None:
        return ConversationRow(key=key, role=role, state={}, version=NEW, due_at_ms=None)
    return ConversationRow(key=key, role=row["role"], state=loads(row["state"]) or {},
                           version=int(row["version"]), due_at_ms=row["due_at_ms"])


async def save(tx: Tx, row: ConversationRow, state: dict[str, Any], due_at_ms: int | None, now_ms: int) -> int:
    """Write the new state if nobody else did since ``row`` was loaded; the new version."""
    params = {"k": row.key, "s": dumps(state), "due": due_at_ms, "now": now_ms}
    if row.version == NEW:
        saved = await tx.one(
            "INSERT INTO conversations (conv_key, role, state, version, due_at_ms, updated_at_ms)"
            " VALUES (:k, :role, :s, 0, :due, :now) ON CONFLICT (conv_key) DO NOTHING RETURNING version",
            {**params, "role": row.role})
    else:
        saved = await tx.one(
            "UPDATE conversations SET state = :s, version = version + 1, due_at_ms = :due,"
            " updated_at_ms = :now WHERE conv_key = :k AND version = :v RETURNING version",
            {**params, "v": row.version})
    if saved is None:
        raise Conflict(f"conversation changed under us (version {row.version})")
    return int(saved["version"])


async def due(tx: Tx, now_ms: int, limit: int = 200) -> list[tuple[str, str]]:
    """(key, role) of conversations whose timer is due."""
    rows = await tx.all(
        "SELECT conv_key, role FROM conversations WHERE due_at_ms IS NOT NULL AND due_at_ms <= :now"
        " ORDER BY due_at_ms LIMIT :lim", {"now": now_ms, "lim": limit})
    return [(r["conv_key"], r["role"]) for r in rows]


async def next_due_ms(tx: Tx) -> int | None:
    return await tx.val("SELECT MIN(due_at_ms) FROM conversations WHERE due_at_ms IS NOT NULL")


async def count(tx: Tx) -> int:
    return int(await tx.val("SELECT COUNT(*) FROM conversations") or 0)
