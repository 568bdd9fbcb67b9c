"""The store: the one place where SQL lives.

``Store`` owns the connections (see ``db``) and the migrations; the modules beside it
(``invoices``, ``inbox``, ``outbox``, ...) are the queries, as functions of a ``Tx``. Callers
compose them inside ``store.write(job)`` so that a state change and the sends it causes
commit together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import anyio

from . import migrate as migrations
from .db import Conflict, Database, Job, StoreError, Tx

T = TypeVar("T")

__all__ = ["Conflict", "Store", "StoreError", "Tx"]


class Store:
    def __init__(self, url: str, *, pg_options: Mapping[str, Any] | None = None, pg_pool: int = 10) -> None:
        self.db = Database(url, pg_options=pg_options, pg_pool=pg_pool)

    @property
    def dialect(self) -> str:
        return self.db.dialect

    async def open(self) -> None:
        await self.db.connect()

    async def close(self) -> None:
        await self.db.disconnect()

    async def run_writer(self) -> None:
        await self.db.run_writer()

    async def migrate(self) -> list[int]:
        return await migrations.migrate(self.db)

    async def migrations_current(self) -> bool:
        return await migrations.is_current(self.db)

    async def write(self, job: Job[T]) -> T:
        return await self.db.write(job)

    async def read(self, job: Job[T]) -> T:
        """A read of a few rows (found through an index): inline on SQLite."""
        return await self.db.read(job)

    async def scan(self, job: Job[T]) -> T:
        """A read whose time grows with the data (counts, listings, sweeps): off the loop."""
        return await self.db.scan(job)

    async def check(self, timeout_s: float = 2.0) -> str | None:
        """None when the database answers a read and takes a write; else what failed."""
        async def probe_read(tx: Tx) -> Any:
            return await tx.val("SELECT 1")

        async def probe_write(tx: Tx) -> None:
            # A real write through the real write path: a read-only file or a lost server fails here.
            await tx.execute("UPDATE counters SET value = value WHERE name = 'invoice'")

        try:
            with anyio.fail_after(timeout_s):
                await self.read(probe_read)
                await self.write(probe_write)
        except TimeoutError:
            return "database: no answer within the timeout"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return f"database: {type(exc).__name__}: {str(exc)[:200]}"
        # The probe is one tiny row: a nearly full disk can take it while real writes fail.
        # So a failed group keeps readiness at 503 for 15 s even if later (smaller) groups
        # commit: the load balancer stops sending for a moment rather than flapping.
        if (recent := self.db.writer_failed_recently()) is not None:
            return f"database: writes failed in the last seconds: {recent[:200]}"
        return None
