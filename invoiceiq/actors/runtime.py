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

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

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


class _Keyed(Generic[M]):
    __slots__ = ("key", "mailbox", "failures")

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.mailbox: Mailbox[M] = Mailbox(size)
        self.failures = 0


class Registry(Generic[M]):
    """Keyed actors spawned on their first message and retired when idle.

    ``handler(key, message)`` runs one message at a time per key (so a conversation's steps
    never interleave within a process); different keys run concurrently, and one busy key
    cannot starve another: each has its own bounded mailbox.
    """

    def __init__(self, name: str, handler: Handler[M], *, mailbox_size: int = 16,
                 idle_s: float = 30.0, metrics: Metrics | None = None,
                 backoff_base_s: float = 0.05, backoff_max_s: float = 10.0) -> None:
        self.name = name
        self._handler = handler
        self._size = mailbox_size
        self._idle_s = idle_s
        self._metrics = metrics
        self._base = backoff_base_s
        self._max = backoff_max_s
        self._actors: dict[str, _Keyed[M]] = {}
        self._tg: TaskGroup | None = None
        self._ready = anyio.Event()
        self.spawned = 0
        self.retired = 0

    def __len__(self) -> int:
        return len(self._actors)

    def __contains__(self, key: str) -> bool:
        return key in self._actors

    async def run(self) -> None:
        """Host the keyed actors (run under the supervisor); returns when cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._ready.set()
            await anyio.sleep_forever()

    async def send(self, key: str, message: M) -> None:
        await self._ready.wait()
        while True:
            actor = self._actors.get(key)
            if actor is None:
                actor = self._spawn(key)
            try:
                await actor.mailbox.send(message)
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                # The actor retired between our lookup and our send: nothing was delivered,
                # so send again to its successor.
                if self._actors.get(key) is actor:
                    del self._actors[key]

    def _spawn(self, key: str) -> _Keyed[M]:
        assert self._tg is not None
        actor: _Keyed[M] = _Keyed(key, self._size)
        self._actors[key] = actor
        self.spawned += 1
        self._tg.start_soon(self._loop, actor, name=f"{self.name}:{key}")
        return actor

    async def _loop(self, actor: _Keyed[M]) -> None:
        mailbox = actor.mailbox
        while True:
            message: M | None = None
            with anyio.move_on_after(self._idle_s):
                message = await mailbox.receive()
            if message is None:
                # Idle. Retire only with an empty mailbox, and close it in the same step
                # (no await in between), so a concurrent sender either got in before us and
                # we keep going, or finds the mailbox closed and spawns a successor.
                if mailbox.queued == 0:
                    if self._actors.get(actor.key) is actor:
                        del self._actors[actor.key]
                    mailbox.close()
                    self.retired += 1
                    return
                continue
            try:
                await self._handler(actor.key, message)
                actor.failures = 0
            except Exception:  # noqa: BLE001 - a crashed message handler is restarted
                actor.failures += 1
                if self._metrics is not None:
                    self._metrics.actor_restarts.labels(self.name).inc()
                delay = backoff_s(actor.failures, self._base, self._max)
                log.exception("actor_crashed", actor=self.name, key=actor.key,
                              failures=actor.failures, retry_in_s=round(delay, 3))
                await anyio.sleep(delay)
