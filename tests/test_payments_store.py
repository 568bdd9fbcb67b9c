"""Payments in the store (issue 5): at most one STK attempt in flight per invoice, whatever the
number of connections or processes, decided by the partial unique index ``payments_one_in_flight``
in the INSERT itself. On SQLite and, when INVOICEIQ_TEST_POSTGRES_URL is set, on PostgreSQL,
where the race is real: two pooled connections (two ``store.write`` jobs) and two raw asyncpg
connections start an attempt on one invoice at the same moment.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest

from invoiceiq.core.model import PaymentStatus
from invoiceiq.store import Store, Tx, inbox, invoices, payments
from invoiceiq.store.payments import Attempt

pytestmark = pytest.mark.anyio
NOW = 1_764_158_400_000
PHONE = "254712345678"


async def new_invoice(store: Store, msisdn: str = PHONE) -> str:
    async def job(tx: Tx) -> str:
        invoice = await invoices.create(tx, msisdn=msisdn, customer_name=None, amount_cents=250_000,
                                        description="Cleaning", now_ms=NOW, pay_base_url="https://pay.test",
                                        source="test")
        return invoice.id
    return await store.write(job)


async def start(tx: Tx, invoice_id: str, now: int = NOW, phone: str = PHONE) -> Attempt | None:
    return await payments.start(tx, invoice_id=invoice_id, phone=phone, amount_cents=250_000, now_ms=now,
                                next_check_at_ms=now + 60_000, expire_at_ms=now + 600_000, source="test")


async def count(store: Store, sql: str, params: dict[str, object] | None = None) -> int:
    async def job(tx: Tx) -> int:
        return int(await tx.val(sql, params) or 0)
    return await store.read(job)


async def in_flight(store: Store, invoice_id: str) -> int:
    return await count(store, "SELECT COUNT(*) FROM payments WHERE invoice_id = :i AND status = 'INITIATED'",
                       {"i": invoice_id})


# -- the race ----------------------------------------------------------------------------------------


async def test_concurrent_starts_on_one_invoice_one_wins(store: Store) -> None:
    invoice_id = await new_invoice(store)
    results: list[Attempt | None] = []

    async def one() -> None:
        results.append(await store.write(lambda tx: start(tx, invoice_id)))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    winners = [r for r in results if r is not None]
    assert len(results) == 20 and len(winners) == 1
    assert await in_flight(store, invoice_id) == 1
    assert await count(store, "SELECT COUNT(*) FROM stk_attempts WHERE invoice_id = :i", {"i": invoice_id}) == 1
    (stored,) = await store.read(lambda tx: payments.for_invoice(tx, invoice_id))
    assert stored.payment_id == winners[0].payment_id and stored.status is PaymentStatus.INITIATED


async def test_postgresql_two_pooled_connections_racing_one_wins(store: Store) -> None:
    """Both transactions are open and both saw no attempt in flight before either inserts: only
    the index can decide. (SQLite runs write jobs one after another, so there is nothing to race.)"""
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has a single writer")
    invoice_id = await new_invoice(store)
    both_looked = anyio.Event()
    looked = 0
    results: list[Attempt | None] = []

    async def racer(tx: Tx) -> Attempt | None:
        nonlocal looked
        assert await payments.in_flight(tx, invoice_id) is None
        looked += 1
        if looked == 2:
            both_looked.set()
        with anyio.fail_after(5):
            await both_looked.wait()
        return await start(tx, invoice_id)

    async def one() -> None:
        results.append(await store.write(racer))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
    assert len(results) == 2
    assert sum(r is not None for r in results) == 1
    assert await in_flight(store, invoice_id) == 1


async def test_postgresql_two_raw_connections_racing_one_wins(store: Store, database_url: str) -> None:
    """The same race below the store: two asyncpg connections, each in its own transaction, run the
    store's INSERT ... ON CONFLICT; the second waits for the first to commit, then inserts nothing."""
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL only")
    import asyncpg

    invoice_id = await new_invoice(store)
    parts = urlsplit(database_url)
    schema = parse_qs(parts.query)["search_path"][0]
    dsn = parts._replace(query="").geturl()
    sql = ("INSERT INTO payments (id, invoice_id, method, status, amount_cents)"
           " VALUES ($1, $2, 'MPESA_STK', 'INITIATED', 250000)"
           " ON CONFLICT (invoice_id) WHERE status = 'INITIATED' DO NOTHING RETURNING id")
    a = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    b = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        ta, tb = a.transaction(), b.transaction()
        await ta.start()
        await tb.start()
        assert await a.fetchval(sql, "pay_a", invoice_id) == "pay_a"
        got_b: list[object] = []

        async def second() -> None:
            got_b.append(await b.fetchval(sql, "pay_b", invoice_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.2)
            assert got_b == []  # blocked on a's uncommitted row, not racing past it
            await ta.commit()
        assert got_b == [None]
        await tb.commit()
        # And with a plain INSERT the index itself refuses the second in-flight row.
        with pytest.raises(asyncpg.UniqueViolationError):
            await b.execute("INSERT INTO payments (id, invoice_id, method, status, amount_cents)"
                            " VALUES ('pay_c', $1, 'MPESA_STK', 'INITIATED', 1)", invoice_id)
    finally:
        await a.close()
        await b.close()
    assert await in_flight(store, invoice_id) == 1
    assert await count(store, "SELECT COUNT(*) FROM payments WHERE invoice_id = :i", {"i": invoice_id}) == 1


async def test_two_invoices_of_one_phone_decided_at_once_push_once(store: Store, database_url: str) -> None:
    """The per-phone limits hold across invoices and processes. Two Pay decisions for two
    invoices of one phone, in two transactions on two connections: the second, started while the
    first has pushed but not committed, waits on the phone's row and then sees that push (too
    soon), instead of reading "no prompt lately" and pushing too. (On SQLite the single writer
    runs the two one after the other; on PostgreSQL the lock is what orders them.)"""
    from invoiceiq.actors import effects
    from invoiceiq.core import settlement

    first_id, second_id = await new_invoice(store), await new_invoice(store)
    limits = settlement.PushLimits()  # 60 s apart, 3 in 10 minutes
    first_pushed = anyio.Event()
    verdicts: dict[str, settlement.PayVerdict] = {}

    async def decide(tx: Tx, invoice_id: str) -> settlement.PayVerdict:
        invoice = await invoices.get(tx, invoice_id)
        assert invoice is not None
        verdict = await effects.push_verdict(tx, invoice, limits, NOW)
        if verdict is settlement.PayVerdict.START:
            assert await start(tx, invoice_id) is not None
        return verdict

    async def first(tx: Tx) -> settlement.PayVerdict:
        verdict = await decide(tx, first_id)
        first_pushed.set()
        if store.dialect == "postgresql":
            # The second waits on the phone's row (or, were there no lock, has decided already).
            await _until_a_backend_waits_on_a_lock(database_url, or_else=lambda: "second" in verdicts)
        return verdict

    async def second() -> None:
        with anyio.fail_after(10):
            await first_pushed.wait()
        verdicts["second"] = await store.write(lambda tx: decide(tx, second_id))

    async def run_first() -> None:
        verdicts["first"] = await store.write(first)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_first)
            tg.start_soon(second)
    assert verdicts == {"first": settlement.PayVerdict.START, "second": settlement.PayVerdict.TOO_SOON}
    assert await count(store, "SELECT COUNT(*) FROM stk_attempts WHERE phone = :p", {"p": PHONE}) == 1
    assert await count(store, "SELECT COUNT(*) FROM push_locks") == 0  # empty at rest: no phone kept


async def _until_a_backend_waits_on_a_lock(database_url: str, or_else: Callable[[], bool]) -> None:
    """Poll (with a deadline) until another session of this database waits on a lock, or ``or_else()``."""
    import asyncpg

    dsn = urlsplit(database_url)._replace(query="").geturl()
    conn = await asyncpg.connect(dsn)
    try:
        with anyio.fail_after(10):
            while not or_else() and not await conn.fetchval("SELECT COUNT(*) FROM pg_stat_activity"
                                          " WHERE datname = current_database() AND wait_event_type = 'Lock'"):
                await anyio.sleep(0.01)
    finally:
        await conn.close()


# -- what the index allows -----------------------------------------------------------------------------


async def test_postgresql_a_callback_racing_its_push_answer_is_never_set_aside(store: Store) -> None:
    """A cancelled prompt's callback (1032: no phone in it) arrives while the push's answer is
    being recorded on another connection. The callback's transaction has looked the id up and
    found nothing; the answer's transaction then records the id and claims unmatched callbacks.
    Under READ COMMITTED, without ``serialize_checkout``, the claim misses the callback's
    uncommitted row and the callback stays set aside for good (the route and the payment actor
    run these same steps: web/payments.py ``store``, actors/payment.py ``job``)."""
    if store.dialect != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has a single writer")
    invoice_id = await new_invoice(store)
    attempt = await store.write(lambda tx: start(tx, invoice_id))
    assert attempt is not None
    checkout = "ws_CO_RACE_0001"
    callback_looked = anyio.Event()
    answer_started = anyio.Event()

    async def callback(tx: Tx) -> bool:
        await payments.serialize_checkout(tx, checkout)
        found = await payments.for_callback(tx, checkout, None)
        callback_looked.set()
        with anyio.move_on_after(1):  # give the answer every chance to run now
            await answer_started.wait()
        await anyio.sleep(0.2)
        actor, key = ("payment", found.invoice_id) if found is not None else ("unmatched", "-")
        seq = await inbox.put(tx, source="mpesa", event_id=checkout, actor=actor, actor_key=key,
                              kind="callback", payload={"result_code": 1032}, now_ms=NOW)
        if seq is not None and found is None:
            await inbox.mark_processed(tx, seq, NOW)
        return found is not None

    async def answer(tx: Tx) -> bool:
        answer_started.set()
        await payments.serialize_checkout(tx, checkout)
        await payments.accepted(tx, attempt.payment_id, checkout_request_id=checkout,
                                merchant_request_id="mr-1", raw_request={})
        return await inbox.claim_unmatched(tx, "mpesa", checkout, "payment", invoice_id)

    results: dict[str, bool] = {}

    async def run_callback() -> None:
        results["callback_matched"] = await store.write(callback)

    async def run_answer() -> None:
        with anyio.fail_after(5):
            await callback_looked.wait()
        results["answer_claimed"] = await store.write(answer)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_callback)
            tg.start_soon(run_answer)
    # Either way round, the callback ends up pending for the invoice's payment actor.
    assert results["callback_matched"] or results["answer_claimed"], results
    assert await count(store, "SELECT COUNT(*) FROM inbox WHERE event_id = :e AND actor = 'payment'"
                       " AND actor_key = :k AND processed_at_ms IS NULL", {"e": checkout, "k": invoice_id}) == 1


async def test_the_index_refuses_a_second_in_flight_row_but_not_history(store: Store) -> None:
    invoice_id = await new_invoice(store)
    other = await new_invoice(store)
    first = await store.write(lambda tx: start(tx, invoice_id))
    assert first is not None
    # A plain INSERT (no ON CONFLICT) of a second INITIATED row fails on the index.
    with pytest.raises(Exception) as raised:
        await store.write(lambda tx: tx.execute(
            "INSERT INTO payments (id, invoice_id, method, status, amount_cents)"
            " VALUES ('pay_dup', :i, 'MPESA_STK', 'INITIATED', 1)", {"i": invoice_id}))
    assert "unique" in str(raised.value).lower() or "Unique" in type(raised.value).__name__
    # Another invoice is independent.
    assert await store.write(lambda tx: start(tx, other)) is not None
    # Once resolved, the next attempt may start; the ended ones stay as history.
    for status in (PaymentStatus.FAILED, PaymentStatus.EXPIRED):
        current = await store.read(lambda tx: payments.in_flight(tx, invoice_id))
        assert current is not None
        assert await store.write(lambda tx, c=current, s=status: payments.resolve(
            tx, c.payment_id, status=s, result_code=None, result_desc="x", now_ms=NOW, only_if_initiated=True))
        assert await store.write(lambda tx: start(tx, invoice_id, NOW + 1000)) is not None
    statuses = [a.status for a in await store.read(lambda tx: payments.for_invoice(tx, invoice_id))]
    assert sorted(statuses) == sorted([PaymentStatus.FAILED, PaymentStatus.EXPIRED, PaymentStatus.INITIATED])
    assert await in_flight(store, invoice_id) == 1


async def test_a_receipt_number_is_used_once(store: Store) -> None:
    a, b = await new_invoice(store), await new_invoice(store)
    first = await store.write(lambda tx: start(tx, a))
    second = await store.write(lambda tx: start(tx, b))
    assert first is not None and second is not None
    assert await store.write(lambda tx: payments.resolve(
        tx, first.payment_id, status=PaymentStatus.SUCCESS, result_code=0, result_desc="ok", now_ms=NOW,
        receipt="TKQ4ABC12D"))
    with pytest.raises(Exception):
        await store.write(lambda tx: payments.resolve(
            tx, second.payment_id, status=PaymentStatus.SUCCESS, result_code=0, result_desc="ok", now_ms=NOW,
            receipt="TKQ4ABC12D"))
    assert await count(store, "SELECT COUNT(*) FROM payments WHERE mpesa_receipt = 'TKQ4ABC12D'") == 1


# -- compare-and-sets ------------------------------------------------------------------------------------


async def test_resolve_only_if_initiated_applies_once(store: Store) -> None:
    invoice_id = await new_invoice(store)
    attempt = await store.write(lambda tx: start(tx, invoice_id))
    assert attempt is not None
    results: list[bool] = []

    async def resolve(status: PaymentStatus) -> None:
        results.append(await store.write(lambda tx: payments.resolve(
            tx, attempt.payment_id, status=status, result_code=1032, result_desc="cancelled", now_ms=NOW,
            only_if_initiated=True)))

    async with anyio.create_task_group() as tg:
        for status in (PaymentStatus.FAILED, PaymentStatus.EXPIRED) * 3:
            tg.start_soon(resolve, status)
    assert sorted(results) == [False] * 5 + [True]
    (stored,) = await store.read(lambda tx: payments.for_invoice(tx, invoice_id))
    assert stored.status in (PaymentStatus.FAILED, PaymentStatus.EXPIRED)
    assert stored.resolved_at_ms == NOW and stored.next_check_at_ms is None


async def test_a_due_query_is_claimed_by_one_caller(store: Store) -> None:
    invoice_id = await new_invoice(store)
    attempt = await store.write(lambda tx: start(tx, invoice_id))
    assert attempt is not None and attempt.next_check_at_ms == NOW + 60_000
    assert await store.read(lambda tx: payments.due_checks(tx, NOW + 59_999)) == []
    assert await store.read(lambda tx: payments.due_checks(tx, NOW + 60_000)) == [invoice_id]
    results: list[bool] = []

    async def claim() -> None:
        results.append(await store.write(lambda tx: payments.claim_check(
            tx, attempt.payment_id, NOW + 60_000, NOW + 180_000)))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(claim)
    assert sorted(results) == [False] * 4 + [True]
    (stored,) = await store.read(lambda tx: payments.for_invoice(tx, invoice_id))
    assert (stored.next_check_at_ms, stored.queries) == (NOW + 180_000, 1)
    assert await store.read(lambda tx: payments.due_checks(tx, NOW + 179_999)) == []
    assert await store.read(payments.next_check_ms) == NOW + 180_000
    # A resolved attempt is never claimed again.
    await store.write(lambda tx: payments.resolve(tx, attempt.payment_id, status=PaymentStatus.EXPIRED,
                                                  result_code=None, result_desc="x", now_ms=NOW))
    assert not await store.write(lambda tx: payments.claim_check(tx, attempt.payment_id, NOW + 180_000, NOW + 1))
    assert await store.read(lambda tx: payments.due_checks(tx, NOW + 10**9)) == []


async def test_checkout_ids_recent_pushes_and_orphans(store: Store) -> None:
    a, b = await new_invoice(store), await new_invoice(store, "254722000111")
    first = await store.write(lambda tx: start(tx, a))
    assert first is not None
    await store.write(lambda tx: payments.accepted(tx, first.payment_id, checkout_request_id="ws_CO_1",
                                                   merchant_request_id="mr-1", raw_request={"Amount": 2500}))
    found = await store.read(lambda tx: payments.by_checkout_id(tx, "ws_CO_1"))
    assert found is not None and found.payment_id == first.payment_id and found.invoice_id == a
    assert await store.read(lambda tx: payments.by_checkout_id(tx, "ws_CO_2")) is None
    # An attempt whose push answer was lost has no CheckoutRequestID: a callback adopts it by phone.
    second = await store.write(lambda tx: start(tx, b, NOW + 5000, phone="254722000111"))
    assert second is not None
    assert await store.read(lambda tx: payments.orphan_for_phone(tx, PHONE)) is None  # has its id
    orphan = await store.read(lambda tx: payments.orphan_for_phone(tx, "254722000111"))
    assert orphan is not None and orphan.payment_id == second.payment_id
    await store.write(lambda tx: payments.adopt_checkout_id(tx, second.payment_id, "ws_CO_2"))
    await store.write(lambda tx: payments.adopt_checkout_id(tx, second.payment_id, "ws_CO_3"))  # first wins
    adopted = await store.read(lambda tx: payments.by_checkout_id(tx, "ws_CO_2"))
    assert adopted is not None and adopted.payment_id == second.payment_id
    assert await store.read(lambda tx: payments.orphan_for_phone(tx, "254722000111")) is None
    # Prompts per phone, for the limits.
    assert await store.read(lambda tx: payments.recent_pushes(tx, PHONE, NOW)) == (NOW,)
    assert await store.read(lambda tx: payments.recent_pushes(tx, PHONE, NOW + 1)) == ()
    assert await store.read(lambda tx: payments.recent_pushes(tx, "254722000111", NOW)) == (NOW + 5000,)
