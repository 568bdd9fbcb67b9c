"""Connections and transactions on top of ``databases`` (aiosqlite or asyncpg).

The rules from notes/stack.md are applied here once, so no other module has to know them:

* every connection is *held* (``databases`` opens a connection and a thread per query
  otherwise, and loses per-connection PRAGMAs);
* SQLite writes go through one ``GroupCommitWriter`` that runs queued jobs in one
  transaction, one SAVEPOINT each, and commits (one fsync) for the whole group; SQLite
  point reads run in the loop on a read-only connection of their own (``read``), reads
  that grow with the data in reader threads (``scan``);
* PostgreSQL jobs each get a pooled connection and their own transaction, retried on
  serialization failures and on ``Conflict`` (a lost compare-and-set);
* a job never starts child tasks (a ``databases`` transaction belongs to one task).

A *job* is ``async def job(tx: Tx) -> T``: it runs SQL through ``tx`` and nothing else (no
provider calls), so that holding the write lock for it is cheap.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit
from typing import Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import databases
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from ..observability import get_logger

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]
log = get_logger(__name__)

# How long closing may wait for pooled PostgreSQL connections to come back.
CLOSE_TIMEOUT_S = 5.0
# How long a PostgreSQL BEGIN may take on a connection the pool already handed out.
BEGIN_TIMEOUT_S = 10.0
# How long a SQLite write or thread read waits for another process's lock (a backup, a prune).
BUSY_TIMEOUT_MS = 5000


class StoreError(Exception):
    """The database could not do what was asked (unreachable, read-only, locked...)."""


class Conflict(Exception):
    """A compare-and-set lost a race; the whole job is safe to run again."""


class Tx:
    """One transaction on one held connection: the only object through which SQL runs."""

    __slots__ = ("_conn", "dialect")

    def __init__(self, conn: databases.core.Connection, dialect: Dialect) -> None:
        self._conn = conn
        self.dialect = dialect

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        await self._conn.execute(sql, _pg_params(params))

    async def one(self, sql: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        row = await self._conn.fetch_one(sql, _pg_params(params))
        return None if row is None else dict(row._mapping)

    async def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        rows = await self._conn.fetch_all(sql, _pg_params(params))
        return [dict(r._mapping) for r in rows]

    async def val(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        row = await self._conn.fetch_one(sql, _pg_params(params))
        return None if row is None else next(iter(row._mapping.values()))


async def update_slice(tx: Tx, table: str, key: str, assign: str, where: str,
                       params: Mapping[str, Any], limit: int) -> int:
    """One slice of a bulk change (``invoiceiq prune``): ``SET assign`` on at most ``limit``
    rows of ``table`` matching ``where``, picked by ``key``; how many changed. A slice is one
    short write transaction, so the running daemon's writes wait milliseconds, not the whole
    prune; call until it returns 0. For SQLite to find the rows through a partial index,
    ``where`` must repeat the index's terms word for word. (The fragments are the store's own
    constants, never input.)"""
    rows = await tx.all(
        f"UPDATE {table} SET {assign} WHERE {key} IN (SELECT {key} FROM {table} WHERE {where} LIMIT :lim)"
        f" RETURNING {key}", {**params, "lim": limit})
    return len(rows)


def _pg_params(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """PostgreSQL refuses a NUL character in text, where SQLite keeps it. Text reaching us
    from outside may carry one; dropping it beats failing the whole transaction."""
    if not params:
        return None
    return {k: v.replace("\x00", "") if isinstance(v, str) and "\x00" in v else v for k, v in params.items()}


class SqliteTx(Tx):
    """SQLite's Tx for the writer and the inline reader: statements run on a stdlib
    ``sqlite3`` connection, in the event loop's thread, without a thread hop or a SQLAlchemy
    compile per statement (measured in bench/: those cost 0.2-0.7 ms and 0.14 ms of CPU per
    statement through ``databases`` and made the single writer the bottleneck). Point
    statements take microseconds; only what can wait (the fsync of COMMIT, a BEGIN behind
    another process's lock) runs in a thread."""

    __slots__ = ("_raw",)

    def __init__(self, raw: sqlite3.Connection) -> None:
        self._raw = raw
        self.dialect = "sqlite"

    async def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._raw.execute(sql, params or {})

    async def one(self, sql: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        row: dict[str, Any] | None = self._raw.execute(sql, params or {}).fetchone()
        return row

    async def all(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._raw.execute(sql, params or {}).fetchall()
        return rows

    async def val(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        row = self._raw.execute(sql, params or {}).fetchone()
        return None if row is None else next(iter(row.values()))


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row)}


def _connect(target: str, **options: Any) -> sqlite3.Connection:
    """A stdlib connection in autocommit mode (we issue BEGIN/COMMIT ourselves), rows as dicts."""
    raw = sqlite3.connect(target, isolation_level=None, uri=target.startswith("file:"), **options)
    raw.row_factory = _dict_row
    return raw


Job = Callable[[Tx], Awaitable[T]]


def normalise_url(url: str) -> tuple[Dialect, str]:
    if url.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
        return "postgresql", re.sub(r"^postgres(ql)?(\+asyncpg)?://", "postgresql://", url)
    if url.startswith(("sqlite://", "sqlite+aiosqlite://")):
        return "sqlite", url.replace("sqlite+aiosqlite://", "sqlite://", 1)
    raise ValueError(f"unsupported database url scheme: {url.split(':', 1)[0]}")


def sqlite_file(url: str) -> Path | None:
    """The file behind a ``sqlite:///path`` URL (None for in-memory databases)."""
    path = url.split("://", 1)[1]
    path = path[1:] if path.startswith("/") else path
    path = path.split("?", 1)[0]
    if not path or path == ":memory:" or "mode=memory" in url:
        return None
    return Path(path)


class GroupCommitWriter:
    """The single SQLite writer: many queued jobs, one transaction, one fsync.

    Each job runs inside its own SAVEPOINT, so a job that fails (a constraint, a bug) is
    rolled back alone and its caller gets the exception, while the rest of the group commits.
    A caller's ``submit`` returns only after the COMMIT: durable before acknowledged.

    This is the hot path of every webhook, so it uses asyncio's own future and queue rather
    than anyio's streams and events (a job costs a few microseconds of bookkeeping, not tens);
    the store is asyncio-only anyway (``databases`` is). A caller cancelled while waiting
    does not unqueue its job: it runs and commits, only nobody is told.
    """

    def __init__(self, raw: sqlite3.Connection, max_batch: int = 256, depth: int = 4096,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self._raw = raw
        # One thread of our own for the COMMIT's fsync: cheaper to hand work to than anyio's
        # pool (no limiter, no cancel scope), and the connection is used by one thread at a time.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-commit")
        self.busy_timeout_ms = busy_timeout_ms
        raw.execute("PRAGMA busy_timeout=0")  # see _begin
        self._tx = SqliteTx(raw)
        self._max_batch = max_batch
        self._depth = depth
        self._queue: deque[tuple[Job[Any], asyncio.Future[Any]]] = deque()
        self._wake: asyncio.Event | None = None
        self._space: asyncio.Event | None = None
        self._closed = False
        self.commits = 0  # groups committed
        self.jobs = 0  # jobs in them (failed jobs included: their group committed)
        self.last_error: str | None = None
        self.failed_at: float | None = None
        self.failure: str | None = None  # the last failure, kept after later successes

    def failed_recently(self, within_s: float) -> str | None:
        """The last failed group's error if it failed less than ``within_s`` ago."""
        if self.failed_at is None or time.monotonic() - self.failed_at > within_s:
            return None
        return self.failure

    async def submit(self, job: Job[T]) -> T:
        if self._closed:
            raise StoreError("the database is closed")
        while len(self._queue) >= self._depth:  # backpressure: wait, never drop
            if self._space is None:
                self._space = asyncio.Event()
            await self._space.wait()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if self._wake is not None:
            self._wake.set()
        return await future

    async def run(self) -> None:
        self._wake = wake = asyncio.Event()
        while True:
            if not self._queue:
                wake.clear()
                await wake.wait()
                continue
            size = min(len(self._queue), self._max_batch)
            batch = [self._queue.popleft() for _ in range(size)]
            if self._space is not None:
                self._space.set()
                self._space = None
            with anyio.CancelScope(shield=True):
                await self._run_batch(batch)

    def close(self) -> None:
        self._closed = True
        self._committer.shutdown(wait=False)
        for _, future in self._queue:
            if not future.done():
                future.set_exception(StoreError("the database is closed"))
        self._queue.clear()

    async def _run_batch(self, batch: list[tuple[Job[Any], asyncio.Future[Any]]]) -> None:
        raw = self._raw
        try:
            await self._begin()
        except Exception as exc:
            self._fail_all(batch, exc)
            return
        outcomes: list[tuple[bool, Any]] = []
        for index, (job, _future) in enumerate(batch):
            try:
                raw.execute("SAVEPOINT job")
                outcomes.append((True, await job(self._tx)))
                raw.execute("RELEASE job")
            except Exception as exc:  # noqa: BLE001 - the job's caller receives it
                outcomes.append((False, exc))
                if _is_connection_error(exc):
                    # The database, not the job (a full disk fails the biggest writes first).
                    self.last_error = self.failure = f"{type(exc).__name__}: {exc}"
                    self.failed_at = time.monotonic()
                try:
                    raw.execute("ROLLBACK TO job")
                    raw.execute("RELEASE job")
                except Exception as inner:  # the transaction itself is broken
                    self._rollback()
                    self._fail_all(batch, inner)
                    return
            if index % 16 == 15:
                # Let the HTTP side breathe during a long group (jobs run without yielding).
                await anyio.lowlevel.checkpoint()
        try:
            # The fsync: in the committer thread, so that requests go on meanwhile.
            await asyncio.get_running_loop().run_in_executor(self._committer, raw.execute, "COMMIT")
        except Exception as exc:
            self._rollback()
            self._fail_all(batch, exc)
            return
        self.commits += 1
        self.jobs += len(batch)
        self.last_error = None
        for (_, future), (ok, value) in zip(batch, outcomes):
            if future.done():
                continue  # its caller was cancelled meanwhile
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE, in the loop when the write lock is free (the usual case: this
        connection is the process's only writer), else in the committer thread.

        The connection's busy timeout is 0, so the attempt in the loop never waits; only
        another process holding the lock (a backup, ``invoiceiq prune``) makes it fail with
        SQLITE_BUSY, and then the thread waits for the lock as long as ``busy_timeout_ms``.
        A thread hop costs ~100 us of CPU here (bench/README): one less per group."""
        try:
            self._raw.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
        await asyncio.get_running_loop().run_in_executor(self._committer, self._begin_waiting)

    def _begin_waiting(self) -> None:
        raw = self._raw
        raw.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        try:
            raw.execute("BEGIN IMMEDIATE")
        finally:
            raw.execute("PRAGMA busy_timeout=0")

    def _rollback(self) -> None:
        try:
            self._raw.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - nothing left to undo
            pass

    def _fail_all(self, batch: list[tuple[Job[Any], asyncio.Future[Any]]], exc: BaseException) -> None:
        self.last_error = self.failure = f"{type(exc).__name__}: {exc}"
        self.failed_at = time.monotonic()
        log.error("db_write_failed", error=self.last_error, jobs=len(batch))
        for _, future in batch:
            if not future.done():
                future.set_exception(StoreError(self.last_error))


_RETRYABLE_PG = ("SerializationError", "DeadlockDetectedError")


class Database:
    """The store's connections: a writer path and a reader path for either dialect."""

    def __init__(self, url: str, *, readers: int = 3, pg_pool: int = 10, pg_options: Mapping[str, Any] | None = None) -> None:
        self.dialect, self.url = normalise_url(url)
        self._readers_n = readers
        if self.dialect == "sqlite":
            # databases passes unknown options to sqlite3.connect: wait for locks rather than fail.
            self._db = databases.Database(self.url, timeout=30)
        else:
            options = dict(pg_options or {})
            # databases drops the URL's query; keep the server settings it may carry (a schema
            # through ?search_path=..., an application_name) by passing them to asyncpg.
            query = dict(parse_qsl(urlsplit(self.url).query))
            server_settings = {k: v for k, v in query.items() if k in ("search_path", "application_name")}
            server_settings.setdefault("application_name", "invoiceiq")
            options.setdefault("server_settings", server_settings)
            if "sslmode" in query and "ssl" not in query:
                # libpq's name for it; databases only reads ?ssl=, so it would be dropped silently.
                options.setdefault("ssl", query["sslmode"])
            self._db = databases.Database(self.url, min_size=1, max_size=pg_pool, **options)
        self._writer: GroupCommitWriter | None = None
        self._writer_raw: sqlite3.Connection | None = None
        self._inline: SqliteTx | None = None
        self._reader_conns: list[databases.core.Connection] = []
        self._readers: ObjectReceiveStream[databases.core.Connection] | None = None
        self._reader_return: ObjectSendStream[databases.core.Connection] | None = None
        self._pg_slots = anyio.Semaphore(pg_pool)

    # -- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self.dialect == "sqlite":
            path = sqlite_file(self.url)
            if path is not None and path.parent and not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            await self._db.connect()
            if self.dialect == "sqlite":
                await self._open_sqlite()
        except Exception as exc:
            raise StoreError(f"cannot open database: {type(exc).__name__}: {exc}") from exc

    async def _open_sqlite(self) -> None:
        path = sqlite_file(self.url)
        target = str(path) if path is not None else self.url.split("://", 1)[1].lstrip("/")
        # check_same_thread=False: the COMMIT runs in the committer thread while the
        # connection is otherwise idle.
        raw = _connect(target, check_same_thread=False)
        # FULL: a commit is on disk before the webhook's 200 (durable before acknowledged).
        # (Its busy timeout is the writer's business: GroupCommitWriter._begin.)
        for pragma in ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON"):
            raw.execute(pragma)
        self._writer_raw = raw
        self._writer = GroupCommitWriter(raw)
        # The inline reader (see read): its own connection, so that it never sees the
        # writer's open group (uncommitted, not yet durable). In WAL mode a reader never
        # waits for the writer; only an exclusive lock (a VACUUM by hand) could make it
        # wait, and then the loop waits: 1 s at most.
        reader = _connect(target, timeout=1.0)
        reader.execute("PRAGMA query_only=1")
        self._inline = SqliteTx(reader)
        send, recv = anyio.create_memory_object_stream[databases.core.Connection](self._readers_n)
        self._reader_return, self._readers = send, recv
        for _ in range(self._readers_n):
            conn = await self._held()
            await conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA query_only=1")
            self._reader_conns.append(conn)
            send.send_nowait(conn)

    async def _held(self) -> databases.core.Connection:
        conn = databases.core.Connection(self._db, self._db._backend)
        await conn.__aenter__()
        return conn

    async def disconnect(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._inline is not None:
            inline, self._inline = self._inline, None
            inline._raw.close()
        if self._writer_raw is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._writer_raw.close)
            self._writer_raw = None
        for conn in self._reader_conns:
            if conn is not None:
                try:
                    await conn.__aexit__(None, None, None)
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
        self._reader_conns.clear()
        try:
            # asyncpg's pool.close() waits for every connection to come back, forever: one
            # stuck mid-transaction (a statement cut off by a cancellation) would hang the
            # shutdown until systemd's SIGKILL. Give it a bound, then terminate the pool.
            with anyio.fail_after(CLOSE_TIMEOUT_S):
                await self._db.disconnect()
        except TimeoutError:
            pool = getattr(self._db._backend, "_pool", None)
            if pool is not None:
                pool.terminate()
                self._db._backend._pool = None
            self._db.is_connected = False
            log.warning("database_close_timed_out", timeout_s=CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            pass

    async def run_writer(self) -> None:
        """The SQLite writer's loop (a supervised task); returns at once on PostgreSQL."""
        if self._writer is not None:
            await self._writer.run()

    def writer_stats(self) -> tuple[int, int] | None:
        """(groups, jobs) the SQLite writer has committed; None on PostgreSQL."""
        return (self._writer.commits, self._writer.jobs) if self._writer is not None else None

    def writer_failed_recently(self, within_s: float = 15.0) -> str | None:
        """A real write failed lately (SQLite): a readiness probe's tiny write may still fit on
        a full disk, so the writer's own recent failures count too."""
        return self._writer.failed_recently(within_s) if self._writer is not None else None

    # -- jobs --------------------------------------------------------------------------------

    async def write(self, job: Job[T], *, retries: int = 5) -> T:
        """Run ``job`` in a write transaction; ``Conflict`` (and PG serialization errors)
        re-run it from the start."""
        for attempt in range(retries + 1):
            try:
                if self._writer is not None:
                    return await self._writer.submit(job)
                return await self._pg_write(job)
            except Conflict:
                if attempt == retries:
                    raise
            except StoreError:
                raise
            except Exception as exc:
                if self.dialect == "postgresql" and type(exc).__name__ in _RETRYABLE_PG and attempt < retries:
                    await anyio.sleep(0.005 * (2**attempt))
                    continue
                if _is_connection_error(exc):
                    raise StoreError(f"{type(exc).__name__}: {exc}") from exc
                raise
            await anyio.sleep(0.002 * (2**attempt))
        raise AssertionError("unreachable")

    async def read(self, job: Job[T]) -> T:
        """Run ``job`` outside a write transaction (it must not write).

        On SQLite it runs in the event loop, on a read-only connection of its own: the
        loops' point queries take microseconds, where a hop to a reader thread through
        ``databases`` cost ~0.3 ms of CPU (bench/). A read that may walk a backlog (counts,
        listings, sweeps) belongs in :meth:`scan`, which keeps the loop free meanwhile."""
        if self._inline is None:
            return await self.scan(job)
        with _as_store_error():
            return await job(self._inline)

    async def scan(self, job: Job[T]) -> T:
        """Like :meth:`read`, for a job whose time grows with the data (a COUNT, a MIN over a
        backlog, a listing): on SQLite it runs in a reader thread."""
        with _as_store_error():
            if self._readers is not None and self._reader_return is not None:
                conn = await self._readers.receive()
                try:
                    return await job(Tx(conn, "sqlite"))
                finally:
                    self._reader_return.send_nowait(conn)
            async with self._pg_slots, self._pg_connection() as conn:
                return await job(Tx(conn, "postgresql"))

    async def _pg_write(self, job: Job[T]) -> T:
        async with self._pg_slots, self._pg_connection() as conn:
            transaction = conn.transaction()
            # BEGIN is shielded (and bounded): ``databases`` counts the connection as in use
            # before it sends BEGIN and only registers the transaction after, so a cancellation
            # in between (a shutdown, a client that went away) would keep the connection out of
            # the pool forever, "idle in transaction", and hang the pool's close.
            with anyio.CancelScope(shield=True), anyio.fail_after(BEGIN_TIMEOUT_S):
                await transaction.start()
            try:
                result = await job(Tx(conn, "postgresql"))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await transaction.rollback()
                raise
            with anyio.CancelScope(shield=True):
                await transaction.commit()
            return result

    @asynccontextmanager
    async def _pg_connection(self) -> AsyncIterator[databases.core.Connection]:
        """A pooled connection of our own (databases keys connections by task; a job must own
        its connection outright), always given back: anyio cancellation is level-triggered,
        so an unshielded release in a cancelled task would be cancelled too and the pool
        would wait for that connection forever when it closes."""
        conn = databases.core.Connection(self._db, self._db._backend)
        await conn.__aenter__()
        try:
            yield conn
        finally:
            with anyio.CancelScope(shield=True):
                await conn.__aexit__(None, None, None)


def _is_connection_error(exc: BaseException) -> bool:
    name = type(exc).__name__
    module = type(exc).__module__
    if isinstance(exc, (OSError, ConnectionError)):
        return True
    if module.startswith("asyncpg"):
        if ("Connection" in name or "CannotConnectNow" in name or "InterfaceError" in name
                or "AdminShutdown" in name or "TooManyConnections" in name):
            return True
        # SQLSTATE classes of a server that cannot take the write now, whatever we sent:
        # 08 connection, 25 read-only transaction (a failover), 53 resources (disk full),
        # 57 operator intervention (shutdown), 58 system error.
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if sqlstate[:2] in ("08", "25", "53", "57", "58"):
            return True
    if module.startswith("sqlite3") or name in ("OperationalError", "DatabaseError"):
        text = str(exc).lower()
        return any(w in text for w in ("readonly", "read-only", "locked", "disk", "unable to open", "i/o"))
    return False



@contextmanager
def _as_store_error() -> Iterator[None]:
    """A read that failed because of the database, not the job, as a ``StoreError``."""
    try:
        yield
    except (Conflict, StoreError):
        raise
    except Exception as exc:
        if _is_connection_error(exc):
            raise StoreError(f"{type(exc).__name__}: {exc}") from exc
        raise


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY: another connection holds the lock ("database is locked")."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == sqlite3.SQLITE_BUSY
    return "locked" in str(exc).lower()
