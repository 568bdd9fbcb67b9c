"""The scheduler: nothing stored is ever forgotten.

It wakes the keyed actors for work the database says is due:

* inbox events not yet processed — all of them at start-up (a restart resumes everything),
  then those older than a few seconds (a kick that was lost, or that lost a race);
* conversations whose timer (nudge, close) is due;
* payment attempts due for a status query or for expiry (``due_payments``, supplied by the
  payments capability).

Several processes may run it at once: what it kicks is idempotent (a conversation's step is a
compare-and-set, an inbox event is processed once), so a double kick costs a read, no more.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ..clock import Clock
from ..observability import Metrics, get_logger
from ..store import Store, conversations, inbox
from .runtime import Waker

log = get_logger(__name__)
SWEEP_AFTER_MS = 5_000
POLL_MS = 5_000

Kick = Callable[[str, str], None]
DueSource = Callable[[int], Awaitable[tuple[list[str], int | None]]]


class Scheduler:
    def __init__(self, *, store: Store, clock: Clock, kick: Kick, stopping: anyio.Event,
                 due_payments: DueSource | None = None, metrics: Metrics | None = None) -> None:
        self.store = store
        self.clock = clock
        self.kick = kick
        self.stopping = stopping
        self.due_payments = due_payments
        self.metrics = metrics
        self.waker = Waker()
        self.sweeps = 0

    async def run(self) -> None:
        started = True
        while not self.stopping.is_set():
            now = self.clock.now_ms()
            horizon = now if started else now - SWEEP_AFTER_MS
            resumed = await self.store.scan(lambda tx: inbox.unprocessed_keys(tx, horizon))
            if started and resumed:
                log.info("resuming_stored_work", keys=len(resumed))
            for actor, key in resumed:
                self.kick(actor, key)
            for key, _role in await self.store.read(lambda tx: conversations.due(tx, now)):
                self.kick("session", key)
            next_due = await self.store.read(conversations.next_due_ms)
            if self.due_payments is not None:
                invoice_ids, next_payment = await self.due_payments(now)
                for invoice_id in invoice_ids:
                    self.kick("payment", invoice_id)
                if next_payment is not None:
                    next_due = next_payment if next_due is None else min(next_due, next_payment)
            started = False
            self.sweeps += 1
            if self.metrics is not None:
                self.metrics.scheduler_sweeps.inc()
            deadline = now + POLL_MS
            if next_due is not None:
                # A due time already past was just kicked; look again soon, not in a busy loop.
                deadline = min(deadline, max(next_due, now + 200))
            await self.waker.wait(self.clock, deadline)
