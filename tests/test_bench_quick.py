"""`make bench-quick` runs and writes its JSON (issue 8). Timings are never asserted here.

The quick benchmark starts the reference server, a fake provider sink, two real daemons for
ingest, and two daemon + simulator pairs for the end-to-end flows (one on a seeded database) as
subprocesses on loopback, so it takes half a minute; it uses wrk when installed and otherwise
the small Python generator (the JSON says which). What is asserted are counts: every flow
completed, one STK push and two receipts per flow, nothing sent twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `bench` is a top-level package of the checkout, not installed
    sys.path.insert(0, str(REPO))
QUICK_JSON = REPO / "bench" / "results" / "quick.json"
INGEST = ("ingest_customer_text", "ingest_merchant_invoice")


def test_quick_bench_runs_and_writes_the_json() -> None:
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "reference" in done.stdout and "ingest_customer_text" in done.stdout  # the table
    assert "end_to_end:" in done.stdout and "state_at_scale:" in done.stdout
    assert QUICK_JSON.exists() and QUICK_JSON.stat().st_mtime >= started - 1
    report = json.loads(QUICK_JSON.read_text())

    assert report["mode"] == "quick"
    assert report["exit_status"] == 0
    assert report["versions"]["invoiceiq_path"] == str(REPO / "invoiceiq")  # the code that ran is this
    for key in ("machine", "versions", "settings", "scenarios", "ratios", "targets", "started_at", "elapsed_s"):
        assert key in report, key
    assert report["machine"]["cpu_count"] >= 1
    assert report["versions"]["python"]
    assert report["versions"]["packages"]["quart"] and report["versions"]["packages"]["hypercorn"]
    assert report["versions"]["generator"] in ("wrk", "python")
    assert report["settings"]["generator"] == report["versions"]["generator"]
    # The reference runs on the daemon's event loop (uvloop here: a dependency on Linux).
    assert report["versions"]["event_loop"] == report["scenarios"]["reference"]["event_loop"] == "uvloop"
    assert "-k uvloop" in report["scenarios"]["reference"]["server_command"]

    for name in ("reference", *INGEST):
        scenario = report["scenarios"][name]
        assert "error" not in scenario, scenario.get("error")
        assert scenario["server_command"]
        runs = scenario["runs"]
        assert len(runs) == 1
        run = runs[0]
        assert run["command"] and run["generator"] == report["versions"]["generator"]
        assert run["requests"] > 0 and run["ok_2xx"] > 0 and run["rps"] > 0
        assert run["p50_ms"] and run["p50_ms"] > 0 and run["p99_ms"] and run["p99_ms"] > 0
        assert scenario["median"]["rps"] > 0

    for name in INGEST:
        assert report["ratios"][name] > 0
        check = report["scenarios"][name]["durability"]
        # Every webhook answered 200 is stored, none twice.
        assert check["ok"], check["problems"]
        assert check["stored_inbox_rows"] >= check["accepted_2xx"] > 0
        assert check["repeated_bodies"] == 0
        # Group commit during the runs: at least one job per fsync, counted from /metrics.
        writer = report["scenarios"][name]["writer_during_runs"]
        assert writer["jobs"] >= writer["groups"] > 0 and writer["jobs_per_group"] >= 1

    # End to end: every flow completed, and the counts at the simulators and in the database agree.
    e2e = report["scenarios"]["end_to_end"]
    assert "error" not in e2e, e2e.get("error")
    assert e2e["plan"]["provider_latency_ms"] == 200
    assert e2e["daemon_command"] and e2e["sim_command"] and e2e["daemon_exit_code"] == 0
    run = e2e["run"]
    assert run["flows"] == run["completed"] == e2e["plan"]["flows"] > 0 and run["not_started"] == 0
    assert run["flows_per_minute"] > 0 and run["latency_ms"]["p50"] > 0 and run["latency_ms"]["p99"] > 0
    assert set(run["stages_ms"]) >= {"merchant_msg_to_template", "tap_to_prompt", "pay_to_merchant_receipt"}
    assert "server_cpu_pct" in run["cpu"] and "sim_cpu_pct" in run["cpu"]
    per_flow = run["cpu_ms_per_flow"]  # what caps throughput
    assert set(per_flow) == {"daemon", "daemon_loop_thread", "daemon_other_threads", "simulators", "driver"}
    assert per_flow["daemon"] > 0 and per_flow["simulators"] > 0 and per_flow["daemon_loop_thread"] > 0
    # The daemon's threads add up to the daemon, within the clock ticks (10 ms each, three
    # readings taken a moment apart) spread over a handful of flows.
    slack = 3 * 10.0 / run["completed"]
    assert abs(per_flow["daemon_loop_thread"] + per_flow["daemon_other_threads"] - per_flow["daemon"]) <= slack
    # Every flow writes: its webhooks, turns, sends and payment each commit at least once.
    writes = run["writes_per_flow"]
    assert writes["jobs"] >= 10 and 0 < writes["commits"] <= writes["jobs"]
    assert e2e["single"]["latency_ms_median"] > 0
    checks = e2e["checks"]
    assert checks["ok"], checks["problems"]
    n = checks["flows"]
    assert n == e2e["plan"]["flows"] + e2e["plan"]["single_flows"]
    sims = checks["at_simulators"]
    assert sims["stk_pushes_accepted"] == n and sims["receipts"] == {"customers": n, "merchant": n, "total": 2 * n}
    assert sims["identical_sends_repeated"] == 0 and sims["whatsapp_sends_refused"] == 0
    assert checks["in_database"]["invoices_by_status"] == {"PAID": n}
    assert checks["in_database"]["payments_by_status"] == {"SUCCESS": n}
    assert e2e["daemon_rss"]["after_start"]["rss_mb"] > 0
    for key in ("flows_per_minute>=3000", "p99<2800ms", "no_message_lost_or_duplicated"):
        assert key in e2e["targets"]["met"], key
        assert f"end_to_end_{key}" in report["targets"]["met"]

    # State at scale: a seeded database, RSS after start and after the flows, one flow seeded vs empty.
    scale = report["scenarios"]["state_at_scale"]
    assert "error" not in scale, scale.get("error")
    assert scale["seed"]["conversations"] == scale["seed"]["invoices"] == 3000
    assert scale["seed"]["outbox_history_rows"] > 3000
    assert scale["migrate"]["command"].endswith("invoiceiq migrate")
    rss = scale["daemon_rss"]
    assert rss["after_start"]["rss_mb"] > 0 and rss["after_flows"]["rss_mb"] > 0 and rss["peak_mb"] > 0
    one = scale["one_flow"]
    assert one["seeded_median_ms"] > 0 and one["empty_median_ms"] > 0 and one["ratio"] > 0
    assert one["empty_source"] == "end_to_end"
    assert scale["checks"]["ok"], scale["checks"]["problems"]
    for key in ("rss<150MB", "one_flow_no_slower", "no_message_lost_or_duplicated"):
        assert f"state_at_scale_{key}" in report["targets"]["met"]


# -- the pieces, quickly ---------------------------------------------------------------------

WRK_SAMPLE = """Running 10s test @ http://127.0.0.1:8100/whatsapp/webhook
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    20.51ms    3.02ms    1.20s    85.12%
    Req/Sec     3.01k   123.45     3.30k    70.00%
  Latency Distribution
     50%  820.00us
     75%   21.50ms
     90%   23.01ms
     99%    1.05s
  30129 requests in 10.00s, 4.31MB read
  Socket errors: connect 0, read 0, write 0, timeout 2
  Non-2xx or 3xx responses: 12
Requests/sec:   3012.34
Transfer/sec:    441.20KB
BENCH tid=0 sent=30193 bodies=45000
"""


def test_wrk_output_is_parsed() -> None:
    from bench import wrk

    r = wrk.parse(WRK_SAMPLE)
    assert r.requests == 30129 and r.duration_s == pytest.approx(10.0)
    assert r.rps == pytest.approx(3012.34)
    assert r.non_2xx_3xx == 12 and r.ok_2xx == 30117
    assert r.socket_errors == {"connect": 0, "read": 0, "write": 0, "timeout": 2}
    assert r.p50_ms == pytest.approx(0.82) and r.p99_ms == pytest.approx(1050.0)
    assert r.percentiles_ms["75"] == pytest.approx(21.5)
    assert r.latency_max_ms == pytest.approx(1200.0)
    assert (r.sent, r.bodies, r.repeated) == (30193, 45000, 0)


def test_wrk_command_pins_and_passes_the_bodies(tmp_path: Path) -> None:
    from bench import wrk

    cmd = wrk.command("wrk", "http://127.0.0.1:1/x", tmp_path / "b.tsv", threads=1, connections=64, duration_s=10,
                      latency=True, pin="1", timeout_s=10)
    assert cmd[:3] == ["taskset", "-c", "1"]
    assert cmd[3:7] == ["wrk", "-t1", "-c64", "-d10s"]
    assert "--latency" in cmd and cmd[cmd.index("-s") + 1].endswith("cycle.lua")
    assert cmd[-3:] == ["--", str(tmp_path / "b.tsv"), "1"]


def test_bodies_are_signed_unique_and_the_same_as_the_test_harness(tmp_path: Path) -> None:
    from bench import bodies

    from harness import APP_SECRET, inbound_text, sign

    made = bodies.write_bodies(tmp_path / "b.tsv", "merchant_invoice", scenario="s", label="run1", count=50)
    lines = bodies.read_bodies(made.path)
    assert len(lines) == 50
    ids = set()
    for sig, body in lines:
        assert sig == sign(body, APP_SECRET)
        msg = json.loads(body)["entry"][0]["changes"][0]["value"]["messages"][0]
        assert msg["from"] == bodies.MERCHANT and msg["text"]["body"].startswith("invoice 07")
        ids.add(msg["id"])
    assert len(ids) == 50 and all(i.startswith(made.id_prefix) for i in ids)

    # Byte for byte what tests/harness.py's Handle.post_webhook would send for the same message.
    ours = bodies.encode(bodies.inbound_text("254712345678", "hi", wamid="wamid.X", timestamp=1_764_158_400))
    theirs = json.dumps(inbound_text("254712345678", "hi", wamid="wamid.X"), ensure_ascii=True,
                        separators=(",", ":")).encode()
    assert ours == theirs


# -- end to end and state at scale: the pieces ---------------------------------------------------


def test_percentile_and_flow_summary() -> None:
    from bench import e2e

    assert e2e.percentile([], 50) is None
    assert e2e.percentile([5.0], 99) == 5.0
    assert e2e.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert e2e.percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    ok = e2e.FlowResult(index=0, customer="254730000000", ok=True, t0=100.0, t_template=100.4, t_tap=100.5,
                        t_prompt=100.8, t_pay=100.9, t_customer_receipt=101.3, t_merchant_receipt=101.5)
    failed = e2e.FlowResult(index=1, customer="254730000001", error="FlowFailed: timed out waiting for prompt (x)",
                            t0=100.0)
    assert ok.latency_ms == pytest.approx(1500.0)
    summary = e2e.summarise([ok, failed], wall_s=2.0)
    assert (summary["flows"], summary["completed"], summary["failed"]) == (2, 1, 1)
    assert summary["flows_per_minute"] == pytest.approx(40.0)  # 1 flow in 1.5 s
    assert summary["errors"] == {"FlowFailed: timed out waiting for prompt": 1}
    assert summary["stages_ms"]["tap_to_prompt"]["p50"] == pytest.approx(300.0)


def test_graph_bodies_are_classified() -> None:
    from bench import e2e

    assert e2e.classify({"type": "template", "template": {"name": "invoice_notification"}}) == "invoice_template"
    receipt = "Paid \u2714 \u2014 Invoice #1042 (KES 2,500)\nReceipt: SBK7XZ1ABC\nThank you!"
    assert e2e.classify({"type": "text", "text": {"body": receipt}}) == "receipt"
    assert e2e.RECEIPT_RE.match(receipt).group(1) == "1042"
    buttons = {"type": "interactive", "interactive": {"type": "button", "body": {"text": "Invoice #1042 sent to "
                                                                                         "254712345678. Use ..."}}}
    assert e2e.classify(buttons) == "invoice_sent_confirmation"
    assert e2e.classify({"type": "text", "text": {"body": "M-PESA prompt sent to 0712…678"}}) == "prompt_sent"
    assert e2e.customer_msisdn(7) == "254730000007"


def test_profile_summary_reads_pyspy_raw(tmp_path: Path) -> None:
    from bench import e2e

    raw = tmp_path / "p.txt"
    raw.write_text(
        "thread (1): MainThread;<module> (invoiceiq:6);claim_due (invoiceiq/store/outbox.py:93);"
        "SqliteTx.all (invoiceiq/store/db.py:50) 30\n"
        "thread (1): MainThread;<module> (invoiceiq:6);select (selectors.py:468) 50\n"
        "thread (2): AnyIO worker thread;run (anyio/_backends/_asyncio.py:1) 20\n")
    s = e2e.summarise_raw(raw)
    assert s["samples"] == 100 and s["busy_samples"] == 50
    assert s["threads"]["MainThread"] == {"samples": 80, "waiting": 50}
    assert s["self_pct"][0] == ["SqliteTx.all (invoiceiq/store/db.py)", 60.0]
    assert ["claim_due (invoiceiq/store/outbox.py)", 60.0] in s["inclusive_pct"]
    assert dict(map(tuple, s["self_pct_by_area"]))["invoiceiq/store"] == 60.0


def test_seed_writes_rows_the_daemon_can_read(tmp_path: Path) -> None:
    import sqlite3

    from bench import e2e

    from invoiceiq.core.customer import CustomerState

    db = tmp_path / "seed.db"
    e2e.migrate(db, tmp_path)
    made = e2e.seed(db, conversations=200, invoices=300)
    assert made["conversations"] == 200 and made["invoices"] == 300 and made["outbox_history_rows"] > 300
    conn = sqlite3.connect(db)
    try:
        count = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
        assert count("SELECT COUNT(*) FROM conversations WHERE role = 'customer'") == 200
        assert count("SELECT COUNT(*) FROM invoices") == count("SELECT COUNT(*) FROM invoice_tracking") == 300
        assert count("SELECT value FROM counters WHERE name = 'invoice'") == 1000 + 300
        paid = count("SELECT COUNT(*) FROM invoices WHERE status = 'PAID'")
        assert paid == made["payments"] == count("SELECT COUNT(*) FROM payments WHERE status = 'SUCCESS'")
        assert count("SELECT COUNT(DISTINCT pay_ref) FROM invoices WHERE status = 'PAID'") == paid
        assert count("SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING')") == 0
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        for (state,) in conn.execute("SELECT state FROM conversations"):
            assert CustomerState.from_dict(json.loads(state)).to_dict() == json.loads(state)
    finally:
        conn.close()


def test_the_bench_refuses_a_venv_that_runs_another_clones_code(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A venv made by another clone (an editable install) would run that clone's daemon under
    this checkout's commit in the report: the bench stops before measuring anything."""
    from bench import runner, servers

    assert servers.daemon_code() == REPO / "invoiceiq"
    monkeypatch.setattr(servers, "daemon_code", lambda: Path("/elsewhere/invoiceiq"))
    with pytest.raises(SystemExit) as exited:
        runner.parse_args(["--quick", "--generator", "python"])
    assert exited.value.code == 2
    assert "would run invoiceiq from /elsewhere/invoiceiq, not from this checkout" in capsys.readouterr().err


def test_an_open_loop_starts_flows_on_schedule_whatever_is_still_running() -> None:
    """``--e2e-rate``: flows start at the offered rate even while earlier ones are stuck (a
    closed loop would wait for them: here, for ever), never before their slot, none twice."""
    import asyncio

    from bench import e2e

    starts: list[tuple[int, float]] = []
    all_started = asyncio.Event()

    async def flow(i: int) -> e2e.FlowResult:
        starts.append((i, time.monotonic()))
        if len(starts) == 5:
            all_started.set()
        await all_started.wait()  # every flow stays in flight until the last has started
        return e2e.FlowResult(index=i, customer="")

    async def main() -> dict[str, object]:
        return await asyncio.wait_for(e2e.paced([10, 11, 12, 13, 14], 6000.0, flow), timeout=30)

    out = asyncio.run(main())
    assert sorted(r.index for r in out["results"]) == [10, 11, 12, 13, 14]  # type: ignore[attr-defined]
    assert [i for i, _ in starts] == [10, 11, 12, 13, 14] and out["not_started"] == 0
    first = starts[0][1]
    for n, (_, at) in enumerate(starts):
        assert at - first >= n * 0.01 - 0.001  # 6,000 a minute: one every 10 ms, none early

    # A budget stops the schedule: at 60 a minute only the first of three starts within 0.5 s.
    async def budgeted() -> dict[str, object]:
        return await e2e.paced([1, 2, 3], 60.0, lambda i: asyncio.sleep(0, e2e.FlowResult(index=i, customer="")), budget_s=0.5)

    cut = asyncio.run(budgeted())
    assert cut["not_started"] == 2 and len(cut["results"]) == 1  # type: ignore[arg-type]
