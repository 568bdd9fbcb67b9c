"""The operator's commands beside a running daemon: ``invoiceiq prune`` and ``invoiceiq reconcile``.

``main()`` runs in a worker thread (it starts its own event loop, as from a shell) against the
same database the test holds open, on SQLite and, when INVOICEIQ_TEST_POSTGRES_URL is set, on
PostgreSQL. Daraja is faked with respx (``harness.FakeDaraja``); a few checks go through a
real ``python -m invoiceiq`` subprocess.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import respx

from harness import DARAJA, MERCHANT, FakeDaraja, base_env, make_settings
from invoiceiq.actors import effects
from invoiceiq.cli import main
from invoiceiq.core.model import Channel, Direction, PaymentStatus
from invoiceiq.store import Store, Tx, idempotency, inbox, messages, outbox, payments

pytestmark = pytest.mark.anyio
ENV_PREFIXES = ("INVOICEIQ_", "WABA_", "MPESA_", "SMS_", "DATABASE_URL", "ADMIN_TOKEN", "MERCHANT_")
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Iterator[str]:
    """The environment the CLI sees: the harness's live credentials on ``database_url``, run
    from an empty directory (no stray ./config.toml); logging restored afterwards, since
    ``main()`` points the root logger at the stream of the moment."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES) and not name.startswith("INVOICEIQ_TEST_"):
            monkeypatch.delenv(name)
    for name, value in base_env(database_url).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield database_url
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def run_cli(*argv: str) -> tuple[int, str, str]:
    """``invoiceiq <argv>`` in-process, in a thread of its own: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(list(argv))

    with anyio.fail_after(60):
        code = await anyio.to_thread.run_sync(call)
    return code, out.getvalue(), err.getvalue()


async def scalar(store: Store, sql: str, params: dict[str, Any] | None = None) -> Any:
    async def job(tx: Tx) -> Any:
        return await tx.val(sql, params)
    return await store.read(job)


# -- prune -------------------------------------------------------------------------------------------


async def test_prune_clears_old_payloads_keeps_rows_and_deletes_old_keys(cli_env: str, store: Store) -> None:
    settings = make_settings(cli_env)
    now = 1_764_158_400_000  # received_at_ms / created_at_ms are the daemon's clock; old = far past
    ids: dict[str, Any] = {}

    async def seed(tx: Tx) -> None:
        invoice = await effects.create_invoice(tx, settings, now, msisdn="254712345678", customer_name="Mary",
                                               amount_cents=250_000, description="Cleaning", source="test")
        ids["invoice"] = invoice.id
        for name in ("old_in", "old_out", "new_in"):
            ids[name] = await messages.log_message(
                tx, channel=Channel.WHATSAPP, direction=Direction.IN if name.endswith("in") else Direction.OUT,
                event="inbound" if name.endswith("in") else "sent", invoice_id=invoice.id,
                payload={"text": f"personal words {name}", "from": "254712345678"})
        # created_at is the database's own clock: move two rows back by a year (a literal, so that
        # both SQLite's text and PostgreSQL's TIMESTAMP take it).
        for name in ("old_in", "old_out"):
            await tx.execute("UPDATE message_log SET created_at = '2020-01-01 00:00:00' WHERE id = :id",
                             {"id": ids[name]})
        old, recent = 1_000_000_000_000, now + 400 * DAY_MS  # 2001, and well in the future
        for name, received, processed in (("ev_old_done", old, True), ("ev_old_waiting", old, False),
                                          ("ev_new_done", recent, True)):
            seq = await inbox.put(tx, source="whatsapp", event_id=name, actor="session", actor_key="254712345678",
                                  kind="text", payload={"text": f"secret {name}"}, now_ms=received)
            assert seq is not None
            ids[name] = seq
            if processed:
                await inbox.mark_processed(tx, seq, received)
        for key, created in (("key-old", old), ("key-new", recent)):
            assert await idempotency.begin(tx, "POST /invoices", key, "h", created) is None
            await idempotency.finish(tx, "POST /invoices", key, 201, '{"msisdn":"254712345678"}')
        for name, created, status in (("out_old_done", old, "DELIVERED"), ("out_old_waiting", old, "PENDING"),
                                      ("out_new_done", recent, "READ")):
            row = await outbox.enqueue(tx, recipient="254712345678", channel=Channel.WHATSAPP, kind="reply",
                                       content={"text": f"words {name}"}, now_ms=created, dedupe_key=name)
            await tx.execute("UPDATE outbox SET status = :s WHERE id = :id", {"s": status, "id": row})
            ids[name] = row

    await store.write(seed)
    logged_before = await scalar(store, "SELECT COUNT(*) FROM message_log")

    code, out, err = await run_cli("prune", "--older-than", "30")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("pruning personal data older than 30 days (before ")
    assert "message_log: cleared 2 message payloads (rows and events kept)" in lines
    assert "inbox: cleared 1 payload of processed events (rows kept to deduplicate provider retries)" in lines
    assert "idempotency_keys: deleted 1 key" in lines
    assert "outbox: cleared the text of 1 finished send (rows kept)" in lines
    assert not any(line.startswith("{") for line in lines)  # log lines go to stderr

    async def payload(tx: Tx, row_id: str) -> Any:
        return await tx.val("SELECT payload FROM message_log WHERE id = :id", {"id": row_id})

    for name in ("old_in", "old_out"):
        assert await store.read(lambda tx, n=name: payload(tx, ids[n])) is None
    assert "personal words new_in" in str(await store.read(lambda tx: payload(tx, ids["new_in"])))
    # Rows and their events stay: the log still says what happened, without the words.
    assert await scalar(store, "SELECT COUNT(*) FROM message_log") == logged_before
    assert await scalar(store, "SELECT event FROM message_log WHERE id = :id", {"id": ids["old_out"]}) == "sent"

    async def event_payload(tx: Tx, seq: int) -> str:
        return str(await tx.val("SELECT CAST(payload AS TEXT) FROM inbox WHERE seq = :s", {"s": seq}))

    assert await store.read(lambda tx: event_payload(tx, ids["ev_old_done"])) == "{}"
    # Not yet processed: the actor still needs it, whatever its age.
    assert "secret ev_old_waiting" in await store.read(lambda tx: event_payload(tx, ids["ev_old_waiting"]))
    assert "secret ev_new_done" in await store.read(lambda tx: event_payload(tx, ids["ev_new_done"]))
    # The pruned event's id still deduplicates a provider's redelivery.
    again = await store.write(lambda tx: inbox.put(tx, source="whatsapp", event_id="ev_old_done", actor="session",
                                                   actor_key="254712345678", kind="text", payload={}, now_ms=now))
    assert again is None
    assert await scalar(store, "SELECT COUNT(*) FROM idempotency_keys") == 1
    assert await scalar(store, "SELECT idem_key FROM idempotency_keys") == "key-new"

    async def send_text(tx: Tx, row_id: int) -> str:
        return str(await tx.val("SELECT CAST(content AS TEXT) FROM outbox WHERE id = :i", {"i": row_id}))

    assert await store.read(lambda tx: send_text(tx, ids["out_old_done"])) == "{}"
    # Still to send (whatever its age), or recent: the text stays.
    assert "words out_old_waiting" in await store.read(lambda tx: send_text(tx, ids["out_old_waiting"]))
    assert "words out_new_done" in await store.read(lambda tx: send_text(tx, ids["out_new_done"]))
    assert await scalar(store, "SELECT status FROM outbox WHERE id = :i", {"i": ids["out_old_done"]}) == "DELIVERED"

    # Idempotent: a second run finds nothing more to do.
    code, out, _ = await run_cli("prune", "--older-than", "30")
    assert code == 0
    assert "message_log: cleared 0 message payloads (rows and events kept)" in out.splitlines()
    assert "idempotency_keys: deleted 0 keys" in out.splitlines()
    assert "outbox: cleared the text of 0 finished sends (rows kept)" in out.splitlines()


async def test_prune_works_in_batches(cli_env: str, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import invoiceiq.cli as cli

    monkeypatch.setattr(cli, "PRUNE_BATCH", 3)

    async def seed(tx: Tx) -> None:
        for i in range(8):
            row = await messages.log_message(tx, channel=Channel.SMS, direction=Direction.IN, event="inbound",
                                             payload={"text": f"words {i}"})
            await tx.execute("UPDATE message_log SET created_at = '2020-01-01 00:00:00' WHERE id = :id", {"id": row})
            seq = await inbox.put(tx, source="sms", event_id=f"e{i}", actor="session", actor_key="254712345678",
                                  kind="sms", payload={"text": "x"}, now_ms=1_000_000_000_000)
            assert seq is not None
            await inbox.mark_processed(tx, seq, 1_000_000_000_000)
            await idempotency.begin(tx, "s", f"k{i}", "h", 1_000_000_000_000)
            sent = await outbox.enqueue(tx, recipient="254712345678", channel=Channel.SMS, kind="reply",
                                        content={"text": "x"}, now_ms=1_000_000_000_000, dedupe_key=f"d{i}")
            await tx.execute("UPDATE outbox SET status = 'SENT' WHERE id = :id", {"id": sent})

    await store.write(seed)
    code, out, err = await run_cli("prune", "--older-than", "1")
    assert code == 0, err
    assert "message_log: cleared 8 message payloads (rows and events kept)" in out
    assert "inbox: cleared 8 payloads of processed events" in out
    assert "idempotency_keys: deleted 8 keys" in out
    assert "outbox: cleared the text of 8 finished sends (rows kept)" in out
    assert await scalar(store, "SELECT COUNT(*) FROM message_log WHERE payload IS NOT NULL AND event = 'inbound'") == 0


async def test_prune_refuses_nonsense_days(cli_env: str, store: Store) -> None:
    for bad in ("0", "-3", "ten"):
        with pytest.raises(SystemExit) as exc:
            await run_cli("prune", "--older-than", bad)
        assert exc.value.code == 2
    with pytest.raises(SystemExit):
        await run_cli("prune")  # --older-than is required


# -- reconcile ---------------------------------------------------------------------------------------


async def seed_attempts(store: Store, database_url: str) -> dict[str, str]:
    """Five invoices with an STK attempt each, not due for a check for another minute:
    paid / cancelled / still waiting at M-PESA, one whose push was never acknowledged, and
    one already resolved. Returns invoice ids by name."""
    settings = make_settings(database_url)
    now = time.time_ns() // 1_000_000
    ids: dict[str, str] = {}

    async def job(tx: Tx) -> None:
        for i, name in enumerate(("paid", "cancelled", "waiting", "unacked", "done")):
            phone = f"25471234500{i}"
            invoice = await effects.create_invoice(tx, settings, now, msisdn=phone, customer_name=None,
                                                   amount_cents=150_000, description="Plumbing", source="test")
            ids[name] = invoice.id
            attempt = await payments.start(tx, invoice_id=invoice.id, phone=phone, amount_cents=150_000,
                                           now_ms=now - 120_000, next_check_at_ms=now + 60_000,
                                           expire_at_ms=now + 480_000, source="test")
            assert attempt is not None
            if name != "unacked":
                await payments.accepted(tx, attempt.payment_id, checkout_request_id=f"ws_CO_{name}",
                                        merchant_request_id=f"mr-{name}", raw_request={})
            if name == "done":
                await payments.resolve(tx, attempt.payment_id, status=PaymentStatus.FAILED, result_code=1032,
                                       result_desc="Request cancelled by user", now_ms=now)

    await store.write(job)
    return ids


async def test_reconcile_queries_every_unresolved_attempt_and_prints_each_outcome(cli_env: str, store: Store) -> None:
    ids = await seed_attempts(store, cli_env)
    daraja = FakeDaraja(query_answers={"ws_CO_paid": 0, "ws_CO_cancelled": 1032})
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        daraja.install(router)
        code, out, err = await run_cli("reconcile")
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "checking 4 unresolved STK attempts"
    by_invoice = {line.split()[1]: line for line in lines if line.startswith("invoice #")}
    assert set(by_invoice) == {f"#{ids[n]}" for n in ("paid", "cancelled", "waiting", "unacked")}
    assert by_invoice[f"#{ids['paid']}"].endswith(f": SUCCESS: ResultCode 0, done; invoice #{ids['paid']} is PAID")
    assert "(*********000, KES 1,500)" in by_invoice[f"#{ids['paid']}"]  # phones masked as in the logs
    assert f": FAILED: ResultCode 1032, done; invoice #{ids['cancelled']} is PENDING" in by_invoice[f"#{ids['cancelled']}"]
    assert ": PENDING: M-PESA says the customer has not answered yet" in by_invoice[f"#{ids['waiting']}"]
    assert ": PENDING: the push was never acknowledged (no CheckoutRequestID)" in by_invoice[f"#{ids['unacked']}"]
    assert "done: 1 FAILED, 2 PENDING, 1 SUCCESS" in lines
    assert any("queued in the outbox" in line for line in lines)
    # Queried at once although none was due; the one without a CheckoutRequestID cannot be asked.
    assert sorted(daraja.queries) == ["ws_CO_cancelled", "ws_CO_paid", "ws_CO_waiting"]

    # The payment actor's own effects, committed: PAID with receipts to both, the failure told.
    async def state(tx: Tx) -> dict[str, Any]:
        rows = await tx.all("SELECT p.invoice_id, p.status, i.status AS invoice_status, i.pay_ref, a.queries"
                            " FROM payments p JOIN invoices i ON i.id = p.invoice_id"
                            " JOIN stk_attempts a ON a.payment_id = p.id")
        return {r["invoice_id"]: r for r in rows}

    rows = await store.read(state)
    assert rows[ids["paid"]]["status"] == "SUCCESS" and rows[ids["paid"]]["invoice_status"] == "PAID"
    assert rows[ids["paid"]]["pay_ref"] == "ws_CO_paid"
    assert rows[ids["cancelled"]]["status"] == "FAILED"
    assert rows[ids["waiting"]]["status"] == "INITIATED" and rows[ids["waiting"]]["queries"] == 1
    assert rows[ids["unacked"]]["status"] == "INITIATED"
    kinds = await store.read(lambda tx: tx.all("SELECT recipient, kind FROM outbox WHERE kind IN"
                                               " ('receipt', 'payment_failed') ORDER BY id"))
    assert {(r["recipient"], r["kind"]) for r in kinds} == {
        ("254712345000", "receipt"), (MERCHANT, "receipt"), ("254712345001", "payment_failed")}

    # Once more for one invoice: only its attempt, now answered.
    daraja.query_answers["ws_CO_waiting"] = 1037
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        daraja.install(router)
        code, out, err = await run_cli("reconcile", "--invoice", ids["waiting"])
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "checking 1 unresolved STK attempt"
    assert [line for line in lines if line.startswith("invoice #")] == [
        next(line for line in lines if line.startswith(f"invoice #{ids['waiting']} "))]
    assert ": FAILED: ResultCode 1037" in out


async def test_reconcile_reports_a_failed_query_and_exits_1(cli_env: str, store: Store) -> None:
    await seed_attempts(store, cli_env)
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        router.get(f"{DARAJA}/oauth/v1/generate").mock(
            return_value=httpx.Response(200, json={"access_token": "t", "expires_in": "3599"}))
        router.post(f"{DARAJA}/mpesa/stkpushquery/v1/query").mock(return_value=httpx.Response(
            503, json={"requestId": "r", "errorCode": "500.003.02", "errorMessage": "System is busy"}))
        code, out, err = await run_cli("reconcile")
    assert code == 1, out + err
    assert out.count("ERROR: the status query failed (500.003.02: System is busy); try again later") == 3
    assert "done: 3 ERROR, 1 PENDING" in out
    # Nothing was decided on a failed query: the attempts stay in flight for the next check.
    assert await scalar(store, "SELECT COUNT(*) FROM payments WHERE status = 'INITIATED'") == 4


async def test_reconcile_with_nothing_to_do(cli_env: str, store: Store) -> None:
    code, out, _ = await run_cli("reconcile")
    assert (code, out) == (0, "no unresolved STK attempts\n")
    code, _, err = await run_cli("reconcile", "--invoice", "not-a-number")
    assert code == 2 and "--invoice: not an invoice number" in err


# -- through the installed entry point ---------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES) or k.startswith("INVOICEIQ_TEST_")}
    env.update(extra)
    return env


def test_commands_through_python_m_invoiceiq(tmp_path: Path) -> None:
    db = tmp_path / "ops.db"
    env = clean_env(DATABASE_URL=f"sqlite:///{db}")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "invoiceiq", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)

    # No database yet: refused, and no empty file left behind at a mistyped path.
    missing = run("prune", "--older-than", "30")
    assert missing.returncode == 1
    assert "no database at" in missing.stderr and not db.exists()
    assert run("migrate").returncode == 0
    pruned = run("prune", "--older-than", "30")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.splitlines()[1:] == [
        "message_log: cleared 0 message payloads (rows and events kept)",
        "inbox: cleared 0 payloads of processed events (rows kept to deduplicate provider retries)",
        "outbox: cleared the text of 0 finished sends (rows kept)",
        "idempotency_keys: deleted 0 keys"]
    # Sandbox mode (no credentials): the simulated Daraja is inside the daemon on server.bind's port.
    reconciled = run("reconcile")
    assert (reconciled.returncode, reconciled.stdout) == (0, "no unresolved STK attempts\n"), reconciled.stderr
    assert "--older-than DAYS" in run("prune", "--help").stdout
