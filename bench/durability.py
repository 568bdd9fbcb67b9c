"""What the daemon stored, counted in its SQLite file, against what the load generator saw.

The rule checked (issue 8): every webhook answered 200 is in the inbox, and nothing is there
twice. With a closed-loop generator cut off after its duration, up to ``connections`` requests
per invocation were sent but their answers never read: the daemon may have stored them (it
does: the write is not cancelled once queued), so the exact expectation is

    2xx seen  <=  inbox rows  <=  bodies sent,   and every stored id is one we generated,

with ``repeated bodies == 0`` (no id was sent twice) and the daemon's own duplicate counter 0.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path
from typing import Any


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _val(conn: sqlite3.Connection, sql: str, *params: Any) -> int:
    row = conn.execute(sql, params).fetchone()
    return int(row[0] or 0) if row else 0


def backlog(db: Path) -> dict[str, int]:
    with _connect(db) as conn:
        return {
            "inbox_unprocessed": _val(conn, "SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL"),
            "outbox_pending": _val(conn, "SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING')"),
        }


def settle(db: Path, timeout_s: float) -> dict[str, Any]:
    """Wait until the actors have worked off what the runs queued (or time runs out)."""
    started = time.monotonic()
    first = left = backlog(db)
    while (left["inbox_unprocessed"] or left["outbox_pending"]) and time.monotonic() - started < timeout_s:
        time.sleep(0.25)
        left = backlog(db)
    return {"settled": not (left["inbox_unprocessed"] or left["outbox_pending"]),
            "seconds": round(time.monotonic() - started, 2), "backlog_at_end_of_runs": first,
            "backlog_left": left}


def count(db: Path, id_prefixes: list[str]) -> dict[str, Any]:
    with _connect(db) as conn:
        inbox_rows = _val(conn, "SELECT COUNT(*) FROM inbox WHERE source = 'whatsapp'")
        distinct_ids = _val(conn, "SELECT COUNT(DISTINCT event_id) FROM inbox WHERE source = 'whatsapp'")
        ours = sum(_val(conn, "SELECT COUNT(*) FROM inbox WHERE source = 'whatsapp' AND event_id >= ? AND event_id < ?",
                        p, p + "\uffff") for p in id_prefixes)
        outbox_by = dict(conn.execute("SELECT kind || ':' || status, COUNT(*) FROM outbox GROUP BY 1").fetchall())
        return {
            "inbox_whatsapp_rows": inbox_rows,
            "inbox_distinct_event_ids": distinct_ids,
            "inbox_rows_with_generated_ids": ours,
            "inbox_processed": _val(conn, "SELECT COUNT(*) FROM inbox WHERE source = 'whatsapp' AND processed_at_ms IS NOT NULL"),
            "message_log_in": _val(conn, "SELECT COUNT(*) FROM message_log WHERE direction = 'IN'"),
            "invoices": _val(conn, "SELECT COUNT(*) FROM invoices"),
            "invoices_by_status": dict(conn.execute("SELECT status, COUNT(*) FROM invoices GROUP BY status").fetchall()),
            "conversations": _val(conn, "SELECT COUNT(*) FROM conversations"),
            "customers": _val(conn, "SELECT COUNT(*) FROM customers"),
            "outbox_rows": _val(conn, "SELECT COUNT(*) FROM outbox"),
            "outbox_by_kind_status": outbox_by,
            "outbox_sent_or_later": _val(conn, "SELECT COUNT(*) FROM outbox WHERE status IN ('SENT','DELIVERED','READ')"),
        }


_METRIC = re.compile(r'^invoiceiq_messages_total\{([^}]*)\}\s+([0-9.e+]+)$', re.M)


def message_metrics(text: str) -> dict[str, float]:
    """``invoiceiq_messages_total`` by ``channel:direction:event`` from the daemon's /metrics."""
    out: dict[str, float] = {}
    for labels, value in _METRIC.findall(text):
        parts = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[f"{parts.get('channel')}:{parts.get('direction')}:{parts.get('event')}"] = float(value)
    return out


def writer_counts(text: str) -> dict[str, float]:
    """The SQLite writer's committed groups and jobs from the daemon's /metrics."""
    out = {}
    for name in ("groups", "jobs"):
        found = re.search(rf"^invoiceiq_db_write_{name}_total (\S+)$", text, re.M)
        out[name] = float(found.group(1)) if found else 0.0
    return out


def writer_delta(start: dict[str, float], end: dict[str, float]) -> dict[str, Any]:
    """What the writer committed between two ``writer_counts``."""
    groups, jobs = end["groups"] - start["groups"], end["jobs"] - start["jobs"]
    return {"groups": int(groups), "jobs": int(jobs), "jobs_per_group": round(jobs / groups, 1) if groups else None}


def verdict(*, ok_2xx: int, non_2xx: int, sent: int, repeated: int, timeouts: int, stored: dict[str, Any],
            metrics: dict[str, float], invocations: int, connections: int) -> dict[str, Any]:
    rows = stored["inbox_whatsapp_rows"]
    problems = []
    if rows < ok_2xx:
        problems.append(f"LOST: {ok_2xx - rows} webhooks answered 200 are not in the inbox")
    if rows > sent:
        problems.append(f"inbox has {rows - sent} more rows than bodies were sent")
    if stored["inbox_rows_with_generated_ids"] != rows:
        problems.append("inbox holds rows whose ids were not generated by this benchmark")
    if stored["inbox_distinct_event_ids"] != rows:
        problems.append("DUPLICATE event ids in the inbox")
    if repeated:
        problems.append(f"DUPLICATE: {repeated} bodies were sent twice (a bodies file ran out)")
    dup = metrics.get("WHATSAPP:IN:duplicate", 0.0)
    if dup:
        problems.append(f"DUPLICATE: the daemon counted {dup:.0f} duplicate webhooks")
    unanswered = sent - ok_2xx - non_2xx
    extra = rows - ok_2xx
    # Stored but never acknowledged: requests in flight when a wrk run stopped (or timed out).
    bound = invocations * connections + timeouts
    if extra > bound:
        problems.append(f"{extra} rows stored without a 200 seen, more than the {bound} requests that can be in flight")
    return {
        "ok": not problems,
        "problems": problems,
        "accepted_2xx": ok_2xx,
        "non_2xx": non_2xx,
        "bodies_sent": sent,
        "unanswered_at_cutoff": unanswered,
        "stored_inbox_rows": rows,
        "stored_without_200_seen": extra,
        "repeated_bodies": repeated,
        "daemon_duplicate_counter": dup,
        "daemon_inbound_counter": metrics.get("WHATSAPP:IN:inbound"),
    }
