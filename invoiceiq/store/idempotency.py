"""Idempotency keys of the internal API: the first response for a key is the answer forever.

``begin`` inserts the key row *before* the guarded work, in the same transaction, so two
concurrent requests with one key produce one invoice: the second one's insert waits for
(PostgreSQL) or is serialised after (SQLite's single writer) the first one's commit, and then
finds the finished response instead of doing the work again.
"""

from __future__ import annotations

from dataclasses import dataclass

from .db import Tx


@dataclass(frozen=True, slots=True)
class StoredResponse:
    request_hash: str
    status_code: int
    body: str


async def begin(tx: Tx, scope: str, key: str, request_hash: str, now_ms: int) -> StoredResponse | None:
    """None if this request owns the key now (do the work, then ``finish``); else the
    response stored by the request that owned it first."""
    owned = await tx.val(
        "INSERT INTO idempotency_keys (scope, idem_key, request_hash, status_code, response_body, created_at_ms)"
        " VALUES (:s, :k, :h, 0, '', :now) ON CONFLICT (scope, idem_key) DO NOTHING RETURNING idem_key",
        {"s": scope, "k": key, "h": request_hash, "now": now_ms})
    if owned is not None:
        return None
    row = await tx.one(
        "SELECT request_hash, status_code, response_body FROM idempotency_keys"
        " WHERE scope = :s AND idem_key = :k", {"s": scope, "k": key})
    assert row is not None
    return StoredResponse(row["request_hash"], int(row["status_code"]), row["response_body"])


async def finish(tx: Tx, scope: str, key: str, status_code: int, body: str) -> None:
    await tx.execute(
        "UPDATE idempotency_keys SET status_code = :c, response_body = :b WHERE scope = :s AND idem_key = :k",
        {"c": status_code, "b": body, "s": scope, "k": key})


async def release(tx: Tx, scope: str, key: str) -> None:
    """Give the key back (an answer that says "try again later" must not be replayed forever)."""
    await tx.execute("DELETE FROM idempotency_keys WHERE scope = :s AND idem_key = :k", {"s": scope, "k": key})


async def prune_batch(tx: Tx, before_ms: int, limit: int = 5000) -> int:
    """Delete keys created before ``before_ms``, in slices of at most ``limit`` keys (one short
    transaction each); call until it returns 0. A client retrying with a deleted key gets its request done again, so keep
    keys far longer than any client retries (days, not minutes)."""
    rows = await tx.all(
        "DELETE FROM idempotency_keys WHERE (scope, idem_key) IN (SELECT scope, idem_key"
        " FROM idempotency_keys WHERE created_at_ms < :b LIMIT :lim) RETURNING idem_key",
        {"b": before_ms, "lim": limit})
    return len(rows)
