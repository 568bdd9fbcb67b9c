"""Nothing is lost when the process dies: real ``python -m invoiceiq serve`` processes, killed.

The providers are one small HTTP server in this test process (threads on a loopback port):
a Graph API that can be told to answer 500 for a recipient or to answer slowly, a Daraja
with OAuth, STK Push and STK Push Query, and Africa's Talking. The daemon reaches them over
real HTTP through ``INVOICEIQ_*_API_BASE``, exactly as it reaches Meta and Safaricom.

* SIGKILL with a message in backoff after a 500, an STK push without its callback and a
  merchant half-way through the guided flow; then a new process on the same database: the
  message is delivered once, the push is settled by a status query, the flow goes on.
* SIGTERM while a send is held by a slow provider: the send finishes within
  ``server.shutdown_grace_s`` and is recorded SENT, the process exits 0 inside the grace
  period, and the next process does not send it again.
* The same with a slow client holding an HTTP request as well: one deadline for both.
* The M-PESA callback URL a restart must keep answering: a generated secret that Safaricom
  would accept, and a configured ``mpesa.callback_url`` that actually receives callbacks.

Runs on SQLite and, when INVOICEIQ_TEST_POSTGRES_URL is set, on PostgreSQL.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from harness import ADMIN_TOKEN, APP_SECRET, MERCHANT, PHONE_ID, base_env, inbound_text, sign
from invoiceiq.store import Store, Tx, inbox

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ASK_PHONE = "What is the customer's phone number? Use format 2547XXXXXXXX."
ASK_NAME = "Customer name? (Optional) Reply with the name or send '-' to skip."
ASK_AMOUNT = "Amount in KES? (Whole number, e.g., 2500)"
ASK_DESCRIPTION = "Short description of the invoice (3\u2013120 chars)."
ENV_PREFIXES = ("INVOICEIQ_", "WABA_", "MPESA_", "SMS_", "DATABASE_URL", "ADMIN_TOKEN", "MERCHANT_")


# -- the providers -----------------------------------------------------------------------------------


@dataclass
class WaSend:
    to: str
    kind: str
    body: dict[str, Any]
    wamid: str

    @property
    def text(self) -> str:
        if self.kind == "text":
            return str(self.body["text"]["body"])
        if self.kind == "interactive":
            return str(self.body["interactive"]["body"]["text"])
        return json.dumps(self.body.get(self.kind))

    @property
    def template_params(self) -> list[str]:
        if self.kind != "template":
            return []
        return [p.get("text", "") for c in self.body["template"].get("components", [])
                if c.get("type") == "body" for p in c.get("parameters", [])]


@dataclass
class FakeProviders:
    """Graph API (``/graph/v25.0``), Daraja (``/daraja``) and Africa's Talking (``/at``)."""

    wa_fail: set[str] = field(default_factory=set)          # recipients answered HTTP 500 (code 1)
    wa_slow: dict[str, float] = field(default_factory=dict)  # recipient -> seconds before answering
    query_answers: dict[str, int | None] = field(default_factory=dict)  # CheckoutRequestID -> ResultCode
    wa_attempts: list[tuple[str, int]] = field(default_factory=list)    # (to, HTTP status answered)
    wa_sent: list[WaSend] = field(default_factory=list)                 # accepted sends, in order
    slow_started: list[str] = field(default_factory=list)               # recipients being held
    slow_answered: list[str] = field(default_factory=list)              # wamids whose answer went out
    pushes: list[dict[str, Any]] = field(default_factory=list)
    queries: list[tuple[float, str]] = field(default_factory=list)      # (monotonic time, checkout id)
    sms_sent: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def to(self, msisdn: str) -> list[WaSend]:
        with self.lock:
            return [s for s in self.wa_sent if s.to == msisdn]

    def texts(self, msisdn: str) -> list[str]:
        return [s.text for s in self.to(msisdn)]

    def start(self) -> None:
        fakes = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                if urlsplit(self.path).path == "/daraja/oauth/v1/generate":
                    self._json(200, {"access_token": f"tok{next(fakes._ids)}", "expires_in": "3599"})
                else:
                    self._json(404, {"error": "no such route"})

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = urlsplit(self.path).path
                if path == f"/graph/v25.0/{PHONE_ID}/messages":
                    fakes._graph(self, json.loads(raw))
                elif path == "/daraja/mpesa/stkpush/v1/processrequest":
                    fakes._push(self, json.loads(raw))
                elif path == "/daraja/mpesa/stkpushquery/v1/query":
                    fakes._query(self, json.loads(raw))
                elif path == "/at/version1/messaging":
                    form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
                    mid = f"ATXid_{next(fakes._ids)}"
                    with fakes.lock:
                        fakes.sms_sent.append(form)
                    self._json(201, {"SMSMessageData": {"Message": "Sent to 1/1 Total Cost: KES 0.8000", "Recipients": [
                        {"statusCode": 101, "number": form.get("to", ""), "status": "Success", "cost": "KES 0.8000",
                         "messageId": mid}]}})
                else:
                    self._json(404, {"error": "no such route"})

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-providers", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # Graph API: POST /{phone-number-id}/messages
    def _graph(self, h: Any, body: dict[str, Any]) -> None:
        to = str(body.get("to"))
        if to in self.wa_fail:
            with self.lock:
                self.wa_attempts.append((to, 500))
            h._json(500, {"error": {"message": "(#1) An unknown error occurred", "type": "OAuthException",
                                    "code": 1, "fbtrace_id": "AbCdEf"}})
            return
        delay = self.wa_slow.get(to)
        if delay is not None:
            with self.lock:
                self.slow_started.append(to)
            threading.Event().wait(delay)  # the provider's own slowness, not a test wait
        wamid = f"wamid.CRASH{next(self._ids)}"
        with self.lock:
            self.wa_attempts.append((to, 200))
            self.wa_sent.append(WaSend(to, str(body.get("type")), body, wamid))
        h._json(200, {"messaging_product": "whatsapp", "contacts": [{"input": to, "wa_id": to}],
                      "messages": [{"id": wamid}]})
        if delay is not None:
            with self.lock:
                self.slow_answered.append(wamid)  # written to a live connection: the daemon got it

    # Daraja: STK Push and STK Push Query
    def _push(self, h: Any, body: dict[str, Any]) -> None:
        n = next(self._ids)
        checkout = f"ws_CO_CRASH{n:06d}"
        with self.lock:
            self.pushes.append(dict(body, _checkout=checkout))
        h._json(200, {"MerchantRequestID": f"mr-{n}", "CheckoutRequestID": checkout, "ResponseCode": "0",
                      "ResponseDescription": "Success. Request accepted for processing",
                      "CustomerMessage": "Success. Request accepted for processing"})

    def _query(self, h: Any, body: dict[str, Any]) -> None:
        checkout = str(body.get("CheckoutRequestID"))
        with self.lock:
            self.queries.append((time.monotonic(), checkout))
        answer = self.query_answers.get(checkout)
        if answer is None:
            h._json(500, {"requestId": checkout, "errorCode": "500.001.1001",
                          "errorMessage": "The transaction is being processed"})
            return
        h._json(200, {"ResponseCode": "0", "ResponseDescription": "The service request has been accepted successsfully",
                      "MerchantRequestID": "mr", "CheckoutRequestID": checkout, "ResultCode": str(answer),
                      "ResultDesc": "The service request is processed successfully." if answer == 0 else "failed"})


@pytest.fixture
def fakes() -> Any:
    providers = FakeProviders()
    providers.start()
    try:
        yield providers
    finally:
        providers.stop()


# -- the daemon as a process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_env(database_url: str, fakes: FakeProviders, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}
    env.update(base_env(
        database_url,
        INVOICEIQ_WHATSAPP_API_BASE=f"{fakes.base}/graph/v25.0",
        INVOICEIQ_MPESA_API_BASE=f"{fakes.base}/daraja",
        INVOICEIQ_SMS_API_BASE=f"{fakes.base}/at",
        **extra))
    return env


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    client: httpx.AsyncClient

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def names(self) -> list[str]:
        return [e.get("event", "") for e in self.events()]

    async def exited(self, timeout: float) -> int:
        with anyio.fail_after(timeout):
            while self.proc.poll() is None:
                await anyio.sleep(0.01)
        return int(self.proc.returncode)

    async def say(self, sender: str, text: str) -> None:
        body = json.dumps(inbound_text(sender, text, timestamp=int(time.time())), separators=(",", ":")).encode()
        r = await self.client.post("/whatsapp/webhook", content=body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": sign(body, APP_SECRET)})
        assert r.status_code == 200, r.text

    async def api(self, method: str, path: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        if key:
            headers["Idempotency-Key"] = key
        return await self.client.request(method, path, json=body, headers=headers)


@asynccontextmanager
async def daemon(tmp_path: Path, env: dict[str, str], name: str) -> AsyncIterator[Proc]:
    """``invoiceiq serve`` on a free port, ready; killed on the way out if still running."""
    port = free_port()
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log:
        # stdout to a file, not a pipe: a pipe nobody reads would block the daemon's logging.
        proc = subprocess.Popen([sys.executable, "-m", "invoiceiq", "serve"], cwd=tmp_path,
                                env=dict(env, INVOICEIQ_SERVER_BIND=f"127.0.0.1:{port}"),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            handle = Proc(proc, port, log_path, client)
            with anyio.fail_after(30):
                while True:
                    assert proc.poll() is None, f"daemon exited early: {log_path.read_text()[-3000:]}"
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await anyio.sleep(0.05)
            yield handle
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 30.0,
                proc: Proc | None = None) -> None:
    """Poll ``check`` until it holds; fail with ``what`` (and the daemon's last words) at the deadline."""
    try:
        with anyio.fail_after(timeout):
            while True:
                result = check()
                if not isinstance(result, bool):
                    result = await result
                if result:
                    return
                await anyio.sleep(0.05)
    except TimeoutError:
        tail = proc.log_path.read_text()[-4000:] if proc is not None else ""
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}") from None


async def rows(store: Store, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def job(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all(sql, params)
    return await store.read(job)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- SIGKILL -----------------------------------------------------------------------------------------

PENDING_TO = "254711000001"   # the customer whose invoice is in backoff at the kill
PAYER = "254711000002"        # the customer whose STK push is in flight at the kill
FLOW_TO = "254711000003"      # the number the merchant typed in the guided flow


async def test_sigkill_then_restart_loses_nothing(tmp_path: Path, database_url: str, store: Store,
                                                  fakes: FakeProviders) -> None:
    env = daemon_env(database_url, fakes, INVOICEIQ_MPESA_QUERY_AFTER_S="1",
                     INVOICEIQ_OUTBOX_BACKOFF_BASE_S="2", INVOICEIQ_OUTBOX_BACKOFF_MAX_S="3")
    fakes.wa_fail.add(PENDING_TO)

    async with daemon(tmp_path, env, "first") as first:
        # 1. The merchant half-way through the guided flow: phone given, name asked.
        await first.say(MERCHANT, "invoice")
        await until(lambda: ASK_PHONE in fakes.texts(MERCHANT), "the phone prompt", proc=first)
        await first.say(MERCHANT, FLOW_TO)
        await until(lambda: ASK_NAME in fakes.texts(MERCHANT), "the name prompt", proc=first)

        # 2. An invoice whose message the provider refuses with 500: retried with backoff.
        r = await first.api("POST", "/invoices", {"msisdn": PENDING_TO, "amount_cents": 120_000,
                                                  "description": "Window repair"})
        assert r.status_code == 201, r.text
        pending_invoice = r.json()["id"]

        async def in_backoff() -> bool:
            found = await rows(store, "SELECT status, attempts, last_error FROM outbox WHERE recipient = :r",
                               {"r": PENDING_TO})
            return bool(found) and found[0]["status"] == "PENDING" and found[0]["attempts"] >= 1 \
                and found[0]["last_error"] is not None
        await until(in_backoff, "the refused invoice to be back in the outbox for a retry", proc=first)
        assert (PENDING_TO, 500) in fakes.wa_attempts

        # 3. An invoice sent, then its STK push accepted by Daraja: no callback will come.
        r = await first.api("POST", "/invoices", {"msisdn": PAYER, "amount_cents": 250_000,
                                                  "description": "Cleaning service"})
        assert r.status_code == 201, r.text
        paying_invoice = r.json()["id"]
        await until(lambda: any(s.kind == "template" for s in fakes.to(PAYER)), "the payer's invoice", proc=first)
        r = await first.api("POST", "/payments/stk/initiate", {"invoice_id": paying_invoice}, key="crash-pay-1")
        assert r.status_code == 202, r.text

        async def pushed() -> bool:
            found = await rows(store, "SELECT checkout_request_id FROM stk_attempts WHERE invoice_id = :i",
                               {"i": paying_invoice})
            return bool(found) and found[0]["checkout_request_id"] is not None
        await until(pushed, "Daraja's acceptance of the push to be recorded", proc=first)
        assert len(fakes.pushes) == 1
        checkout = fakes.pushes[0]["_checkout"]

        # 4. Kill at a quiet moment: nothing mid-send (a send cut off mid-flight is retried only
        # once its 60 s lease runs out), the refused invoice waiting for its retry.
        async def quiet() -> bool:
            found = await rows(store, "SELECT recipient, status, next_attempt_at_ms FROM outbox"
                                      " WHERE status IN ('PENDING', 'SENDING')")
            return [r["recipient"] for r in found] == [PENDING_TO] and found[0]["status"] == "PENDING" \
                and found[0]["next_attempt_at_ms"] > now_ms() + 300
        await until(quiet, "a moment with only the refused invoice waiting", proc=first)
        first.proc.send_signal(signal.SIGKILL)
        assert await first.exited(10) == -signal.SIGKILL
        assert "stopped" not in first.names()

    # Dead: the invoice unsent, the attempt unresolved, the flow at its name step.
    assert not fakes.to(PENDING_TO)
    found = await rows(store, "SELECT status FROM payments WHERE invoice_id = :i", {"i": paying_invoice})
    assert [r["status"] for r in found] == ["INITIATED"]
    queries_before = len(fakes.queries)
    merchant_before = len(fakes.to(MERCHANT))
    secret_before = await rows(store, "SELECT value FROM meta WHERE key = 'mpesa_callback_secret'")
    # The merchant's next answer ("-": no name) reached the webhook, which stored it and
    # answered 200, and then the process died before the session actor took it: the very
    # row the webhook writes (web/whatsapp.py), left unprocessed.
    stored = await store.write(lambda tx: inbox.put(
        tx, source="whatsapp", event_id="wamid.STORED-BEFORE-THE-CRASH", actor="session", actor_key=MERCHANT,
        kind="text", payload={"from": MERCHANT, "kind": "text", "text": "-", "title": None, "context_id": None,
                              "timestamp_s": int(time.time())}, now_ms=now_ms()))
    assert stored is not None

    # The provider recovers; M-PESA has the money (but the callback was lost with the process).
    fakes.wa_fail.clear()
    fakes.query_answers[checkout] = 0
    restarted_at = time.monotonic()

    async with daemon(tmp_path, env, "second") as second:
        # The flow resumes with the next step (the stored answer is taken up at start-up),
        # remembering the number given before the crash.
        await until(lambda: ASK_AMOUNT in fakes.texts(MERCHANT)[merchant_before:], "the amount prompt", proc=second)
        assert "resuming_stored_work" in second.names()
        await second.say(MERCHANT, "1500")
        await until(lambda: ASK_DESCRIPTION in fakes.texts(MERCHANT)[merchant_before:], "the description prompt",
                    proc=second)
        await second.say(MERCHANT, "Garden work")
        await until(lambda: any(t.startswith("Review invoice:") for t in fakes.texts(MERCHANT)[merchant_before:]),
                    "the review", proc=second)
        review = next(t for t in fakes.texts(MERCHANT)[merchant_before:] if t.startswith("Review invoice:"))
        assert f"To: {FLOW_TO}" in review and "KES 1,500" in review and "Garden work" in review

        # The message that was in backoff is delivered.
        async def delivered() -> bool:
            found = await rows(store, "SELECT status FROM outbox WHERE recipient = :r AND kind = 'invoice'",
                               {"r": PENDING_TO})
            return [r["status"] for r in found] == ["SENT"]
        await until(delivered, "the pending invoice to be sent", proc=second)

        # The attempt is reconciled by a status query, and the receipts go out.
        async def paid() -> bool:
            found = await rows(store, "SELECT p.status, i.status AS invoice FROM payments p"
                                      " JOIN invoices i ON i.id = p.invoice_id WHERE p.invoice_id = :i",
                               {"i": paying_invoice})
            return [(r["status"], r["invoice"]) for r in found] == [("SUCCESS", "PAID")]
        await until(paid, "the payment to be settled by a status query", proc=second)
        assert any(t >= restarted_at and c == checkout for t, c in fakes.queries[queries_before:])
        await until(lambda: any(t.startswith(f"Paid \u2714 \u2014 Invoice #{paying_invoice}")
                                for t in fakes.texts(PAYER)), "the customer's receipt", proc=second)

        # The callback URL given to Daraja before the crash still answers after it (same secret),
        # and Safaricom's late callback changes nothing: no second receipt, no alert.
        assert await rows(store, "SELECT value FROM meta WHERE key = 'mpesa_callback_secret'") == secret_before
        callback_url = urlsplit(fakes.pushes[0]["CallBackURL"])
        assert callback_url.scheme == "https" and callback_url.netloc == "pay.test"
        late = {"Body": {"stkCallback": {
            "MerchantRequestID": "mr-late", "CheckoutRequestID": checkout, "ResultCode": 0,
            "ResultDesc": "The service request is processed successfully.",
            "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": 2500}, {"Name": "MpesaReceiptNumber",
                                                                              "Value": "TKR7CRASH1"},
                                          {"Name": "Balance"}, {"Name": "TransactionDate", "Value": 20261126102115},
                                          {"Name": "PhoneNumber", "Value": int(PAYER)}]}}}}
        r = await second.client.post(callback_url.path, json=late)
        assert r.status_code == 200 and r.json()["ResultCode"] == 0, r.text

        async def late_applied() -> bool:
            found = await rows(store, "SELECT mpesa_receipt FROM payments WHERE invoice_id = :i", {"i": paying_invoice})
            return [x["mpesa_receipt"] for x in found] == ["TKR7CRASH1"]
        await until(late_applied, "the late callback's receipt number to be recorded", proc=second)

        # Everything queued has gone out; nothing twice.
        async def idle() -> bool:
            found = await rows(store, "SELECT COUNT(*) AS n FROM outbox WHERE status IN ('PENDING', 'SENDING')")
            return found[0]["n"] == 0
        await until(idle, "an empty outbox", proc=second)
        invoices_to_pending = [s for s in fakes.to(PENDING_TO) if s.kind == "template"]
        assert len(invoices_to_pending) == 1, fakes.texts(PENDING_TO)
        assert pending_invoice in invoices_to_pending[0].template_params
        merchant_texts = fakes.texts(MERCHANT)
        assert len(merchant_texts) == len(set(merchant_texts)), merchant_texts
        assert any(t.startswith(f"Invoice #{pending_invoice} sent to {PENDING_TO}") for t in merchant_texts)
        assert any(t.startswith(f"Paid \u2714 \u2014 Invoice #{paying_invoice}") for t in merchant_texts)
        assert len([t for t in fakes.texts(PAYER) if t.startswith("Paid \u2714")]) == 1
        assert not [t for t in merchant_texts if "arrived for" in t or t.startswith("Check Invoice")]
        assert "actor_crashed" not in second.names() and "outbox_send_crashed" not in second.names()

        second.proc.send_signal(signal.SIGTERM)
        assert await second.exited(20) == 0


# -- SIGTERM -----------------------------------------------------------------------------------------

SLOW_TO = "254711000004"
GRACE_S = 5


async def test_sigterm_drains_the_send_in_flight_within_the_grace_period(
        tmp_path: Path, database_url: str, store: Store, fakes: FakeProviders) -> None:
    env = daemon_env(database_url, fakes, INVOICEIQ_SERVER_SHUTDOWN_GRACE_S=str(GRACE_S))
    fakes.wa_slow[SLOW_TO] = 1.0

    async with daemon(tmp_path, env, "first") as first:
        r = await first.api("POST", "/invoices", {"msisdn": SLOW_TO, "amount_cents": 80_000,
                                                  "description": "Tailoring"})
        assert r.status_code == 201, r.text
        invoice_id = r.json()["id"]
        await until(lambda: SLOW_TO in fakes.slow_started, "the send to reach the slow provider", proc=first)
        # The keep-alive connection of `first.client` stays open, as a reverse proxy's would.
        signalled = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        code = await first.exited(GRACE_S * 3)
        elapsed = time.monotonic() - signalled
        assert code == 0, first.log_path.read_text()[-3000:]
        assert elapsed < GRACE_S, f"took {elapsed:.2f}s to stop, grace is {GRACE_S}s"
        names = first.names()
        # The send finished during the shutdown, and its outcome was recorded before the exit.
        assert names.index("signal_received") < names.index("message_sent") < names.index("stopped")
        assert "outbox_send_crashed" not in names and "actor_crashed" not in names

    assert len(fakes.slow_answered) == 1
    wamid = fakes.slow_answered[0]
    found = await rows(store, "SELECT status, provider_message_id FROM outbox WHERE recipient = :r AND kind = 'invoice'",
                       {"r": SLOW_TO})
    assert [(r["status"], r["provider_message_id"]) for r in found] == [("SENT", wamid)]
    found = await rows(store, "SELECT status FROM invoices WHERE id = :i", {"i": invoice_id})
    assert found[0]["status"] == "SENT"

    # The next start: not sent again. A second invoice to the same customer goes out after it in
    # order, so once that one has arrived the first would have gone before it if it were due.
    fakes.wa_slow.clear()
    async with daemon(tmp_path, env, "second") as second:
        r = await second.api("POST", "/invoices", {"msisdn": SLOW_TO, "amount_cents": 90_000,
                                                   "description": "Alterations"})
        assert r.status_code == 201, r.text
        later = r.json()["id"]
        await until(lambda: any(later in s.template_params for s in fakes.to(SLOW_TO)), "the second invoice",
                    proc=second)
        # What the shutdown left queued (the merchant's confirmation) goes out now, once.
        await until(lambda: any(t.startswith(f"Invoice #{invoice_id} sent to") for t in fakes.texts(MERCHANT)),
                    "the merchant's confirmation of the first invoice", proc=second)
        firsts = [s for s in fakes.to(SLOW_TO) if invoice_id in s.template_params]
        assert len(firsts) == 1
        second.proc.send_signal(signal.SIGTERM)
        assert await second.exited(20) == 0


async def test_sigterm_exits_within_the_grace_period_despite_a_slow_client(
        tmp_path: Path, database_url: str, fakes: FakeProviders) -> None:
    grace = 2
    env = daemon_env(database_url, fakes, INVOICEIQ_SERVER_SHUTDOWN_GRACE_S=str(grace))
    fakes.wa_slow[SLOW_TO] = 3.0  # longer than the grace: it cannot all be waited for
    async with daemon(tmp_path, env, "slow") as proc:
        r = await proc.api("POST", "/invoices", {"msisdn": SLOW_TO, "amount_cents": 80_000, "description": "Tailoring"})
        assert r.status_code == 201, r.text
        await until(lambda: SLOW_TO in fakes.slow_started, "the send to reach the slow provider", proc=proc)
        # A client that sent its headers and half its body, and then nothing (slow network, slowloris).
        with socket.create_connection(("127.0.0.1", proc.port)) as slow:
            slow.sendall(b"POST /whatsapp/webhook HTTP/1.1\r\nHost: pay.test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"object\":")
            async def later_answered() -> bool:
                # The same event loop reads both: once a later request is answered, hypercorn
                # has accepted the slow one and handed it to the app, which waits for its body.
                return (await proc.client.get("/healthz")).status_code == 200
            await until(later_answered, "a later request to be answered", proc=proc)
            signalled = time.time()
            proc.proc.send_signal(signal.SIGTERM)
            assert await proc.exited(grace * 4) == 0
        stopped = next(e["time"] for e in proc.events() if e.get("event") == "stopped")
        stopped_at = datetime.fromisoformat(stopped.replace("Z", "+00:00")).timestamp()
        # Measured to the daemon's own last log line: the interpreter's teardown after it is not ours.
        assert stopped_at - signalled < grace + 0.25, f"stopped {stopped_at - signalled:.2f}s after SIGTERM"


# -- the callback URL a restart must keep ------------------------------------------------------------


async def test_a_generated_callback_secret_never_holds_a_word_safaricom_rejects(database_url: str) -> None:
    # Safaricom refuses callback URLs holding exe/cmd/sql/query/mpesa/safaricom in any case; a
    # random URL-safe token spells one about 0.3% of the time. Hex (0-9a-f) spells none of them.
    from harness import make_settings, running_daemon
    from invoiceiq.config import _banned_words

    async with running_daemon(make_settings(database_url)) as h:
        secret = h.daemon.callback_secret
    assert secret is not None and re.fullmatch(r"[0-9a-f]{40}", secret)
    assert not _banned_words(secret)


def test_a_callback_url_without_its_secret_is_refused_at_start() -> None:
    # Written as the brief's section 11 shows it, the URL names no secret: Daraja would post
    # where nobody listens. The configuration says so before anything starts.
    from harness import make_settings
    from invoiceiq.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        make_settings("sqlite:///unused.db", MPESA_CALLBACK_URL="https://pay.test/payments/stk/callback")
    assert any("must end with /payments/stk/callback/<secret>" in p for p in refused.value.problems)


@pytest.mark.parametrize("callback_url", [
    pytest.param("https://pay.test/payments/stk/callback/f3a9c1e07b2d4e5f8a6b9c0d1e2f3a4b", id="with-secret"),
])
async def test_a_configured_callback_url_receives_the_callbacks(database_url: str, callback_url: str) -> None:
    from harness import make_settings, running_daemon, stk_callback

    settings = make_settings(database_url, MPESA_CALLBACK_URL=callback_url)
    async with running_daemon(settings) as h:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        r = await h.client.post("/invoices", headers=auth, json={
            "msisdn": "254712345678", "amount_cents": 250_000, "description": "Cleaning"})
        assert r.status_code == 201, r.text
        invoice_id = r.json()["id"]
        r = await h.client.post("/payments/stk/initiate", headers=dict(auth, **{"Idempotency-Key": "cb-url-1"}),
                                json={"invoice_id": invoice_id})
        assert r.status_code == 202, r.text
        await h.wait_for(lambda: len(h.providers.daraja.pushes) == 1, what="the STK push")
        push = h.providers.daraja.pushes[0]
        assert push["CallBackURL"] == callback_url
        # Safaricom posts the result to exactly the URL it was given.
        r = await h.client.post(urlsplit(callback_url).path, json=stk_callback(push["_checkout"], 0, amount=2500))
        assert r.status_code == 200, f"{r.status_code} {r.text}"

        async def paid(tx: Tx) -> bool:
            return await tx.val("SELECT status FROM invoices WHERE id = :i", {"i": invoice_id}) == "PAID"

        with anyio.fail_after(10):
            while not await h.store.read(paid):
                await anyio.sleep(0.02)
