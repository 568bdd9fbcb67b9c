"""Numbered SQL migrations, applied once each, in one transaction, and recorded.

Files are ``migrations/NNNN_name.sql``; ``{{SERIAL}}`` is replaced by the dialect's
auto-increment primary key. Several processes starting together on one PostgreSQL take an
advisory lock first, so exactly one of them applies each migration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from .db import Database, Tx

_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SERIAL = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "postgresql": "BIGSERIAL PRIMARY KEY"}
# Any constant will do; it only has to be the same in every InvoiceIQ process.
_PG_LOCK_ID = 47_114_242


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    found = []
    for entry in resources.files("invoiceiq.store").joinpath("migrations").iterdir():
        match = _NAME_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def statements(sql: str, dialect: str) -> list[str]:
    sql = sql.replace("{{SERIAL}}", _SERIAL[dialect])
    # Our migration files hold no semicolons inside strings or bodies: a plain split is exact.
    body = "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


async def applied_versions(db: Database) -> list[int]:
    async def job(tx: Tx) -> list[int]:
        if not await _has_table(tx):
            return []
        return [r["version"] for r in await tx.all("SELECT version FROM schema_migrations ORDER BY version")]

    return await db.read(job)


async def migrate(db: Database) -> list[int]:
    """Apply what is missing; return the versions applied now (empty when up to date)."""

    async def job(tx: Tx) -> list[int]:
        if tx.dialect == "postgresql":
            await tx.execute(f"SELECT pg_advisory_xact_lock({_PG_LOCK_ID})")
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)")
        done = {r["version"] for r in await tx.all("SELECT version FROM schema_migrations")}
        now_applied = []
        for migration in available():
            if migration.version in done:
                continue
            for statement in statements(migration.sql, tx.dialect):
                await tx.execute(statement)
            await tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (:v, :n)",
                {"v": migration.version, "n": migration.name})
            now_applied.append(migration.version)
        return now_applied

    return await db.write(job)


async def is_current(db: Database) -> bool:
    return set(await applied_versions(db)) >= {m.version for m in available()}


async def _has_table(tx: Tx) -> bool:
    if tx.dialect == "sqlite":
        sql = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_migrations'"
    else:
        sql = "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name='schema_migrations'"
    return await tx.val(sql) is not None
