"""Payments: the brief's ``payments`` rows (one per STK attempt) and their ``stk_attempts``.

At most one attempt per invoice is INITIATED at any time: the partial unique index
``payments_one_in_flight`` decides, in the INSERT itself, whichever process asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.model import PaymentStatus
from .db import Tx
from .ids import new_id
from .jsonio import dumps


@dataclass(frozen=True, slots=True)
class Attempt:
    payment_id: str
    invoice_id: str
    status: PaymentStatus
    phone: str
    amount_cents: int
    requested_at_ms: int
    checkout_request_id: str | None
    result_code: int | None
    result_desc: str | None
    next_check_at_ms: int | None
    expire_at_ms: int
    resolved_at_ms: int | None
    mpesa_receipt: str | None
    queries: int
    source: str


_SELECT = (
    "SELECT p.id AS payment_id, p.invoice_id, p.status, p.amount_cents, p.mpesa_receipt, a.phone,"
    " a.requested_at_ms, a.checkout_request_id, a.result_code, a.result_desc, a.next_check_at_ms,"
    " a.expire_at_ms, a.resolved_at_ms, a.queries, a.source"
    " FROM payments p JOIN stk_attempts a ON a.payment_id = p.id"
)


def _attempt(r: dict[str, Any]) -> Attempt:
    return Attempt(
        payment_id=r["payment_id"], invoice_id=r["invoice_id"], status=PaymentStatus(r["status"]),
        phone=r["phone"], amount_cents=int(r["amount_cents"]), requested_at_ms=int(r["requested_at_ms"]),
        checkout_request_id=r["checkout_request_id"], result_code=r["result_code"],
        result_desc=r["result_desc"], next_check_at_ms=r["next_check_at_ms"],
        expire_at_ms=int(r["expire_at_ms"]), resolved_at_ms=r["resolved_at_ms"],
        mpesa_receipt=r["mpesa_receipt"], queries=int(r["queries"] or 0), source=r["source"],
    )


async def lock_phone(tx: Tx, phone: str) -> None:
    """Serialise the Pay decisions of ``phone`` until this transaction ends: its invoices may be
    decided by different actors, in different processes, and each must read the prompts the
    previous one committed.

    The row is written and deleted at once: on PostgreSQL a second caller's INSERT meets the
    first's uncommitted row and waits for that transaction to end (READ COMMITTED then gives
    its next statement a fresh snapshot), and the table is empty at rest, so it keeps no phone
    number (test_data_protection.py). SQLite's single writer serialises anyway."""
    params = {"ph": phone}
    await tx.execute("INSERT INTO push_locks (phone) VALUES (:ph)"
                     " ON CONFLICT (phone) DO UPDATE SET phone = excluded.phone", params)
    await tx.execute("DELETE FROM push_locks WHERE phone = :ph", params)


async def start(tx: Tx, *, invoice_id: str, phone: str, amount_cents: int, now_ms: int,
                next_check_at_ms: int, expire_at_ms: int, source: str) -> Attempt | None:
    """Insert a new INITIATED attempt; None if one is already in flight for this invoice."""
    payment_id = new_id("pay")
    inserted = await tx.val(
        "INSERT INTO payments (id, invoice_id, method, status, amount_cents)"
        " VALUES (:id, :inv, 'MPESA_STK', 'INITIATED', :amt)"
        " ON CONFLICT (invoice_id) WHERE status = 'INITIATED' DO NOTHING RETURNING id",
        {"id": payment_id, "inv": invoice_id, "amt": amount_cents})
    if inserted is None:
        return None
    await tx.execute(
        "INSERT INTO stk_attempts (payment_id, invoice_id, phone, requested_at_ms, next_check_at_ms,"
        " expire_at_ms, source, queries) VALUES (:id, :inv, :phone, :now, :chk, :exp, :src, 0)",
        {"id": payment_id, "inv": invoice_id, "phone": phone, "now": now_ms, "chk": next_check_at_ms,
         "exp": expire_at_ms, "src": source})
    return Attempt(payment_id, invoice_id, PaymentStatus.INITIATED, phone, amount_cents, now_ms, None, None,
                   None, next_check_at_ms, expire_at_ms, None, None, 0, source)


async def accepted(tx: Tx, payment_id: str, *, checkout_request_id: str, merchant_request_id: str,
                   raw_request: dict[str, Any]) -> None:
    """Daraja took the push: remember its ids (the keys of the callback and the query)."""
    await tx.execute(
        "UPDATE stk_attempts SET checkout_request_id = :co, merchant_request_id = :mr WHERE payment_id = :id",
        {"co": checkout_request_id, "mr": merchant_request_id, "id": payment_id})
    await record_request(tx, payment_id, raw_request)


async def record_request(tx: Tx, payment_id: str, raw_request: Mapping[str, Any]) -> None:
    """The STK Push body as sent (no password): kept whether Daraja took it, refused it or
    never answered, for reconciling by hand."""
    await tx.execute(
        "UPDATE payments SET raw_request = :raw, updated_at = CURRENT_TIMESTAMP WHERE id = :id",
        {"raw": dumps(dict(raw_request)), "id": payment_id})


async def resolve(tx: Tx, payment_id: str, *, status: PaymentStatus, result_code: int | None,
                  result_desc: str, now_ms: int, receipt: str | None = None,
                  raw_callback: dict[str, Any] | None = None, only_if_initiated: bool = False) -> bool:
    """Set the attempt's outcome. ``only_if_initiated``: a compare-and-set, so that a query answer
    and a callback racing to resolve one attempt cannot both apply their effects."""
    guard = " AND status = 'INITIATED'" if only_if_initiated else ""
    done = await tx.val(
        "UPDATE payments SET status = :st, mpesa_receipt = COALESCE(:rcpt, mpesa_receipt),"
        " raw_callback = COALESCE(:raw, raw_callback), updated_at = CURRENT_TIMESTAMP"
        f" WHERE id = :id{guard} RETURNING id",
        {"st": status.value, "rcpt": receipt, "raw": dumps(raw_callback) if raw_callback is not None else None,
         "id": payment_id})
    if done is None:
        return False
    await tx.execute(
        "UPDATE stk_attempts SET result_code = :code, result_desc = :desc, resolved_at_ms = :now,"
        " next_check_at_ms = NULL WHERE payment_id = :id",
        {"code": result_code, "desc": result_desc[:300], "now": now_ms, "id": payment_id})
    return True


async def set_receipt(tx: Tx, payment_id: str, invoice_id: str, receipt: str, placeholder: str | None) -> None:
    """The real M-PESA receipt for an attempt settled by a query (which carries none): replace
    the stand-in reference on the payment and on the invoice."""
    await tx.execute("UPDATE payments SET mpesa_receipt = :r WHERE id = :id AND mpesa_receipt IS NULL",
                     {"r": receipt, "id": payment_id})
    if placeholder:
        await tx.execute("UPDATE invoices SET pay_ref = :r WHERE id = :inv AND pay_ref = :old",
                         {"r": receipt, "inv": invoice_id, "old": placeholder})


async def receipt_used_elsewhere(tx: Tx, receipt: str, payment_id: str) -> bool:
    """True when another attempt already holds this M-PESA receipt (a replayed or forged
    callback must not settle a second invoice with one payment)."""
    used = await tx.val("SELECT id FROM payments WHERE mpesa_receipt = :r AND id <> :id LIMIT 1",
                        {"r": receipt, "id": payment_id})
    return used is not None


async def claim_check(tx: Tx, payment_id: str, expected_next_ms: int, new_next_ms: int) -> bool:
    """Claim a due status query (so exactly one process sends it) and schedule the next one."""
    done = await tx.val(
        "UPDATE stk_attempts SET next_check_at_ms = :new, queries = queries + 1"
        " WHERE payment_id = :id AND next_check_at_ms = :old AND resolved_at_ms IS NULL RETURNING payment_id",
        {"new": new_next_ms, "id": payment_id, "old": expected_next_ms})
    return done is not None


async def in_flight(tx: Tx, invoice_id: str) -> Attempt | None:
    row = await tx.one(f"{_SELECT} WHERE p.invoice_id = :inv AND p.status = 'INITIATED'", {"inv": invoice_id})
    return _attempt(row) if row else None


async def by_checkout_id(tx: Tx, checkout_request_id: str) -> Attempt | None:
    row = await tx.one(f"{_SELECT} WHERE a.checkout_request_id = :co", {"co": checkout_request_id})
    return _attempt(row) if row else None


# The class id of the advisory locks below (two-int keys never meet the one-bigint keys of
# migrations and the Daraja token).
_CHECKOUT_LOCK_CLASS = 7001


async def serialize_checkout(tx: Tx, checkout_request_id: str) -> None:
    """Make a callback and its push's answer, about one CheckoutRequestID, take turns.

    On PostgreSQL (READ COMMITTED) each could otherwise miss the other's uncommitted row: the
    callback, not finding the id yet, is stored aside as unmatched while the answer's
    ``inbox.claim_unmatched`` looks for it and finds nothing; the payment would then wait for
    the status query. Held to the end of the transaction. SQLite has one writer: no-op."""
    if tx.dialect == "postgresql":
        await tx.execute("SELECT pg_advisory_xact_lock(:cls, hashtext(:co))",
                         {"cls": _CHECKOUT_LOCK_CLASS, "co": checkout_request_id})


async def for_callback(tx: Tx, checkout_request_id: str, phone: str | None) -> Attempt | None:
    """The attempt a callback is about, in ONE statement (one snapshot): by its
    CheckoutRequestID, or else — when the push's answer was lost or is being recorded right
    now by another process — the in-flight attempt without an id for the paying phone."""
    row = await tx.one(
        f"{_SELECT} WHERE a.checkout_request_id = :co"
        " OR (:ph <> '' AND a.phone = :ph AND p.status = 'INITIATED' AND a.checkout_request_id IS NULL)"
        " ORDER BY CASE WHEN a.checkout_request_id = :co THEN 0 ELSE 1 END, a.requested_at_ms DESC LIMIT 1",
        {"co": checkout_request_id, "ph": phone or ""})
    return _attempt(row) if row else None


async def orphan_for_phone(tx: Tx, phone: str) -> Attempt | None:
    """An in-flight attempt whose push answer was lost (no CheckoutRequestID), for this phone:
    the only way to tie a callback with an unknown id back to its invoice."""
    row = await tx.one(
        f"{_SELECT} WHERE a.phone = :ph AND p.status = 'INITIATED' AND a.checkout_request_id IS NULL"
        " ORDER BY a.requested_at_ms DESC LIMIT 1", {"ph": phone})
    return _attempt(row) if row else None


async def adopt_checkout_id(tx: Tx, payment_id: str, checkout_request_id: str) -> None:
    await tx.execute("UPDATE stk_attempts SET checkout_request_id = :co WHERE payment_id = :id"
                     " AND checkout_request_id IS NULL", {"co": checkout_request_id, "id": payment_id})


async def for_invoice(tx: Tx, invoice_id: str) -> list[Attempt]:
    rows = await tx.all(f"{_SELECT} WHERE p.invoice_id = :inv ORDER BY a.requested_at_ms", {"inv": invoice_id})
    return [_attempt(r) for r in rows]


async def recent_pushes(tx: Tx, phone: str, since_ms: int) -> tuple[int, ...]:
    rows = await tx.all("SELECT requested_at_ms FROM stk_attempts WHERE phone = :ph AND requested_at_ms >= :since",
                        {"ph": phone, "since": since_ms})
    return tuple(int(r["requested_at_ms"]) for r in rows)


async def due_checks(tx: Tx, now_ms: int, limit: int = 200) -> list[str]:
    """Invoices with an unresolved attempt due for a status query or for expiry."""
    rows = await tx.all(
        "SELECT DISTINCT invoice_id FROM stk_attempts WHERE resolved_at_ms IS NULL"
        " AND next_check_at_ms IS NOT NULL AND next_check_at_ms <= :now LIMIT :lim",
        {"now": now_ms, "lim": limit})
    return [r["invoice_id"] for r in rows]


async def next_check_ms(tx: Tx) -> int | None:
    # "IS NOT NULL" lets the index skip every resolved attempt (their next check is NULL)
    # instead of walking them all: 26 ms -> 0.1 ms with 62,000 paid invoices.
    return await tx.val("SELECT MIN(next_check_at_ms) FROM stk_attempts"
                        " WHERE next_check_at_ms IS NOT NULL AND resolved_at_ms IS NULL")


async def unresolved(tx: Tx) -> list[Attempt]:
    rows = await tx.all(f"{_SELECT} WHERE a.resolved_at_ms IS NULL ORDER BY a.requested_at_ms")
    return [_attempt(r) for r in rows]


async def count_attempts(tx: Tx, invoice_id: str) -> int:
    return int(await tx.val("SELECT COUNT(*) FROM payments WHERE invoice_id = :inv", {"inv": invoice_id}) or 0)
