"""End to end (issue 8, point 3) and state at scale (point 4): the daemon against the simulators.

Pieces, all used by :mod:`bench.scenarios`:

* :func:`start_stack` - the simulated providers (``bench.simhost``, pinned to the load core,
  ``latency_ms`` on every provider API answer) and ``invoiceiq serve`` in live mode (pinned to
  the server core), every provider base URL and credential pointed at the simulators;
* :class:`Driver` - an asyncio + httpx client of the simulators' control API that plays the
  merchant and the customers. One long-poll loop (``GET /api/state?since=S&wait=20``) reads
  the simulators' event log for everyone and resolves the flows' waits; the events carry the
  ids a flow needs (``ref``: the template's wamid to tap, the prompt's CheckoutRequestID to
  pay, whose account is the invoice number), so a flow never reads its phone back;
* :func:`check_flows` - after the run has settled, what the simulators' journal, deliveries
  and phones and the daemon's database say: one STK push per flow, two receipts per flow,
  nothing sent twice, every invoice PAID;
* :func:`migrate` / :func:`seed` - a database with N conversations and N invoices written
  directly with sqlite3 into the schema ``invoiceiq migrate`` created.

One flow (customer ``2547XXXXXXXX``, a new number for every flow):

1. the merchant's phone sends ``invoice 07XXXXXXXX 2500 Cleaning``          (t0, the driver's clock)
2. the invoice template reaches the customer's phone       (``wa.out`` event, the simulator's clock)
3. the customer sends a text (opening the 24 h window), then taps *Pay with M-PESA* on the template
4. the STK Push reaches simulated Daraja and the PIN prompt shows        (``stk.prompt`` event)
5. the customer pays (``POST /api/stk/<id> {"action":"pay"}``); Daraja posts the callback after
   ``callback_delay_ms``
6. both receipts reach the phones (``wa.out`` "Paid ✔ — Invoice #N", customer and merchant): t_end

Both clocks are this machine's ``time.time()``. The flow's latency is ``t_end - t0``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import secrets
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from . import servers
from .loopback import LoopbackTransport
from .servers import Pinning, Proc, Processes

MERCHANT = "254711000111"  # SimConfig's default merchant phone
PUBLIC_URL = "https://pay.test"  # live mode wants https; the simulators rewrite it to the daemon
CALLBACK_SECRET = "bench-callback-secret-0123456789"
AMOUNT_KES = 2500
CUSTOMER_TEXT = "Thanks, paying now"
PAY_TITLE = "Pay with M-PESA"

RECEIPT_RE = re.compile(r"Paid \u2714 \u2014 Invoice #(\d+)")
PROMPT_ACCOUNT_RE = re.compile(r", account (\S+)$")  # the STK Push's AccountReference: the invoice id


def customer_msisdn(index: int) -> str:
    """The flow's customer: 2547 30000000 + index (a number no seeded row uses)."""
    return f"2547{30_000_000 + index:08d}"


# -- the stack: simulators + daemon ----------------------------------------------------------------


@dataclass
class SimSettings:
    latency_ms: int = 200
    callback_delay_ms: int | None = None  # None: the same as latency_ms
    status_delay_ms: int = 50
    delivery_concurrency: int = 64

    def config(self, daemon_port: int) -> dict[str, Any]:
        base = f"http://127.0.0.1:{daemon_port}"
        return {
            "whatsapp_webhook_url": f"{base}/whatsapp/webhook",
            "sms_inbound_url": f"{base}/sms/inbound",
            "sms_status_url": f"{base}/sms/status",
            "merchant_msisdn": MERCHANT,
            # As the daemon's sandbox mode configures it (invoiceiq/daemon.py sandbox_settings).
            "wa_template_buttons": [f"quick_reply:{PAY_TITLE}"],
            "latency_ms": self.latency_ms,
            "callback_delay_ms": self.latency_ms if self.callback_delay_ms is None else self.callback_delay_ms,
            "status_delay_ms": self.status_delay_ms,
            # A flow slowed down by load must not see its prompt time out (1037) meanwhile.
            "prompt_timeout_s": 900.0,
            "delivery_concurrency": self.delivery_concurrency,
            "delivery_timeout_s": 30.0,
        }


def sim_defaults() -> Any:
    from invoiceiq.sandbox import SimConfig

    return SimConfig()


def daemon_env(database_url: str, port: int, sim_base: str, **extra: str) -> dict[str, str]:
    """``invoiceiq serve`` in live mode with the simulators' credentials (as ``sandbox_settings``
    wires them in-process), every provider API base pointed at ``sim_base``."""
    sim = sim_defaults()
    env = {
        "INVOICEIQ_MODE": "live",
        "INVOICEIQ_SERVER_BIND": f"127.0.0.1:{port}",
        "INVOICEIQ_SERVER_PUBLIC_URL": PUBLIC_URL,
        "INVOICEIQ_SERVER_SHUTDOWN_GRACE_S": "2",
        "DATABASE_URL": database_url,
        "MERCHANT_MSISDN": MERCHANT,
        "ADMIN_TOKEN": "admin-token-for-bench-0123",
        "WABA_TOKEN": sim.wa_token,
        "WABA_PHONE_ID": sim.wa_phone_id,
        "WABA_VERIFY_TOKEN": "bench-verify-token",
        "WABA_APP_SECRET": sim.wa_app_secret,
        "INVOICEIQ_WHATSAPP_API_BASE": f"{sim_base}/graph/v25.0",
        "SMS_USERNAME": sim.at_username,
        "SMS_API_KEY": sim.at_api_key,
        "SMS_CALLBACK_TOKEN": "bench-sms-callback-token-0123",
        "INVOICEIQ_SMS_API_BASE": f"{sim_base}/at",
        "MPESA_CONSUMER_KEY": sim.daraja_consumer_key,
        "MPESA_CONSUMER_SECRET": sim.daraja_consumer_secret,
        "MPESA_SHORTCODE": sim.daraja_shortcode,
        "MPESA_PASSKEY": sim.daraja_passkey,
        "MPESA_CALLBACK_SECRET": CALLBACK_SECRET,
        "INVOICEIQ_MPESA_API_BASE": f"{sim_base}/daraja",
        # The merchant sends one command per flow, hundreds a minute.
        "INVOICEIQ_CHAT_MERCHANT_RATE_PER_MIN": "1000000",
        **servers.loop_env(),
    }
    env.update(extra)
    return env


def migrate(db: Path, workdir: Path) -> dict[str, Any]:
    """``invoiceiq migrate`` on a fresh SQLite file (the real schema, as the daemon creates it)."""
    invoiceiq = servers.VENV_BIN / "invoiceiq"
    exe = [str(invoiceiq)] if invoiceiq.exists() else [sys.executable, "-m", "invoiceiq"]
    cmd = [*exe, "migrate"]
    env = servers.clean_env()
    env.update({"DATABASE_URL": f"sqlite:///{db}", "INVOICEIQ_MODE": "sandbox"})
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"invoiceiq migrate failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return {"command": f"DATABASE_URL=sqlite:///{db} " + " ".join(cmd), "seconds": round(time.monotonic() - started, 2)}


@dataclass
class Stack:
    name: str
    sim: Proc
    sim_port: int
    daemon: Proc
    port: int
    db: Path
    sim_settings: SimSettings
    spawned_at: float
    started_s: float | None = None

    @property
    def sim_base(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> Stack:
        if self.started_s is None:
            servers.wait_http(f"{self.sim_base}/api/state?phones=0", self.sim, timeout=60)
            servers.wait_http(f"{self.base}/readyz", self.daemon, timeout=90)
            self.started_s = time.monotonic() - self.spawned_at
        return self

    def describe(self) -> dict[str, Any]:
        return {"daemon_command": self.daemon.describe(), "sim_command": self.sim.describe(),
                "sim_config": self.sim_settings.config(self.port), "database": str(self.db),
                "start_seconds": _r(self.started_s, 2)}

    def stop(self) -> dict[str, int | None]:
        # The simulators first: their keep-alive connections would hold up the daemon's
        # graceful shutdown (and nothing is left to deliver once a run has settled).
        sim_code = self.sim.stop()
        return {"daemon_exit_code": self.daemon.stop(), "sim_exit_code": sim_code}


def spawn_stack(procs: Processes, pin: Pinning, workdir: Path, name: str, sim_settings: SimSettings,
                db: Path | None = None, daemon_extra: dict[str, str] | None = None) -> Stack:
    """Start the simulators (load core) and the daemon (server core); :meth:`Stack.wait_ready`
    waits for both. ``db``: an existing (migrated, maybe seeded) database; else a fresh file the
    daemon migrates itself."""
    spawned = time.monotonic()
    port, sim_port = servers.free_port(), servers.free_port()
    config_path = workdir / f"{name}-sim.json"
    config_path.write_text(json.dumps(sim_settings.config(port), indent=2))
    sim_base = f"http://127.0.0.1:{sim_port}"
    cmd = pin.wrap([sys.executable, "-m", "bench.simhost", "--bind", f"127.0.0.1:{sim_port}",
                    "--config", str(config_path), "--rewrite", f"{PUBLIC_URL}=http://127.0.0.1:{port}"], "load")
    env = servers.clean_env()
    env["PYTHONPATH"] = str(servers.REPO)
    sim = procs.start(f"{name}-sim", cmd, env=env, cwd=servers.REPO)

    db = db or workdir / f"{name}.db"
    shown = daemon_env(f"sqlite:///{db}", port, sim_base, **(daemon_extra or {}))
    denv = servers.clean_env()
    denv.update(shown)
    invoiceiq = servers.VENV_BIN / "invoiceiq"
    exe = [str(invoiceiq)] if invoiceiq.exists() else [sys.executable, "-m", "invoiceiq"]
    daemon = procs.start(name, pin.wrap([*exe, "serve"], "server"), env=denv, cwd=workdir, env_shown=shown)
    return Stack(name, sim, sim_port, daemon, port, db, sim_settings, spawned)


def start_stack(procs: Processes, pin: Pinning, workdir: Path, name: str, sim_settings: SimSettings,
                db: Path | None = None, daemon_extra: dict[str, str] | None = None) -> Stack:
    return spawn_stack(procs, pin, workdir, name, sim_settings, db, daemon_extra).wait_ready()


# -- the driver ------------------------------------------------------------------------------------


class FlowFailed(Exception):
    pass


@dataclass
class FlowResult:
    index: int
    customer: str
    ok: bool = False
    error: str | None = None
    invoice_id: str | None = None
    receipt: str | None = None
    t0: float = 0.0
    t_template: float | None = None
    t_tap: float | None = None
    t_prompt: float | None = None
    t_pay: float | None = None
    t_customer_receipt: float | None = None
    t_merchant_receipt: float | None = None

    @property
    def t_end(self) -> float | None:
        if self.t_customer_receipt is None or self.t_merchant_receipt is None:
            return None
        return max(self.t_customer_receipt, self.t_merchant_receipt)

    @property
    def latency_ms(self) -> float | None:
        end = self.t_end
        return None if end is None else (end - self.t0) * 1000

    def stages_ms(self) -> dict[str, float]:
        def d(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else (b - a) * 1000
        out = {
            "merchant_msg_to_template": d(self.t0, self.t_template),
            "template_to_tap": d(self.t_template, self.t_tap),
            "tap_to_prompt": d(self.t_tap, self.t_prompt),
            "prompt_to_pay": d(self.t_prompt, self.t_pay),
            "pay_to_customer_receipt": d(self.t_pay, self.t_customer_receipt),
            "pay_to_merchant_receipt": d(self.t_pay, self.t_merchant_receipt),
        }
        return {k: v for k, v in out.items() if v is not None}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _r(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


class Driver:
    """The merchant and the customers, through the simulators' control API."""

    def __init__(self, sim_base: str, connections: int = 64, flow_timeout_s: float = 300.0) -> None:
        # The bench's lean loopback transport (bench/loopback.py): the driver shares the load
        # core with the simulators.
        self.api = httpx.AsyncClient(base_url=f"{sim_base}/api", timeout=httpx.Timeout(60.0),
                                     transport=LoopbackTransport(max_connections=connections + 4))
        self.poll_client = httpx.AsyncClient(base_url=f"{sim_base}/api", timeout=httpx.Timeout(60.0),
                                             transport=LoopbackTransport(max_connections=4))
        self.flow_timeout_s = flow_timeout_s
        self.seq = 0
        self._waits: dict[tuple[str, str], asyncio.Future[float]] = {}
        self.duplicates: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.problem_events: list[dict[str, Any]] = []
        self.events_missed = 0
        self.polls = 0
        self.requests = 0
        self._poller: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Driver:
        state = await self._get("/state", params={"phones": "0"}, client=self.poll_client)
        self.seq = int(state["seq"])
        self._poller = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.api.aclose()
        await self.poll_client.aclose()

    # -- control API ------------------------------------------------------------------------

    async def _get(self, path: str, params: dict[str, Any] | None = None,
                   client: httpx.AsyncClient | None = None) -> Any:
        self.requests += 1
        r = await (client or self.api).get(path, params=params)
        if r.status_code != 200:
            raise FlowFailed(f"GET {path}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        self.requests += 1
        r = await self.api.post(path, json=body)
        if r.status_code != 200:
            raise FlowFailed(f"POST {path}: HTTP {r.status_code} {r.text[:200]}")
        return r.json()

    # -- the event log ----------------------------------------------------------------------

    async def _poll(self) -> None:
        while True:
            try:
                state = await self._get("/state", params={"since": self.seq, "wait": 20, "phones": "0", "numbers": "0"},
                                        client=self.poll_client)
            except Exception:  # noqa: BLE001 - the flows' waits time out if this never recovers
                await asyncio.sleep(0.2)
                continue
            self.polls += 1
            events = state["events"]
            if events and events[0]["seq"] > self.seq + 1:
                # The simulators keep the last 5,000 events: we fell behind by this many.
                self.events_missed += events[0]["seq"] - self.seq - 1
            for event in events:
                self._on_event(event)
            self.seq = max(self.seq, int(state["seq"]))

    def _on_event(self, e: dict[str, Any]) -> None:
        kind, msisdn, summary = e["kind"], e.get("msisdn"), e["summary"]
        self.events[kind] += 1
        if kind == "wa.out" and msisdn:
            head, _, text = summary.partition(": ")
            receipt = RECEIPT_RE.match(text)
            if msisdn == MERCHANT:
                if receipt:
                    self._resolve("merchant_receipt", receipt.group(1), e)
            elif head.startswith("WhatsApp template"):
                self._resolve("template", msisdn, e)
            elif receipt:
                self._resolve("receipt", msisdn, e)
        elif kind == "stk.prompt" and msisdn:
            self._resolve("prompt", msisdn, e)
        elif kind in ("wa.failed", "delivery.failed", "delivery.retry", "fault", "stk.no_callback"):
            if len(self.problem_events) < 50:
                self.problem_events.append(e)

    def _future(self, key: tuple[str, str]) -> asyncio.Future[dict[str, Any]]:
        fut = self._waits.get(key)
        if fut is None:
            fut = self._waits[key] = asyncio.get_running_loop().create_future()
        return fut

    def _resolve(self, what: str, key: str, event: dict[str, Any]) -> None:
        fut = self._future((what, key))
        if fut.done():
            self.duplicates[what] += 1
        else:
            fut.set_result(event)

    async def wait(self, what: str, key: str, deadline: float) -> dict[str, Any]:
        """The event that announced ``what`` for ``key``."""
        fut = self._future((what, key))
        timeout = deadline - time.monotonic()
        if not fut.done() and timeout <= 0:
            raise FlowFailed(f"timed out before waiting for {what}")
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=max(timeout, 0.001))
        except asyncio.TimeoutError:
            raise FlowFailed(f"timed out waiting for {what} ({key})") from None

    # -- one flow ---------------------------------------------------------------------------

    async def flow(self, index: int) -> FlowResult:
        customer = customer_msisdn(index)
        res = FlowResult(index=index, customer=customer)
        deadline = time.monotonic() + self.flow_timeout_s
        try:
            res.t0 = time.time()
            await self._post(f"/phones/{MERCHANT}/whatsapp",
                             {"text": f"invoice 0{customer[3:]} {AMOUNT_KES} Cleaning"})
            # The events name the template's wamid and the prompt's CheckoutRequestID (``ref``),
            # so the flow never reads its phone back: two requests fewer on the load core.
            template = await self.wait("template", customer, deadline)
            res.t_template = float(template["at"])
            if not template.get("ref"):
                raise FlowFailed(f"the template's event names no message: {template}")
            await self._post(f"/phones/{customer}/whatsapp", {"text": CUSTOMER_TEXT})
            res.t_tap = time.time()
            await self._post(f"/phones/{customer}/tap", {"message_id": template["ref"], "button_id": PAY_TITLE})
            prompt = await self.wait("prompt", customer, deadline)
            res.t_prompt = float(prompt["at"])
            account = PROMPT_ACCOUNT_RE.search(prompt["summary"])
            if not prompt.get("ref") or account is None:
                raise FlowFailed(f"the prompt's event names no checkout or account: {prompt}")
            res.invoice_id = account.group(1)
            res.t_pay = time.time()
            paid = await self._post(f"/stk/{prompt['ref']}", {"action": "pay"})
            if paid.get("result_code") != 0:
                raise FlowFailed(f"payment not accepted: {paid}")
            res.receipt = paid.get("receipt")
            res.t_customer_receipt = float((await self.wait("receipt", customer, deadline))["at"])
            res.t_merchant_receipt = float((await self.wait("merchant_receipt", res.invoice_id, deadline))["at"])
            res.ok = True
        except Exception as exc:  # noqa: BLE001 - a flow that breaks is reported, the others go on
            res.error = f"{type(exc).__name__}: {exc}"
        return res

    async def run(self, indices: list[int], concurrency: int, budget_s: float | None = None,
                  rate_per_min: float | None = None) -> dict[str, Any]:
        """Run these flows, at most ``concurrency`` at a time (a closed loop: a flow starts when
        one ends); no new flow starts after ``budget_s``. With ``rate_per_min``, an open loop
        instead: flows start on a fixed schedule whatever is still running (``paced``)."""
        if rate_per_min is not None:
            return await paced(indices, rate_per_min, self.flow, budget_s)
        queue = list(reversed(indices))
        results: list[FlowResult] = []
        started = time.monotonic()
        stop_at = None if budget_s is None else started + budget_s

        async def worker() -> None:
            while queue:
                if stop_at is not None and time.monotonic() >= stop_at:
                    return
                results.append(await self.flow(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(indices))))))
        return {"results": results, "wall_s": time.monotonic() - started, "not_started": len(queue)}


async def paced(indices: list[int], rate_per_min: float, flow: Any, budget_s: float | None = None) -> dict[str, Any]:
    """Start ``flow(i)`` for each index at ``rate_per_min``, the i-th ``i * 60 / rate`` seconds
    after the first, however many are still running: the offered load stays the same when the
    system slows down, so the latency is the system's at that load (a closed loop at saturation
    only measures its own concurrency over the throughput). No start after ``budget_s``."""
    interval = 60.0 / rate_per_min
    results: list[FlowResult] = []
    started = time.monotonic()
    not_started = 0

    async def one(i: int) -> None:
        results.append(await flow(i))

    tasks = []
    for n, i in enumerate(indices):
        due = started + n * interval
        if budget_s is not None and due - started >= budget_s:
            not_started = len(indices) - n
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    return {"results": results, "wall_s": time.monotonic() - started, "not_started": not_started}


def summarise(results: list[FlowResult], wall_s: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    lat = [r.latency_ms for r in done if r.latency_ms is not None]
    out: dict[str, Any] = {"flows": len(results), "completed": len(done), "failed": len(results) - len(done)}
    if done:
        first = min(r.t0 for r in results)
        last = max(r.t_end or 0.0 for r in done)
        span = max(last - first, 1e-9)
        out.update({
            "span_s": round(span, 2), "wall_s": round(wall_s, 2),
            "flows_per_minute": round(len(done) / span * 60, 1),
            "latency_ms": {"p50": _r(percentile(lat, 50)), "p90": _r(percentile(lat, 90)),
                           "p99": _r(percentile(lat, 99)), "min": _r(min(lat)), "max": _r(max(lat)),
                           "mean": _r(statistics.fmean(lat))},
        })
        stages: dict[str, list[float]] = defaultdict(list)
        for r in done:
            for k, v in r.stages_ms().items():
                stages[k].append(v)
        out["stages_ms"] = {k: {"p50": _r(percentile(v, 50)), "p99": _r(percentile(v, 99))}
                            for k, v in stages.items()}
    errors = Counter((r.error or "").split(" (")[0] for r in results if not r.ok)
    if errors:
        out["errors"] = dict(errors.most_common(10))
    return out


async def _drive(sim_base: str, single: list[int], concurrent: list[int], concurrency: int,
                 budget_s: float | None, flow_timeout_s: float, before: Any, after: Any,
                 rate_per_min: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"single": [], "concurrent": {"results": [], "wall_s": 0.0, "not_started": 0}}
    # An open loop may have many more flows out at once than a closed one: room for them.
    connections = 512 if rate_per_min is not None else max(concurrency, 4) * 2
    async with Driver(sim_base, connections=connections, flow_timeout_s=flow_timeout_s) as driver:
        for i in single:
            out["single"].append(await driver.flow(i))
        if concurrent:
            if before is not None:
                before()
            try:
                out["concurrent"] = await driver.run(concurrent, concurrency, budget_s, rate_per_min)
            finally:
                if after is not None:
                    after()
        # A receipt or template announced twice shows up here even after its flow returned.
        await asyncio.sleep(0.5)
        out["driver"] = {"polls": driver.polls, "control_requests": driver.requests,
                         "events": dict(driver.events), "events_missed": driver.events_missed,
                         "duplicates_seen_in_events": dict(driver.duplicates),
                         "problem_events": driver.problem_events[:20]}
    return out


def drive(sim_base: str, *, single: Iterable[int] = (), concurrent: Iterable[int] = (), concurrency: int = 64,
          budget_s: float | None = None, flow_timeout_s: float = 300.0, before: Any = None,
          after: Any = None, rate_per_min: float | None = None) -> dict[str, Any]:
    """Run flows one at a time (``single``), then ``concurrent`` ones ``concurrency`` at a time
    (or, with ``rate_per_min``, started at that rate), in one event loop; ``before``/``after``
    are called around the concurrent part."""
    return asyncio.run(_drive(sim_base, list(single), list(concurrent), concurrency, budget_s, flow_timeout_s,
                              before, after, rate_per_min))


def single_summary(results: list[FlowResult], skip_first: bool = True) -> dict[str, Any]:
    """One flow at a time: the first is a warm-up (OAuth token, first connections), not counted."""
    measured = results[1:] if skip_first and len(results) > 1 else results
    lat = [r.latency_ms for r in measured if r.ok and r.latency_ms is not None]
    stages: dict[str, list[float]] = defaultdict(list)
    for r in measured:
        if r.ok:
            for k, v in r.stages_ms().items():
                stages[k].append(v)
    return {"flows": len(measured), "warmup_flows": len(results) - len(measured),
            "completed": len(lat), "latency_ms_median": _r(statistics.median(lat)) if lat else None,
            "latency_ms_each": [_r(x) for x in lat],
            "warmup_latency_ms": [_r(r.latency_ms) for r in results[: len(results) - len(measured)]],
            "stages_ms_median": {k: _r(statistics.median(v)) for k, v in stages.items()},
            "errors": [r.error for r in results if not r.ok]}


# -- settling and counting -------------------------------------------------------------------------


def _sim_get(stack: Stack, path: str, params: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    r = httpx.get(f"{stack.sim_base}/api{path}", params=params, timeout=timeout)
    r.raise_for_status()
    return r.json()


def settle(stack: Stack, timeout_s: float) -> dict[str, Any]:
    """Wait until the daemon's inbox and outbox and the simulators' delivery queue are empty."""
    from . import durability

    started = time.monotonic()

    def left() -> dict[str, int]:
        b = durability.backlog(stack.db)
        b["sim_pending_deliveries"] = int(_sim_get(stack, "/state", {"phones": "0", "since": 1 << 60})
                                          ["sandbox"]["pending_deliveries"])
        return b

    first = now = left()
    while any(now.values()) and time.monotonic() - started < timeout_s:
        time.sleep(0.25)
        now = left()
    return {"settled": not any(now.values()), "seconds": round(time.monotonic() - started, 2),
            "backlog_at_end_of_run": first, "backlog_left": now}


def graph_text(body: dict[str, Any]) -> str:
    kind = body.get("type", "text")
    if kind == "text":
        return str((body.get("text") or {}).get("body", ""))
    if kind == "interactive":
        return str(((body.get("interactive") or {}).get("body") or {}).get("text", ""))
    return ""


def classify(body: dict[str, Any]) -> str:
    if body.get("type") == "template":
        return "invoice_template"
    text = graph_text(body)
    if text.startswith("Paid \u2714"):
        return "receipt"
    if text.startswith("M-PESA prompt sent to"):
        return "prompt_sent"
    if re.match(r"Invoice #\d+ sent to ", text):
        return "invoice_sent_confirmation"
    return "other"


def _chunks(items: list[str], n: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def max_outbox_id(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def check_flows(stack: Stack, flows: list[FlowResult], settled: dict[str, Any], metrics_text: str | None,
                outbox_after_id: int = 0) -> dict[str, Any]:
    """Count, at the simulators and in the daemon's database, what the flows left behind.

    ``flows`` are every flow run against this stack (single and concurrent), completed or not;
    outbox rows up to ``outbox_after_id`` were seeded (history), not written by this daemon.
    """
    from . import durability

    problems: list[str] = []
    customers = {r.customer for r in flows}
    n = len(flows)
    completed = sum(r.ok for r in flows)
    if completed != n:
        problems.append(f"{n - completed} of {n} flows did not complete")
    if not settled["settled"]:
        problems.append(f"backlog not worked off within the settle timeout: {settled['backlog_left']}")

    # -- the simulators: what the daemon sent them -------------------------------------------
    wa = _sim_get(stack, "/journal", {"service": "whatsapp"})
    pushes = _sim_get(stack, "/journal", {"service": "daraja_push"})
    queries = _sim_get(stack, "/journal", {"service": "daraja_query"})
    sms = _sim_get(stack, "/journal", {"service": "sms"})
    oauth = _sim_get(stack, "/journal", {"service": "daraja_oauth"})
    deliveries = _sim_get(stack, "/deliveries")

    accepted = [c for c in wa if c["status"] == 200]
    seen_bodies: Counter[str] = Counter()
    per_customer: dict[str, Counter[str]] = defaultdict(Counter)
    merchant_kinds: Counter[str] = Counter()
    merchant_receipts: Counter[str] = Counter()
    for call in accepted:
        body = call["body"]
        to = str(body.get("to", "")).lstrip("+")
        seen_bodies[to + "\0" + json.dumps(body, sort_keys=True)] += 1
        kind = classify(body)
        if to == MERCHANT:
            merchant_kinds[kind] += 1
            if kind == "receipt":
                m = RECEIPT_RE.match(graph_text(body))
                if m:
                    merchant_receipts[m.group(1)] += 1
        elif to in customers:
            per_customer[to][kind] += 1
    identical_twice = sum(c - 1 for c in seen_bodies.values() if c > 1)
    if identical_twice:
        problems.append(f"DUPLICATE: {identical_twice} WhatsApp messages sent twice with identical bodies")
    not_200 = len(wa) - len(accepted)
    if not_200:
        problems.append(f"{not_200} Graph sends were refused by the simulator")

    flow_pushes = Counter(str(c["body"].get("PhoneNumber")) for c in pushes if c["status"] == 200)
    push_total = sum(flow_pushes[c] for c in customers)
    if push_total != n or any(flow_pushes[c] != 1 for c in customers):
        problems.append(f"STK pushes: {push_total} accepted for {n} flows "
                        f"({sum(1 for c in customers if flow_pushes[c] > 1)} customers prompted more than once, "
                        f"{sum(1 for c in customers if flow_pushes[c] == 0)} never)")
    other_pushes = sum(v for k, v in flow_pushes.items() if k not in customers)
    if other_pushes:
        problems.append(f"{other_pushes} STK pushes to numbers no flow used")
    refused_pushes = sum(1 for c in pushes if c["status"] != 200)

    customer_receipts = sum(k["receipt"] for k in per_customer.values())
    receipts_total = customer_receipts + sum(merchant_receipts.values())
    if customer_receipts != n or any(per_customer[c]["receipt"] != 1 for c in customers):
        problems.append(f"customer receipts: {customer_receipts} for {n} flows")
    flow_invoices = {r.invoice_id for r in flows if r.invoice_id}
    if sum(merchant_receipts[i] for i in flow_invoices) != len(flow_invoices) or \
            any(merchant_receipts[i] != 1 for i in flow_invoices):
        problems.append(f"merchant receipts: {sum(merchant_receipts.values())} for {len(flow_invoices)} invoices")
    for kind in ("invoice_template", "prompt_sent"):
        bad = [c for c in customers if per_customer[c][kind] != 1]
        if bad:
            problems.append(f"{len(bad)} customers did not get exactly one {kind} (e.g. {bad[0]}: "
                            f"{dict(per_customer[bad[0]])})")
    more_than_once = sorted({k for c in customers for k, v in per_customer[c].items() if v > 1})
    if more_than_once:
        problems.append(f"customers got more than one of: {', '.join(more_than_once)}")
    if merchant_kinds["invoice_sent_confirmation"] != len(flow_invoices):
        problems.append(f"merchant confirmations: {merchant_kinds['invoice_sent_confirmation']} for "
                        f"{len(flow_invoices)} invoices")

    by_kind_state: Counter[str] = Counter()
    answer_ms: dict[str, list[float]] = defaultdict(list)
    redelivered = 0
    for d in deliveries:
        by_kind_state[f"{d['kind']}:{d['state']}"] += 1
        redelivered += max(0, len(d["attempts"]) - 1)
        for a in d["attempts"]:
            if a["status"] is not None:
                answer_ms[d["kind"]].append(float(a["elapsed_ms"]))
    failed_deliveries = sum(v for k, v in by_kind_state.items() if k.endswith(":failed"))
    if failed_deliveries:
        problems.append(f"{failed_deliveries} webhooks/callbacks the simulators gave up on")
    callbacks = by_kind_state.get("stk_callback:delivered", 0)
    if callbacks != n:
        problems.append(f"{callbacks} STK callbacks delivered for {n} flows")

    # -- the daemon's database ---------------------------------------------------------------
    conn = sqlite3.connect(f"file:{stack.db}?mode=ro", uri=True, timeout=30)
    try:
        def val(sql: str, *params: Any) -> int:
            row = conn.execute(sql, params).fetchone()
            return int(row[0] or 0) if row else 0

        inv_status: Counter[str] = Counter()
        pay_status: Counter[str] = Counter()
        for chunk in _chunks(sorted(customers)):
            marks = ",".join("?" * len(chunk))
            for status, count in conn.execute(
                    f"SELECT status, COUNT(*) FROM invoices WHERE msisdn IN ({marks}) GROUP BY status", chunk):
                inv_status[status] += count
            for status, count in conn.execute(
                    f"SELECT p.status, COUNT(*) FROM payments p JOIN invoices i ON i.id = p.invoice_id"
                    f" WHERE i.msisdn IN ({marks}) GROUP BY p.status", chunk):
                pay_status[status] += count
        inbox_session = val("SELECT COUNT(*) FROM inbox WHERE source = 'whatsapp' AND actor = 'session'")
        inbox_session_distinct = val(
            "SELECT COUNT(DISTINCT event_id) FROM inbox WHERE source = 'whatsapp' AND actor = 'session'")
        inbox_callbacks = val("SELECT COUNT(*) FROM inbox WHERE source = 'mpesa'")
        unprocessed = val("SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL")
        after = outbox_after_id
        outbox_by = dict(conn.execute("SELECT kind || ':' || status, COUNT(*) FROM outbox WHERE id > ?"
                                      " GROUP BY 1", (after,)).fetchall())
        outbox_failed = val("SELECT COUNT(*) FROM outbox WHERE id > ? AND status = 'FAILED'", after)
        outbox_sent = val("SELECT COUNT(*) FROM outbox WHERE id > ? AND status IN ('SENT','DELIVERED','READ')",
                          after)
    finally:
        conn.close()
    if inv_status.get("PAID", 0) != n or sum(inv_status.values()) != n:
        problems.append(f"invoices of the flows' customers: {dict(inv_status)}, expected {n} PAID")
    if pay_status.get("SUCCESS", 0) != n or sum(pay_status.values()) != n:
        problems.append(f"payments of the flows' customers: {dict(pay_status)}, expected {n} SUCCESS")
    # Inbound messages: the merchant's command, the customer's text and the tap, once each.
    if inbox_session != 3 * n:
        problems.append(f"{inbox_session} inbound WhatsApp messages stored for {n} flows (expected {3 * n})")
    if inbox_session_distinct != inbox_session:
        problems.append("DUPLICATE inbound message ids in the inbox")
    if inbox_callbacks != n:
        problems.append(f"{inbox_callbacks} M-PESA callbacks stored for {n} flows")
    if outbox_failed:
        problems.append(f"{outbox_failed} outbox rows FAILED")
    if outbox_sent != len(accepted):
        problems.append(f"outbox marks {outbox_sent} messages sent, the simulated Graph API accepted {len(accepted)}")
    metrics = durability.message_metrics(metrics_text) if metrics_text else {}
    dup = metrics.get("WHATSAPP:IN:duplicate", 0.0)
    if dup:
        problems.append(f"the daemon counted {dup:.0f} duplicate webhooks (redeliveries by the simulators: "
                        f"{redelivered})")

    kinds_per_customer = Counter(
        ",".join(f"{k}={v}" for k, v in sorted(per_customer[c].items())) for c in customers)
    return {
        "ok": not problems, "problems": problems, "flows": n, "completed": completed,
        "at_simulators": {
            "whatsapp_sends_accepted": len(accepted), "whatsapp_sends_refused": not_200,
            "identical_sends_repeated": identical_twice,
            "stk_pushes_accepted": push_total, "stk_pushes_refused": refused_pushes,
            "stk_queries": len(queries), "oauth_tokens": len(oauth), "sms_sends": len(sms),
            "receipts": {"customers": customer_receipts, "merchant": sum(merchant_receipts.values()),
                         "total": receipts_total},
            "merchant_messages": dict(merchant_kinds),
            "customer_message_kinds": dict(kinds_per_customer.most_common(5)),
            "deliveries": dict(by_kind_state), "redelivery_attempts": redelivered,
            # How long the daemon took to answer the simulators' webhooks and callbacks.
            "daemon_answer_ms": {k: {"n": len(v), "p50": _r(percentile(v, 50)), "p99": _r(percentile(v, 99))}
                                 for k, v in answer_ms.items()},
        },
        "in_database": {
            "invoices_by_status": dict(inv_status), "payments_by_status": dict(pay_status),
            "inbound_whatsapp_messages": inbox_session, "mpesa_callbacks": inbox_callbacks,
            "inbox_unprocessed": unprocessed, "outbox_by_kind_status": outbox_by,
        },
        "daemon_duplicate_webhooks": dup,
    }


# -- seeding ---------------------------------------------------------------------------------------

_FIRST = ("Mary", "John", "Wanjiku", "Otieno", "Achieng", "Kamau", "Njeri", "Mwangi", "Akinyi", "Kiprono",
          "Fatuma", "Hassan", "Chebet", "Mutua", "Nafula", "Omondi")
_LAST = ("Wanjiru", "Odhiambo", "Kariuki", "Mutiso", "Were", "Kiptoo", "Nyambura", "Ali", "Onyango", "Maina")
_ITEMS = ("Cleaning", "Laundry", "Logo design", "Water delivery", "Sukuma wiki and eggs", "Tuition, March",
          "Plumbing repair", "Tailoring: 2 dresses", "Catering deposit", "Boda delivery", "Hair braiding",
          "Website hosting", "Charcoal, 2 bags", "Event tent hire")
_RECEIPT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _base36(value: int, width: int) -> str:
    out = []
    while value:
        value, rem = divmod(value, 36)
        out.append(_RECEIPT_ALPHABET[26:][rem] if rem < 10 else _RECEIPT_ALPHABET[rem - 10])
    return "".join(reversed(out)).rjust(width, "0")[-width:]


def seed(db: Path, *, conversations: int, invoices: int, outbox_history: bool = True, now_ms: int | None = None,
         rng_seed: int = 8) -> dict[str, Any]:
    """Write ``conversations`` customer conversations (with their customers) and ``invoices``
    invoices (with invoice_tracking, and a SUCCESS payment + STK attempt for each PAID one),
    in one transaction, into a database ``invoiceiq migrate`` created. Rows are what the daemon
    itself writes: customer states as ``CustomerState.to_dict()`` (through the store's own JSON
    encoder), invoice numbers from the counter (which is moved past them), pay tokens as
    ``store.ids.new_token``. Numbers 2547 20000000.. are seeded customers; flows use others.

    ``outbox_history``: also the outbox rows those invoices left behind, all finished (the
    invoice, the merchant's confirmation, and for a paid one the "prompt sent" reply and both
    receipts; for a cancelled one the customer's notice) with the dedupe keys the daemon uses.
    Nothing deletes outbox rows (``invoiceiq prune`` only empties payloads), so a database
    that holds 100,000 invoices holds these too."""
    from invoiceiq.core.customer import CustomerState
    from invoiceiq.store.ids import new_token
    from invoiceiq.store.jsonio import dumps

    rng = random.Random(rng_seed)
    rand = rng.random

    def below(n: int) -> int:  # rng.randrange(n), several times faster
        return int(rand() * n)

    now_ms = now_ms or int(time.time() * 1000)
    day = 86_400_000
    started = time.monotonic()
    conn = sqlite3.connect(db, timeout=60)
    try:
        conn.execute("PRAGMA busy_timeout=60000")
        # Bulk load: nothing reads this file yet, and the daemon syncs it on its own start.
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        conn.execute("BEGIN IMMEDIATE")
        first_counter = int(conn.execute("SELECT value FROM counters WHERE name = 'invoice'").fetchone()[0])
        n_customers = max(conversations, 1)

        def msisdn(i: int) -> str:
            return f"2547{20_000_000 + i:08d}"

        def name(i: int) -> str:
            return f"{_FIRST[i % len(_FIRST)]} {_LAST[(i // len(_FIRST)) % len(_LAST)]}"

        cust_rows = []
        conv_rows = []
        for i in range(n_customers):
            created = now_ms - (1 + below(364)) * day
            named = rand() < 0.7
            wrote = rand() < 0.6
            last_in = created + below(max(1, now_ms - created)) if wrote else None
            nm = name(i) if named else None
            cust_rows.append((msisdn(i), nm, " ".join(nm.split()).casefold() if nm else None, last_in, created))
            if i < conversations:
                state = CustomerState(last_hint_at_ms=last_in) if wrote and rand() < 0.8 else CustomerState()
                conv_rows.append((msisdn(i), "customer", dumps(state.to_dict()), below(12), None,
                                  last_in or created))
        conn.executemany("INSERT INTO customers (msisdn, name, name_key, last_inbound_at_ms, created_at_ms)"
                         " VALUES (?, ?, ?, ?, ?)", cust_rows)
        conn.executemany("INSERT INTO conversations (conv_key, role, state, version, due_at_ms, updated_at_ms)"
                         " VALUES (?, ?, ?, ?, ?, ?)", conv_rows)

        inv_rows, track_rows, pay_rows, stk_rows, outbox_rows = [], [], [], [], []
        statuses: Counter[str] = Counter()
        for k in range(invoices):
            inv_id = str(first_counter + 1 + k)
            ci = below(n_customers)
            amount = (150, 300, 450, 800, 1200, 1500, 2500, 3200, 5000, 12000)[below(10)] * 100
            created = now_ms - (1 + below(359)) * day - below(day)
            roll = rand()
            # No PENDING: an invoice is PENDING only until its first send, seconds after creation.
            status = "PAID" if roll < 0.62 else "SENT" if roll < 0.88 else "CANCELLED" if roll < 0.96 else "FAILED"
            statuses[status] += 1
            token = new_token()
            channel = "SMS" if rand() < 0.08 else "WHATSAPP"
            sent = created + 500 + below(4500)
            delivery = "failed" if status == "FAILED" else ("delivered", "read", "sent")[below(3)]
            paid = created + 60_000 + below(5 * day) if status == "PAID" else None
            cancelled = created + 60_000 + below(3 * day) if status == "CANCELLED" else None
            # M-PESA receipt numbers: 10 capitals and digits, unique (the index refuses a repeat).
            receipt = (f"S{_base36(k, 6)}" + "".join(_RECEIPT_ALPHABET[below(26)] for _ in range(3))
                       if status == "PAID" else None)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(created / 1000))
            inv_rows.append((inv_id, cust_rows[ci][1], cust_rows[ci][0], amount, "KES", _ITEMS[below(len(_ITEMS))], status,
                             receipt, f"{PUBLIC_URL}/p/{token}", stamp, stamp))
            track_rows.append((inv_id, token, created, sent, paid, cancelled, channel, delivery, None, "chat"))
            if outbox_history:
                cust = cust_rows[ci][0]
                final = "FAILED" if status == "FAILED" else ("DELIVERED", "READ", "READ")[below(3)]
                t = created + 300
                history = [(cust, channel or "WHATSAPP", "invoice", {"type": "invoice", "invoice_id": inv_id,
                                                                       "purpose": "invoice"}, final, f"invoice:{inv_id}")]
                if status != "FAILED":
                    history.append((MERCHANT, "WHATSAPP", "notice", {"type": "buttons", "body": f"Invoice #{inv_id} sent"
                                    f" to {cust}.", "buttons": [[f"remind:{inv_id}", "Send reminder"],
                                                               [f"cancel:{inv_id}", "Cancel"]], "footer": None},
                                    "READ", f"confirm:{inv_id}"))
                if status == "PAID":
                    text = f"Paid \u2714 \u2014 Invoice #{inv_id} (KES {amount // 100:,})\nReceipt: {receipt}\nThank you!"
                    history += [(cust, "WHATSAPP", "customer_reply", {"type": "text", "body": "M-PESA prompt sent"},
                                 "READ", None),
                                (cust, "WHATSAPP", "receipt", {"type": "text", "body": text}, "DELIVERED",
                                 f"receipt:{inv_id}:customer"),
                                (MERCHANT, "WHATSAPP", "receipt", {"type": "text", "body": text}, "READ",
                                 f"receipt:{inv_id}:merchant")]
                elif status == "CANCELLED":
                    history.append((cust, channel or "WHATSAPP", "notice", {"type": "text", "body": "Cancelled"},
                                    "DELIVERED", f"cancelled:{inv_id}"))
                for to, ch, kind, content, st, dk in history:
                    t += 200 + below(60_000)
                    pid = None if st == "FAILED" else f"wamid.HIST{len(outbox_rows):09d}"
                    outbox_rows.append((to, ch, kind, inv_id, dumps(content), st, 1, t, pid, dk, t, t, t))
            if status == "PAID":
                pay_id = f"pay_{_base36(requested_base := (paid or created), 10)}{rng.getrandbits(60):015x}"
                requested = requested_base - 5_000 - below(55_000)
                checkout = f"ws_CO_{time.strftime('%d%m%Y%H%M%S', time.gmtime(requested / 1000))}" \
                           f"{cust_rows[ci][0]}{secrets.token_hex(2)}{k}"
                raw_req = {"BusinessShortCode": "174379", "TransactionType": "CustomerPayBillOnline",
                           "Amount": amount // 100, "PartyA": cust_rows[ci][0], "PartyB": "174379",
                           "PhoneNumber": cust_rows[ci][0], "AccountReference": inv_id,
                           "TransactionDesc": f"Invoice {inv_id}"}
                raw_cb = {"Body": {"stkCallback": {
                    "MerchantRequestID": f"{10**4 + below(9 * 10**4)}-{10**7 + below(9 * 10**7)}-1",
                    "CheckoutRequestID": checkout, "ResultCode": 0,
                    "ResultDesc": "The service request is processed successfully.",
                    "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": float(amount // 100)},
                                                  {"Name": "MpesaReceiptNumber", "Value": receipt},
                                                  {"Name": "TransactionDate", "Value": 20250101120000},
                                                  {"Name": "PhoneNumber", "Value": int(cust_rows[ci][0])}]}}}}
                pay_rows.append((pay_id, inv_id, "MPESA_STK", "SUCCESS", receipt, amount, dumps(raw_req),
                                 dumps(raw_cb), None, stamp, stamp))
                stk_rows.append((pay_id, inv_id, cust_rows[ci][0], requested, checkout,
                                 raw_cb["Body"]["stkCallback"]["MerchantRequestID"], 0,
                                 "The service request is processed successfully.", None, 0,
                                 requested + 600_000, paid, ("whatsapp", "whatsapp", "sms", "page")[below(4)]))
        conn.executemany(
            "INSERT INTO invoices (id, customer_name, msisdn, amount_cents, currency, description, status, pay_ref,"
            " pay_link, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inv_rows)
        conn.executemany(
            "INSERT INTO invoice_tracking (invoice_id, pay_token, created_at_ms, sent_at_ms, paid_at_ms,"
            " cancelled_at_ms, channel, delivery_state, last_reminder_at_ms, source)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", track_rows)
        conn.executemany(
            "INSERT INTO payments (id, invoice_id, method, status, mpesa_receipt, amount_cents, raw_request,"
            " raw_callback, idempotency_key, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            pay_rows)
        conn.executemany(
            "INSERT INTO stk_attempts (payment_id, invoice_id, phone, requested_at_ms, checkout_request_id,"
            " merchant_request_id, result_code, result_desc, next_check_at_ms, queries, expire_at_ms,"
            " resolved_at_ms, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", stk_rows)
        conn.executemany(
            "INSERT INTO outbox (recipient, channel, kind, invoice_id, content, status, attempts, next_attempt_at_ms,"
            " provider_message_id, dedupe_key, created_at_ms, sent_at_ms, updated_at_ms, order_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [(*r, r[0]) for r in outbox_rows])
        conn.execute("UPDATE counters SET value = ? WHERE name = 'invoice'", (first_counter + invoices,))
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return {"conversations": len(conv_rows), "customers": len(cust_rows), "invoices": invoices,
            "invoices_by_status": dict(statuses), "payments": len(pay_rows), "stk_attempts": len(stk_rows),
            "outbox_history_rows": len(outbox_rows),
            "seconds": round(time.monotonic() - started, 2), "db_bytes": db.stat().st_size}


def rss(proc: Proc) -> dict[str, Any]:
    kb = servers.rss_kb(proc.pid)
    return {"rss_kb": kb.get("VmRSS"), "hwm_kb": kb.get("VmHWM"),
            "rss_mb": _r(kb["VmRSS"] / 1024) if "VmRSS" in kb else None,
            "hwm_mb": _r(kb["VmHWM"] / 1024) if "VmHWM" in kb else None}


# -- CPU: the daemon, the simulators and this process --------------------------------------------


class CpuWatch:
    """CPU seconds of the daemon (its event loop's thread and the rest) and the simulators,
    and how busy both cores were, over a run."""

    def __init__(self, daemon_pid: int, sim_pid: int, pin: Pinning) -> None:
        self.sample = servers.CpuSample(daemon_pid, pin)
        self.daemon_pid = daemon_pid
        self.threads0 = servers.thread_cpu_s(daemon_pid)
        self.sim_pid = sim_pid
        self.sim0 = servers._proc_cpu_s(sim_pid)
        self.me0 = _self_cpu_s()

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.sample.finish())
        wall = float(out["wall_s"]) or 1e-9
        threads1 = servers.thread_cpu_s(self.daemon_pid)
        if self.threads0 is not None and threads1 is not None:
            out["server_loop_thread_cpu_pct"] = round(100.0 * (threads1[0] - self.threads0[0]) / wall, 1)
            out["server_other_threads_cpu_pct"] = round(100.0 * (threads1[1] - self.threads0[1]) / wall, 1)
        sim1 = servers._proc_cpu_s(self.sim_pid)
        if self.sim0 is not None and sim1 is not None:
            out["sim_cpu_pct"] = round(100.0 * (sim1 - self.sim0) / wall, 1)
        out["driver_cpu_pct"] = round(100.0 * (_self_cpu_s() - self.me0) / wall, 1)
        if "load_cpu_busy_pct" in out:
            used = out.get("sim_cpu_pct", 0.0) + out["driver_cpu_pct"]
            out["other_on_load_cpu_pct"] = round(max(0.0, out["load_cpu_busy_pct"] - used), 1)
        return out


def cpu_ms_per_flow(run: dict[str, Any]) -> dict[str, float] | None:
    """CPU milliseconds per completed flow of the daemon, the simulators and the driver over
    the concurrent run: the cost that caps throughput on one core, whoever is the bottleneck
    (1 core / this = the most flows a second that process could serve)."""
    cpu, completed = run.get("cpu") or {}, run.get("completed") or 0
    wall = cpu.get("wall_s")
    if not completed or not wall:
        return None
    out = {}
    for who, key in (("daemon", "server_cpu_pct"), ("daemon_loop_thread", "server_loop_thread_cpu_pct"),
                     ("daemon_other_threads", "server_other_threads_cpu_pct"),
                     ("simulators", "sim_cpu_pct"), ("driver", "driver_cpu_pct")):
        if cpu.get(key) is not None:
            out[who] = round(cpu[key] / 100.0 * float(wall) * 1000.0 / completed, 1)
    return out


def writes_per_flow(run: dict[str, Any]) -> dict[str, float] | None:
    """The SQLite writer's transactions (each one fsync) and write jobs per completed flow
    over the concurrent run: what the group commit shares, and what it cannot."""
    writer, completed = run.get("writer") or {}, run.get("completed") or 0
    if not completed or not writer.get("groups"):
        return None
    return {"commits": round(writer["groups"] / completed, 1), "jobs": round(writer["jobs"] / completed, 1)}


def _self_cpu_s() -> float:
    import os

    t = os.times()
    return t.user + t.system


def flows_as_dicts(results: list[FlowResult], limit: int = 5) -> list[dict[str, Any]]:
    out = []
    for r in results[:limit]:
        d = asdict(r)
        d["latency_ms"] = _r(r.latency_ms)
        d["stages_ms"] = {k: _r(v) for k, v in r.stages_ms().items()}
        out.append(d)
    return out


__all__ = ["spawn_stack", "CpuWatch", "Driver", "FlowResult", "SimSettings", "Spy", "Stack", "summarise_raw", "check_flows", "customer_msisdn", "daemon_env", "drive",
           "migrate", "percentile", "rss", "seed", "settle", "single_summary", "start_stack", "summarise"]


# -- profiling -------------------------------------------------------------------------------------


class Spy:
    """``py-spy record`` attached to one process (on the load core) until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, fmt: str, pin: Pinning, rate: int = 100) -> None:
        import shutil

        exe = servers.VENV_BIN / "py-spy"
        self.out = out
        self.cmd = pin.wrap([str(exe) if exe.exists() else (shutil.which("py-spy") or "py-spy"), "record",
                             "--pid", str(pid), "--rate", str(rate), "--nonblocking", "--threads", "--format", fmt,
                             "-o", str(out)], "load")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.fmt = fmt

    def stop(self) -> dict[str, Any]:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            text, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            text, _ = self.proc.communicate()
        result: dict[str, Any] = {"command": " ".join(self.cmd), "output": str(self.out),
                                  "exit_code": self.proc.returncode, "log": (text or "")[-300:]}
        if self.fmt == "raw" and self.out.exists():
            result["summary"] = summarise_raw(self.out)
        return result


def _frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    return f"{name} ({path})"


def _area(frame: str) -> str:
    """A coarse bucket for a frame: our package's module, or the library."""
    _, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    if "invoiceiq/" in path or path.startswith("invoiceiq"):
        rest = path.split("invoiceiq/", 1)[-1]
        return "invoiceiq/" + rest.rsplit("/", 1)[0] if "/" in rest else "invoiceiq/" + rest
    for lib in ("hypercorn", "quart", "werkzeug", "flask", "httpx", "httpcore", "h11", "anyio", "asyncio",
                "sqlite3", "databases", "sqlalchemy", "aiosqlite", "orjson", "structlog", "logging", "json",
                "prometheus_client", "ssl", "selectors", "h2", "wsproto", "email", "urllib", "http", "jinja2"):
        if f"/{lib}/" in path or path.startswith(f"{lib}/") or path == f"{lib}.py" or path.endswith(f"/{lib}.py"):
            return lib
    return path.rsplit("/", 1)[-1] or "?"


IDLE_LEAVES = ("select (selectors.py", "Condition.wait (threading.py", "Event.wait (threading.py",
               "Queue.get (queue.py", "_wait_for_tstate_lock (threading.py", "SimpleQueue.get")


def _thread_name(frame: str) -> str:
    # "thread (1234): AnyIO worker thread" -> "AnyIO worker thread"; numbers dropped so that
    # the threads of one pool add up.
    name = frame.split("): ", 1)[-1]
    return re.sub(r"-\d+", "-N", name)


def summarise_raw(path: Path, top: int = 25) -> dict[str, Any]:
    """From a py-spy raw (collapsed stacks, ``--threads``) file: samples per thread (and how many
    of them wait in select/locks/queues), then over the non-waiting samples the top functions by
    self and by inclusive time, and self time by area (invoiceiq module or library), in %."""
    total = 0
    busy = 0
    threads: Counter[str] = Counter()
    threads_idle: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    leaf_in_ours: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        raw = [f for f in stack.split(";") if f]
        thread = _thread_name(raw[0]) if raw and raw[0].startswith("thread (") else "?"
        frames = [f for f in raw if " (" in f and not f.startswith(("process ", "thread ("))]
        if not frames:
            continue
        total += count
        threads[thread] += count
        leaf = frames[-1]
        if leaf.startswith(IDLE_LEAVES):
            threads_idle[thread] += count
            continue
        busy += count
        self_time[_frame_name(leaf)] += count
        areas[_area(leaf)] += count
        for name in {_frame_name(f) for f in frames}:
            inclusive[name] += count
        ours = [f for f in frames if "invoiceiq/" in f]
        if ours:
            leaf_in_ours[_frame_name(ours[-1])] += count

    def pct(c: Counter[str], n: int, of: int) -> list[list[Any]]:
        return [[k, round(100.0 * v / of, 1)] for k, v in c.most_common(n)] if of else []

    return {"samples": total, "busy_samples": busy,
            "threads": {t: {"samples": n, "waiting": threads_idle[t]} for t, n in threads.most_common(12)},
            "note": "percentages below are of the busy (non-waiting) samples, all threads together",
            "self_pct": pct(self_time, top, busy), "inclusive_pct": pct(inclusive, top + 15, busy),
            "self_pct_by_area": pct(areas, 20, busy), "innermost_invoiceiq_frame_pct": pct(leaf_in_ours, top, busy)}
