"""The actor runtime: supervision with restarts, keyed actors with idle retirement, backpressure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import anyio.lowlevel
import pytest

from invoiceiq.actors.runtime import Mailbox, Pressure, Registry, Supervisor, Waker, backoff_s
from invoiceiq.clock import ManualClock
from invoiceiq.observability import Metrics

pytestmark = pytest.mark.anyio
T = TypeVar("T")


async def eventually(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def test_supervisor_restarts_a_crashed_actor_with_backoff() -> None:
    metrics = Metrics()
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(anyio.current_time())
        if len(runs) < 3:
            raise RuntimeError("crash")
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        sup = Supervisor(tg, metrics, backoff_base_s=0.05, backoff_max_s=1.0)
        sup.start("flaky", flaky)
        await eventually(lambda: len(runs) == 3 and sup.actors["flaky"].state == "running")
        status = sup.actors["flaky"]
        assert status.restarts == 2 and "RuntimeError" in (status.last_error or "")
        assert sup.failing() == []
        # Exponential: the second wait is about twice the first (jitter is +/-20%).
        first, second = runs[1] - runs[0], runs[2] - runs[1]
        assert first >= 0.035 and second >= 1.5 * 0.8 * first
        assert metrics.actor_restarts.labels("flaky")._value.get() == 2
        tg.cancel_scope.cancel()


async def test_supervisor_reports_a_restarting_actor_as_failing() -> None:
    async def always_crash() -> None:
        raise ValueError("nope")

    async with anyio.create_task_group() as tg:
        sup = Supervisor(tg, backoff_base_s=10, backoff_max_s=10)
        sup.start("broken", always_crash)
        await eventually(lambda: sup.actors["broken"].restarts == 1)
        assert sup.failing() == ["broken"]
        tg.cancel_scope.cancel()


def test_backoff_grows_and_caps() -> None:
    assert backoff_s(1, 1, 100, jitter=0) == 1
    assert backoff_s(4, 1, 100, jitter=0) == 8
    assert backoff_s(20, 1, 100, jitter=0) == 100
    assert 0.8 <= backoff_s(1, 1, 100) <= 1.2


async def test_registry_spawns_per_key_and_retires_idle_actors() -> None:
    seen: list[tuple[str, int]] = []

    async def handler(key: str, message: int) -> None:
        seen.append((key, message))

    reg: Registry[int] = Registry("test", handler, idle_s=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reg.run)
        for i in range(3):
            await reg.send("a", i)
            await reg.send("b", i)
        await eventually(lambda: len(seen) == 6)
        assert [m for k, m in seen if k == "a"] == [0, 1, 2]
        assert len(reg) == 2 and reg.spawned == 2
        # Quiet conversations cost no task: both retire.
        await eventually(lambda: len(reg) == 0)
        assert reg.retired == 2
        # A new message brings the actor back.
        await reg.send("a", 9)
        await eventually(lambda: ("a", 9) in seen)
        assert reg.spawned == 3
        tg.cancel_scope.cancel()


async def test_registry_never_loses_a_message_around_retirement() -> None:
    got: list[int] = []

    async def handler(key: str, message: int) -> None:
        got.append(message)

    # An idle time so short that actors retire between almost every message.
    reg: Registry[int] = Registry("race", handler, idle_s=0.0005, mailbox_size=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reg.run)
        for i in range(300):
            await reg.send("k", i)
            if i % 7 == 0:
                await anyio.sleep(0.002)
        await eventually(lambda: len(got) == 300)
        assert got == list(range(300))
        assert reg.retired > 1
        tg.cancel_scope.cancel()


async def test_backpressure_waits_instead_of_dropping() -> None:
    release = anyio.Event()
    handled: list[int] = []

    async def slow(key: str, message: int) -> None:
        await release.wait()
        handled.append(message)

    reg: Registry[int] = Registry("slow", slow, mailbox_size=2, idle_s=60)
    sent: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(reg.run)

        async def producer() -> None:
            for i in range(10):
                await reg.send("k", i)
                sent.append(i)

        tg.start_soon(producer)
        # One message in the handler, two in the mailbox: the producer is held at the fourth.
        await eventually(lambda: len(sent) == 3)
        await eventually(lambda: reg._actors["k"].space is not None)
        assert len(sent) == 3 and len(reg._actors["k"].mail) == 2
        release.set()
        await eventually(lambda: len(handled) == 10)
        assert handled == list(range(10))
        tg.cancel_scope.cancel()


async def test_a_crashing_handler_is_restarted_and_other_keys_go_on() -> None:
    got: list[str] = []

    async def handler(key: str, message: str) -> None:
        if message == "bad":
            raise RuntimeError("handler crash")
        got.append(f"{key}:{message}")

    reg: Registry[str] = Registry("crashy", handler, backoff_base_s=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reg.run)
        await reg.send("a", "bad")
        await reg.send("a", "ok")
        await reg.send("b", "ok")
        await eventually(lambda: sorted(got) == ["a:ok", "b:ok"])
        tg.cancel_scope.cancel()


async def test_keys_take_turns_so_a_flood_cannot_starve_another_key() -> None:
    order: list[str] = []
    gate = anyio.Event()

    async def handler(key: str, message: int) -> None:
        await gate.wait()
        order.append(key)

    # One worker makes the scheduling visible: it must alternate between the keys.
    reg: Registry[int] = Registry("fair", handler, workers=1, mailbox_size=100)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reg.run)
        for i in range(50):
            await reg.send("flood", i)
        await reg.send("merchant", 1)
        gate.set()
        await eventually(lambda: "merchant" in order)
        # The merchant waited for at most one flood message per turn, not for all 50.
        assert order.index("merchant") <= 2
        await eventually(lambda: len(order) == 51)
        tg.cancel_scope.cancel()


async def test_an_urgent_kick_takes_the_next_turn_once_through_a_busy_door() -> None:
    """Kicks for keys a-f wait at a busy door (one admitted per tick); a Pay request kicked
    urgently for "pay" after them, and then for "c" (already waiting), go first, in that
    order, then the rest in theirs. The urgency lasts one turn: "pay" kicked again
    normally goes to the back."""
    order: list[str] = []
    pressure = Pressure(admit_every_s=0.02)
    _busy(pressure)

    async def handler(key: str, message: object) -> None:
        order.append(key)

    reg: Registry[object] = Registry("chat", handler, workers=2, pressure=pressure)
    async with anyio.create_task_group() as tg:
        for key in "abcdef":
            reg.kick(key)
        tg.start_soon(reg.run)
        await eventually(lambda: pressure.waiting == 2)  # both workers at the door
        reg.kick("pay", urgent=True)
        reg.kick("c", urgent=True)
        await eventually(lambda: len(order) == 3)
        reg.kick("pay")
        await eventually(lambda: len(order) == 8)
        tg.cancel_scope.cancel()
    # Both workers were already waiting at the door when the urgent kicks came: each takes
    # the urgent line first once admitted.
    assert order == ["pay", "c", "a", "b", "d", "e", "f", "pay"]


async def test_only_as_many_workers_wait_at_a_busy_door_as_turns_are_ready() -> None:
    """One key ready and sixteen idle workers: one of them queues for admission (the others
    would each spend an admission to find nothing); a second key sends a second worker."""
    pressure = Pressure(admit_every_s=60.0)  # nobody is admitted during the test
    _busy(pressure)
    handled: list[str] = []

    async def handler(key: str, message: object) -> None:
        handled.append(key)

    reg: Registry[object] = Registry("statuses", handler, workers=16, pressure=pressure)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reg.run)
        reg.kick("statuses")
        await eventually(lambda: pressure.waiting == 1)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert pressure.waiting == 1
        reg.kick("other")
        await eventually(lambda: pressure.waiting == 2)
        pressure.rate = pressure.lag_s = 0.0  # calm: both go
        pressure._admit()
        await eventually(lambda: sorted(handled) == ["other", "statuses"])
        tg.cancel_scope.cancel()


async def test_kicks_coalesce_and_never_block() -> None:
    runs: list[str] = []
    release = anyio.Event()

    async def handler(key: str, message: object) -> None:
        runs.append(key)
        await release.wait()

    reg: Registry[object] = Registry("kicks", handler, workers=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(reg.run)
        reg.kick("a")
        await eventually(lambda: runs == ["a"])
        for _ in range(100):
            reg.kick("a")  # while "a" runs: remembered once, not 100 times
        release.set()
        await eventually(lambda: runs == ["a", "a"])
        assert not reg._actors["a"].has_work
        tg.cancel_scope.cancel()


async def test_mailbox_is_bounded() -> None:
    box: Mailbox[int] = Mailbox(2)
    box.send_nowait(1)
    box.send_nowait(2)
    with pytest.raises(anyio.WouldBlock):
        box.send_nowait(3)
    assert box.queued == 2 and box.receive_nowait() == 1


async def test_waker_wakes_on_news_or_at_the_deadline() -> None:
    clock = ManualClock()
    waker = Waker()
    woke: list[str] = []

    async with anyio.create_task_group() as tg:
        async def sleeper() -> None:
            await waker.wait(clock, clock.now_ms() + 1000)
            woke.append("first")
            await waker.wait(clock, clock.now_ms() + 1000)
            woke.append("second")

        tg.start_soon(sleeper)
        await anyio.sleep(0.01)
        assert woke == []
        waker.wake()
        await eventually(lambda: woke == ["first"])
        clock.advance(999)
        await anyio.sleep(0.01)
        assert woke == ["first"]
        clock.advance(1)
        await eventually(lambda: woke == ["first", "second"])
    # A wake before the wait is not lost.
    waker.wake()
    with anyio.fail_after(1):
        await waker.wait(clock, None)


# -- Pressure: background work steps aside while webhooks pour in ---------------------------


def _busy(pressure: Pressure) -> None:
    pressure.rate, pressure.lag_s = pressure.min_rate * 10, pressure.max_lag_s * 10


def _busy_door(admitted: list[T]) -> tuple[Pressure, Callable[[T], Awaitable[None]]]:
    """A door that stays busy (no requests feed the probe) and a background job that waits
    its turn there, then records its name in ``admitted``."""
    pressure = Pressure(admit_every_s=0.05)
    _busy(pressure)

    async def job(name: T) -> None:
        await pressure.yield_to_requests()
        admitted.append(name)

    return pressure, job


async def test_pressure_lets_background_work_through_unless_the_loop_is_late_under_load() -> None:
    pressure = Pressure()
    # Many requests the loop keeps up with (a simulator posting 64 callbacks at once)...
    pressure.rate, pressure.lag_s = pressure.min_rate * 10, pressure.max_lag_s / 2
    with anyio.fail_after(1):
        await pressure.yield_to_requests()
    # ...or a loop late with background work alone (catching up after a burst): no waiting.
    pressure.rate, pressure.lag_s = 0.0, pressure.max_lag_s * 10
    with anyio.fail_after(1):
        await pressure.yield_to_requests()
    assert pressure.deferred == 0 and not pressure.busy
    _busy(pressure)
    assert pressure.busy


async def test_pressure_admits_waiting_jobs_one_at_a_time_in_order_then_all_when_calm() -> None:
    admitted: list[int] = []
    pressure, job = _busy_door(admitted)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(job, n)
            await anyio.lowlevel.checkpoint()  # queue in this order
        await eventually(lambda: len(admitted) >= 1)
        assert admitted == [0]  # one per tick, not all of them at the first tick
        await eventually(lambda: len(admitted) >= 2)
        assert admitted == [0, 1]
        pressure.rate = pressure.lag_s = 0.0  # the burst is over
        await eventually(lambda: len(admitted) == 4)  # the next tick lets everyone go
    assert admitted == [0, 1, 2, 3] and pressure.deferred == 4


async def test_pressure_one_calm_probe_under_a_flood_does_not_release_the_whole_line() -> None:
    """Under a sustained flood the door's moving averages hover at their thresholds and a
    probe now and then finds it calm (bench: 60-70 times in a 3 x 10 s customer flood, each
    releasing up to 17 turns at once). Only a door calm for ``settle_s`` lets everyone go;
    until then the tick goes on admitting one at a time."""
    admitted: list[int] = []
    pressure = Pressure(admit_every_s=0.02, settle_s=3600.0)
    _busy(pressure)

    async def job(n: int) -> None:
        await pressure.yield_to_requests()
        admitted.append(n)

    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(job, n)
            await anyio.lowlevel.checkpoint()
        await eventually(lambda: len(admitted) >= 1)
        pressure._busy_at = asyncio.get_running_loop().time()  # a probe found it busy just now
        pressure.rate = pressure.lag_s = 0.0  # ...and the next finds it calm
        assert not pressure.busy
        await eventually(lambda: len(admitted) >= 3)
        assert len(admitted) < 10 and pressure.waiting == 10 - len(admitted)
        pressure.admit_every_s = 3600.0  # from here, one more tick at most
        assert pressure._busy_at is not None
        pressure._busy_at -= pressure.settle_s  # calm long enough: the next tick lets all go
        await eventually(lambda: len(admitted) == 10)
    assert admitted == list(range(10))


async def test_pressure_admits_urgent_jobs_first_each_kind_in_order() -> None:
    """A payment's turn (urgent) overtakes the chat's turns queued before it, not another
    payment's; the ordinary ones follow in their own order."""
    admitted: list[str] = []
    pressure, job = _busy_door(admitted)

    async def urgent_job(name: str) -> None:
        await pressure.yield_to_requests(urgent=True)
        admitted.append(name)

    async with anyio.create_task_group() as tg:
        for name in ("chat1", "chat2", "chat3"):
            tg.start_soon(job, name)
            await anyio.lowlevel.checkpoint()
        tg.start_soon(urgent_job, "pay1")
        await anyio.lowlevel.checkpoint()
        tg.start_soon(urgent_job, "pay2")
        await anyio.lowlevel.checkpoint()
        assert pressure.waiting == 5 and admitted == []
        await eventually(lambda: len(admitted) >= 3)
        assert admitted[:3] == ["pay1", "pay2", "chat1"]
        await eventually(lambda: len(admitted) == 5)
    assert admitted == ["pay1", "pay2", "chat1", "chat2", "chat3"] and pressure.waiting == 0


async def test_pressure_a_cancelled_waiter_gives_up_its_place() -> None:
    admitted: list[str] = []
    pressure, job = _busy_door(admitted)
    scopes: list[anyio.CancelScope] = []

    async def cancelled_job() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await job("gone")

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancelled_job)
        await anyio.lowlevel.checkpoint()
        tg.start_soon(job, "kept")
        await anyio.lowlevel.checkpoint()
        assert pressure.waiting == 2
        scopes[0].cancel()
        await eventually(lambda: admitted == ["kept"])
    assert pressure.waiting == 0


async def test_pressure_measures_a_loop_kept_late_by_requests_and_stops_when_they_stop() -> None:
    """Through the ASGI middleware: requests that each hold the CPU for 10 ms make the loop
    late and the door busy; once they stop, the probe stops and the door is calm."""
    pressure = Pressure(min_rate=20)

    async def request() -> None:
        time.sleep(0.01)  # work the loop cannot interleave, as a burst of webhooks
        await anyio.lowlevel.checkpoint()

    seen: list[tuple[float, float]] = []

    def busy(p: Pressure) -> bool:
        if p.busy:
            seen.append((p.rate, p.lag_s))  # as the door saw it (the probe goes on after)
        return p.busy

    await _flood(pressure, request, busy)
    ((rate, lag),) = seen[:1]
    assert rate > pressure.min_rate and lag > pressure.max_lag_s
    await eventually(lambda: pressure._probe_due is None)
    assert not pressure.busy and pressure.in_flight == 0


async def _flood(pressure: Pressure, request: Callable[[], Awaitable[None]],
                 until: Callable[[Pressure], bool]) -> None:
    """Eight clients sending ``request`` through the door's ASGI middleware, back to back,
    until ``until(pressure)`` holds."""

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await request()

    wrapped = pressure.wrap(app)
    stop = anyio.Event()

    async def client() -> None:
        while not stop.is_set():
            await wrapped({"type": "http"}, None, None)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(client)
        await eventually(lambda: until(pressure))
        stop.set()


def _burn(seconds: float) -> None:
    """Hold this thread on the CPU (time.sleep would leave it idle)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_pressure_sees_a_saturated_loop_that_is_never_late() -> None:
    """uvloop runs its timers between small batches of callbacks, so a loop saturated by
    requests can look late by only a millisecond or two: the door must see it by the loop's
    CPU share too. Requests that each hold the CPU for 1 ms, with the lag threshold out of
    reach, make the door busy; as many requests that wait instead leave it calm."""

    async def run(request: Callable[[], Awaitable[None]], check: Callable[[Pressure], bool]) -> Pressure:
        pressure = Pressure(min_rate=20, max_lag_s=10.0, max_cpu_share=0.5)
        await _flood(pressure, request, check)
        return pressure

    async def on_the_cpu() -> None:
        _burn(0.001)
        await anyio.lowlevel.checkpoint()

    async def waiting() -> None:
        await anyio.sleep(0.005)

    seen: list[tuple[float, float]] = []

    def busy(p: Pressure) -> bool:
        if p.busy:
            seen.append((p.cpu_share, p.lag_s))  # as the door saw it (the probe goes on after)
        return p.busy

    await run(on_the_cpu, busy)
    ((share, lag),) = seen[:1]
    assert share > 0.5 and lag < 10.0

    probes: list[bool] = []

    def calm_for_a_while(p: Pressure) -> bool:
        if p.rate > p.min_rate:
            probes.append(p.busy)
        return len(probes) >= 50

    waited = await run(waiting, calm_for_a_while)
    assert not any(probes) and waited.rate > waited.min_rate and waited.cpu_share < 0.5
