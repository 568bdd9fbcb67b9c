"""Small facts shared by every process: generated secrets, heartbeats."""

from __future__ import annotations

from .db import Tx


async def get(tx: Tx, key: str) -> str | None:
    return await tx.val("SELECT value FROM meta WHERE key = :k", {"k": key})


async def get_or_set(tx: Tx, key: str, value: str) -> str:
    """The stored value, or ``value`` if none was stored: the first process to ask decides."""
    await tx.execute("INSERT INTO meta (key, value) VALUES (:k, :v) ON CONFLICT (key) DO NOTHING",
                     {"k": key, "v": value})
    stored = await get(tx, key)
    assert stored is not None
    return stored


async def heartbeat(tx: Tx, key: str, value: str) -> None:
    await tx.execute("INSERT INTO meta (key, value) VALUES (:k, :v)"
                     " ON CONFLICT (key) DO UPDATE SET value = excluded.value", {"k": key, "v": value})
