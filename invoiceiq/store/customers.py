"""Customers: the name <-> number book behind `invoice <name> ...`, and the 24-hour window."""

from __future__ import annotations

import re

from ..core.model import Customer
from .db import Tx


def name_key(name: str) -> str:
    """Case- and spacing-insensitive key: `  Mary   WANJIKU ` and `mary wanjiku` are one name."""
    return re.sub(r"\s+", " ", name).strip().casefold()


async def upsert(tx: Tx, msisdn: str, name: str | None, now_ms: int) -> None:
    """Record the customer; a new name replaces the old one, no name keeps it."""
    await tx.execute(
        "INSERT INTO customers (msisdn, name, name_key, created_at_ms)"
        " VALUES (:m, :n, :k, :now)"
        " ON CONFLICT (msisdn) DO UPDATE SET"
        "  name = COALESCE(excluded.name, customers.name),"
        "  name_key = COALESCE(excluded.name_key, customers.name_key)",
        {"m": msisdn, "n": name, "k": name_key(name) if name else None, "now": now_ms},
    )


async def find_by_name(tx: Tx, name: str, limit: int = 9) -> list[Customer]:
    rows = await tx.all(
        "SELECT msisdn, name FROM customers WHERE name_key = :k ORDER BY created_at_ms, msisdn LIMIT :lim",
        {"k": name_key(name), "lim": limit},
    )
    return [Customer(msisdn=r["msisdn"], name=r["name"]) for r in rows]


async def touch_inbound(tx: Tx, msisdn: str, at_ms: int) -> None:
    """The customer wrote to us at ``at_ms``: the WhatsApp window is open for 24 hours."""
    await tx.execute(
        "INSERT INTO customers (msisdn, last_inbound_at_ms, created_at_ms) VALUES (:m, :at, :at)"
        " ON CONFLICT (msisdn) DO UPDATE SET last_inbound_at_ms = CASE"
        "  WHEN customers.last_inbound_at_ms IS NULL OR customers.last_inbound_at_ms < excluded.last_inbound_at_ms"
        "  THEN excluded.last_inbound_at_ms ELSE customers.last_inbound_at_ms END",
        {"m": msisdn, "at": at_ms},
    )


async def last_inbound_ms(tx: Tx, msisdn: str) -> int | None:
    return await tx.val("SELECT last_inbound_at_ms FROM customers WHERE msisdn = :m", {"m": msisdn})
