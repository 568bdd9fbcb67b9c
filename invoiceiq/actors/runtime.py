"""The actor runtime: bounded mailboxes, a supervisor, and a registry of keyed actors.

* An actor owns a mailbox (a bounded anyio memory stream) and its own state, and talks to
  others only by sending messages. A full mailbox makes the sender wait: backpressure, never
  a dropped message.
* The ``Supervisor`` runs long-lived actors in one task group and restarts one that crashes,
  with exponential backoff, logging the exception.
* The ``Registry`` spawns a keyed actor (one per conversation, one per invoice) on its first
  message and retires it after an idle time, so 100,000 quiet conversations cost no task:
  they are database rows until someone writes.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskGroup

from ..clock import Clock
from ..observability import Metrics, get_logger

M = TypeVar("M")
log = get_logger(__name__)


def backoff_s(failures: int, base_s: float, max_s: float, jitter: float = 0.2) -> float:
    """``base * 2**(failures-1)`` capped at ``max_s``, spread by +/- ``jitter``."""
    delay = min(max_s, base_s * math.pow(2, max(0, failures - 1)))
    return delay * (1 + random.uniform(-jitter, jitter))


@dataclass
class ActorStatus:
    name: str
    state: str = "starting"  # starting | running | restarting | stopped
    restarts: int = 0
    last_error: str | None = None


class Supervisor:
    """Runs actors in one task group and restarts the ones that crash."""

    def __init__(self, tg: TaskGroup, metrics: Metrics | None = None, *,
                 backoff_base_s: float = 0.1, backoff_max_s: float = 30.0,
                 healthy_after_s: float = 60.0) -> None:
        self._tg = tg
        self._metrics = metrics
        self._base = backoff_base_s
        self._max = backoff_max_s
        self._healthy_after = healthy_after_s
        self.actors: dict[str, ActorStatus] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.actors[name] = status = ActorStatus(name)
        self._tg.start_soon(self._supervise, status, run, name=f"actor:{name}")

    def failing(self) -> list[str]:
        return [s.name for s in self.actors.values() if s.state != "running"]

    async def _supervise(self, status: ActorStatus, run: Callable[[], Awaitable[None]]) -> None:
        failures = 0
        while True:
            status.state = "running"
            started = anyio.current_time()
            try:
                await run()
            except Exception as exc:  # noqa: BLE001 - the supervisor's whole job
                status.state = "restarting"
                status.restarts += 1
                status.last_error = f"{type(exc).__name__}: {exc}"
                if self._metrics is not None:
                    self._metrics.actor_restarts.labels(status.name).inc()
                # A crash after a long healthy run starts the backoff again from the bottom.
                failures = 1 if anyio.current_time() - started > self._healthy_after else failures + 1
                delay = backoff_s(failures, self._base, self._max)
                log.exception("actor_crashed", actor=status.name, restarts=status.restarts,
                              retry_in_s=round(delay, 3))
                await anyio.sleep(delay)
                continue
            status.state = "stopped"
            return


class Waker:
    """Wakes a singleton actor that sleeps until its next due time (or until there is news).

    ``wake`` before ``wait`` is not lost: the next ``wait`` returns at once."""

    def __init__(self) -> None:
        self._pending = False
        self._event: anyio.Event | None = None

    def wake(self) -> None:
        self._pending = True
        if self._event is not None:
            self._event.set()

    async def wait(self, clock: Clock, deadline_ms: int | None) -> None:
        if self._pending:
            self._pending = False
            return
        self._event = event = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def until_deadline() -> None:
                if deadline_ms is None:
                    await anyio.sleep_forever()
                else:
                    await clock.sleep_until(deadline_ms)
                tg.cancel_scope.cancel()

            async def until_woken() -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(until_deadline)
            tg.start_soon(until_woken)
        self._event = None
        self._pending = False


class Pressure:
    """How busy the front door is, so that background work steps aside during a burst.

    A probe timer measures how late the event loop runs it (its *lag*: how long the
    callbacks ahead of it kept the CPU), how much of the time since the last probe the loop's
    thread spent on the CPU (its *CPU share*), and how many requests arrived meanwhile. The
    door is *busy* when requests arrive faster than ``min_rate`` per second **and** the loop
    either lags by more than ``max_lag_s`` or keeps the CPU more than ``max_cpu_share`` of the
    time, all as moving averages. Many requests the loop keeps up with (a simulator posting 64
    callbacks at once to an idle daemon) are no reason to hold replies back, nor is a loop
    busy with background work alone (catching up after a burst); a loop saturated while
    webhooks pour in means the CPU is the bottleneck, and what it spends on background work it
    takes from webhooks that must be stored and answered.

    (Lag alone depends on the loop: asyncio runs a whole batch of ready callbacks before its
    timers, so a saturated loop is late by the batch; uvloop runs its timers between smaller
    batches, and measures time from the start of each turn, so the same saturated loop looks
    late by only 1-3 ms: under a webhook flood the door was busy in 30-70% of the probes
    instead of ~100%, and the replies let through took the CPU: 0.42-0.52 of the reference
    against 0.53-0.65 on asyncio. The CPU share sees saturation on either loop: 0.71 on uvloop
    then, bench/README.)

    (Requests in flight are no such signal: they wait for the same group commit, so the
    count swings from 0 to every connection and back with each commit.)

    While busy, background workers (keyed actors, the outbox) calling ``yield_to_requests``
    are admitted one at a time, one every ``admit_every_s``: the follow-up (replies, sends)
    keeps moving at a bounded rate and never starves, and the inbox and the outbox keep it
    safe meanwhile. Urgent waiters (the payment actors, the outbox, the chat turn of a Pay
    request: a customer may be holding the phone, waiting for the PIN prompt or the receipt)
    go before the others; each kind is first come first served. When the door has been calm
    for ``settle_s`` everyone waiting goes at once: under a sustained flood the averages hover
    at their thresholds, and a single calm probe (60-70 in a 3 x 10 s customer flood) used to
    release the whole line, up to 17 turns at once (bench/README). One timer serves all the
    waiters (a poll per worker cost a few percent of the CPU during exactly the bursts this
    protects).

    (``admit_every_s``, 0.1 s: what background work may take during a flood is about ten
    turns a second times a turn's CPU: from a fraction of a millisecond (a customer's text
    that earns no reply) to several (a one-line invoice: its invoice, template and
    confirmation). At 100 turns a second, the earlier setting, a flood of one-line invoices
    could hand a third of the core to its own follow-up. Measured with bench/ the gain is
    within this VM's noise: merchant-ingest ratios 0.69-0.88 against 0.43-0.84 before, four
    alternating invocations each; customer texts 0.54-0.82 against 0.46-0.77 (bench/README).
    End to end, where the door is seldom busy, nothing changed.)
    """

    def __init__(self, *, min_rate: float = 200.0, max_lag_s: float = 0.002, max_cpu_share: float = 0.9,
                 admit_every_s: float = 0.1, probe_every_s: float = 0.005, smoothing: float = 0.2,
                 settle_s: float = 0.05) -> None:
        self.min_rate = min_rate
        self.max_lag_s = max_lag_s
        self.max_cpu_share = max_cpu_share
        self.admit_every_s = admit_every_s
        self.probe_every_s = probe_every_s
        self.smoothing = smoothing
        self.settle_s = settle_s
        self.lag_s = 0.0  # moving averages, kept while requests come in
        self.rate = 0.0
        self.cpu_share = 0.0
        self.in_flight = 0
        self.deferred = 0  # background jobs that had to wait, since start
        self._arrived = 0
        self._waiting: deque[anyio.Event] = deque()
        self._urgent: deque[anyio.Event] = deque()  # served before _waiting
        self._admitter: asyncio.TimerHandle | None = None
        self._probe_due: float | None = None  # None: the probe is not running
        self._probed_at = 0.0
        self._cpu_at = (0.0, 0.0)  # (wall, this thread's CPU) at the last probe
        self._busy_at: float | None = None  # loop time of the last probe that found the door busy

    @property
    def busy(self) -> bool:
        return self.rate > self.min_rate and (self.lag_s > self.max_lag_s or self.cpu_share > self.max_cpu_share)

    def turn(self, normal: int, busy: int = 1) -> int:
        """How many waiting items a background turn may take now: ``normal``, or ``busy``
        while the door is busy. Each turn is admitted on its own during a burst, so this
        bounds what background work takes from the webhooks however long its backlog (with
        full turns it grew with the backlog: bench/README)."""
        return busy if self.busy else normal

    async def yield_to_requests(self, *, urgent: bool = False) -> None:
        """Return at once when the door is calm; else wait for this job's turn (``urgent``:
        before every job that is not)."""
        if not self.busy:
            return
        self.deferred += 1
        admitted = anyio.Event()
        line = self._urgent if urgent else self._waiting
        line.append(admitted)
        if self._admitter is None:
            self._admitter = asyncio.get_running_loop().call_later(self.admit_every_s, self._admit)
        try:
            await admitted.wait()
        finally:
            if not admitted.is_set():  # cancelled while waiting: give up the place
                line.remove(admitted)

    @property
    def waiting(self) -> int:
        return len(self._urgent) + len(self._waiting)

    def _admit(self) -> None:
        self._admitter = None
        if self._settled(asyncio.get_running_loop().time()):
            self._admit_all()
            return
        line = self._urgent or self._waiting
        if line:
            line.popleft().set()
        if self.waiting:
            self._admitter = asyncio.get_running_loop().call_later(self.admit_every_s, self._admit)

    def _settled(self, now: float) -> bool:
        """Calm, and for ``settle_s`` already: the moving averages hover at the thresholds
        under a sustained flood, and one calm probe must not release the whole line."""
        return not self.busy and (self._busy_at is None or now - self._busy_at >= self.settle_s)

    def _admit_all(self) -> None:
        for line in (self._urgent, self._waiting):
            while line:
                line.popleft().set()
        if self._admitter is not None:
            self._admitter.cancel()
            self._admitter = None

    def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        assert self._probe_due is not None
        lag = max(0.0, now - self._probe_due)
        rate = self._arrived / max(now - self._probed_at, 1e-6)
        self._arrived, self._probed_at = 0, now
        wall, cpu = time.perf_counter(), time.thread_time()  # loop.time() is per turn on uvloop
        share = min(1.0, (cpu - self._cpu_at[1]) / max(wall - self._cpu_at[0], 1e-6))
        self._cpu_at = (wall, cpu)
        self.lag_s += (lag - self.lag_s) * self.smoothing
        self.rate += (rate - self.rate) * self.smoothing
        self.cpu_share += (share - self.cpu_share) * self.smoothing
        if self.in_flight == 0 and self.rate < 1.0:
            self._probe_due = None  # quiet: sleep until the next request
            self.rate = self.lag_s = self.cpu_share = 0.0
            self._busy_at = None
        else:
            self._probe_due = now + self.probe_every_s
            loop.call_at(self._probe_due, self._probe)
        if self.busy:
            self._busy_at = now
        if self.waiting and self._settled(now):
            self._admit_all()

    def _started(self) -> None:
        self.in_flight += 1
        self._arrived += 1
        if self._probe_due is None:
            loop = asyncio.get_running_loop()
            self._probed_at = loop.time()
            self._cpu_at = (time.perf_counter(), time.thread_time())
            self._probe_due = self._probed_at + self.probe_every_s
            loop.call_at(self._probe_due, self._probe)

    def wrap(self, app: Any) -> Any:
        """ASGI middleware feeding the probe (and the latency histogram's start time)."""

        async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            self._started()
            scope["iq_started"] = time.perf_counter()
            try:
                await app(scope, receive, send)
            finally:
                self.in_flight -= 1

        return counted


class Mailbox(Generic[M]):
    """A bounded mailbox: ``send`` waits while it is full."""

    def __init__(self, size: int) -> None:
        self._send: ObjectSendStream[M]
        self._recv: ObjectReceiveStream[M]
        self._send, self._recv = anyio.create_memory_object_stream[M](size)

    async def send(self, message: M) -> None:
        await self._send.send(message)

    def send_nowait(self, message: M) -> None:
        self._send.send_nowait(message)

    async def receive(self) -> M:
        return await self._recv.receive()

    def receive_nowait(self) -> M:
        return self._recv.receive_nowait()

    @property
    def queued(self) -> int:
        return self._recv.statistics().current_buffer_used

    @property
    def waiting_senders(self) -> int:
        return self._recv.statistics().tasks_waiting_send

    def close(self) -> None:
        self._send.close()
        self._recv.close()


Handler = Callable[[str, M], Awaitable[None]]
KICK: Any = "kick"  # the message of a coalesced wake-up: "there is stored work for you"


class _Keyed(Generic[M]):
    """One keyed actor: its mailbox and bookkeeping. It owns no task: a worker of the pool
    runs its handler while it has mail (notes/stack.md: a task per actor costs ~9 KB; a
    record like this a few hundred bytes)."""

    __slots__ = ("key", "mail", "kicked", "urgent", "running", "scheduled", "failures", "idle_since", "space")

    def __init__(self, key: str) -> None:
        self.key = key
        self.mail: deque[M] = deque()
        self.kicked = False
        self.urgent = False  # its next turn goes ahead of the line (Registry.kick)
        self.running = False
        self.scheduled = False
        self.failures = 0
        self.idle_since = 0.0
        self.space: anyio.Event | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.mail) or self.kicked


class Registry(Generic[M]):
    """Keyed actors (one per conversation, one per invoice), created on their first message,
    served by a bounded pool of workers, and retired after ``idle_s`` without mail.

    * ``handler(key, message)`` runs one message at a time per key, in order: a
      conversation's steps never interleave within a process;
    * keys take turns (one message per turn, round robin), so one flooding sender cannot
      starve another: the merchant's conversation is served while a customer floods;
    * ``send`` waits while the key's mailbox holds ``mailbox_size`` messages (backpressure,
      never a dropped message); ``kick`` is a coalesced, non-blocking wake-up for actors
      whose real mail is in the database (several kicks before the handler runs are one);
    * during a burst at the front door each turn waits for ``pressure``'s admission; urgent
      turns (in a line taken first, and admitted before other background work) are every
      turn of an ``urgent`` registry, or a key's next turn after ``kick(key, urgent=True)``.
    """

    def __init__(self, name: str, handler: Handler[M], *, mailbox_size: int = 16, workers: int = 16,
                 idle_s: float = 30.0, metrics: Metrics | None = None,
                 backoff_base_s: float = 0.05, backoff_max_s: float = 10.0,
                 pressure: Pressure | None = None, urgent: bool = False) -> None:
        self.name = name
        self._handler = handler
        self._size = mailbox_size
        self._workers = workers
        self._pressure = pressure
        self._urgent = urgent
        self._idle_s = idle_s
        self._metrics = metrics
        self._base = backoff_base_s
        self._max = backoff_max_s
        self._actors: dict[str, _Keyed[M]] = {}
        self._ready: deque[str] = deque()
        self._ready_urgent: deque[str] = deque()  # taken before _ready, in order
        self._at_door = 0  # workers waiting for the front door's admission
        self._work = anyio.Event()
        self._started = False
        self.spawned = 0
        self.retired = 0

    def __len__(self) -> int:
        return len(self._actors)

    def __contains__(self, key: str) -> bool:
        return key in self._actors

    @property
    def busy(self) -> int:
        return sum(1 for a in self._actors.values() if a.running)

    async def run(self) -> None:
        """Run the worker pool and the idle janitor (under the supervisor)."""
        self._started = True
        async with anyio.create_task_group() as tg:
            for n in range(self._workers):
                tg.start_soon(self._worker, name=f"{self.name}:worker{n}")
            await self._janitor()

    async def send(self, key: str, message: M) -> None:
        actor = self._get(key)
        while len(actor.mail) >= self._size:
            if actor.space is None:
                actor.space = anyio.Event()
            await actor.space.wait()
            actor = self._get(key)  # it may have retired (and been replaced) meanwhile
        actor.mail.append(message)
        self._schedule(actor)

    def kick(self, key: str, *, urgent: bool = False) -> None:
        actor = self._get(key)
        if urgent and not actor.urgent:
            actor.urgent = True
            if actor.scheduled:  # somewhere down the line: join the urgent line as well
                self._ready_urgent.append(key)  # (the later entry finds the turn taken: skipped)
                self._work.set()
        if not actor.kicked:
            actor.kicked = True
            self._schedule(actor)

    def _get(self, key: str) -> _Keyed[M]:
        actor = self._actors.get(key)
        if actor is None:
            actor = self._actors[key] = _Keyed(key)
            actor.urgent = self._urgent
            actor.idle_since = anyio.current_time()
            self.spawned += 1
        return actor

    def _schedule(self, actor: _Keyed[M]) -> None:
        if not actor.running and not actor.scheduled:
            actor.scheduled = True
            (self._ready_urgent if actor.urgent else self._ready).append(actor.key)
            self._work.set()

    async def _worker(self) -> None:
        while True:
            # Only as many workers queue at the door as there are turns ready: one key ready
            # and sixteen workers waiting for it would spend fifteen admissions on nothing.
            while len(self._ready) + len(self._ready_urgent) <= self._at_door:
                self._work = anyio.Event() if self._work.is_set() else self._work
                await self._work.wait()
            if self._pressure is not None and self._pressure.busy:
                self._at_door += 1
                try:
                    await self._pressure.yield_to_requests(urgent=bool(self._ready_urgent))
                finally:
                    self._at_door -= 1
                    if len(self._ready) + len(self._ready_urgent) > self._at_door:
                        self._work.set()  # a worker held back by this place may go now (a cancel)
                if not (self._ready or self._ready_urgent):
                    continue
            key = (self._ready_urgent or self._ready).popleft()
            actor = self._actors.get(key)
            if actor is None or actor.running:
                continue
            actor.scheduled = False
            if not actor.has_work:
                continue
            actor.running = True
            actor.urgent = self._urgent  # one turn ahead per urgent kick: a flood of them stays in line
            try:
                if actor.mail:
                    message = actor.mail.popleft()
                    if actor.space is not None:
                        actor.space.set()
                        actor.space = None
                else:
                    message = KICK
                # A kick taken now covers every kick until here: the handler reads the store.
                actor.kicked = False
                await self._handle(actor, message)
            finally:
                actor.running = False
                actor.idle_since = anyio.current_time()
                if actor.has_work:
                    self._schedule(actor)  # to the back of the line: keys take turns

    async def _handle(self, actor: _Keyed[M], message: M) -> None:
        try:
            await self._handler(actor.key, message)
            actor.failures = 0
        except Exception:  # noqa: BLE001 - a crashed handler is restarted after a backoff
            actor.failures += 1
            if self._metrics is not None:
                self._metrics.actor_restarts.labels(self.name).inc()
            delay = backoff_s(actor.failures, self._base, self._max)
            log.exception("actor_crashed", actor=self.name, key=actor.key, failures=actor.failures,
                          retry_in_s=round(delay, 3))
            await anyio.sleep(delay)
            # A kick stands for work stored in the database: try it again (after the backoff).
            # A plain message that failed is not replayed from memory.
            if message is KICK:
                actor.kicked = True

    async def _janitor(self) -> None:
        """Retire actors without mail for ``idle_s``: a quiet conversation is a row again."""
        period = max(0.001, min(self._idle_s / 2, 5.0))
        while True:
            await anyio.sleep(period)
            now = anyio.current_time()
            for key in [k for k, a in self._actors.items()
                        if not a.running and not a.scheduled and not a.has_work and a.space is None
                        and now - a.idle_since >= self._idle_s]:
                del self._actors[key]
                self.retired += 1
