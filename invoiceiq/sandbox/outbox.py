"""Outbound deliveries: webhooks, STK callbacks, SMS delivery reports and inbound SMS.

Like Meta and Safaricom, a delivery that meets a non-2xx answer or a connection error is tried
again with exponential backoff, a bounded number of times, and every attempt is recorded.
Deliveries that share a key (one phone on one service) go out in the order they were queued,
each waiting for the one before it to finish; different keys go out concurrently.

Delays run on the real monotonic clock, not on the simulator's injectable ``now``: a test that
moves the calendar forward a day should not have to wait a day for a webhook.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import httpx
from anyio.abc import TaskGroup


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float  # simulator clock
    status: int | None  # HTTP status, None when no answer came
    error: str | None
    elapsed_ms: int


@dataclass(slots=True)
class Delivery:
    id: int
    kind: str  # wa_webhook | stk_callback | sms_dlr | sms_inbound
    key: str
    url: str
    body: bytes
    headers: dict[str, str]
    summary: str
    due: float  # monotonic seconds
    attempts: list[Attempt] = field(default_factory=list)
    state: str = "pending"  # pending | delivered | failed

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "url": self.url,
            "summary": self.summary,
            "state": self.state,
            "attempts": [
                {"at": a.at, "status": a.status, "error": a.error, "elapsed_ms": a.elapsed_ms} for a in self.attempts
            ],
        }


class Outbox:
    def __init__(
        self,
        *,
        max_attempts: int,
        backoff_s: float,
        timeout_s: float,
        concurrency: int,
        now: Callable[[], float],
        on_attempt: Callable[[Delivery, Attempt], None],
    ) -> None:
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._concurrency = concurrency
        self._now = now
        self._on_attempt = on_attempt
        self._queues: dict[str, deque[Delivery]] = {}
        # Heads of the queues that are waiting (not on the wire), by due time: a benchmark can
        # have thousands of phones with something queued, so nothing here scans them all.
        self._ready: list[tuple[float, int, str]] = []
        self._inflight = 0
        self._wake: anyio.Event | None = None
        self._next_id = 0
        self.history: list[Delivery] = []

    def post(
        self, kind: str, key: str, url: str, body: bytes, headers: dict[str, str], summary: str, delay_s: float = 0.0
    ) -> Delivery:
        self._next_id += 1
        delivery = Delivery(self._next_id, kind, key, url, body, headers, summary, time.monotonic() + delay_s)
        self.history.append(delivery)
        queue = self._queues.setdefault(key, deque())
        queue.append(delivery)
        if len(queue) == 1:
            self._schedule(delivery)
        return delivery

    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def clear(self) -> None:
        """Drop everything queued; attempts already on the wire finish but change nothing."""
        for queue in self._queues.values():
            for delivery in queue:
                delivery.state = "failed"
        self._queues.clear()
        self._ready.clear()
        self.history.clear()
        self._poke()

    def _schedule(self, head: Delivery) -> None:
        heapq.heappush(self._ready, (head.due, head.id, head.key))
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(self, client: httpx.AsyncClient) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                self._wake = anyio.Event()
                wait = self._dispatch(tg, client)
                with anyio.move_on_after(wait):
                    await self._wake.wait()

    def _dispatch(self, tg: TaskGroup, client: httpx.AsyncClient) -> float:
        """Start every head that is due, up to the concurrency limit; return how long to sleep."""
        now = time.monotonic()
        while self._ready and self._inflight < self._concurrency:
            due, _, key = self._ready[0]
            if due > now:
                return due - now
            heapq.heappop(self._ready)
            queue = self._queues.get(key)
            if queue:  # else cleared by a reset
                self._inflight += 1
                tg.start_soon(self._attempt, client, queue[0])
        return 3600.0  # until poked

    async def _attempt(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            response = await client.post(
                delivery.url, content=delivery.body, headers=delivery.headers, timeout=self._timeout_s
            )
            status = response.status_code
        except Exception as exc:  # whatever the receiver does, the simulator keeps delivering
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        attempt = Attempt(self._now(), status, error, round((time.monotonic() - started) * 1000))
        self._inflight -= 1
        self._poke()
        queue = self._queues.get(delivery.key)
        if delivery.state != "pending" or not queue or queue[0] is not delivery:
            return  # cleared by a reset while on the wire
        delivery.attempts.append(attempt)
        if status is not None and 200 <= status < 300:
            delivery.state = "delivered"
        elif len(delivery.attempts) >= self._max_attempts:
            delivery.state = "failed"
        else:
            delivery.due = time.monotonic() + self._backoff_s * 2 ** (len(delivery.attempts) - 1)
        if delivery.state != "pending":
            queue.popleft()
            if not queue:
                del self._queues[delivery.key]
        if queue:
            self._schedule(queue[0])
        self._on_attempt(delivery, attempt)
