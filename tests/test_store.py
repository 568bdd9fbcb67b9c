"""The store on a real SQLite file, and on PostgreSQL when INVOICEIQ_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import anyio
import pytest

from invoiceiq.core.model import Channel, InvoiceStatus
from invoiceiq.store import Conflict, Store, StoreError, Tx, conversations, customers, idempotency, inbox, invoices, outbox
from invoiceiq.store import migrate as migrations

pytestmark = pytest.mark.anyio
NOW = 1_764_158_400_000


async def new_invoice(store: Store, msisdn: str = "254712345678", name: str | None = "Mary Wanjiku",
                      amount_cents: int = 250_000) -> invoices.Invoice:
    async def job(tx: Tx) -> invoices.Invoice:
        return await invoices.create(tx, msisdn=msisdn, customer_name=name, amount_cents=amount_cents,
                                     description="Cleaning", now_ms=NOW, pay_base_url="http://x", source="test")
    return await store.write(job)


async def test_migrations_apply_once_and_are_idempotent(store: Store) -> None:
    # The fixture migrated already: a second run applies nothing and changes nothing.
    assert await store.migrate() == []
    assert await store.migrate() == []
    versions = await migrations.applied_versions(store.db)
    assert versions == [m.version for m in migrations.available()]
    assert await store.migrations_current()


async def test_brief_tables_have_the_briefs_columns(store: Store) -> None:
    expected = {
        "invoices": ["id", "customer_name", "msisdn", "amount_cents", "currency", "description", "status",
                     "pay_ref", "pay_link", "created_at", "updated_at"],
        "payments": ["id", "invoice_id", "method", "status", "mpesa_receipt", "amount_cents", "raw_request",
                     "raw_callback", "idempotency_key", "created_at", "updated_at"],
        "message_log": ["id", "invoice_id", "channel", "direction", "event", "payload", "created_at"],
    }
    for table, columns in expected.items():
        async def job(tx: Tx, table: str = table) -> list[str]:
            if tx.dialect == "sqlite":
                return [r["name"] for r in await tx.all(f"PRAGMA table_info({table})")]
            return [r["column_name"] for r in await tx.all(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
                " AND table_name = :t ORDER BY ordinal_position", {"t": table})]
        assert await store.read(job) == columns


async def test_check_constraints_reject_bad_status(store: Store) -> None:
    async def job(tx: Tx) -> None:
        await tx.execute("INSERT INTO invoices (id, msisdn, amount_cents, status) VALUES ('x', '1', 1, 'BOGUS')")
    with pytest.raises(Exception):
        await store.write(job)
    assert await store.read(lambda tx: invoices.get(tx, "x")) is None


async def test_invoice_ids_are_short_sequential_and_unique_under_concurrency(store: Store) -> None:
    created: list[str] = []

    async def make() -> None:
        created.append((await new_invoice(store)).id)

    async with anyio.create_task_group() as tg:
        for _ in range(25):
            tg.start_soon(make)
    assert sorted(int(i) for i in created) == list(range(1001, 1026))
    assert all(len(i) <= 10 for i in created)


async def test_invoice_status_transitions_are_conditional(store: Store) -> None:
    inv = await new_invoice(store)
    assert await store.write(lambda tx: invoices.mark_sent(tx, inv.id, Channel.WHATSAPP, NOW + 1))
    assert not await store.write(lambda tx: invoices.mark_sent(tx, inv.id, Channel.WHATSAPP, NOW + 2))
    assert await store.write(lambda tx: invoices.mark_paid(tx, inv.id, "NLJ7RT61SV", NOW + 3))
    # Paid is final: it can be neither cancelled nor paid again.
    assert not await store.write(lambda tx: invoices.cancel(tx, inv.id, NOW + 4))
    assert not await store.write(lambda tx: invoices.mark_paid(tx, inv.id, "OTHER", NOW + 5))
    got = await store.read(lambda tx: invoices.get(tx, inv.id))
    assert got is not None and got.status is InvoiceStatus.PAID and got.mpesa_receipt == "NLJ7RT61SV"
    assert got.sent_at_ms == NOW + 1 and got.paid_at_ms == NOW + 3
    assert await store.read(invoices.totals) == (1, 1, 1)


async def test_reminder_claim_once_per_interval(store: Store) -> None:
    inv = await new_invoice(store)
    hour = 3_600_000
    assert await store.write(lambda tx: invoices.claim_reminder(tx, inv.id, NOW, hour))
    assert not await store.write(lambda tx: invoices.claim_reminder(tx, inv.id, NOW + hour - 1, hour))
    assert await store.write(lambda tx: invoices.claim_reminder(tx, inv.id, NOW + hour, hour))


async def test_customers_by_name_case_insensitive(store: Store) -> None:
    await new_invoice(store, "254712345678", "Mary Wanjiku")
    await new_invoice(store, "254722000111", "mary  wanjiku")
    await new_invoice(store, "254733000222", "John")
    found = await store.read(lambda tx: customers.find_by_name(tx, "MARY WANJIKU"))
    assert sorted(c.msisdn for c in found) == ["254712345678", "254722000111"]
    # An invoice without a name keeps the name we knew.
    await new_invoice(store, "254733000222", None)
    assert [c.msisdn for c in await store.read(lambda tx: customers.find_by_name(tx, "john"))] == ["254733000222"]


async def test_inbox_dedupes_by_event_id(store: Store) -> None:
    async def put(tx: Tx) -> int | None:
        return await inbox.put(tx, source="whatsapp", event_id="wamid.X", actor="session",
                               actor_key="254712345678", kind="message", payload={"text": "hi"}, now_ms=NOW)

    first = await store.write(put)
    second = await store.write(put)
    assert first is not None and second is None
    events = await store.read(lambda tx: inbox.pending(tx, "session", "254712345678"))
    assert [e.event_id for e in events] == ["wamid.X"] and events[0].payload == {"text": "hi"}
    assert await store.write(lambda tx: inbox.mark_processed(tx, first, NOW))
    assert not await store.write(lambda tx: inbox.mark_processed(tx, first, NOW))
    assert await store.read(lambda tx: inbox.pending(tx, "session", "254712345678")) == []


async def test_concurrent_duplicate_webhooks_store_one_event(store: Store) -> None:
    results: list[int | None] = []

    async def deliver() -> None:
        results.append(await store.write(lambda tx: inbox.put(
            tx, source="whatsapp", event_id="wamid.DUP", actor="session", actor_key="k",
            kind="message", payload={}, now_ms=NOW)))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(deliver)
    assert len([r for r in results if r is not None]) == 1


async def test_conversation_compare_and_set(store: Store) -> None:
    row = await store.write(lambda tx: conversations.load(tx, "254700000001", "merchant"))
    assert row.version == conversations.NEW
    await store.write(lambda tx: conversations.save(tx, row, {"stage": "PHONE"}, NOW + 10, NOW))
    # A second writer that loaded the same (stale) version loses.
    with pytest.raises(Conflict):
        await store.write(lambda tx: conversations.save(tx, row, {"stage": "AMOUNT"}, None, NOW), )
    fresh = await store.write(lambda tx: conversations.load(tx, "254700000001", "merchant"))
    assert fresh.state == {"stage": "PHONE"} and fresh.version == 0 and fresh.due_at_ms == NOW + 10
    assert await store.read(lambda tx: conversations.due(tx, NOW + 10)) == [("254700000001", "merchant")]
    assert await store.read(lambda tx: conversations.due(tx, NOW + 9)) == []


async def test_failed_job_rolls_back_alone(store: Store) -> None:
    async def good(tx: Tx) -> str:
        return (await invoices.create(tx, msisdn="254712345678", customer_name=None, amount_cents=100,
                                      description="ok", now_ms=NOW, pay_base_url="x", source="t")).id

    async def bad(tx: Tx) -> None:
        await invoices.create(tx, msisdn="254712345678", customer_name=None, amount_cents=100,
                              description="half", now_ms=NOW, pay_base_url="x", source="t")
        raise RuntimeError("boom after a write")

    outcomes: dict[str, object] = {}

    async def run(name: str, job) -> None:  # type: ignore[no-untyped-def]
        try:
            outcomes[name] = await store.write(job)
        except RuntimeError as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "good1", good)
        tg.start_soon(run, "bad", bad)
        tg.start_soon(run, "good2", good)
    assert isinstance(outcomes["bad"], RuntimeError)
    listed = await store.read(lambda tx: invoices.listing(tx, None, 10))
    # No half-written invoice: only the two good ones exist.
    assert sorted(i.id for i in listed) == sorted([outcomes["good1"], outcomes["good2"]])  # type: ignore[list-item]
    assert all(i.description == "ok" for i in listed)


async def test_outbox_claims_in_order_per_recipient_and_leases(store: Store) -> None:
    async def queue(tx: Tx) -> list[int | None]:
        ids = []
        for to, body in (("A", "a1"), ("A", "a2"), ("B", "b1")):
            ids.append(await outbox.enqueue(tx, recipient=to, channel=Channel.WHATSAPP, kind="reply",
                                            content={"type": "text", "body": body}, now_ms=NOW))
        ids.append(await outbox.enqueue(tx, recipient="A", channel=Channel.WHATSAPP, kind="reply",
                                        content={"type": "text", "body": "dup"}, now_ms=NOW, dedupe_key="k1"))
        ids.append(await outbox.enqueue(tx, recipient="A", channel=Channel.WHATSAPP, kind="reply",
                                        content={"type": "text", "body": "dup"}, now_ms=NOW, dedupe_key="k1"))
        return ids

    a1, a2, b1, d1, d2 = await store.write(queue)
    assert d1 is not None and d2 is None  # the dedupe key queued it once

    claimed = await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=10, worker="w1", lease_ms=1000))
    # a2 must wait for a1: one row per recipient at a time, the oldest first.
    assert [r.id for r in claimed] == [a1, b1]
    assert await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=10, worker="w2", lease_ms=1000)) == []

    assert await store.write(lambda tx: outbox.mark_sent(tx, a1, "wamid.a1", NOW + 1))
    nxt = await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW + 2, limit=10, worker="w1", lease_ms=1000))
    assert [r.id for r in nxt] == [a2]

    # b1's claimer died: after the lease another worker takes it over.
    again = await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW + 1001, limit=10, worker="w2", lease_ms=1000))
    assert b1 in [r.id for r in again]


async def test_outbox_status_never_moves_backwards(store: Store) -> None:
    async def queue(tx: Tx) -> int | None:
        return await outbox.enqueue(tx, recipient="A", channel=Channel.WHATSAPP, kind="reply",
                                    content={"type": "text", "body": "x"}, now_ms=NOW)

    row_id = await store.write(queue)
    assert row_id is not None
    await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=1, worker="w", lease_ms=1000))
    await store.write(lambda tx: outbox.mark_sent(tx, row_id, "wamid.1", NOW))
    assert await store.write(lambda tx: outbox.advance_status(tx, "wamid.1", "READ", NOW)) is not None
    assert await store.write(lambda tx: outbox.advance_status(tx, "wamid.1", "DELIVERED", NOW)) is None
    assert await store.write(lambda tx: outbox.advance_status(tx, "wamid.1", "READ", NOW)) is None
    row = await store.read(lambda tx: outbox.get(tx, row_id))
    assert row is not None and row.status == "READ"


async def test_idempotency_first_response_wins(store: Store) -> None:
    async def first(tx: Tx) -> object:
        got = await idempotency.begin(tx, "s", "key-1", "h1", NOW)
        assert got is None
        await idempotency.finish(tx, "s", "key-1", 201, '{"id":"1001"}')
        return got

    await store.write(first)
    stored = await store.write(lambda tx: idempotency.begin(tx, "s", "key-1", "h2", NOW))
    assert stored is not None and stored.status_code == 201 and stored.request_hash == "h1"


async def test_one_payment_in_flight_per_invoice_by_constraint(store: Store) -> None:
    inv = await new_invoice(store)

    async def start(tx: Tx, pid: str) -> str | None:
        return await tx.val(
            "INSERT INTO payments (id, invoice_id, method, status, amount_cents) VALUES"
            " (:id, :inv, 'MPESA_STK', 'INITIATED', 100)"
            " ON CONFLICT (invoice_id) WHERE status = 'INITIATED' DO NOTHING RETURNING id",
            {"id": pid, "inv": inv.id})

    assert await store.write(lambda tx: start(tx, "p1")) == "p1"
    assert await store.write(lambda tx: start(tx, "p2")) is None
    await store.write(lambda tx: tx.execute("UPDATE payments SET status = 'FAILED' WHERE id = 'p1'"))
    assert await store.write(lambda tx: start(tx, "p3")) == "p3"


async def test_check_reports_a_closed_database(database_url: str) -> None:
    st = Store(database_url)
    await st.open()
    async with anyio.create_task_group() as tg:
        tg.start_soon(st.run_writer)
        await st.migrate()
        assert await st.check() is None
        tg.cancel_scope.cancel()
    await st.close()
    problem = await st.check(timeout_s=1)
    assert problem is not None and problem.startswith("database")


async def test_unreachable_database_is_a_store_error() -> None:
    st = Store("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError):
        await st.open()


async def test_merchant_notices_keep_order_per_invoice_not_across_invoices(store: Store) -> None:
    async def queue(tx: Tx) -> list[int | None]:
        ids = []
        for invoice, body in (("1001", "confirm 1001"), ("1002", "confirm 1002"), ("1001", "receipt 1001")):
            ids.append(await outbox.enqueue(tx, recipient="M", channel=Channel.WHATSAPP, kind="notice",
                                            content={"type": "text", "body": body}, now_ms=NOW,
                                            order_key=outbox.per_invoice("M", invoice)))
        return ids

    c1, c2, r1 = await store.write(queue)
    claimed = await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=10, worker="w", lease_ms=1000))
    # Two invoices' notices go out side by side; 1001's receipt waits for 1001's confirmation.
    assert [r.id for r in claimed] == [c1, c2]
    await store.write(lambda tx: outbox.mark_sent(tx, c1, "wamid.c1", NOW))
    nxt = await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=10, worker="w", lease_ms=1000))
    assert [r.id for r in nxt] == [r1]


async def test_next_due_ignores_rows_blocked_behind_a_send(store: Store) -> None:
    async def queue(tx: Tx) -> None:
        for body in ("a1", "a2"):
            await outbox.enqueue(tx, recipient="A", channel=Channel.WHATSAPP, kind="reply",
                                 content={"type": "text", "body": body}, now_ms=NOW)

    await store.write(queue)
    await store.write(lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=10, worker="w", lease_ms=5000))
    # a2 is due but waits for a1: the next wake-up is a1's lease running out, not "now" (a spin).
    assert await store.read(lambda tx: outbox.next_due_ms(tx, NOW)) == NOW + 5001


async def test_a_merchant_notice_never_overtakes_an_earlier_chat_reply(store: Store) -> None:
    async def queue(tx: Tx) -> list[int | None]:
        reply = await outbox.enqueue(tx, recipient="M", channel=Channel.WHATSAPP, kind="reply",
                                     content={"type": "text", "body": "review"}, now_ms=NOW)
        notice = await outbox.enqueue(tx, recipient="M", channel=Channel.WHATSAPP, kind="notice",
                                      content={"type": "text", "body": "sent"}, now_ms=NOW,
                                      order_key=outbox.per_invoice("M", "1001"))
        later_reply = await outbox.enqueue(tx, recipient="M", channel=Channel.WHATSAPP, kind="reply",
                                           content={"type": "text", "body": "next"}, now_ms=NOW)
        return [reply, notice, later_reply]

    reply, notice, later_reply = await store.write(queue)
    claim = lambda tx: outbox.claim_due(tx, now_ms=NOW, limit=10, worker="w", lease_ms=1000)  # noqa: E731
    assert [r.id for r in await store.write(claim)] == [reply]
    await store.write(lambda tx: outbox.mark_sent(tx, reply, "wamid.r", NOW))
    assert [r.id for r in await store.write(claim)] == [notice]
    await store.write(lambda tx: outbox.mark_sent(tx, notice, "wamid.n", NOW))
    assert [r.id for r in await store.write(claim)] == [later_reply]


async def test_closing_gives_up_on_a_connection_that_never_comes_back(database_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncpg's pool.close() waits for every connection forever; a shutdown must not.
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has no pool")
    from invoiceiq.store import db as dbmod

    monkeypatch.setattr(dbmod, "CLOSE_TIMEOUT_S", 0.5)
    st = Store(database_url)
    await st.open()
    leaked = await st.db._db._backend._pool.acquire()  # like one stuck mid-statement
    await leaked.execute("BEGIN")
    backend_pid = leaked.get_server_pid()
    with anyio.fail_after(10):
        await st.close()
    # The stuck connection was cut, not left "idle in transaction" on the server.
    import asyncpg

    from conftest import POSTGRES_URL

    check = await asyncpg.connect(POSTGRES_URL)
    try:
        with anyio.fail_after(10):
            while await check.fetchval("SELECT COUNT(*) FROM pg_stat_activity WHERE pid = $1", backend_pid):
                await anyio.sleep(0.05)
    finally:
        await check.close()


async def test_a_write_cancelled_during_begin_gives_its_connection_back(database_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # databases counts the connection as in use before BEGIN and registers the transaction
    # after it: a cancellation in between used to keep the connection out of the pool forever.
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite has a single writer, no pool")
    from databases.backends.postgres import PostgresTransaction

    original = PostgresTransaction.start

    async def slow_begin(self, is_root: bool, extra_options: dict) -> None:  # type: ignore[no-untyped-def,type-arg]
        await anyio.sleep(0.3)
        await original(self, is_root, extra_options)

    st = Store(database_url)
    await st.open()
    try:
        pool = st.db._db._backend._pool
        monkeypatch.setattr(PostgresTransaction, "start", slow_begin)
        with anyio.move_on_after(0.1):
            await st.write(lambda tx: tx.val("SELECT 1"))
        monkeypatch.setattr(PostgresTransaction, "start", original)
        with anyio.fail_after(10):
            while pool.get_idle_size() != pool.get_size():
                await anyio.sleep(0.02)
        assert await st.write(lambda tx: tx.val("SELECT 2")) == 2
    finally:
        with anyio.fail_after(10):
            await st.close()


async def test_a_write_waits_for_another_process_holding_the_sqlite_lock_without_stopping_the_loop(
        store: Store) -> None:
    """BEGIN IMMEDIATE runs in the event loop when the write lock is free (no thread hop);
    when another process holds it (a backup, ``invoiceiq prune``) the group waits for it in
    the committer thread, as long as the busy timeout, while the loop serves everyone else."""
    import sqlite3

    from invoiceiq.store.db import sqlite_file

    if store.dialect != "sqlite":
        pytest.skip("SQLite only: PostgreSQL has no single write lock")
    other = sqlite3.connect(str(sqlite_file(store.db.url)), isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # the other process takes the write lock
        stored: list[int | None] = []
        ticks = 0

        async def write() -> None:
            stored.append(await store.write(lambda tx: inbox.put(
                tx, source="test", event_id="e1", actor="session", actor_key="k", kind="text",
                payload={}, now_ms=NOW)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            with anyio.fail_after(5):
                while ticks < 20:  # the loop goes on while the write waits for the lock
                    await anyio.sleep(0.005)
                    ticks += 1
            assert stored == []
            other.execute("COMMIT")  # the lock is free again: the waiting group goes through
        assert stored[0] is not None
        assert await store.read(lambda tx: tx.val("SELECT COUNT(*) FROM inbox WHERE event_id = 'e1'")) == 1
    finally:
        other.close()

def test_row_ids_are_unique_time_ordered_and_base32() -> None:
    import time

    from invoiceiq.store.ids import _ALPHABET, _b32, new_id

    assert _b32(0, 4) == "0000" and _b32(31, 2) == "0z" and _b32(32, 2) == "10" and _b32(1024, 4) == "0100"
    first = new_id("ml")
    ids = [new_id("ml") for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("ml_") and len(i) == 25 and set(i[3:]) <= set(_ALPHABET) for i in ids)
    last_ms = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 == last_ms:  # a later millisecond sorts after, whatever the random part
        pass
    assert new_id("ml") > max([first, *ids])


async def test_a_read_never_sees_a_write_that_is_not_committed_yet(store: Store) -> None:
    """SQLite reads run in the event loop on a connection of their own, not the writer's: a
    row of a group still open (not yet on disk) is invisible until its COMMIT."""
    inside = anyio.Event()
    release = anyio.Event()

    async def slow_job(tx: Tx) -> None:
        await inbox.put(tx, source="test", event_id="uncommitted", actor="session", actor_key="k",
                        kind="text", payload={}, now_ms=NOW)
        inside.set()
        await release.wait()  # the group (and its transaction) stays open meanwhile

    async def count(tx: Tx) -> int:
        return int(await tx.val("SELECT COUNT(*) FROM inbox WHERE event_id = 'uncommitted'") or 0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.write, slow_job)
        try:
            with anyio.fail_after(5):
                await inside.wait()
            seen = await store.read(count), await store.scan(count)
        finally:
            release.set()  # the writer's group is shielded: let it finish either way
    assert seen == (0, 0)
    assert await store.read(count) == 1
