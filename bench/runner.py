"""``python -m bench [--quick]``: run the scenarios, write the JSON report, print the table.

Full mode (``make bench``): for the reference and each ingest scenario, one server process,
a 3 s warm-up (discarded) then 3 measured runs of 10 s at 64 connections (wrk -t1 --latency),
median req/s, p50 and p99 each taken independently (as notes/stack.md section 7); the server
pinned to the first CPU, wrk and the fake providers to the second. Writes
``bench/results/latest.json``.

End to end and state at scale (``bench/scenarios.py``, ``bench/e2e.py``): complete flows
against the sandbox simulators (on the load core, 200 ms per provider call) and the daemon in
live mode (on the server core); 1,000 flows 64 at a time after 6 one at a time; then the same
on a database seeded with 100,000 conversations and 100,000 invoices (RSS, one flow's latency).

Quick mode (``make bench-quick``, used by the test suite): one 2 s run of each ingest scenario
at 16 connections, no warm-up; wrk if installed, else the small Python generator; 2 + 4 flows
and a 3,000-row seed. Writes ``bench/results/quick.json`` (not tracked by git).
Timings are never asserted anywhere.

Exit status: 0 when everything ran and the durability checks passed, 1 when a durability
check failed (a webhook answered 200 but not stored, a flow lost or a message duplicated), 2
when a scenario could not run at all.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from invoiceiq.eventloop import LoopUnavailable

from . import bodies as bodies_mod
from . import durability, scenarios, servers, wrk
from .servers import Pinning, Proc, Processes

RESULTS = Path(__file__).resolve().parent / "results"
ALL_SCENARIOS = ("reference", "ingest_customer_text", "ingest_merchant_invoice", "end_to_end", "state_at_scale")
PACKAGES = ("invoiceiq", "quart", "hypercorn", "werkzeug", "flask", "orjson", "anyio", "httpx", "h11",
            "databases", "sqlalchemy", "aiosqlite", "prometheus-client", "uvloop", "py-spy")
TARGETS = {"ingest_customer_ratio_min": 0.80, "ingest_p99_ms_max": 50.0}
# wrk's default (2 s) drops slower answers from the latency figures (they become "timeouts");
# with 10 s a slow daemon shows its real p99 instead of a capped one.
WRK_TIMEOUT_S = 10.0


# -- load generation -----------------------------------------------------------------------------


class Load:
    def __init__(self, generator: str, pin: Pinning, connections: int, threads: int = 1) -> None:
        self.generator = generator
        self.pin = pin
        self.connections = connections
        self.threads = threads
        self.exe = wrk.find_wrk() if generator == "wrk" else None

    def command(self, url: str, bodies: Path, duration_s: float, latency: bool) -> list[str]:
        if self.generator == "wrk":
            assert self.exe is not None
            return wrk.command(self.exe, url, bodies, threads=self.threads, connections=self.connections,
                               duration_s=duration_s, latency=latency, pin=self.pin.load, timeout_s=WRK_TIMEOUT_S)
        cmd = [sys.executable, "-m", "bench.pyload", url, str(bodies), "--connections", str(self.connections),
               "--duration", str(duration_s)]
        return self.pin.wrap(cmd, "load")

    def run(self, label: str, url: str, bodies: Path, duration_s: float, latency: bool = True,
            during: Any = None, server_pid: int | None = None) -> dict[str, Any]:
        cmd = self.command(url, bodies, duration_s, latency)
        env = dict(os.environ, PYTHONPATH=str(servers.REPO))
        cpu = servers.CpuSample(server_pid, self.pin) if server_pid is not None else None
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=servers.REPO)
        extra = during(proc) if during is not None else None
        try:
            out, err = proc.communicate(timeout=duration_s + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"load generator hung: {shlex.join(cmd)}") from None
        wall = time.monotonic() - started
        cpu_use = cpu.finish() if cpu is not None else None
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed ({proc.returncode}): {shlex.join(cmd)}\n{out}\n{err}")
        if self.generator == "wrk":
            parsed = wrk.parse(out).as_dict()
            raw = out
        else:
            parsed = json.loads(out)
            parsed.update(ok_2xx=parsed["requests"] - parsed["non_2xx_3xx"],
                          p50_ms=parsed["percentiles_ms"].get("50"), p99_ms=parsed["percentiles_ms"].get("99"),
                          repeated_bodies=max(0, parsed["sent"] - parsed["bodies"]))
            raw = None
        record = {"label": label, "generator": self.generator, "command": shlex.join(cmd),
                  "connections": self.connections, "duration_s": duration_s, "wall_s": round(wall, 2), **parsed}
        if cpu_use is not None:
            record["cpu"] = cpu_use
            if cpu_use.get("server_cpu_pct"):
                # Requests per second of server CPU: less sensitive to other processes taking
                # part of the server's core (see cpu.other_on_server_cpu_pct).
                record["rps_per_server_cpu_s"] = round(record["rps"] / (cpu_use["server_cpu_pct"] / 100.0), 1)
        if raw is not None:
            record["wrk_output"] = raw
        if err.strip():
            record["stderr"] = err.strip()[-2000:]
        if extra is not None:
            record.update(extra() if callable(extra) else extra)
        return record


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"rps": _median(runs, "rps"), "p50_ms": _median(runs, "p50_ms"), "p99_ms": _median(runs, "p99_ms"),
            "rps_per_server_cpu_s": _median(runs, "rps_per_server_cpu_s"),
            "server_cpu_pct": _median([r.get("cpu", {}) for r in runs], "server_cpu_pct"),
            "runs_rps": [round(r["rps"], 1) for r in runs]}


# -- the harness ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.duration = args.duration
        self.warmup = args.warmup
        self.runs = args.runs
        self.connections = args.connections
        self.pin = Pinning.detect(not args.no_pin)
        self.generator = args.generator
        self.workdir = Path(tempfile.mkdtemp(prefix="invoiceiq-bench-"))
        self.procs = Processes(self.workdir)
        self.load = Load(self.generator, self.pin, self.connections)
        self.profile_dir: Path | None = Path(args.profile_dir).resolve() if args.profile_dir else None

    # -- reference ---------------------------------------------------------------------------

    def reference(self) -> dict[str, Any]:
        count = 5_000 if self.quick else 20_000
        files = {label: bodies_mod.write_bodies(self.workdir / f"ref-{label}.tsv", "reference",
                                                scenario="reference", label=label, count=count)
                 for label in self._labels()}
        proc, port = servers.start_reference(self.procs, self.pin)
        url = f"http://127.0.0.1:{port}/json"
        try:
            warm, runs = self._series(url, files, proc.worker_pid())
        finally:
            code = proc.stop()
        return {"description": "bare Quart JSON-POST on hypercorn (bench/reference_app.py): reads the body, "
                               "orjson.loads it, returns a small JSON; no database (notes/stack.md case c); "
                               "posted the same webhook bodies as the daemon; on the daemon's event loop",
                "event_loop": servers.reference_loop(),
                "server_command": proc.describe(), "server_exit_code": code, "url": url,
                "body_bytes_mean": bodies_mod.mean_body_bytes(files[self._labels()[-1]].path),
                "warmup": warm, "runs": runs, "median": medians(runs)}

    def _labels(self) -> list[str]:
        return (["warmup"] if self.warmup > 0 else []) + [f"run{i + 1}" for i in range(self.runs)]

    def _series(self, url: str, files: dict[str, bodies_mod.BodySet], server_pid: int, profile: bool = False,
                profile_name: str = "") -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        warm = None
        if self.warmup > 0:
            warm = self.load.run("warmup", url, files["warmup"].path, self.warmup, latency=False,
                                 server_pid=server_pid)
        runs = []
        profile_at = min(1, self.runs - 1)
        for i in range(self.runs):
            label = f"run{i + 1}"
            during = None
            if profile and self.profile_dir is not None and i == profile_at:
                during = self._profiler(server_pid, profile_name)
            runs.append(self.load.run(label, url, files[label].path, self.duration, latency=True, during=during,
                                      server_pid=server_pid))
        return warm, runs

    def _profiler(self, pid: int, name: str) -> Any:
        """Sample the daemon with py-spy during one run (that run is marked ``profiled``)."""
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        pyspy = servers.VENV_BIN / "py-spy"
        exe = str(pyspy) if pyspy.exists() else (shutil.which("py-spy") or "py-spy")
        fmt = self.args.profile_format
        out = self.profile_dir / f"{name}.{ {'raw': 'txt', 'flamegraph': 'svg', 'speedscope': 'json'}[fmt] }"
        cmd = self.pin.wrap([exe, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
                             "--duration", str(int(self.duration)), "--format", fmt, "-o", str(out)], "load")

        def start(_load: subprocess.Popen[str]) -> Any:
            spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            def finish() -> dict[str, Any]:
                try:
                    text, _ = spy.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    text, _ = spy.communicate()
                return {"profiled": True, "profile": {"command": shlex.join(cmd), "output": str(out),
                                                      "exit_code": spy.returncode, "log": text[-500:]}}
            return finish

        return start

    # -- ingest --------------------------------------------------------------------------------

    def ingest(self, sc: scenarios.IngestScenario, ref_rps_max: float) -> dict[str, Any]:
        # Enough unique bodies per invocation that none repeats unless the daemon runs at more
        # than 1.5x the reference's best rate (then `repeated_bodies` says so and the check fails).
        cap = max(ref_rps_max, 1000.0) * 1.5
        files: dict[str, bodies_mod.BodySet] = {}
        first = 0
        for label in self._labels():
            seconds = self.warmup if label == "warmup" else self.duration
            n = max(5_000, int(cap * seconds) + 4 * self.connections)
            files[label] = bodies_mod.write_bodies(self.workdir / f"{sc.name}-{label}.tsv", sc.body_kind,
                                                   scenario=sc.name, label=label, count=n, first_index=first)
            first += n
        sink, sink_port = servers.start_sink(self.procs, self.pin, name=f"{sc.name}-sink")
        daemon: Proc | None = None
        try:
            daemon, port, db = servers.start_daemon(self.procs, self.pin, sc.name, self.workdir, sink_port,
                                                    **sc.daemon_env)
            base = f"http://127.0.0.1:{port}"
            rss_start = servers.rss_kb(daemon.worker_pid())
            writer_start = durability.writer_counts(servers.get_text(f"{base}/metrics"))
            warm, runs = self._series(f"{base}/whatsapp/webhook", files, daemon.worker_pid(), profile=True,
                                      profile_name=sc.name)
            rss_runs = servers.rss_kb(daemon.worker_pid())
            writer_end = durability.writer_counts(servers.get_text(f"{base}/metrics"))
            settled = durability.settle(db, timeout_s=self.args.settle_timeout)
            metrics_text = servers.get_text(f"{base}/metrics")
            sink_stats = json.loads(servers.get_text(f"http://127.0.0.1:{sink_port}/_stats"))
            rss_end = servers.rss_kb(daemon.worker_pid())
        finally:
            daemon_code = daemon.stop() if daemon is not None else None
            sink.stop()
        stored = durability.count(db, [f.id_prefix for f in files.values()])
        everything = ([warm] if warm else []) + runs
        check = durability.verdict(
            ok_2xx=sum(r["ok_2xx"] for r in everything), non_2xx=sum(r["non_2xx_3xx"] for r in everything),
            sent=sum(r["sent"] for r in everything), repeated=sum(r["repeated_bodies"] for r in everything),
            timeouts=sum(r["socket_errors"].get("timeout", 0) for r in everything), stored=stored,
            metrics=durability.message_metrics(metrics_text), invocations=len(everything),
            connections=self.connections)
        flow = self._flow_checks(sc, stored, sink_stats, settled)
        return {"description": sc.description, "server_command": daemon.describe() if daemon else None,
                "daemon_env_extra": sc.daemon_env, "server_exit_code": daemon_code,
                "sink_command": sink.describe(), "url": f"{base}/whatsapp/webhook",
                "body_bytes_mean": bodies_mod.mean_body_bytes(files[self._labels()[-1]].path),
                "bodies_per_invocation": {k: v.count for k, v in files.items()},
                "warmup": warm, "runs": runs, "median": medians(runs),
                "durability": check, "settle": settled, "database": stored, "sink": sink_stats, "flow_checks": flow,
                "daemon_rss_kb": {"after_start": rss_start, "after_runs": rss_runs, "after_settle": rss_end},
                # Group commit at work during the warm-up and the runs: jobs per fsync.
                "writer_during_runs": durability.writer_delta(writer_start, writer_end)}

    @staticmethod
    def _flow_checks(sc: scenarios.IngestScenario, stored: dict[str, Any], sink: dict[str, Any],
                     settled: dict[str, Any]) -> dict[str, Any]:
        """After the actors settled: what the stored webhooks led to, counted in the DB and at the sink."""
        if not settled["settled"]:
            return {"checked": False, "reason": f"backlog not worked off within the settle timeout: "
                                                f"{settled['backlog_left']}"}
        problems = []
        if stored["inbox_processed"] != stored["inbox_whatsapp_rows"]:
            problems.append("inbox rows left unprocessed")
        sent_at_sink = sink["graph_messages"] + sink["sms_messages"]
        if sent_at_sink != stored["outbox_sent_or_later"]:
            problems.append(f"sink received {sent_at_sink} messages, outbox marks {stored['outbox_sent_or_later']} sent")
        if sink["identical_bodies_repeated"]:
            problems.append(f"sink received {sink['identical_bodies_repeated']} identical messages twice")
        if sc.body_kind == "merchant_invoice":
            if stored["invoices"] != stored["inbox_whatsapp_rows"]:
                problems.append(f"{stored['inbox_whatsapp_rows']} one-line invoices stored, {stored['invoices']} invoices created")
            invoice_rows = sum(v for k, v in stored["outbox_by_kind_status"].items() if k.startswith("invoice:"))
            if invoice_rows != stored["invoices"]:
                problems.append(f"{stored['invoices']} invoices, {invoice_rows} invoice outbox rows")
        return {"checked": True, "ok": not problems, "problems": problems, "sent_at_sink": sent_at_sink}


    # -- end to end and state at scale -------------------------------------------------------

    def e2e_plans(self) -> tuple[scenarios.EndToEndPlan, scenarios.StateAtScalePlan]:
        a = self.args
        e2e_plan = scenarios.EndToEndPlan(
            flows=a.e2e_flows, provider_latency_ms=a.e2e_latency_ms, concurrency=a.e2e_concurrency,
            rate_per_min=a.e2e_rate,
            callback_delay_ms=a.e2e_callback_delay_ms, status_delay_ms=a.e2e_status_delay_ms,
            sim_deliveries=a.e2e_sim_deliveries,
            single_flows=a.e2e_single, budget_s=a.e2e_budget,
            flow_timeout_s=60.0 if self.quick else 300.0, settle_timeout_s=20.0 if self.quick else 120.0)
        scale_plan = scenarios.StateAtScalePlan(
            conversations=a.scale_rows, invoices=a.scale_rows, outbox_history=a.scale_history == "on",
            flows_after_start=a.scale_flows,
            concurrency=a.e2e_concurrency, single_flows=a.e2e_single, budget_s=a.e2e_budget)
        return e2e_plan, scale_plan

    def flows(self, wanted: list[str], report: dict[str, Any], status: int) -> int:
        """The end-to-end and state-at-scale scenarios; returns the updated exit status."""
        e2e_plan, scale_plan = self.e2e_plans()
        ctx = scenarios.Context(self.procs, self.pin, self.workdir, self.profile_dir, self.args.profile_format)
        prep = None
        both = "end_to_end" in wanted and "state_at_scale" in wanted
        if self.quick and both:
            # Quick mode: the seeded stack starts up while the end-to-end flows run (its figures
            # are not meant to be clean; the full mode runs everything one after the other).
            try:
                prep = scenarios.prepare_state_at_scale(scale_plan, e2e_plan, ctx, spawn=True)
            except Exception as exc:  # noqa: BLE001
                report["scenarios"]["state_at_scale"] = {"error": f"{type(exc).__name__}: {exc}"}
                status = 2
                wanted = [w for w in wanted if w != "state_at_scale"]
        baseline = None
        for name in ("end_to_end", "state_at_scale"):
            if name not in wanted:
                continue
            if name == "end_to_end":
                pace = scenarios.pace(e2e_plan.concurrency, e2e_plan.rate_per_min)
                print(f"end_to_end: {e2e_plan.single_flows} + {e2e_plan.flows} flows, {pace}, "
                      f"{e2e_plan.provider_latency_ms} ms provider latency ...", file=sys.stderr, flush=True)
            else:
                print(f"state_at_scale: {scale_plan.conversations:,} conversations + {scale_plan.invoices:,} "
                      f"invoices, {scale_plan.flows_after_start} flows ...", file=sys.stderr, flush=True)
            try:
                if name == "end_to_end":
                    result = scenarios.end_to_end(e2e_plan, ctx)
                    baseline = result
                else:
                    result = scenarios.state_at_scale(scale_plan, e2e_plan, ctx, baseline=baseline, prep=prep)
            except Exception as exc:  # noqa: BLE001
                report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                status = 2
                continue
            report["scenarios"][name] = result
            if not result["checks"]["ok"] and status == 0:
                status = 1
        return status


# -- report --------------------------------------------------------------------------------------


def _versions(generator: str, invoiceiq_path: Path) -> dict[str, Any]:
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    exe = wrk.find_wrk()
    return {"python": platform.python_version(), "implementation": platform.python_implementation(),
            "packages": packages, "wrk": wrk.wrk_version(exe) if exe else None, "generator": generator,
            # The daemon's (server.event_loop "auto") and the reference's.
            "event_loop": servers.reference_loop(),
            # The code the daemons ran (checked against this checkout at start-up).
            "invoiceiq_path": str(invoiceiq_path)}


def _machine(pin: Pinning) -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpus_usable": list(pin.cpus), "cpu_model": model,
            "platform": platform.platform(), "hostname": platform.node(),
            "pinning": {"server_cpu": pin.server, "load_cpu": pin.load} if pin.server is not None else None}


def _git() -> dict[str, Any]:
    def run(*a: str) -> str | None:
        try:
            out = subprocess.run(["git", *a], capture_output=True, text=True, cwd=servers.REPO, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _cpu_note(run: dict[str, Any]) -> str:
    cpu = run.get("cpu") or {}
    if "server_cpu_pct" not in cpu:
        return ""
    parts = [f"daemon CPU {cpu['server_cpu_pct']:.0f}%"]
    if "other_on_server_cpu_pct" in cpu:
        parts.append(f"others on its core {cpu['other_on_server_cpu_pct']:.0f}%")
    if "sim_cpu_pct" in cpu:
        parts.append(f"simulators {cpu['sim_cpu_pct']:.0f}% + driver {cpu.get('driver_cpu_pct', 0):.0f}%"
                     f" + others {cpu.get('other_on_load_cpu_pct', 0):.0f}% on the load core")
    per_flow = run.get("cpu_ms_per_flow") or {}
    if per_flow:
        shown = [f"{who} {per_flow[who]:.0f} ms" for who in ("daemon", "simulators", "driver") if who in per_flow]
        if "daemon_loop_thread" in per_flow and shown:
            shown[0] += (f" (event loop {per_flow['daemon_loop_thread']:.0f}"
                         f" + other threads {per_flow['daemon_other_threads']:.0f})")
        parts.append("CPU per flow " + ", ".join(shown))
    writes = run.get("writes_per_flow") or {}
    if writes:
        parts.append(f"{writes['commits']:g} commits and {writes['jobs']:g} write jobs per flow")
    return "; " + ", ".join(parts)


def _flow_lines(report: dict[str, Any]) -> list[str]:
    """One line each for end_to_end and state_at_scale."""
    lines = []
    e = report["scenarios"].get("end_to_end") or {}
    if "run" in e:
        run, plan, ch = e["run"], e["plan"], e["checks"]
        lat = run.get("latency_ms") or {}
        db = ch["in_database"]
        sims = ch["at_simulators"]
        lines.append(
            f"end_to_end: {run['completed']:,}/{run['flows']:,} flows ({run.get('not_started', 0)} not started), "
            f"{scenarios.pace(plan['concurrency'], plan.get('rate_per_min'))}, "
            f"{plan['provider_latency_ms']} ms per provider call: "
            f"{_fmt(run.get('flows_per_minute'))} flows/min (target {plan['target_flows_per_minute']:,}), "
            f"p50 {_fmt(lat.get('p50'), 0)} ms, p99 {_fmt(lat.get('p99'), 0)} ms (target < "
            f"{e['targets']['p99_ms_max']:,} ms); one flow alone {_fmt(e['single'].get('latency_ms_median'), 0)} ms; "
            f"checks {'ok' if ch['ok'] else 'FAILED'} ({db['invoices_by_status'].get('PAID', 0):,} PAID, "
            f"{sims['stk_pushes_accepted']:,} STK pushes, {sims['receipts']['total']:,} receipts, "
            f"{sims['identical_sends_repeated']} duplicates)" + _cpu_note(run))
    s = report["scenarios"].get("state_at_scale") or {}
    if "one_flow" in s:
        rss, one = s["daemon_rss"], s["one_flow"]
        empty_rss = (rss.get("empty_db_after_start") or {}).get("rss_mb")
        run = s["run"]
        lines.append(
            f"state_at_scale: {s['seed']['conversations']:,} conversations + {s['seed']['invoices']:,} invoices: "
            f"RSS {_fmt(rss['after_start'].get('rss_mb'))} MB after start (empty DB {_fmt(empty_rss)} MB), "
            f"{_fmt(rss['after_flows'].get('rss_mb'))} MB after {run['completed']:,} flows "
            f"({_fmt(run.get('flows_per_minute'))}/min), peak {_fmt(rss['peak_mb'])} MB (target < "
            f"{s['targets']['rss_mb_max']:g}); one flow {_fmt(one['seeded_median_ms'], 0)} ms vs "
            f"{_fmt(one['empty_median_ms'], 0)} ms empty (x{_fmt(one['ratio'], 2)}); checks "
            f"{'ok' if s['checks']['ok'] else 'FAILED'}" + _cpu_note(run))
    return lines


def table(report: dict[str, Any]) -> str:
    rows = [("scenario", "req/s", "runs req/s", "p50 ms", "p99 ms", "ratio", "srv CPU", "req/CPU-s", "ratio/CPU",
             "stored / 200s")]
    for name, sc in report["scenarios"].items():
        if "median" not in sc:
            continue
        med = sc["median"]
        d = sc.get("durability")
        is_ref = name == "reference"
        ratio = "1.00" if is_ref else _fmt(report["ratios"].get(name), 2)
        ratio_cpu = "1.00" if is_ref else _fmt(report["ratios_per_server_cpu"].get(name), 2)
        rows.append((name, _fmt(med["rps"], 0), " / ".join(f"{x:,.0f}" for x in med["runs_rps"]),
                     _fmt(med["p50_ms"]), _fmt(med["p99_ms"]), ratio,
                     "-" if med.get("server_cpu_pct") is None else f"{med['server_cpu_pct']:.0f}%",
                     _fmt(med.get("rps_per_server_cpu_s"), 0), ratio_cpu,
                     f"{d['stored_inbox_rows']:,} / {d['accepted_2xx']:,} {'ok' if d['ok'] else 'FAIL'}" if d else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = report["settings"]
    pinning = report["machine"]["pinning"]
    pins = f"server->cpu{pinning['server_cpu']} load->cpu{pinning['load_cpu']}" if pinning else "off"
    warm = f" after a {s['warmup_s']:g}s warm-up" if s["warmup_s"] else ""
    head = (f"InvoiceIQ bench ({report['mode']}): generator {report['versions']['generator']}, "
            f"{s['connections']} connections, {s['runs']} x {s['duration_s']:g}s{warm}, "
            f"{report['machine']['cpu_count']} CPUs, pinning {pins}")
    tail = _flow_lines(report)
    for name, sc in report["scenarios"].items():
        for p in (sc.get("checks") or {}).get("problems", []):
            tail.append(f"{name}: {p}")
        if sc.get("status") == "not_implemented":
            tail.append(f"{name}: not implemented yet ({sc['reason']})")
        elif sc.get("error"):
            tail.append(f"{name}: ERROR {sc['error'].splitlines()[0]}")
        for p in (sc.get("durability") or {}).get("problems", []):
            tail.append(f"{name}: {p}")
        fc = sc.get("flow_checks") or {}
        for p in fc.get("problems", []):
            tail.append(f"{name}: {p}")
        if fc and not fc.get("checked", True):
            tail.append(f"{name}: flow not checked: {fc['reason']}")
    noisy = [(name, r["label"], r["cpu"]["other_on_server_cpu_pct"])
             for name, sc in report["scenarios"].items() for r in sc.get("runs", [])
             if (r.get("cpu") or {}).get("other_on_server_cpu_pct", 0) > 10]
    noisy += [(name, "flows", sc["run"]["cpu"]["other_on_server_cpu_pct"])
              for name, sc in report["scenarios"].items()
              if ((sc.get("run") or {}).get("cpu") or {}).get("other_on_server_cpu_pct", 0) > 10]
    if noisy:
        tail.append("warning: other processes took part of the server's CPU during "
                    + ", ".join(f"{n}/{label} ({pct:.0f}%)" for n, label, pct in noisy)
                    + "; those figures are low (see req/CPU-s)")
    t = report.get("targets") or {}
    if t:
        tail.append("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in t.get("met", {}).items()))
    return "\n".join([head, *lines, *tail])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one short run of each scenario (a few seconds)")
    p.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator (auto: wrk when installed, else the Python one)")
    p.add_argument("--duration", type=float, help="seconds per measured run (10; quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up, discarded (3; quick 0)")
    p.add_argument("--runs", type=int, help="measured runs per scenario (3; quick 1)")
    p.add_argument("--connections", type=int, help="concurrent connections (64; quick 16)")
    p.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                   help="comma-separated subset; the reference runs whenever an ingest scenario does")
    p.add_argument("--e2e-flows", type=int, help="end_to_end: flows run concurrently (1000; quick 4)")
    p.add_argument("--e2e-concurrency", type=int, help="end_to_end/state_at_scale: flows at a time (64; quick 4)")
    p.add_argument("--e2e-rate", type=float, default=None,
                   help="end_to_end only: start this many flows a minute, however many are still running"
                        " (an open loop: the latency at that load), instead of --e2e-concurrency at a time")
    p.add_argument("--e2e-single", type=int, help="flows run one at a time first, the first a warm-up (6; quick 2)")
    p.add_argument("--e2e-latency-ms", type=int, default=200, help="added to every provider API answer (200)")
    p.add_argument("--e2e-callback-delay-ms", type=int, help="STK callback delay after the PIN (= latency)")
    p.add_argument("--e2e-status-delay-ms", type=int, default=50, help="status webhooks after a send (50)")
    p.add_argument("--e2e-sim-deliveries", type=int, default=64,
                   help="webhooks/callbacks the simulators post at once (64)")
    p.add_argument("--e2e-budget", type=float, help="seconds after which no new flow starts (900; quick 30)")
    p.add_argument("--scale-rows", type=int, help="state_at_scale: conversations and invoices seeded (100000; quick 3000)")
    p.add_argument("--scale-history", choices=("on", "off"), default="on",
                   help="state_at_scale: also seed the finished outbox rows the invoices left (on)")
    p.add_argument("--scale-flows", type=int, help="state_at_scale: flows before the second RSS (1000; quick 2)")
    p.add_argument("--settle-timeout", type=float, help="seconds to wait for the actors' backlog (180; quick 3)")
    p.add_argument("--output", help="JSON path (bench/results/latest.json; quick: quick.json)")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument("--profile-dir", help="record the daemon with py-spy during one measured run per scenario")
    p.add_argument("--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (bodies, databases, logs)")
    p.add_argument("--event-loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                   help="the daemon's server.event_loop; the reference runs on the same loop")
    a = p.parse_args(argv)
    full = {"duration": 10.0, "warmup": 3.0, "runs": 3, "connections": 64, "settle_timeout": 180.0,
            "e2e_flows": 1000, "e2e_concurrency": 64, "e2e_single": 6, "e2e_budget": 900.0,
            "scale_rows": 100_000, "scale_flows": 1000}
    quick = {"duration": 2.0, "warmup": 0.0, "runs": 1, "connections": 16, "settle_timeout": 3.0,
             "e2e_flows": 4, "e2e_concurrency": 4, "e2e_single": 2, "e2e_budget": 30.0,
             "scale_rows": 3000, "scale_flows": 2}
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.output is None:
        a.output = str(RESULTS / ("quick.json" if a.quick else "latest.json"))
    try:
        servers.set_event_loop(a.event_loop)
    except LoopUnavailable as exc:
        p.error(str(exc))
    if a.generator == "auto":
        a.generator = "wrk" if wrk.find_wrk() else "python"
    elif a.generator == "wrk" and not wrk.find_wrk():
        p.error("wrk is not installed (apt-get install -y wrk), or use --generator python")
    if a.e2e_rate is not None and not a.e2e_rate > 0:
        p.error("--e2e-rate must be a positive number of flows a minute")
    a.invoiceiq_path = servers.daemon_code()  # a subprocess: asked once, recorded in the report
    if a.invoiceiq_path != servers.REPO / "invoiceiq":
        p.error(f"the daemon would run invoiceiq from {a.invoiceiq_path}, not from this checkout"
                f" ({servers.REPO}): its venv was made by another clone; run 'make venv' here")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    bench = Bench(args)
    if bench.pin.load is not None:
        # The harness itself (body generation, polling, counting) stays off the server's core.
        os.sched_setaffinity(0, {int(bench.pin.load)})
    if args.generator == "python" and not args.quick:
        print("warning: wrk not used; the Python generator may be the bottleneck", file=sys.stderr)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    report: dict[str, Any] = {
        "schema": 1, "mode": "quick" if args.quick else "full",
        "started_at": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": [sys.executable, "-m", "bench", *(argv if argv is not None else sys.argv[1:])],
        "machine": _machine(bench.pin), "versions": _versions(args.generator, args.invoiceiq_path), "git": _git(),
        "settings": {"connections": args.connections, "threads": 1, "duration_s": args.duration,
                     "warmup_s": args.warmup, "runs": args.runs, "generator": args.generator,
                     "statistic": "median of the runs, each of req/s, p50 and p99 taken independently"},
        "scenarios": {}, "ratios": {}, "ratios_per_server_cpu": {},
    }
    status = 0
    ingest_wanted = [sc for sc in scenarios.INGEST if sc.name in wanted]
    try:
        ref = None
        if ingest_wanted or "reference" in wanted:
            print(f"reference: {args.runs} x {args.duration:g}s ...", file=sys.stderr, flush=True)
            try:
                ref = bench.reference()
            except Exception as exc:  # noqa: BLE001 - report it and stop: nothing to compare with
                report["scenarios"]["reference"] = {"error": f"{type(exc).__name__}: {exc}"}
                status = 2
                ref = None
        if ref is not None:
            report["scenarios"]["reference"] = ref
            ref_max = max(r["rps"] for r in ref["runs"])
            for sc in ingest_wanted:
                print(f"{sc.name}: {args.runs} x {args.duration:g}s ...", file=sys.stderr, flush=True)
                try:
                    result = bench.ingest(sc, ref_max)
                except Exception as exc:  # noqa: BLE001
                    report["scenarios"][sc.name] = {"error": f"{type(exc).__name__}: {exc}"}
                    status = 2
                    continue
                report["scenarios"][sc.name] = result
                if ref["median"]["rps"]:
                    report["ratios"][sc.name] = round(result["median"]["rps"] / ref["median"]["rps"], 3)
                if ref["median"].get("rps_per_server_cpu_s") and result["median"].get("rps_per_server_cpu_s"):
                    report["ratios_per_server_cpu"][sc.name] = round(
                        result["median"]["rps_per_server_cpu_s"] / ref["median"]["rps_per_server_cpu_s"], 3)
                if not result["durability"]["ok"] and status == 0:
                    status = 1
        status = bench.flows(wanted, report, status)
    finally:
        bench.procs.stop_all()
        if args.keep:
            report["workdir"] = str(bench.workdir)
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    cust = report["scenarios"].get("ingest_customer_text", {})
    met: dict[str, bool] = {}
    if "ingest_customer_text" in report["ratios"]:
        met["customer_ingest_ratio>=0.80"] = report["ratios"]["ingest_customer_text"] >= TARGETS["ingest_customer_ratio_min"]
    for name in ("ingest_customer_text", "ingest_merchant_invoice"):
        p99 = (report["scenarios"].get(name, {}).get("median") or {}).get("p99_ms")
        if p99 is not None:
            met[f"{name}_p99<50ms"] = p99 < TARGETS["ingest_p99_ms_max"]
    if cust.get("durability"):
        met["no_webhook_lost_or_duplicated"] = all(
            report["scenarios"][n]["durability"]["ok"] for n in report["ratios"])
    targets: dict[str, Any] = dict(TARGETS)
    for name in ("end_to_end", "state_at_scale"):
        sc_targets = (report["scenarios"].get(name) or {}).get("targets")
        if sc_targets:
            targets.update({f"{name}_{k}": v for k, v in sc_targets.items() if k != "met"})
            met.update({f"{name}_{k}": v for k, v in sc_targets["met"].items()})
    report["targets"] = {**targets, "met": met}
    report["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report["elapsed_s"] = round(time.time() - started, 1)
    report["exit_status"] = status
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(table(report))
    print(f"wrote {out}")
    return status
