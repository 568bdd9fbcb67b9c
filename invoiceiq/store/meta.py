"""Small facts shared by every process: generated secrets, heartbeats."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
    revokes the previous token whenever one is minted: instances must not each mint their own).

    On PostgreSQL a refresh takes an advisory lock for the length of the mint, so that two
    processes whose token was refused at the same moment mint once: the second finds the
    first's new token. (SQLite means one process, whose client already mints under a lock.)"""

    _LOCK = 47_114_243

    def __init__(self, store: Any, key: str, now: Callable[[], int]) -> None:
        self._store = store
        self._key = key
        self._now = now

    def _usable(self, raw: str | None, refused: str | None) -> tuple[str, int] | None:
        """The stored token if it is not the one just refused and not due for refresh."""
        token, _, refresh_at = (raw or "").rpartition(" ")
        if token and token != refused and refresh_at.isdigit() and self._now() < int(refresh_at):
            return token, int(refresh_at)
        return None

    async def exchange(self, refused: str | None,
                       mint: Callable[[], Awaitable[tuple[str, int]]]) -> tuple[str, int]:
        async def job(tx: Tx) -> tuple[str, int]:
            await tx.execute(f"SELECT pg_advisory_xact_lock({self._LOCK})")
            if (usable := self._usable(await get(tx, self._key), refused)) is not None:
                return usable
            token, refresh_at_ms = await mint()
            await heartbeat(tx, self._key, f"{token} {refresh_at_ms}")
            return token, refresh_at_ms

        if self._store.dialect == "postgresql":
            # The mint (an HTTP call) runs inside this transaction, holding the lock: fine on
            # PostgreSQL, where a job owns its own connection.
            return await self._store.write(job)
        if (usable := self._usable(await self._store.read(lambda tx: get(tx, self._key)), refused)) is not None:
            return usable
        # SQLite's writer runs jobs without I/O: mint first, then share.
        token, refresh_at_ms = await mint()
        await self._store.write(lambda tx: heartbeat(tx, self._key, f"{token} {refresh_at_ms}"))
        return token, refresh_at_ms
