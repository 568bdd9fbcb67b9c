"""The scenarios of issue 8.

Ingest (point 2) is implemented: :data:`INGEST` lists the two body kinds posted to the real
daemon. End to end (point 3) and state at scale (point 4) are hooks: their parameters, what
they will measure, and the steps, with :func:`end_to_end` / :func:`state_at_scale` returning
a ``not_implemented`` record (never a number) until the pieces they need exist.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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


# -- hooks: end to end and state at scale (issue 8, points 3 and 4) ---------------------------


@dataclass(frozen=True, slots=True)
class EndToEndPlan:
    """Point 3: N complete flows against the sandbox providers, with provider latency."""

    flows: int = 1000
    provider_latency_ms: int = 200
    concurrency: int = 64
    measures: tuple[str, ...] = ("flows_per_minute", "p50_ms merchant message -> last receipt",
                                 "p99_ms merchant message -> last receipt", "lost/duplicated at the fakes")
    targets: dict[str, Any] = field(default_factory=lambda: {
        "flows_per_minute_min": 3000, "p99_ms_max": "2000 + the providers' own latency"})
    needs: tuple[str, ...] = (
        "the sandbox simulators (invoiceiq/sandbox: graph, daraja, africastalking) runnable as a separate "
        "process on the load core, with latency_ms and a way to read what they received",
        "the payments flow (Pay tap -> STK Push -> callback -> receipts), still being built",
    )
    # TODO(issue 8, point 3), once the simulators and the payments flow are in:
    #  1. start the simulators on the load core (Pinning.load) with latency_ms=provider_latency_ms,
    #     and the daemon on the server core with every provider API base pointed at them;
    #  2. drive N flows with an async client on the load core, at most `concurrency` at a time:
    #     post the merchant's signed `invoice 07.. <amount> <desc>` (bench.bodies), wait at the
    #     simulated Graph API for the invoice to reach the customer, post the customer's signed
    #     Pay button tap, wait for the STK Push at the simulated Daraja, let it post the signed
    #     callback, wait for both receipts (customer and merchant) at the simulated Graph API;
    #  3. per flow, the time from the merchant's post to the last receipt seen; report flows/min
    #     over the whole run and p50/p99 of those times;
    #  4. afterwards count, in the database and at the simulators: N invoices PAID, N payments
    #     SUCCESS, exactly one STK push and two receipts per flow, no message sent twice.


@dataclass(frozen=True, slots=True)
class StateAtScalePlan:
    """Point 4: 100,000 conversations and 100,000 invoices stored; memory and one flow's latency."""

    conversations: int = 100_000
    invoices: int = 100_000
    flows_after_start: int = 1000
    measures: tuple[str, ...] = ("rss_mb after start", "rss_mb after flows_after_start flows",
                                 "one flow's latency: seeded vs empty database")
    targets: dict[str, Any] = field(default_factory=lambda: {"rss_mb_max": 150, "flow_latency": "no slower than empty"})
    # TODO(issue 8, point 4), after the end-to-end flow exists:
    #  1. seed a fresh database before the daemon starts: run `invoiceiq migrate`, then insert the
    #     conversations/customers/invoices (+ invoice_tracking) rows in bulk with executemany in
    #     one transaction (stdlib sqlite3; the rows must look like real ones: states as the
    #     conversation core writes them, PENDING/SENT/PAID invoices);
    #  2. start the daemon; RSS via bench.servers.rss_kb(pid) once /readyz answers;
    #  3. run EndToEndPlan(flows=flows_after_start) against it; RSS again (VmRSS and VmHWM);
    #  4. the latency of one flow, alone, on the seeded database and on an empty one (median of a
    #     few), both on the same cores.
    # bench.servers.rss_kb already works: the ingest scenarios record the daemon's RSS after start
    # and after their runs.


def end_to_end(plan: EndToEndPlan | None = None) -> dict[str, Any]:
    plan = plan or EndToEndPlan()
    return {"status": "not_implemented",
            "reason": "needs the sandbox simulators and the payments flow (other engineers are building them)",
            "plan": asdict(plan)}


def state_at_scale(plan: StateAtScalePlan | None = None) -> dict[str, Any]:
    plan = plan or StateAtScalePlan()
    return {"status": "not_implemented",
            "reason": "needs the end-to-end flow (point 3) to drive flows on a seeded database",
            "plan": asdict(plan)}
