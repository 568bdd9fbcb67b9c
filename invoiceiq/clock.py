"""Time as a dependency.

Every timer in InvoiceIQ (chat nudges, outbox backoff, payment queries) reads the time
from a ``Clock`` and sleeps through it, so tests can move time forward instead of waiting.
Times are integer milliseconds since the Unix epoch.
"""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    def now_ms(self) -> int: ...

    async def sleep_until(self, deadline_ms: int) -> None:
        """Return at ``deadline_ms`` (or later); cancellable."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    async def sleep_until(self, deadline_ms: int) -> None:
        delay = (deadline_ms - self.now_ms()) / 1000
        if delay > 0:
            await anyio.sleep(delay)


class ManualClock:
    """A clock that only moves when a test calls ``advance``; sleepers wake as it passes them."""

    def __init__(self, start_ms: int = 1_764_158_400_000) -> None:
        self._now = start_ms
        # Created lazily: an anyio.Event needs a running event loop.
        self._moved: anyio.Event | None = None

    def now_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> None:
        self.set(self._now + ms)

    def set(self, now_ms: int) -> None:
        self._now = max(self._now, now_ms)
        moved, self._moved = self._moved, None
        if moved is not None:
            moved.set()

    async def sleep_until(self, deadline_ms: int) -> None:
        while self._now < deadline_ms:
            if self._moved is None:
                self._moved = anyio.Event()
            await self._moved.wait()
