"""Shared fixtures. anyio's own pytest plugin runs the async tests (not the empty pytest-anyio)."""

from __future__ import annotations

from pathlib import Path

import pytest

# Copies of ../shared/providers (samples and Meta's schema), so a fresh clone tests on its own.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROVIDERS = FIXTURES / "providers"
META_OPENAPI = PROVIDERS / "meta-openapi"


@pytest.fixture
def anyio_backend() -> str:
    # databases and SQLAlchemy's asyncio layer are asyncio-only (notes/stack.md, gotcha 2).
    return "asyncio"
