"""`make bench-quick` runs and writes its JSON (issue 8). Timings are never asserted here.

The quick benchmark starts the reference server, a fake provider sink and two real daemons as
subprocesses on loopback, so it takes some seconds; it uses wrk when installed and otherwise
the small Python generator (the JSON says which).
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
    assert QUICK_JSON.exists() and QUICK_JSON.stat().st_mtime >= started - 1
    report = json.loads(QUICK_JSON.read_text())

    assert report["mode"] == "quick"
    assert report["exit_status"] == 0
    for key in ("machine", "versions", "settings", "scenarios", "ratios", "targets", "started_at", "elapsed_s"):
        assert key in report, key
    assert report["machine"]["cpu_count"] >= 1
    assert report["versions"]["python"]
    assert report["versions"]["packages"]["quart"] and report["versions"]["packages"]["hypercorn"]
    assert report["versions"]["generator"] in ("wrk", "python")
    assert report["settings"]["generator"] == report["versions"]["generator"]

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

    for hook in ("end_to_end", "state_at_scale"):
        assert report["scenarios"][hook]["status"] == "not_implemented"


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
