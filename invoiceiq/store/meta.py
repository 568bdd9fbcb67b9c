"""Small facts shared by every process: generated secrets, heartbeats."""

from __future__ import annotations

from typing import Any

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


class SharedToken:
    """A provider access token shared by every process through the ``meta`` table (Daraja
    revokes the previous token whenever one is minted: instances must not each mint their own)."""

    def __init__(self, store: Any, key: str) -> None:
        self._store = store
        self._key = key

    async def load(self) -> tuple[str, int] | None:
        raw = await self._store.read(lambda tx: get(tx, self._key))
        if not raw:
            return None
        token, _, refresh_at = raw.rpartition(" ")
        return (token, int(refresh_at)) if token and refresh_at.isdigit() else None

    async def save(self, token: str, refresh_at_ms: int) -> None:
        await self._store.write(lambda tx: heartbeat(tx, self._key, f"{token} {refresh_at_ms}"))
