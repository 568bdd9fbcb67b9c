"""Shared fixtures. anyio's own pytest plugin runs the async tests (not the empty pytest-anyio)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Timings belong in bench/, not in assertions: hypothesis's per-example deadline (200 ms) is a
# timing assertion that fails on a busy 2-core CI machine, so it is off for the whole suite.
settings.register_profile("invoiceiq", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("invoiceiq")

# Copies of ../shared/providers (samples and Meta's schema), so a fresh clone tests on its own.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROVIDERS = FIXTURES / "providers"
META_OPENAPI = PROVIDERS / "meta-openapi"


@pytest.fixture
def anyio_backend() -> object:
    # databases and SQLAlchemy's asyncio layer are asyncio-only (notes/stack.md, gotcha 2).
    # The served daemon runs on uvloop (server.event_loop "auto"), and the tests that start
    # `invoiceiq serve` run it so; INVOICEIQ_TEST_EVENT_LOOP=uvloop runs the in-process tests
    # on it too (a whole-suite check, not needed per run).
    if os.environ.get("INVOICEIQ_TEST_EVENT_LOOP", "asyncio") == "uvloop":
        return ("asyncio", {"use_uvloop": True})
    return "asyncio"


# -- databases -------------------------------------------------------------------------------
# A SQLite file per test, and the same tests on PostgreSQL when INVOICEIQ_TEST_POSTGRES_URL is
# set (CI sets it). When it is set and the server is unreachable those tests FAIL: they never
# skip, so a broken CI database cannot pass unnoticed.

import os
import secrets
from collections.abc import AsyncIterator

import anyio

POSTGRES_URL = os.environ.get("INVOICEIQ_TEST_POSTGRES_URL", "").strip()
DIALECTS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


async def make_pg_schema() -> str:
    """A fresh schema on the test server; its name goes in ?search_path= of the URL."""
    import asyncpg

    name = f"iq_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return name


async def drop_pg_schema(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


def pg_url(schema: str) -> str:
    sep = "&" if "?" in POSTGRES_URL else "?"
    return f"{POSTGRES_URL}{sep}search_path={schema}"


@pytest.fixture(params=DIALECTS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'invoiceiq.db'}"
        return
    schema = await make_pg_schema()
    try:
        yield pg_url(schema)
    finally:
        await drop_pg_schema(schema)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator["Store"]:
    """An open, migrated store with its writer running."""
    from invoiceiq.store import Store

    st = Store(database_url)
    await st.open()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(st.run_writer)
            await st.migrate()
            yield st
            tg.cancel_scope.cancel()
    finally:
        await st.close()
