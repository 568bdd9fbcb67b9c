"""The scenarios of issue 8.

* Ingest (point 2): :data:`INGEST` lists the two body kinds posted to the real daemon (run by
  :meth:`bench.runner.Bench.ingest`).
* End to end (point 3): :func:`end_to_end` runs complete flows (merchant one-line -> invoice
  template -> customer message -> Pay tap -> STK Push -> callback -> both receipts) against the
  sandbox simulators with provider latency, then counts what happened at the simulators and
  in the database (:mod:`bench.e2e`).
* State at scale (point 4): :func:`state_at_scale` seeds 100,000 conversations and invoices,
  starts the daemon on them, and measures its memory and one flow's latency against the empty
  database of :func:`end_to_end`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import durability, e2e, servers
from .servers import Pinning, Processes


@dataclass(frozen=True, slots=True)
class IngestScenario:
    name: str
    body_kind: str  # bench.bodies kind
    description: str
    # Extra daemon settings for this scenario (INVOICEIQ_* env), reported in the JSON.
    daemon_env: dict[str, str] = field(default_factory=dict)


INGEST: tuple[IngestScenario, ...] = (
    IngestScenario(
        name="ingest_customer_text",
        body_kind="customer_text",
        description=("signed WhatsApp text webhooks from 10,000 different customer numbers (cycled), every "
                     "message id unique; the cheap path: verify, store in the inbox (group commit), 200; the "
                     "session actors then answer each customer (a hint, at most one per customer per hour) "
                     "through the outbox to the sink"),
    ),
    IngestScenario(
        name="ingest_merchant_invoice",
        body_kind="merchant_invoice",
        description=("signed WhatsApp webhooks from the merchant number, each `invoice 07XXXXXXXX 2500 Cleaning` "
                     "for a different customer, unique ids; the webhook stores and answers, the merchant's "
                     "session actor creates the invoice and its outbox row, the outbox sends the template to the sink"),
        # The default of 30 merchant messages a minute would turn all but 30 of these into
        # "slow down" replies; a campaign of hundreds of invoices at once is what is measured.
        daemon_env={"INVOICEIQ_CHAT_MERCHANT_RATE_PER_MIN": "1000000"},
    ),
)



# -- end to end and state at scale (issue 8, points 3 and 4) ---------------------------------


@dataclass(frozen=True, slots=True)
class EndToEndPlan:
    """Point 3: N complete flows against the sandbox providers, with provider latency."""

    flows: int = 1000
    provider_latency_ms: int = 200
    concurrency: int = 64
    # Flows started per minute whatever is still running (an open loop), instead of
    # ``concurrency`` at a time: None = the closed loop.
    rate_per_min: float | None = None
    # The STK callback leaves simulated Daraja this long after the PIN: None = provider_latency_ms.
    callback_delay_ms: int | None = None
    # Status webhooks (sent, delivered) follow a send after 1x / 2x this. The simulators deliver
    # everything for one phone in order, so an inbound message waits behind them: kept short.
    status_delay_ms: int = 50
    # Webhooks/callbacks the simulators post at once (different phones; one phone's go in order).
    sim_deliveries: int = 64
    # Flows run one at a time first (the first is a warm-up): an unloaded flow's latency.
    single_flows: int = 6
    # No new flow starts after this many seconds (the report says how many never started).
    budget_s: float = 900.0
    flow_timeout_s: float = 300.0
    settle_timeout_s: float = 120.0
    target_flows_per_minute: int = 3000
    target_p99_ms_over_providers: int = 2000

    @property
    def callback_ms(self) -> int:
        return self.provider_latency_ms if self.callback_delay_ms is None else self.callback_delay_ms

    @property
    def providers_on_path_ms(self) -> int:
        """The providers' own latency on a flow's critical path: the template send, the STK
        Push, the callback's delay and the last receipt's send (the token is cached; the other
        sends of a flow overlap these)."""
        return 3 * self.provider_latency_ms + self.callback_ms


@dataclass(frozen=True, slots=True)
class StateAtScalePlan:
    """Point 4: 100,000 conversations and 100,000 invoices stored; memory and one flow's latency."""

    conversations: int = 100_000
    invoices: int = 100_000
    # Also the (finished) outbox rows those invoices left: ~3.9 per invoice (bench.e2e.seed).
    outbox_history: bool = True
    flows_after_start: int = 1000
    concurrency: int = 64
    single_flows: int = 6
    budget_s: float = 900.0
    target_rss_mb: float = 150.0
    # "No slower": the seeded median within this factor of the empty one (run-to-run noise).
    slower_tolerance: float = 1.10


@dataclass
class Context:
    procs: Processes
    pin: Pinning
    workdir: Path
    profile_dir: Path | None = None
    profile_format: str = "raw"


# Customers: 2547 30000000 + index. Each stack gets its own range.
E2E_FIRST = 0
SCALE_FIRST = 500_000
BASELINE_FIRST = 900_000


def pace(concurrency: int, rate_per_min: float | None) -> str:
    """How the flows arrive, for the report's lines: a closed loop or an open one."""
    return f"{concurrency} at a time" if rate_per_min is None else f"started at {rate_per_min:g} a minute"


def _sim(plan: EndToEndPlan) -> e2e.SimSettings:
    return e2e.SimSettings(latency_ms=plan.provider_latency_ms, callback_delay_ms=plan.callback_delay_ms,
                           status_delay_ms=plan.status_delay_ms, delivery_concurrency=plan.sim_deliveries)


class _Around:
    """Called around the concurrent part of a drive: RSS, CPU, and py-spy if asked."""

    def __init__(self, ctx: Context, stack: e2e.Stack, name: str) -> None:
        self.ctx, self.stack, self.name = ctx, stack, name
        self.out: dict[str, Any] = {}
        self._cpu: e2e.CpuWatch | None = None
        self._spies: dict[str, e2e.Spy] = {}
        self._writer0: dict[str, float] | None = None

    def before(self) -> None:
        self.out["rss_before"] = e2e.rss(self.stack.daemon)
        self._writer0 = self._writer_counts()
        self._cpu = e2e.CpuWatch(self.stack.daemon.pid, self.stack.sim.pid, self.ctx.pin)
        if self.ctx.profile_dir is not None:
            ext = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}[self.ctx.profile_format]
            for who, proc in (("daemon", self.stack.daemon), ("sim", self.stack.sim)):
                self._spies[who] = e2e.Spy(proc.pid, self.ctx.profile_dir / f"{self.name}-{who}.{ext}",
                                           self.ctx.profile_format, self.ctx.pin)

    def after(self) -> None:
        if self._cpu is not None:
            self.out["cpu"] = self._cpu.finish()
        writer1 = self._writer_counts()
        if self._writer0 is not None and writer1 is not None:
            self.out["writer"] = durability.writer_delta(self._writer0, writer1)
        self.out["rss_after"] = e2e.rss(self.stack.daemon)
        if self._spies:
            self.out["profiles"] = {who: spy.stop() for who, spy in self._spies.items()}

    def _writer_counts(self) -> dict[str, float] | None:
        try:
            return durability.writer_counts(servers.get_text(f"{self.stack.base}/metrics"))
        except OSError:
            return None


def _finish(stack: e2e.Stack, flows: list[e2e.FlowResult], settle_timeout_s: float,
            outbox_after_id: int = 0) -> dict[str, Any]:
    settled = e2e.settle(stack, settle_timeout_s)
    try:
        metrics_text = servers.get_text(f"{stack.base}/metrics")
    except OSError:
        metrics_text = None
    checks = e2e.check_flows(stack, flows, settled, metrics_text, outbox_after_id)
    checks["settle"] = settled
    return checks


def end_to_end(plan: EndToEndPlan, ctx: Context) -> dict[str, Any]:
    """Start the simulators and the daemon (empty database), run ``single_flows`` flows one at a
    time, then ``flows`` flows ``concurrency`` at a time; count what they left behind."""
    stack = e2e.start_stack(ctx.procs, ctx.pin, ctx.workdir, "end_to_end", _sim(plan))
    around = _Around(ctx, stack, "end_to_end")
    try:
        rss_start = e2e.rss(stack.daemon)
        first = E2E_FIRST + plan.single_flows
        out = e2e.drive(stack.sim_base, single=range(E2E_FIRST, first), concurrent=range(first, first + plan.flows),
                        concurrency=plan.concurrency, budget_s=plan.budget_s, flow_timeout_s=plan.flow_timeout_s,
                        before=around.before, after=around.after, rate_per_min=plan.rate_per_min)
        flows = out["single"] + out["concurrent"]["results"]
        checks = _finish(stack, flows, plan.settle_timeout_s)
        rss_end = e2e.rss(stack.daemon)
    finally:
        described = stack.describe()
        codes = stack.stop()
    conc = out["concurrent"]
    run = e2e.summarise(conc["results"], conc["wall_s"])
    run["not_started"] = conc["not_started"]
    run["concurrency"] = plan.concurrency
    run["arrival"] = ("closed loop" if plan.rate_per_min is None
                      else f"open loop: {plan.rate_per_min:g} flows started per minute")
    run.update({k: v for k, v in around.out.items() if k in ("cpu", "profiles", "writer")})
    run["cpu_ms_per_flow"] = e2e.cpu_ms_per_flow(run)
    run["writes_per_flow"] = e2e.writes_per_flow(run)
    p99_max = plan.target_p99_ms_over_providers + plan.providers_on_path_ms
    p99 = (run.get("latency_ms") or {}).get("p99")
    met = {
        f"flows_per_minute>={plan.target_flows_per_minute}":
            (run.get("flows_per_minute") or 0) >= plan.target_flows_per_minute and run["not_started"] == 0,
        f"p99<{p99_max}ms": p99 is not None and p99 < p99_max,
        "no_message_lost_or_duplicated": checks["ok"],
    }
    return {
        "description": ("complete flows against the sandbox simulators (bench/simhost.py on the load core, "
                        f"{plan.provider_latency_ms} ms on every provider API answer, STK callback "
                        f"{plan.callback_ms} ms after the PIN), the daemon in live mode on the server core; "
                        "latency = the merchant's message -> the last of the two receipts at the phones"),
        "plan": {**asdict(plan), "providers_on_path_ms": plan.providers_on_path_ms},
        **described, **codes,
        "single": e2e.single_summary(out["single"]),
        "run": run,
        "checks": checks,
        "driver": out["driver"],
        "daemon_rss": {"after_start": rss_start, "before_run": around.out.get("rss_before"),
                       "after_run": around.out.get("rss_after"), "after_settle": rss_end},
        "sample_flows": e2e.flows_as_dicts(conc["results"], 3),
        "targets": {"flows_per_minute_min": plan.target_flows_per_minute, "p99_ms_max": p99_max, "met": met},
    }


@dataclass
class ScalePrep:
    db: Path
    migrate: dict[str, Any]
    seed: dict[str, Any]
    stack: e2e.Stack | None = None


def prepare_state_at_scale(plan: StateAtScalePlan, e2e_plan: EndToEndPlan, ctx: Context,
                           spawn: bool = False) -> ScalePrep:
    """``invoiceiq migrate`` a fresh database, seed it; with ``spawn`` also start its stack
    (without waiting: quick mode overlaps its start-up with the end-to-end scenario)."""
    db = ctx.workdir / "state_at_scale.db"
    migrated = e2e.migrate(db, ctx.workdir)
    seeded = e2e.seed(db, conversations=plan.conversations, invoices=plan.invoices,
                      outbox_history=plan.outbox_history)
    seeded["max_outbox_id"] = e2e.max_outbox_id(db)
    prep = ScalePrep(db, migrated, seeded)
    if spawn:
        prep.stack = e2e.spawn_stack(ctx.procs, ctx.pin, ctx.workdir, "state_at_scale", _sim(e2e_plan), db=db)
    return prep


def _empty_baseline(e2e_plan: EndToEndPlan, single_flows: int, ctx: Context) -> dict[str, Any]:
    """One flow at a time on an empty database (when no end-to-end run gave one)."""
    stack = e2e.start_stack(ctx.procs, ctx.pin, ctx.workdir, "state_at_scale_empty", _sim(e2e_plan))
    try:
        rss_start = e2e.rss(stack.daemon)
        out = e2e.drive(stack.sim_base, single=range(BASELINE_FIRST, BASELINE_FIRST + single_flows))
    finally:
        stack.stop()
    return {"source": "state_at_scale_empty", "single": e2e.single_summary(out["single"]),
            "rss_after_start": rss_start}


def state_at_scale(plan: StateAtScalePlan, e2e_plan: EndToEndPlan, ctx: Context,
                   baseline: dict[str, Any] | None = None, prep: ScalePrep | None = None) -> dict[str, Any]:
    """Seeded database: the daemon's RSS after start and after ``flows_after_start`` flows, and
    one flow's latency (median of ``single_flows - 1`` after a warm-up) against the empty
    database's (``baseline``: the end-to-end scenario's single flows, same cores and settings)."""
    prep = prep or prepare_state_at_scale(plan, e2e_plan, ctx)
    stack = prep.stack or e2e.spawn_stack(ctx.procs, ctx.pin, ctx.workdir, "state_at_scale", _sim(e2e_plan),
                                          db=prep.db)
    around = _Around(ctx, stack, "state_at_scale")
    try:
        stack.wait_ready()
        rss_start = e2e.rss(stack.daemon)
        first = SCALE_FIRST + plan.single_flows
        out = e2e.drive(stack.sim_base, single=range(SCALE_FIRST, first),
                        concurrent=range(first, first + plan.flows_after_start), concurrency=plan.concurrency,
                        budget_s=plan.budget_s, flow_timeout_s=e2e_plan.flow_timeout_s,
                        before=around.before, after=around.after)
        flows = out["single"] + out["concurrent"]["results"]
        checks = _finish(stack, flows, e2e_plan.settle_timeout_s, prep.seed.get("max_outbox_id", 0))
        rss_end = e2e.rss(stack.daemon)
    finally:
        described = stack.describe()
        codes = stack.stop()
    if baseline is None or not (baseline.get("single") or {}).get("latency_ms_median"):
        empty = _empty_baseline(e2e_plan, plan.single_flows, ctx)
    else:
        empty = {"source": "end_to_end", "single": baseline["single"],
                 "rss_after_start": (baseline.get("daemon_rss") or {}).get("after_start")}
    seeded_single = e2e.single_summary(out["single"])
    conc = out["concurrent"]
    run = e2e.summarise(conc["results"], conc["wall_s"])
    run["not_started"] = conc["not_started"]
    run.update({k: v for k, v in around.out.items() if k in ("cpu", "profiles", "writer")})
    run["cpu_ms_per_flow"] = e2e.cpu_ms_per_flow(run)
    run["writes_per_flow"] = e2e.writes_per_flow(run)
    seeded_ms = seeded_single.get("latency_ms_median")
    empty_ms = empty["single"].get("latency_ms_median")
    ratio = round(seeded_ms / empty_ms, 3) if seeded_ms and empty_ms else None
    after_flows = around.out.get("rss_after") or rss_end
    peak_mb = max(x for x in ((rss_start.get("hwm_mb") or 0), (after_flows.get("hwm_mb") or 0),
                              (rss_end.get("hwm_mb") or 0)))
    met = {
        f"rss<{plan.target_rss_mb:g}MB": bool(peak_mb) and peak_mb < plan.target_rss_mb,
        "one_flow_no_slower": ratio is not None and ratio <= plan.slower_tolerance,
        "no_message_lost_or_duplicated": checks["ok"],
    }
    return {
        "description": (f"{prep.seed['conversations']:,} conversations and {prep.seed['invoices']:,} invoices "
                        f"(+ {prep.seed['outbox_history_rows']:,} finished outbox rows) written into the schema of "
                        "`invoiceiq migrate` before the daemon starts; its RSS after start and after "
                        f"{plan.flows_after_start:,} flows; one flow at a time, seeded vs empty"),
        "plan": asdict(plan), "migrate": prep.migrate, "seed": prep.seed,
        **described, **codes,
        "daemon_rss": {"after_start": rss_start, "after_flows": after_flows, "after_settle": rss_end,
                       "peak_mb": peak_mb, "empty_db_after_start": empty.get("rss_after_start")},
        "one_flow": {"seeded": seeded_single, "empty": empty["single"], "empty_source": empty["source"],
                     "seeded_median_ms": seeded_ms, "empty_median_ms": empty_ms, "ratio": ratio},
        "run": run,
        "checks": checks,
        "driver": out["driver"],
        "targets": {"rss_mb_max": plan.target_rss_mb, "flow_latency_ratio_max": plan.slower_tolerance, "met": met},
    }

