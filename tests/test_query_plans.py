"""The queries that run again and again (the actors' polling loops) must not read history.

A database that has served a merchant for a year holds hundreds of thousands of finished
outbox rows, paid invoices and resolved STK attempts. A loop query that scans them costs
milliseconds per call on the single writer and makes every flow slower as the business grows
(bench/: one ``claim_due`` took 127 ms with 390,000 finished outbox rows when SQLite walked the
table in ``id`` order for ``ORDER BY o.id LIMIT``, 0.2 ms through the partial index).

SQLite plans without statistics (the daemon never runs ANALYZE), so the plan on an empty
migrated file is the plan on a full one: each loop query is planned here with
``EXPLAIN QUERY PLAN`` and must reach its rows through a constraint on an index, or walk only
a partial index, whose rows are the unfinished ones."""

from __future__ import annotations

import re
import sqlite3
from datetime import datetime
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from invoiceiq.store import Store, conversations, idempotency, inbox, invoices, messages, outbox, payments
from invoiceiq.store.db import SqliteTx, Tx, _dict_row

pytestmark = pytest.mark.anyio

NOW = 1_790_000_000_000


class PlanningTx(SqliteTx):
    """Runs each statement after recording SQLite's plan for it."""

    __slots__ = ("plans",)

    def __init__(self, raw: sqlite3.Connection) -> None:
        super().__init__(raw)
        self.plans: list[tuple[str, list[str]]] = []

    def _plan(self, sql: str, params: Mapping[str, Any] | None) -> None:
        rows = self._raw.execute("EXPLAIN QUERY PLAN " + sql, params or {}).fetchall()
        self.plans.append((sql, [r["detail"] for r in rows]))

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._plan(sql, params)
        await super().execute(sql, params)

    async def one(self, sql: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        self._plan(sql, params)
        return await super().one(sql, params)

    async def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        self._plan(sql, params)
        return await super().all(sql, params)

    async def val(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        self._plan(sql, params)
        return await super().val(sql, params)


# Each loop query, as the actors call it (actors/outbox.py, payment.py, session.py, runtime.py).
LOOP_QUERIES: dict[str, Callable[[Tx], Awaitable[Any]]] = {
    "outbox.claim_due": lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=16, worker="w1", lease_ms=30_000),
    "outbox.next_due_ms": lambda tx: outbox.next_due_ms(tx, NOW),
    "outbox.pending_count": outbox.pending_count,
    "payments.due_checks": lambda tx: payments.due_checks(tx, NOW),
    "payments.next_check_ms": payments.next_check_ms,
    "payments.recent_pushes": lambda tx: payments.recent_pushes(tx, "254712345678", NOW - 600_000),
    "payments.in_flight": lambda tx: payments.in_flight(tx, "1001"),
    "payments.for_callback": lambda tx: payments.for_callback(tx, "ws_CO_1", "254712345678"),
    "payments.for_invoice": lambda tx: payments.for_invoice(tx, "1001"),  # after every payment event
    "conversations.due": lambda tx: conversations.due(tx, NOW),
    "conversations.next_due_ms": conversations.next_due_ms,
    "inbox.pending": lambda tx: inbox.pending(tx, "session", "254712345678"),
    "inbox.pending_for_actor": lambda tx: inbox.pending_for_actor(tx, "payment"),
    "inbox.unprocessed_keys": lambda tx: inbox.unprocessed_keys(tx, NOW),
    "inbox.count_unprocessed": inbox.count_unprocessed,
    "invoices.open_totals": lambda tx: invoices.open_totals(tx, "254712345678"),
}


def partial_indexes(raw: sqlite3.Connection) -> set[str]:
    rows = raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetchall()
    return {r["name"] for r in rows if re.search(r"\bWHERE\b", r["sql"], re.IGNORECASE)}


def reads_history(detail: str, partial: set[str]) -> bool:
    """A plan step that visits rows no constraint selects: a table scan, a walk of a full
    (non-partial) index, or a SEARCH that names an index without a constraint on it."""
    index = re.search(r"USING (?:COVERING )?INDEX (\w+)", detail)
    if detail.startswith("SCAN "):
        return not (index and index.group(1) in partial)
    if detail.startswith("SEARCH ") and index and "(" not in detail:
        return index.group(1) not in partial
    return False


@pytest.fixture
async def migrated(tmp_path: Path) -> Path:
    """An empty SQLite file with every migration applied."""
    path = tmp_path / "plans.db"
    store = Store(f"sqlite:///{path}")
    await store.open()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run_writer)
            await store.migrate()
            tg.cancel_scope.cancel()
    finally:
        await store.close()
    return path


@pytest.mark.parametrize("name", sorted(LOOP_QUERIES))
async def test_loop_queries_do_not_read_history(migrated: Path, name: str) -> None:
    raw = sqlite3.connect(migrated, isolation_level=None)
    raw.row_factory = _dict_row
    try:
        tx = PlanningTx(raw)
        raw.execute("BEGIN")
        await LOOP_QUERIES[name](tx)
        raw.execute("ROLLBACK")
        assert tx.plans, f"{name} ran no statement"
        partial = partial_indexes(raw)
        bad = [(sql, step) for sql, plan in tx.plans for step in plan if reads_history(step, partial)]
        assert not bad, f"{name} reads every row ever written: {bad}"
    finally:
        raw.close()


def test_the_rule_catches_the_scans_it_is_for() -> None:
    partial = {"outbox_due", "inbox_pending"}
    assert reads_history("SCAN o", partial)  # ORDER BY o.id LIMIT walked the whole table
    assert reads_history("SEARCH stk_attempts USING INDEX stk_attempts_check", partial)  # MIN() over NULLs
    assert reads_history("SCAN invoices USING COVERING INDEX invoices_status", partial)
    assert not reads_history("SCAN outbox USING INDEX outbox_due", partial)
    assert not reads_history("SEARCH o USING INDEX outbox_due (next_attempt_at_ms<?)", partial)
    assert not reads_history("SEARCH outbox USING INTEGER PRIMARY KEY (rowid=?)", partial)


# -- the outbox's ordering rule must not be quadratic in a campaign's backlog -----------------


def _backlog(raw: sqlite3.Connection, notices: int, *, plain_first: str | None = None) -> None:
    """``notices`` unfinished merchant notices, one per invoice (their own order keys), to one
    recipient; ``plain_first``: an earlier plain chat reply in that status ahead of them."""
    merchant = "254700000001"
    row = ("INSERT INTO outbox (recipient, order_key, channel, kind, content, status, next_attempt_at_ms,"
           " claimed_until_ms, created_at_ms, updated_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?)")
    raw.execute("BEGIN")
    if plain_first is not None:
        raw.execute(row, (merchant, merchant, "WHATSAPP", "reply", "{}", plain_first, NOW, NOW + 60_000, NOW, NOW))
    for i in range(notices):
        raw.execute(row, (merchant, f"inv{i}", "WHATSAPP", "notice", "{}", "PENDING", NOW, None, NOW, NOW))
    raw.execute("COMMIT")


async def _claim_steps(path: Path) -> tuple[int, int]:
    """(rows claimed, SQLite virtual-machine steps/100) of one claim of 2: a count of work
    that does not depend on the machine's speed."""
    raw = sqlite3.connect(path, isolation_level=None)
    raw.row_factory = _dict_row
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        raw.set_progress_handler(count, 100)
        raw.execute("BEGIN")
        rows = await outbox.claim_due(SqliteTx(raw), now_ms=NOW, limit=2, worker="w", lease_ms=1000)
        raw.execute("ROLLBACK")
        return len(rows), steps
    finally:
        raw.close()


@pytest.mark.parametrize("plain_first", [None, "SENDING"])
async def test_a_claim_costs_at_most_linear_work_in_the_backlog_of_one_recipient(
        migrated: Path, tmp_path: Path, plain_first: str | None) -> None:
    """bench/: 42,000 invoice notices to one merchant (a campaign) stopped the outbox for
    minutes: every candidate asked "is an earlier unfinished row holding me back?" by walking
    the recipient's earlier rows (1,000 rows: 6 M steps; 4,000: 96 M). Now each question is an
    index seek: with claimable rows at the front the claim's work does not grow with the
    backlog; with all of them held back behind a send in flight, it grows linearly."""
    work = {}
    for notices in (1000, 4000):
        path = tmp_path / f"backlog{notices}.db"
        path.write_bytes(migrated.read_bytes())
        raw = sqlite3.connect(path, isolation_level=None)
        _backlog(raw, notices, plain_first=plain_first)
        raw.close()
        claimed, steps = await _claim_steps(path)
        assert claimed == (0 if plain_first else 2)  # held back behind the reply in flight, or two notices
        work[notices] = steps
    if plain_first is None:
        assert work[4000] <= work[1000] + 5, work
    else:
        assert work[4000] <= 4 * work[1000] + 50, work  # linear: four times the rows, four times the work



# -- `invoiceiq prune` slices must not walk what earlier slices (and days) pruned ----------------


def _prune_history(raw: sqlite3.Connection, pruned: int) -> None:
    """``pruned`` old rows already pruned (and 10 still to prune) in each table prune visits,
    and ``pruned`` recent idempotency keys that are not due yet."""
    old_ms, old_ts = NOW - 90 * 86_400_000, "2026-01-01 00:00:00"
    raw.execute("BEGIN")
    for i in range(pruned + 10):
        payload = None if i < pruned else '{"text": "hello"}'
        raw.execute("INSERT INTO message_log (id, channel, direction, event, payload, created_at)"
                    " VALUES (?, 'WHATSAPP', 'IN', 'inbound', ?, ?)", (f"ml_{i:08d}", payload, old_ts))
        raw.execute("INSERT INTO inbox (source, event_id, actor, actor_key, kind, payload, received_at_ms,"
                    " processed_at_ms) VALUES ('whatsapp', ?, 'session', '254712345678', 'text', ?, ?, ?)",
                    (f"wamid.{i}", "{}" if i < pruned else '{"text": "hello"}', old_ms, old_ms))
        raw.execute("INSERT INTO idempotency_keys (scope, idem_key, request_hash, status_code, response_body,"
                    " created_at_ms) VALUES ('POST /invoices', ?, 'h', 201, '{}', ?)",
                    (f"key{i}", NOW if i < pruned else old_ms))
        raw.execute("INSERT INTO outbox (recipient, order_key, channel, kind, content, status, next_attempt_at_ms,"
                    " created_at_ms, updated_at_ms) VALUES ('254712345678', '254712345678', 'WHATSAPP', 'reply', ?,"
                    " 'DELIVERED', ?, ?, ?)", ("{}" if i < pruned else '{"text": "hello"}', old_ms, old_ms, old_ms))
    raw.execute("COMMIT")


PRUNE_SLICES: dict[str, Callable[[Tx], Awaitable[int]]] = {
    "messages.prune_payloads_batch": lambda tx: messages.prune_payloads_batch(
        tx, datetime(2026, 6, 1), limit=5),
    "inbox.prune_payloads": lambda tx: inbox.prune_payloads(tx, NOW - 86_400_000, limit=5),
    "idempotency.prune_batch": lambda tx: idempotency.prune_batch(tx, NOW - 86_400_000, limit=5),
    "outbox.prune_content": lambda tx: outbox.prune_content(tx, NOW - 86_400_000, limit=5),
}


@pytest.mark.parametrize("name", sorted(PRUNE_SLICES))
async def test_a_prune_slice_does_not_walk_what_was_pruned_before(migrated: Path, tmp_path: Path, name: str) -> None:
    """Each slice of `invoiceiq prune` is a write transaction beside the daemon: it must find
    its 5 rows without walking the thousands pruned on earlier days (migration 0005's partial
    indexes, and 0006's for the outbox). Counted in SQLite virtual-machine steps, which do not depend on the machine."""
    work = {}
    for pruned in (1000, 4000):
        path = tmp_path / f"pruned{pruned}.db"
        path.write_bytes(migrated.read_bytes())
        raw = sqlite3.connect(path, isolation_level=None)
        raw.row_factory = _dict_row
        try:
            _prune_history(raw, pruned)
            steps = 0

            def count() -> int:
                nonlocal steps
                steps += 1
                return 0

            raw.set_progress_handler(count, 100)
            raw.execute("BEGIN")
            done = await PRUNE_SLICES[name](SqliteTx(raw))
            raw.execute("COMMIT")
            assert done == 5
            work[pruned] = steps
        finally:
            raw.close()
    assert work[4000] <= work[1000] + 5, work
