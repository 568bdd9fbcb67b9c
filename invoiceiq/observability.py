"""Structured logs and metrics.

Logs are one JSON object per line on stdout: ``time``, ``level``, ``event`` and context
fields. Two rules hold for every line, whoever writes it:

* secrets and message bodies never appear: context keys that name them are replaced;
* phone numbers are masked to their last three digits, wherever they appear in a value.

Metrics live in a per-daemon ``CollectorRegistry`` (not the global one) so that tests can
run several daemons in one process.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

# Kenyan mobile numbers in any of the forms people type; masked wherever they occur.
_PHONE_RE = re.compile(r"(?<!\d)(?:\+?254|0)?[17]\d{8}(?!\d)")
_SECRET_KEYS = frozenset(
    {"token", "secret", "password", "passkey", "api_key", "apikey", "authorization",
     "app_secret", "consumer_key", "consumer_secret", "access_token", "verify_token"}
)
# Message content is personal data: it is stored (and pruned), never logged.
_BODY_KEYS = frozenset({"body", "text", "message", "payload", "content", "description", "name"})


def mask_phone(value: str) -> str:
    """``254712345678`` -> ``*********678``: enough to tell two numbers apart in a log."""
    digits = re.sub(r"\D", "", value)
    if len(digits) <= 3:
        return "*" * len(digits)
    return "*" * (len(digits) - 3) + digits[-3:]


def scrub(value: Any) -> Any:
    """Mask every phone number inside ``value`` (strings, lists, dicts)."""
    if isinstance(value, str):
        return _PHONE_RE.sub(lambda m: mask_phone(m.group(0)), value)
    if isinstance(value, Mapping):
        return {str(k): _clean_field(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    return value


def _clean_field(key: str, value: Any) -> Any:
    lowered = key.lower()
    if lowered in _SECRET_KEYS or lowered.endswith(("_token", "_secret", "_key", "password")):
        return "***" if value else ""
    if lowered in _BODY_KEYS:
        return f"<{len(value)} chars>" if isinstance(value, str) else "<redacted>"
    return scrub(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or scrub(record.getMessage()),
        }
        context = getattr(record, "context", None)
        if context:
            for key, value in context.items():
                line[key] = _clean_field(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            # Exception text may quote request data: scrub it like any other value.
            line["error"] = scrub(f"{record.exc_info[0].__name__}: {record.exc_info[1]}")
            line["traceback"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


class EventLogger:
    """``log.info("invoice_created", invoice_id="1042", msisdn="2547…")``."""

    __slots__ = ("_logger",)

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, exc: bool, context: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level, event, exc_info=exc, extra={"event": event, "context": context},
                stacklevel=3,
            )

    def debug(self, event: str, **context: Any) -> None:
        self._log(logging.DEBUG, event, False, context)

    def info(self, event: str, **context: Any) -> None:
        self._log(logging.INFO, event, False, context)

    def warning(self, event: str, **context: Any) -> None:
        self._log(logging.WARNING, event, False, context)

    def error(self, event: str, **context: Any) -> None:
        self._log(logging.ERROR, event, False, context)

    def exception(self, event: str, **context: Any) -> None:
        self._log(logging.ERROR, event, True, context)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure_logging(level: str = "info", stream: Any = None) -> None:
    """Route every logger (ours, hypercorn's, quart's) through the JSON formatter."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # hypercorn's access log would print full URLs (pay tokens, callback secrets): keep it off.
    for noisy in ("hypercorn.access", "httpx", "httpcore", "databases", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Latency buckets for HTTP and time-to-pay: the former in seconds from 1 ms, the latter in minutes.
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_PAY_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600)


class Metrics:
    """Every metric the daemon exports (brief section 14 and the operations issue)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.invoices_created = Counter(
            "invoiceiq_invoices_created", "Invoices created (m_invoices_created)", registry=r)
        self.invoices_sent = Counter(
            "invoiceiq_invoices_sent", "Invoices accepted by a provider (m_invoices_sent)", registry=r)
        self.invoices_paid = Counter(
            "invoiceiq_invoices_paid", "Invoices paid (m_invoices_paid)", registry=r)
        self.conversion_ratio = Gauge(
            "invoiceiq_conversion_ratio", "Paid invoices / sent invoices", registry=r)
        self.time_to_pay = Histogram(
            "invoiceiq_time_to_pay_seconds", "Payment time minus invoice sent time",
            buckets=_PAY_BUCKETS, registry=r)
        self.messages = Counter(
            "invoiceiq_messages", "Messages by channel, direction and event",
            ["channel", "direction", "event"], registry=r)
        self.stk_requests = Counter(
            "invoiceiq_stk_requests", "STK Push requests by result", ["result"], registry=r)
        self.outbox_pending = Gauge(
            "invoiceiq_outbox_pending", "Outbox rows not yet accepted by a provider", registry=r)
        self.webhook_rejected = Counter(
            "invoiceiq_webhook_rejected", "Inbound requests refused, by reason", ["reason"], registry=r)
        self.http_latency = Histogram(
            "invoiceiq_http_request_duration_seconds", "HTTP request latency by route",
            ["route", "method"], buckets=_HTTP_BUCKETS, registry=r)
        self.actor_restarts = Counter(
            "invoiceiq_actor_restarts", "Supervised actor restarts after a crash", ["actor"], registry=r)
        # A pass finds due timers and stored work whose kick was lost; if it stops moving, nothing
        # due fires any more (nudges, closes, M-PESA status queries and expiries).
        self.scheduler_sweeps = Counter(
            "invoiceiq_scheduler_sweeps", "Scheduler passes over the database for due work", registry=r)

    def set_totals(self, created: int, sent: int, paid: int) -> None:
        """Start the counters from the database so that a restart does not reset them."""
        for counter, value in ((self.invoices_created, created), (self.invoices_sent, sent),
                               (self.invoices_paid, paid)):
            current = counter._value.get()  # prometheus_client has no public setter for counters
            if value > current:
                counter.inc(value - current)
        self.update_conversion()

    def update_conversion(self) -> None:
        sent = self.invoices_sent._value.get()
        self.conversion_ratio.set(self.invoices_paid._value.get() / sent if sent else 0)

    def watch_writer(self, stats: Callable[[], tuple[int, int] | None]) -> None:
        """Export the SQLite writer's (groups, jobs) committed, read at scrape time: jobs per
        group is the group commit at work (near 1 under load means one fsync per webhook)."""
        self.registry.register(_WriterCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WriterCollector:
    def __init__(self, stats: Callable[[], tuple[int, int] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # PostgreSQL: no single writer
            return
        groups, jobs = stats
        yield CounterMetricFamily("invoiceiq_db_write_groups", "SQLite write groups committed (one fsync each)",
                                  value=groups)
        yield CounterMetricFamily("invoiceiq_db_write_jobs", "Write jobs committed in those groups", value=jobs)
