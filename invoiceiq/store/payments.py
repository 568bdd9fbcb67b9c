"""Payments: the brief's ``payments`` rows (one per STK attempt) and their ``stk_attempts``."""

from __future__ import annotations

from .db import Tx


async def count_attempts(tx: Tx, invoice_id: str) -> int:
    return int(await tx.val("SELECT COUNT(*) FROM payments WHERE invoice_id = :inv", {"inv": invoice_id}) or 0)
