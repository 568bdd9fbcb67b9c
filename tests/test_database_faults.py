"""Database faults (issue 10, part 5): the store refuses writes while webhooks arrive.

While the database cannot take a write, ``/readyz`` answers 503 and every webhook is answered
503 (so the provider retries it) — never 200 for an event that was not stored. When the
database is back the daemon resumes by itself (no restart), and the same webhooks, retried,
are answered 200 and processed exactly once.

How the faults are made, and why these ways:

* SQLite, the writer's I/O fails (always runs, needs no privilege): the running daemon's
  ``GroupCommitWriter`` gets its connection wrapped so that, while a flag is set, COMMIT raises
  ``sqlite3.OperationalError("disk I/O error")`` (SQLITE_IOERR: the group's fsync failed), or
  every row-changing statement of the jobs raises "attempt to write a readonly database"
  (SQLITE_READONLY). These are the errors SQLite itself raises, raised at the places it raises
  them, through the daemon's real write path; clearing the flag ends the fault. This is the
  SQLite fault test CI always runs.
* SQLite, disk full: the database lives on a small tmpfs of its own, filled up with a file.
  SQLite then fails the next write (``SQLITE_FULL``, "database or disk is full"); deleting the
  file ends the fault. This needs the right to mount (root in a container); without it these
  tests are skipped with that reason (the injected faults above still run).
* SQLite, file made read-only: NOT a fault for the running daemon, so it is not used to make
  one. ``chmod`` on the database, its -wal/-shm files and the directory is checked by the
  kernel only when a file is *opened*; the daemon's writer opened them read-write at start and
  keeps those descriptors, and in WAL mode a transaction creates no new file (the -wal and -shm
  files stay open and are reused), so every later write goes through as before. Root ignores
  file modes anyway. ``test_a_read_only_sqlite_file_is_still_written_through_the_open_
  connection`` pins that: nothing is refused, nothing is lost, ``/readyz`` stays 200; the
  read-only file only bites a process that opens it afterwards (the next start, for a user
  other than root). ``PRAGMA query_only`` would be a connection setting, not the file, so it
  is not used either.
* PostgreSQL, server unreachable: the shared test server is never stopped (other tests use it).
  The daemon reaches its own schema through a TCP proxy this test runs; cutting the proxy drops
  the daemon's connections and refuses new ones, exactly what a stopped or unreachable server
  looks like from the daemon; restoring it is the server coming back.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import pytest
from anyio.abc import SocketStream, TaskGroup

from conftest import POSTGRES_URL, drop_pg_schema, make_pg_schema
from harness import (
    AUTH,
    SMS_INBOUND,
    SMS_STATUS,
    CUSTOMER,
    FakeProviders,
    Handle,
    inbound_button,
    inbound_text,
    make_settings,
    running_daemon,
    sign,
    status_event,
    stk_callback,
)
from invoiceiq.store import Tx
from invoiceiq.store.db import GroupCommitWriter, SqliteTx

pytestmark = pytest.mark.anyio

ACK = {"ResultCode": 0, "ResultDesc": "Accepted"}


# -- helpers ---------------------------------------------------------------------------------------


async def rows(h: Handle, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def job(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all(sql, params)
    return await h.store.read(job)


async def wait_until(check: Any, what: str, timeout: float = 20.0) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def settle(h: Handle, timeout: float = 20.0) -> None:
    async def idle() -> bool:
        (row,) = await rows(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL AND actor <> 'delivery')"
                               " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING')) AS n")
        busy = any(r.busy for r in h.daemon.dispatch.registries.values())
        return row["n"] == 0 and not busy and (h.daemon.outbox is None or h.daemon.outbox.in_flight == 0)
    await wait_until(idle, "the daemon to work everything off", timeout)


async def invoice_with_attempt(h: Handle) -> str:
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": CUSTOMER, "amount_cents": 250000, "description": "Cleaning"})
    assert response.status_code == 201, response.text
    await h.wait_for(lambda: bool(h.providers.to(CUSTOMER)), what="the invoice")
    await h.tap(CUSTOMER, "pay_now:1001")
    await h.wait_for(lambda: bool(h.providers.daraja.pushes), what="the STK push")
    await settle(h)
    return str(h.providers.daraja.pushes[0]["_checkout"])


def webhooks(checkout: str, first_wamid: str) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """One of each kind of provider callback, as (name, path, body, headers): all must be 503
    during the fault and 200 (processed once) when retried afterwards."""
    def wa(payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return body, {"Content-Type": "application/json", "X-Hub-Signature-256": sign(body)}

    text_body, text_headers = wa(inbound_text(CUSTOMER, "hello, is this paid?", wamid="wamid.DBFAULT.1"))
    tap_body, tap_headers = wa(inbound_button("254799000111", "pay_now:1001", wamid="wamid.DBFAULT.2"))
    status_body, status_headers = wa(status_event(first_wamid, "read", CUSTOMER))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    return [
        ("whatsapp message", "/whatsapp/webhook", text_body, text_headers),
        ("whatsapp tap", "/whatsapp/webhook", tap_body, tap_headers),
        ("whatsapp status", "/whatsapp/webhook", status_body, status_headers),
        ("sms inbound", SMS_INBOUND, b"from=%2B254711222333&to=21345&id=sms-dbfault-1&text=hello", form),
        ("sms status", SMS_STATUS, b"id=ATXid_dbfault&status=Success&phoneNumber=%2B254711222333", form),
        ("stk callback", "CALLBACK", json.dumps(stk_callback(checkout, 0, amount=2500, receipt="DBFAULT001")).encode(),
         {"Content-Type": "application/json"}),
    ]


async def post(h: Handle, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    if path == "CALLBACK":
        path = f"/payments/stk/callback/{h.daemon.callback_secret}"
    return await h.client.post(path, content=body, headers=headers)


async def during_fault(h: Handle, hooks: list[tuple[str, str, bytes, dict[str, str]]]) -> dict[str, int]:
    """Post every webhook while the database refuses writes; their answers."""
    answers = {}
    for name, path, body, headers in hooks:
        answers[name] = (await post(h, path, body, headers)).status_code
    return answers


async def after_fault(h: Handle, hooks: list[tuple[str, str, bytes, dict[str, str]]]) -> None:
    """The providers' retries once the database is back: 200 each, and each event stored and
    applied exactly once (a second retry is a duplicate)."""
    for _ in range(2):
        for name, path, body, headers in hooks:
            response = await post(h, path, body, headers)
            assert response.status_code == 200, (name, response.status_code, response.text)
    await settle(h)
    counts = {r["event_id"]: r["n"] for r in await rows(
        h, "SELECT event_id, COUNT(*) AS n FROM inbox GROUP BY event_id")}
    for event in ("wamid.DBFAULT.1", "wamid.DBFAULT.2", "sms-dbfault-1", "ATXid_dbfault:Success"):
        assert counts.get(event) == 1, (event, counts.get(event))
    (invoice,) = await rows(h, "SELECT status, pay_ref FROM invoices")
    assert (invoice["status"], invoice["pay_ref"]) == ("PAID", "DBFAULT001")
    assert sum(s.text.startswith("Paid ✔") for s in h.providers.sent) == 2  # one receipt each, once
    assert [t for t in h.providers.texts("254711222333")] == ["You have no open invoices right now. Thank you!"]
    logged = {r["what"]: r["n"] for r in await rows(
        h, "SELECT CASE WHEN event = 'pay_requested' THEN 'request' ELSE 'message' END AS what,"
           " COUNT(*) AS n FROM message_log WHERE direction = 'IN' GROUP BY 1")}
    # The two WhatsApp messages, the SMS and the first tap, and that tap's Pay request: each
    # once, whatever the retries.
    assert logged == {"message": 4, "request": 1}


async def readyz(h: Handle) -> httpx.Response:
    return await h.client.get("/readyz", timeout=30)


async def ready_again(h: Handle) -> None:
    async def ok() -> bool:
        return (await readyz(h)).status_code == 200
    await wait_until(ok, "/readyz to answer 200 again", timeout=40)


# -- SQLite: disk full ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({done.stderr.strip() or done.returncode}): "
                    "the disk-full fault needs the right to mount")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
        try:  # the last partial blocks
            while True:
                f.write(b"\0" * 512)
                f.flush()
        except OSError:
            pass
    return filler


async def test_sqlite_disk_full_answers_503_then_resumes_by_itself(small_disk: Path) -> None:
    settings = make_settings(f"sqlite:///{small_disk / 'invoiceiq.db'}")
    async with running_daemon(settings, providers=FakeProviders()) as h:
        checkout = await invoice_with_attempt(h)
        hooks = webhooks(checkout, h.providers.sent[0].message_id)
        filler = fill(small_disk)
        try:
            answers = await during_fault(h, hooks)
            assert answers == {name: 503 for name, *_ in hooks}, answers
            # Nothing of them was stored.
            assert not await rows(h, "SELECT seq FROM inbox WHERE LOWER(event_id) LIKE :p", {"p": "%dbfault%"})
        finally:
            filler.unlink()
        await ready_again(h)
        await after_fault(h, hooks)
        assert h.daemon.supervisor is not None and h.daemon.supervisor.failing() == []


async def test_sqlite_disk_full_makes_readyz_503(small_disk: Path) -> None:
    settings = make_settings(f"sqlite:///{small_disk / 'invoiceiq.db'}")
    async with running_daemon(settings, providers=FakeProviders()) as h:
        checkout = await invoice_with_attempt(h)
        hooks = webhooks(checkout, h.providers.sent[0].message_id)
        filler = fill(small_disk)
        try:
            answers = await during_fault(h, hooks)
            assert set(answers.values()) == {503}, answers
            ready = [await readyz(h) for _ in range(3)]
        finally:
            filler.unlink()
        assert all(r.status_code == 503 and "database" in r.json()["checks"] for r in ready), [r.text for r in ready]


# -- SQLite: the file made read-only --------------------------------------------------------------


async def test_a_read_only_sqlite_file_is_still_written_through_the_open_connection(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    settings = make_settings(f"sqlite:///{directory / 'invoiceiq.db'}")
    modes: dict[Path, int] = {}
    async with running_daemon(settings, providers=FakeProviders()) as h:
        checkout = await invoice_with_attempt(h)
        hooks = webhooks(checkout, h.providers.sent[0].message_id)
        for path in [*directory.iterdir(), directory]:
            modes[path] = stat.S_IMODE(path.stat().st_mode)
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            # Not refused: the answers are 200 and truthful (the events are durably stored).
            # File modes are checked at open(); the writer's descriptors were opened read-write
            # at start and WAL reuses its -wal/-shm files, so the open connection still writes.
            await after_fault(h, hooks)
            assert (await readyz(h)).status_code == 200
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    print(f"\nread-only SQLite file while running: writes still accepted (running as uid {os.getuid()})")


# -- SQLite: the writer's I/O fails (needs no privilege: always runs) -----------------------------


class WriteFault:
    """A switch for ``FaultyConnection``: while ``message`` is set, the chosen statements raise
    ``sqlite3.OperationalError(message)``, which is what SQLite raises for an I/O error or a
    database it may no longer write."""

    def __init__(self) -> None:
        self.message: str | None = None
        self.hits = 0


class FaultyConnection:
    """The daemon's own writer connection with faults injected on demand; everything else
    (reads, savepoints, ROLLBACK, close) goes through to the real ``sqlite3.Connection``.

    ``at="commit"`` fails COMMIT (and BEGIN IMMEDIATE): the jobs ran, their fsync did not
    happen, the whole group is rolled back — SQLITE_IOERR on a dying disk. ``at="statement"``
    fails every statement that changes a row, inside the jobs: a database that can be read but
    not written (SQLITE_READONLY)."""

    _WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")

    def __init__(self, raw: sqlite3.Connection, fault: WriteFault, at: str) -> None:
        self._raw = raw
        self._fault = fault
        self._at = at

    def _fails(self, sql: str) -> bool:
        if self._fault.message is None:
            return False
        verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        if self._at == "commit":
            return verb == "COMMIT" or sql.strip().upper() == "BEGIN IMMEDIATE"
        return verb in self._WRITES

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self._fails(sql):
            self._fault.hits += 1
            raise sqlite3.OperationalError(self._fault.message)
        return self._raw.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def inject(h: Handle, monkeypatch: pytest.MonkeyPatch, at: str) -> WriteFault:
    """Put a ``FaultyConnection`` under the running daemon's GroupCommitWriter (its COMMIT goes
    through ``writer._raw``; the jobs' statements through ``writer._tx``)."""
    writer = h.store.db._writer
    assert isinstance(writer, GroupCommitWriter), "the SQLite store writes through one GroupCommitWriter"
    fault = WriteFault()
    faulty = FaultyConnection(writer._raw, fault, at)
    monkeypatch.setattr(writer, "_raw", faulty)
    monkeypatch.setattr(writer, "_tx", SqliteTx(faulty))  # type: ignore[arg-type]
    return fault


@pytest.mark.parametrize(("at", "message"), [
    ("commit", "disk I/O error"),
    ("statement", "attempt to write a readonly database"),
])
async def test_sqlite_write_failures_answer_503_then_resume_by_themselves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at: str, message: str) -> None:
    """The SQLite fault test that runs everywhere (no tmpfs, no root): the running daemon's
    writer raises SQLite's own errors while a flag is set. Every webhook is 503 (never 200 for
    an event that was not stored), ``/readyz`` is 503 naming the database; the flag cleared,
    ``/readyz`` is 200 again without a restart and the providers' retries are stored once and
    answered (the customer and the SMS sender get their replies, both receipts go out once)."""
    settings = make_settings(f"sqlite:///{tmp_path / 'invoiceiq.db'}")
    async with running_daemon(settings, providers=FakeProviders()) as h:
        checkout = await invoice_with_attempt(h)
        hooks = webhooks(checkout, h.providers.sent[0].message_id)
        fault = inject(h, monkeypatch, at)
        assert (await readyz(h)).status_code == 200  # the wrapper alone changes nothing
        sent_before = len(h.providers.sent)
        fault.message = message
        try:
            answers = await during_fault(h, hooks)
            assert answers == {name: 503 for name, *_ in hooks}, answers
            ready = await readyz(h)
            assert ready.status_code == 503, ready.text
            assert message in ready.json()["checks"]["database"], ready.text
            # Nothing of them was stored, and nothing was answered.
            assert not await rows(h, "SELECT seq FROM inbox WHERE LOWER(event_id) LIKE :p", {"p": "%dbfault%"})
            assert not await rows(h, "SELECT status FROM invoices WHERE status = 'PAID'")
            assert fault.hits > 0
        finally:
            fault.message = None
        # By itself, no restart: the probe's write commits again and, 15 s after the last failed
        # group, the writer's recent failure stops counting (Store.check, writer_failed_recently).
        await ready_again(h)
        hits = fault.hits
        await after_fault(h, hooks)
        assert fault.hits == hits  # the recovery ran through the same (now healthy) writer
        # The customer's WhatsApp question was answered after its retry, exactly once.
        replies = [s for s in h.providers.sent[sent_before:] if s.to == CUSTOMER and not s.text.startswith("Paid ✔")]
        assert len(replies) == 1, [s.text for s in replies]
        assert h.daemon.supervisor is not None and h.daemon.supervisor.failing() == []


# -- PostgreSQL: the server unreachable ------------------------------------------------------------


class Proxy:
    """A TCP relay to the PostgreSQL server that can be cut (every connection dropped, new ones
    refused) and restored."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.up = True
        self.port = 0
        self._live: set[SocketStream] = set()

    async def serve(self, tg: TaskGroup, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        async with listener:
            await listener.serve(self._handle, task_group=tg)

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            if not self.up:
                return
            try:
                server = await anyio.connect_tcp(*self.target)
            except OSError:
                return
            self._live.update((client, server))
            async with server, anyio.create_task_group() as tg:
                async def pipe(a: SocketStream, b: SocketStream) -> None:
                    try:
                        async for chunk in a:
                            await b.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    tg.cancel_scope.cancel()
                tg.start_soon(pipe, client, server)
                tg.start_soon(pipe, server, client)
            self._live.difference_update((client, server))

    async def cut(self) -> None:
        self.up = False
        for stream in list(self._live):
            await stream.aclose()
        self._live.clear()

    def restore(self) -> None:
        self.up = True


@pytest.fixture
async def pg_behind_proxy() -> AsyncIterator[tuple[str, Proxy]]:
    if not POSTGRES_URL:
        pytest.skip("PostgreSQL variant: set INVOICEIQ_TEST_POSTGRES_URL")
    schema = await make_pg_schema()
    parts = urlsplit(POSTGRES_URL)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(proxy.serve, tg)
            netloc = (f"{parts.username}@" if parts.username else "") + f"127.0.0.1:{proxy.port}"
            if parts.password:
                netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
            query = (parts.query + "&" if parts.query else "") + f"search_path={schema}"
            yield urlunsplit((parts.scheme, netloc, parts.path, query, "")), proxy
            tg.cancel_scope.cancel()
    finally:
        await drop_pg_schema(schema)


async def test_postgresql_unreachable_answers_503_then_resumes_by_itself(pg_behind_proxy: tuple[str, Proxy]) -> None:
    url, proxy = pg_behind_proxy
    async with running_daemon(make_settings(url), providers=FakeProviders()) as h:
        checkout = await invoice_with_attempt(h)
        hooks = webhooks(checkout, h.providers.sent[0].message_id)
        await proxy.cut()
        answers = await during_fault(h, hooks)
        assert answers == {name: 503 for name, *_ in hooks}, answers
        ready = await readyz(h)
        assert ready.status_code == 503 and "database" in ready.json()["checks"], ready.text
        proxy.restore()
        await ready_again(h)
        await after_fault(h, hooks)
        assert h.daemon.supervisor is not None and h.daemon.supervisor.failing() == []


# -- the other routes during an outage -------------------------------------------------------------


async def test_the_internal_api_and_the_pay_page_answer_503_during_an_outage(small_disk: Path) -> None:
    settings = make_settings(f"sqlite:///{small_disk / 'invoiceiq.db'}")
    async with running_daemon(settings, providers=FakeProviders()) as h:
        await invoice_with_attempt(h)
        token = (await h.client.get("/invoices/1001", headers=AUTH)).json()["pay_link"].rsplit("/", 1)[-1]
        filler = fill(small_disk)
        try:
            answers = {
                "POST /invoices": (await h.client.post("/invoices", headers={**AUTH, "Idempotency-Key": "k-outage"}, json={
                    "msisdn": "0712345678", "amount_cents": 100, "description": "During"})).status_code,
                "POST /payments/stk/initiate": (await h.client.post(
                    "/payments/stk/initiate", headers={**AUTH, "Idempotency-Key": "k-outage"},
                    json={"invoice_id": "1001"})).status_code,
                "POST /p/<token>/pay": (await h.client.post(f"/p/{token}/pay", data={"csrf": "v"},
                                                            headers={"Cookie": "iq_csrf=v"})).status_code,
            }
        finally:
            filler.unlink()
        assert answers == {k: 503 for k in answers}, answers


async def test_the_pay_page_and_the_api_answer_503_while_postgresql_is_unreachable(
        pg_behind_proxy: tuple[str, Proxy]) -> None:
    url, proxy = pg_behind_proxy
    async with running_daemon(make_settings(url), providers=FakeProviders()) as h:
        await invoice_with_attempt(h)
        token = (await h.client.get("/invoices/1001", headers=AUTH)).json()["pay_link"].rsplit("/", 1)[-1]
        await proxy.cut()
        try:
            answers = {
                "GET /p/<token>": (await h.client.get(f"/p/{token}")).status_code,
                "POST /p/<token>/pay": (await h.client.post(f"/p/{token}/pay", data={"csrf": "v"},
                                                            headers={"Cookie": "iq_csrf=v"})).status_code,
                "GET /invoices/1001": (await h.client.get("/invoices/1001", headers=AUTH)).status_code,
                "POST /invoices": (await h.client.post("/invoices", headers={**AUTH, "Idempotency-Key": "k-out"}, json={
                    "msisdn": "0712345678", "amount_cents": 100, "description": "During"})).status_code,
            }
        finally:
            proxy.restore()
        assert answers == {k: 503 for k in answers}, answers
