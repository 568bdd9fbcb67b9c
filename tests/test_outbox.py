"""The outbox actor through the real daemon (issue 4): retries, backoff, fallback, statuses,
order per recipient, restarts and broken credentials, with the clock under the test's control.

The providers are ``harness.FakeProviders`` plus a script (``Scripted``): per recipient, the
answers the Graph API or Africa's Talking give before they start accepting, and the clock time
of every attempt, so that "nothing was sent before next_attempt_at_ms" is checked on what the
providers actually saw.

``outbox_pass`` is the synchronisation point for "nothing happened": it queues a marker
message at the clock's current time and waits for it to leave. The outbox claims every due row
in one UPDATE, so a row that was due at that time would have been claimed (its ``attempts``
raised) no later than the marker.

What tests/test_chat_e2e.py already covers is not repeated here: status webhooks moving an
invoice's delivery state, the 131026 fallback by status and at send time, 130429 Retry-After.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import pytest

from harness import (
    WA_ERRORS,
    AUTH,
    busy_door,
    until,
    CUSTOMER,
    MERCHANT,
    FakeProviders,
    Handle,
    Sent,
    make_settings,
    running_daemon,
    status_event,
)
from invoiceiq.clock import ManualClock
from invoiceiq.core import copy, delivery
from invoiceiq.core.model import Channel
from invoiceiq.store import Tx, outbox
from invoiceiq.store.jsonio import loads

pytestmark = pytest.mark.anyio

PROVIDERS_DIR = Path(__file__).resolve().parent / "fixtures" / "providers"
OTHER = "254722000111"
MARKER = "254799000001"  # nobody: the recipient of outbox_pass markers
START = 1_764_158_400_000


def wa_error(code: str, headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """A Graph API error answer from ../shared/providers/whatsapp_error_responses.json."""
    sample = WA_ERRORS[code]
    return sample["http_status"], sample["body"], headers or {}


NOT_ON_WHATSAPP = (WA_ERRORS["131026"]["http_status"], WA_ERRORS["131026"]["body"])


# -- the scripted providers ----------------------------------------------------------------------


@dataclass
class Scripted(FakeProviders):
    """FakeProviders with per-recipient scripts and the clock time of every attempt.

    A script entry is an exception to raise (a network failure), ``(status, json_or_text,
    headers)`` for a raw answer, or (SMS only) an int: a 201 whose one recipient has that
    Africa's Talking statusCode."""

    clock: ManualClock | None = None
    wa_script: dict[str, list[Any]] = field(default_factory=dict)
    sms_script: dict[str, list[Any]] = field(default_factory=dict)
    wa_token_expired: bool = False
    sms_key_rejected: bool = False
    attempts: list[tuple[str, str, int]] = field(default_factory=list)  # (channel, to, clock ms)

    def attempts_to(self, msisdn: str, channel: str | None = None) -> list[int]:
        return [t for c, to, t in self.attempts if to == msisdn and (channel is None or c == channel)]

    def _now(self) -> int:
        return self.clock.now_ms() if self.clock is not None else 0

    def _graph(self, request: httpx.Request) -> httpx.Response:
        to = json.loads(request.content)["to"]
        self.attempts.append(("WHATSAPP", to, self._now()))
        if self.wa_token_expired:
            self.requests.append(request)
            status, body, _ = wa_error("190")
            return httpx.Response(status, json=body)
        script = self.wa_script.get(to)
        if script:
            self.requests.append(request)
            return self._scripted(script.pop(0), request)
        return super()._graph(request)

    def _sms(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        to = form["to"].lstrip("+")
        self.attempts.append(("SMS", to, self._now()))
        if self.sms_key_rejected:
            self.requests.append(request)
            return httpx.Response(401, text="The supplied authentication is invalid",
                                  headers={"Content-Type": "text/plain"})
        script = self.sms_script.get(to)
        if script:
            self.requests.append(request)
            entry = script.pop(0)
            if isinstance(entry, int):
                return self._at_recipient(entry, form)
            return self._scripted(entry, request)
        return super()._sms(request)

    def _at_recipient(self, code: int, form: dict[str, str]) -> httpx.Response:
        names = {100: "Processed", 101: "Success", 102: "Queued", 403: "InvalidPhoneNumber",
                 406: "UserInBlacklist", 500: "InternalServerError", 501: "GatewayError", 502: "RejectedByGateway"}
        accepted = code in (100, 101, 102)
        mid = f"ATXid_code{code}_{next(self._ids)}" if accepted else "None"
        if accepted:
            self.sent.append(Sent(form["to"].lstrip("+"), "sms", form, mid))
        return httpx.Response(201, json={"SMSMessageData": {
            "Message": f"Sent to {int(accepted)}/1 Total Cost: KES {'0.8000' if accepted else '0'}",
            "Recipients": [{"statusCode": code, "number": form["to"], "status": names[code],
                            "cost": "KES 0.8000" if accepted else "0", "messageId": mid}]}})

    @staticmethod
    def _scripted(entry: Any, request: httpx.Request) -> httpx.Response:
        if isinstance(entry, Exception):
            raise entry
        status, payload, headers = entry
        if isinstance(payload, str):
            return httpx.Response(status, text=payload, headers=headers)
        return httpx.Response(status, json=payload, headers=headers)


# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def providers(clock: ManualClock) -> Scripted:
    return Scripted(clock=clock)


@pytest.fixture
async def h(database_url: str, providers: Scripted, clock: ManualClock) -> AsyncIterator[Handle]:
    async with running_daemon(make_settings(database_url), providers=providers, clock=clock) as handle:
        yield handle




async def q(h: Handle, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    async def job(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all(sql, params)
    return await h.store.read(job)


async def rows(h: Handle, where: str = "1 = 1", params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return await q(h, f"SELECT * FROM outbox WHERE {where} ORDER BY id", params)


async def invoice_row(h: Handle, invoice_id: str, channel: str = "WHATSAPP") -> dict[str, Any]:
    (row,) = await rows(h, "invoice_id = :i AND kind = 'invoice' AND channel = :c", {"i": invoice_id, "c": channel})
    return row


async def wait_invoice_row(h: Handle, invoice_id: str, what: str, channel: str = "WHATSAPP",
                           **expected: Any) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = await rows(h, "invoice_id = :i AND kind = 'invoice' AND channel = :c", {"i": invoice_id, "c": channel})
        if found and all(found[0][k] == v for k, v in expected.items()):
            return found[0]
        return None
    return await until(check, f"{what} (invoice {invoice_id} {channel} row with {expected})")


async def settle(h: Handle, timeout: float = 5.0) -> None:
    """Nothing waiting that is due now: the inbox processed, no due or in-flight send."""
    async def idle() -> bool:
        now = h.daemon.clock.now_ms()
        found = await q(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL)"
                           " + (SELECT COUNT(*) FROM outbox WHERE status = 'SENDING'"
                           "    OR (status = 'PENDING' AND next_attempt_at_ms <= :now)) AS busy", {"now": now})
        assert h.daemon.outbox is not None
        return int(found[0]["busy"]) == 0 and h.daemon.outbox.in_flight == 0
    await until(idle, "the daemon to settle", timeout)


async def outbox_pass(h: Handle, channel: Channel = Channel.WHATSAPP) -> None:
    """Proof that the outbox has claimed at the clock's current time: a marker queued now left."""
    count = len(h.providers.to(MARKER))
    now = h.daemon.clock.now_ms()
    await h.store.write(lambda tx: outbox.enqueue(
        tx, recipient=MARKER, channel=channel, kind="reply", now_ms=now,
        content=delivery.reply_content(copy.Reply(f"marker {count}"))))
    h.daemon.dispatch.wake("outbox")
    await h.wait_for(lambda: len(h.providers.to(MARKER)) > count, what="the outbox to pass at the current time")


async def new_invoice(h: Handle, msisdn: str = CUSTOMER, amount_kes: int = 2500,
                      description: str = "Cleaning service") -> dict[str, Any]:
    response = await h.client.post("/invoices", headers=AUTH, json={
        "msisdn": msisdn, "amount_cents": amount_kes * 100, "description": description})
    assert response.status_code == 201, response.text
    return response.json()


async def log_events(h: Handle, invoice_id: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    found = await q(h, "SELECT channel, direction, event, payload FROM message_log WHERE invoice_id = :i",
                    {"i": invoice_id})
    return [(r["channel"], r["direction"], r["event"], loads(r["payload"]) or {}) for r in found]


def template_params(s: Sent) -> list[str]:
    assert s.kind == "template", s.body
    body = [c for c in s.body["template"]["components"] if c["type"] == "body"]
    return [p["text"] for p in body[0]["parameters"]]


def confirmation(invoice_id: str, msisdn: str) -> str:
    return (f"Invoice #{invoice_id} sent to {msisdn}. Use 'remind {invoice_id}' to nudge"
            f" or 'cancel {invoice_id}' to cancel.")


def in_jitter(next_at: int, failed_at: int, backoff_ms: int) -> bool:
    """``next_at`` is ``failed_at`` plus ``backoff_ms`` with at most 25 % jitter either way."""
    return failed_at + backoff_ms * 3 // 4 <= next_at < failed_at + backoff_ms * 5 // 4


# -- retries and backoff -----------------------------------------------------------------------------


async def test_transient_failures_back_off_exponentially_with_jitter_and_nothing_leaves_early(
        h: Handle, providers: Scripted, clock: ManualClock) -> None:
    providers.wa_script[CUSTOMER] = [
        wa_error("131000"),                                              # HTTP 500, code 131000
        (503, "Service Unavailable", {}),                                # a 5xx without a Graph body
        httpx.ConnectError("connection refused"),                        # the network
    ]
    created = await new_invoice(h)
    assert created["id"] == "1001"
    expected_errors = ["131000: (#131000) Something went wrong", "503: HTTP 503", "connect: ConnectError"]
    for attempt, (backoff_ms, error) in enumerate(zip((2_000, 4_000, 8_000), expected_errors, strict=True), start=1):
        failed_at = clock.now_ms()
        row = await wait_invoice_row(h, "1001", f"failure {attempt}", status="PENDING", attempts=attempt)
        assert row["last_error"] == error
        assert in_jitter(row["next_attempt_at_ms"], failed_at, backoff_ms), (row["next_attempt_at_ms"] - failed_at)
        assert len(providers.attempts_to(CUSTOMER)) == attempt
        # One millisecond before the row is due: the outbox runs, the row stays where it is.
        clock.set(row["next_attempt_at_ms"] - 1)
        await outbox_pass(h)
        still = await invoice_row(h, "1001")
        assert (still["status"], still["attempts"]) == ("PENDING", attempt)
        assert len(providers.attempts_to(CUSTOMER)) == attempt
        clock.set(row["next_attempt_at_ms"])
    await h.wait_for_texts(MERCHANT, 1)
    await settle(h)
    # Every attempt at (never before) the time the previous failure set.
    times = providers.attempts_to(CUSTOMER, "WHATSAPP")
    assert len(times) == 4 and times[0] == START
    sent = await invoice_row(h, "1001")
    assert (sent["status"], sent["attempts"], sent["last_error"]) == ("SENT", 4, None)
    (template,) = providers.to(CUSTOMER)
    assert template_params(template) == ["Customer", "2,500", "1001", created["pay_link"]]
    assert providers.texts(MERCHANT) == [confirmation("1001", CUSTOMER)]
    assert not [s for s in providers.sent if s.kind == "sms"]


async def test_retry_after_is_honoured_over_the_shorter_backoff(
        h: Handle, providers: Scripted, clock: ManualClock) -> None:
    # A customer reached by SMS (not on WhatsApp), and Africa's Talking throttling with
    # Retry-After: the SMS channel holds that long (not our one second), no attempt spent.
    providers.wa_fail_for[CUSTOMER] = NOT_ON_WHATSAPP
    providers.sms_script[CUSTOMER] = [(429, "Too Many Requests", {"Retry-After": "300",
                                                                   "Content-Type": "text/plain"})]
    created = await new_invoice(h)
    row = await wait_invoice_row(h, "1001", "the throttled SMS", channel="SMS", status="PENDING",
                                 last_error="429: Too Many Requests")
    assert row["next_attempt_at_ms"] == START + 300_000
    assert row["attempts"] == 0
    clock.set(START + 299_999)
    await outbox_pass(h)
    assert (await invoice_row(h, "1001", "SMS"))["attempts"] == 0
    assert [s for s in providers.sent if s.kind == "sms"] == []
    clock.set(START + 300_000)
    await h.wait_for_texts(MERCHANT, 2)
    await settle(h)
    assert providers.attempts_to(CUSTOMER, "SMS") == [START, START + 300_000]
    assert providers.texts(CUSTOMER) == [
        f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: {created['pay_link']}"]
    assert providers.texts(MERCHANT) == [
        confirmation("1001", CUSTOMER),
        "Invoice #1001 (KES 2,500) went to 0712\u2026678 by SMS because the number is not on WhatsApp.",
    ]


async def test_transient_failures_until_the_last_attempt_then_the_sms_fallback(
        database_url: str, providers: Scripted, clock: ManualClock) -> None:
    providers.wa_script[CUSTOMER] = [wa_error("131000")] * 3
    settings = make_settings(database_url, INVOICEIQ_OUTBOX_MAX_ATTEMPTS="3")
    async with running_daemon(settings, providers=providers, clock=clock) as h:
        created = await new_invoice(h)
        for attempt in (1, 2):
            row = await wait_invoice_row(h, "1001", f"failure {attempt}", status="PENDING", attempts=attempt)
            clock.set(row["next_attempt_at_ms"])
        await h.wait_for_texts(MERCHANT, 2)
        await settle(h)
        assert len(providers.attempts_to(CUSTOMER, "WHATSAPP")) == 3
        wa_row = await invoice_row(h, "1001")
        assert (wa_row["status"], wa_row["attempts"]) == ("FAILED", 3)
        assert wa_row["last_error"] == "131000: (#131000) Something went wrong"
        sms_row = await invoice_row(h, "1001", "SMS")
        assert (sms_row["status"], sms_row["attempts"], sms_row["fallback_of"]) == ("SENT", 1, wa_row["id"])
        assert providers.texts(CUSTOMER) == [
            f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: {created['pay_link']}"]
        assert providers.texts(MERCHANT) == [
            confirmation("1001", CUSTOMER),
            "Invoice #1001 (KES 2,500) went to 0712\u2026678 by SMS because WhatsApp could not deliver it.",
        ]
        events = [(c, e) for c, _, e, _ in await log_events(h, "1001")]
        assert events.count(("WHATSAPP", "fallback")) == 1
        invoice = (await h.client.get("/invoices/1001", headers=AUTH)).json()
        assert (invoice["status"], invoice["channel"]) == ("SENT", "SMS")


async def test_meta_throttling_holds_the_whole_channel_without_spending_attempts_or_falling_back(
        database_url: str, providers: Scripted, clock: ManualClock) -> None:
    """130429 (the business number's throughput reached) is the account's limit, not the
    message's: WhatsApp holds for everyone (1 s, then 2 s while Meta keeps refusing, back to
    1 s after a send goes through), no attempt is spent and no SMS goes out, however many
    refusals (with two attempts allowed, the second would otherwise fall back to SMS)."""
    providers.wa_script[CUSTOMER] = [wa_error("130429"), wa_error("130429")]
    providers.wa_script[OTHER] = [wa_error("130429")]
    settings = make_settings(database_url, INVOICEIQ_OUTBOX_MAX_ATTEMPTS="2")
    async with running_daemon(settings, providers=providers, clock=clock) as h:
        await new_invoice(h)
        row = await wait_invoice_row(h, "1001", "the first refusal", status="PENDING",
                                     last_error="130429: (#130429) Rate limit hit")
        assert (row["attempts"], row["next_attempt_at_ms"]) == (0, START + 1_000)
        # Someone else's message waits for the hold too: nothing leaves on WhatsApp.
        await queue_reply(h, OTHER, "hello")
        await outbox_pass(h, Channel.SMS)
        assert providers.attempts_to(OTHER) == []
        clock.set(START + 1_000)  # both go, Meta refuses both: one hold (of 2 s), not two
        await until(lambda: refused_rows(h, 2), "both refused again")
        assert [(r["attempts"], r["next_attempt_at_ms"]) for r in await rows(h, "status = 'PENDING'")] == [
            (0, START + 3_000), (0, START + 3_000)]
        clock.set(START + 2_999)
        await outbox_pass(h, Channel.SMS)
        assert len(providers.attempts_to(CUSTOMER, "WHATSAPP")) == 2 and len(providers.attempts_to(OTHER)) == 1
        clock.set(START + 3_000)
        await h.wait_for_texts(MERCHANT, 1)
        await h.wait_for_texts(OTHER, 1)
        sent = await invoice_row(h, "1001")
        assert (sent["status"], sent["attempts"]) == ("SENT", 1)
        assert providers.attempts_to(CUSTOMER) == [START, START + 1_000, START + 3_000]
        assert providers.attempts_to(OTHER) == [START + 1_000, START + 3_000]
        assert providers.attempts_to(CUSTOMER, "SMS") == [] and providers.attempts_to(OTHER, "SMS") == []
        assert h.daemon.metrics.messages.labels("WHATSAPP", "OUT", "throttled")._value.get() == 2
        # A send went through: the next refusal holds for one second again, not four.
        await settle(h)
        providers.wa_script[OTHER] = [wa_error("130429")]
        await queue_reply(h, OTHER, "again")
        await until(lambda: refused_rows(h, 1), "the refusal after the hold")
        (again,) = await rows(h, "status = 'PENDING'")
        assert (again["attempts"], again["next_attempt_at_ms"]) == (0, START + 4_000)


async def queue_reply(h: Handle, to: str, text: str) -> None:
    now = h.daemon.clock.now_ms()
    await h.store.write(lambda tx: outbox.enqueue(
        tx, recipient=to, channel=Channel.WHATSAPP, kind="reply", now_ms=now,
        content=delivery.reply_content(copy.Reply(text))))
    h.daemon.dispatch.wake("outbox")


async def refused_rows(h: Handle, n: int) -> bool:
    """``n`` rows waiting after a refusal at the clock's current time."""
    now = h.daemon.clock.now_ms()
    found = await q(h, "SELECT COUNT(*) AS n FROM outbox WHERE status = 'PENDING' AND updated_at_ms = :now"
                       " AND last_error LIKE '130429%'", {"now": now})
    return int(found[0]["n"]) == n


@pytest.mark.parametrize("code", ["132001", "100", "131030"])
async def test_a_permanent_error_on_the_send_goes_to_sms_at_once(
        h: Handle, providers: Scripted, clock: ManualClock, code: str) -> None:
    providers.wa_script[CUSTOMER] = [wa_error(code)]
    created = await new_invoice(h)
    await h.wait_for_texts(MERCHANT, 2)
    await settle(h)
    wa_row = await invoice_row(h, "1001")
    assert (wa_row["status"], wa_row["attempts"]) == ("FAILED", 1)  # never retried
    assert wa_row["last_error"] == f"{code}: {WA_ERRORS[code]['body']['error']['message']}"
    assert providers.attempts_to(CUSTOMER) == [START, START]  # WhatsApp, then the SMS: no waiting
    assert [(s.kind, s.text) for s in providers.to(CUSTOMER)] == [
        ("sms", f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: {created['pay_link']}")]
    assert providers.texts(MERCHANT) == [
        confirmation("1001", CUSTOMER),
        "Invoice #1001 (KES 2,500) went to 0712\u2026678 by SMS because WhatsApp could not deliver it.",
    ]
    failed = [p for c, d, e, p in await log_events(h, "1001") if (c, e) == ("WHATSAPP", "failed")]
    assert [(p["outbox_id"], p["code"]) for p in failed] == [(wa_row["id"], code)]


# -- delivery statuses ----------------------------------------------------------------------------------


async def post_status(h: Handle, payload: dict[str, Any]) -> None:
    response = await h.post_webhook(payload)
    assert response.status_code == 200, response.text
    await settle(h)


async def test_an_async_failed_status_sends_the_sms_and_tells_the_merchant_once_with_the_reason(
        h: Handle, providers: Scripted) -> None:
    created = await new_invoice(h)
    await h.wait_for_texts(MERCHANT, 1)
    await settle(h)
    wamid = providers.to(CUSTOMER)[0].message_id
    failed = json.loads((PROVIDERS_DIR / "whatsapp_status_failed_131047.json").read_text())
    failed["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = wamid
    await post_status(h, status_event(wamid, "sent", CUSTOMER))
    await post_status(h, failed)
    await post_status(h, failed)  # Meta delivers webhooks at least once
    await post_status(h, status_event(wamid, "delivered", CUSTOMER))  # late, after the failure
    await post_status(h, status_event(wamid, "read", CUSTOMER))
    sms = [s for s in providers.sent if s.kind == "sms"]
    assert [(s.to, s.text) for s in sms] == [
        (CUSTOMER, f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: {created['pay_link']}")]
    assert providers.texts(MERCHANT) == [
        confirmation("1001", CUSTOMER),
        "Invoice #1001 (KES 2,500) went to 0712\u2026678 by SMS because WhatsApp could not deliver it.",
    ]
    wa_row = await invoice_row(h, "1001")
    assert wa_row["status"] == "FAILED"  # neither "delivered" nor "read" brought it back
    assert wa_row["last_error"] == ("131047: Message failed to send because more than 24 hours have passed since"
                                    " the customer last replied to this number.")
    events = Counter((c, e) for c, _, e, _ in await log_events(h, "1001"))
    assert events[("WHATSAPP", "fallback")] == 1
    assert events[("SMS", "sent")] == 1


async def test_a_failure_reported_after_prune_emptied_the_text_sends_nothing_again(
        h: Handle, providers: Scripted) -> None:
    """`invoiceiq prune` empties the content of sends that left the outbox. A failed status
    for such a send (Meta reporting it weeks later) is recorded and the merchant told that the
    invoice did not arrive, but no SMS goes out: there is no text left to send, and a blank
    message (or a crash rendering one) would be worse than none."""
    await new_invoice(h)
    await h.wait_for_texts(MERCHANT, 1)
    await settle(h)
    wamid = providers.to(CUSTOMER)[0].message_id
    await post_status(h, status_event(wamid, "sent", CUSTOMER))
    pruned = await h.store.write(lambda tx: outbox.prune_content(tx, h.daemon.clock.now_ms() + 1))
    assert pruned == 2  # the invoice and the merchant's confirmation; nothing waits to be sent
    failed = json.loads((PROVIDERS_DIR / "whatsapp_status_failed_131047.json").read_text())
    failed["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = wamid
    await post_status(h, failed)
    assert [s for s in providers.sent if s.kind == "sms"] == []
    assert len(providers.to(CUSTOMER)) == 1  # the invoice, once
    wa_row = await invoice_row(h, "1001")
    assert wa_row["status"] == "FAILED" and wa_row["content"] in ("{}", {})
    assert (await rows(h, "kind = 'invoice'")) == [wa_row]  # no fallback row, no template retry
    (invoice,) = await q(h, "SELECT status FROM invoices")
    assert invoice["status"] == "FAILED"
    merchant = providers.texts(MERCHANT)
    assert len(merchant) == 2 and "#1001" in merchant[1]  # the confirmation, then: not delivered


async def test_outside_the_window_an_interactive_invoice_is_sent_again_as_the_template(
        h: Handle, providers: Scripted) -> None:
    # The customer wrote, so the invoice goes as the interactive message; Meta then says the
    # window had closed (131047, e.g. its clock and ours disagree): the approved template is
    # allowed there, so it is tried before any SMS.
    await h.say(CUSTOMER, "hello")
    await settle(h)
    await new_invoice(h)
    await until(lambda: _first(providers, CUSTOMER, "interactive"), "the interactive invoice")
    await settle(h)
    wamid = [s for s in providers.to(CUSTOMER) if s.kind == "interactive"][0].message_id
    failed = json.loads((PROVIDERS_DIR / "whatsapp_status_failed_131047.json").read_text())
    failed["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = wamid
    await post_status(h, failed)
    template = await until(lambda: _first(providers, CUSTOMER, "template"), "the template")
    assert template.button_ids == ["pay_now:1001"]
    assert [s for s in providers.sent if s.kind == "sms"] == []
    # Said once to the merchant: the confirmation; no "went by SMS".
    assert providers.texts(MERCHANT) == [confirmation("1001", CUSTOMER)]


async def test_a_131047_in_meta_answer_to_the_interactive_invoice_also_tries_the_template_first(
        h: Handle, providers: Scripted) -> None:
    # The same refusal, in the answer to the send rather than in a later status webhook
    # (../shared/providers/whatsapp.md: 131026/131047 arrive either way). The row records
    # its form only once a send is accepted, so the refused attempt's own form decides.
    await h.say(CUSTOMER, "hello")
    await settle(h)
    providers.wa_script[CUSTOMER] = [wa_error("131047")]
    await new_invoice(h)
    template = await until(lambda: _first(providers, CUSTOMER, "template"), "the template")
    await settle(h)
    assert template.button_ids == ["pay_now:1001"]
    assert [s for s in providers.sent if s.kind == "sms"] == []
    refused = [r for r in await rows(h, "kind = 'invoice'") if r["status"] == "FAILED"]
    assert len(refused) == 1 and refused[0]["last_error"].startswith("131047: ")
    assert providers.texts(MERCHANT) == [confirmation("1001", CUSTOMER)]
    (invoice,) = await q(h, "SELECT status FROM invoices")
    assert invoice["status"] == "SENT"


async def test_while_webhooks_flood_the_door_statuses_are_applied_in_small_admitted_turns(
        h: Handle, providers: Scripted) -> None:
    """The delivery tracker applies every waiting status in groups of 500; while the front
    door is busy (runtime.Pressure) a turn takes ``BUSY_BATCH`` and queues the rest behind the
    door's admission again, like a conversation's turn: what it takes from the webhooks stays
    bounded however many statuses wait."""
    from invoiceiq.actors.outbox import DeliveryTracker
    from invoiceiq.store import inbox

    await new_invoice(h)
    await h.wait_for_texts(MERCHANT, 1)
    await settle(h)
    wamid = providers.to(CUSTOMER)[0].message_id
    waiting = 2 * DeliveryTracker.BUSY_BATCH + 5

    async def statuses(tx: Tx) -> None:
        now = h.daemon.clock.now_ms()
        for i in range(waiting):  # as many distinct status events (Meta's ids differ per status)
            await inbox.put(tx, source="whatsapp", event_id=f"{wamid}:flood{i}", actor="delivery",
                            actor_key=wamid, kind="status", now_ms=now,
                            payload={"status": "delivered", "recipient": CUSTOMER, "timestamp_s": now // 1000,
                                     "code": None, "reason": None})

    registry = h.daemon.dispatch.registries["delivery"]
    turns: list[str] = []
    inner = registry._handler

    async def recording(key: str, message: Any) -> None:
        turns.append(key)
        await inner(key, message)

    registry._handler = recording
    await h.store.write(statuses)

    async def all_applied() -> bool:
        return await h.store.read(lambda tx: tx.val(
            "SELECT COUNT(*) FROM inbox WHERE event_id LIKE :p AND processed_at_ms IS NOT NULL",
            {"p": f"{wamid}:flood%"})) == waiting

    async with busy_door(h):
        h.daemon.dispatch.kick("delivery", "statuses")
        await until(all_applied, "the statuses to be applied through the door")
    assert len(turns) >= 3  # 32 + 32 + 5, each turn admitted on its own (one turn of 500 before)
    assert (await invoice_row(h, "1001"))["status"] == "DELIVERED"


async def _first(providers: Scripted, to: str, kind: str) -> Any:
    found = [s for s in providers.to(to) if s.kind == kind]
    return found[0] if found else None


async def test_duplicate_and_out_of_order_statuses_never_move_back_and_are_all_logged(
        h: Handle, providers: Scripted) -> None:
    await new_invoice(h)
    await h.wait_for_texts(MERCHANT, 1)
    await settle(h)
    wamid = providers.to(CUSTOMER)[0].message_id
    seen = []
    for status in ("read", "delivered", "sent", "sent", "delivered", "read"):
        await post_status(h, status_event(wamid, status, CUSTOMER))
        row = await invoice_row(h, "1001")
        seen.append(row["status"])
    assert seen == ["READ"] * 6
    invoice = (await h.client.get("/invoices/1001", headers=AUTH)).json()
    assert invoice["delivery_state"] == "read"
    # Every distinct status is in the message log once, tied to the outbox row and the wamid.
    statuses = [p for c, d, e, p in await log_events(h, "1001") if "status" in p]
    assert sorted(p["status"] for p in statuses) == ["delivered", "read", "sent"]
    assert {(p["outbox_id"], p["provider_message_id"]) for p in statuses} == {(row["id"], wamid)}
    # A second message's statuses in the natural order move it forward step by step.
    await new_invoice(h, OTHER, 300, "Airtime top-up")
    await h.wait_for_texts(MERCHANT, 2)
    await settle(h)
    other = providers.to(OTHER)[0].message_id
    steps = []
    for status in ("sent", "sent", "delivered", "read", "delivered"):
        await post_status(h, status_event(other, status, OTHER))
        steps.append((await invoice_row(h, "1002"))["status"])
    assert steps == ["SENT", "SENT", "DELIVERED", "READ", "READ"]
    assert not [s for s in providers.sent if s.kind == "sms"]


# -- order per recipient ------------------------------------------------------------------------------------


async def test_a_second_message_never_overtakes_the_first_even_while_it_backs_off(
        h: Handle, providers: Scripted, clock: ManualClock) -> None:
    providers.wa_script[CUSTOMER] = [wa_error("131000")]
    await new_invoice(h, CUSTOMER, 2500, "Cleaning service")
    first = await wait_invoice_row(h, "1001", "the first failure", status="PENDING", attempts=1)
    await new_invoice(h, CUSTOMER, 700, "Window cleaning")
    await new_invoice(h, OTHER, 300, "Airtime top-up")
    # Another customer is not held up...
    await h.wait_for_texts(MERCHANT, 1)
    await outbox_pass(h)
    assert [template_params(s)[2] for s in providers.to(OTHER)] == ["1003"]
    # ...but the same customer's second invoice waits behind the first, unclaimed.
    second = await invoice_row(h, "1002")
    assert (second["status"], second["attempts"]) == ("PENDING", 0)
    assert providers.to(CUSTOMER) == [] and len(providers.attempts_to(CUSTOMER)) == 1
    clock.set(first["next_attempt_at_ms"])
    await h.wait_for_texts(MERCHANT, 3)
    await settle(h)
    assert [template_params(s)[2] for s in providers.to(CUSTOMER)] == ["1001", "1002"]
    assert providers.texts(MERCHANT) == [confirmation("1003", OTHER), confirmation("1001", CUSTOMER),
                                         confirmation("1002", CUSTOMER)]
    assert len(providers.attempts_to(CUSTOMER)) == 3  # one failure, then each invoice once


# -- restarts ------------------------------------------------------------------------------------------------


async def test_a_row_in_backoff_is_delivered_once_by_the_next_daemon(database_url: str, clock: ManualClock) -> None:
    settings = make_settings(database_url)
    ids = itertools.count(1)  # one sequence of wamids across the restart, as at Meta
    first = Scripted(clock=clock, _ids=ids)
    first.wa_script[CUSTOMER] = [wa_error("131000")]
    async with running_daemon(settings, providers=first, clock=clock) as h:
        created = await new_invoice(h)
        row = await wait_invoice_row(h, "1001", "the failure", status="PENDING", attempts=1)
    due = row["next_attempt_at_ms"]
    second = Scripted(clock=clock, _ids=ids)
    async with running_daemon(settings, providers=second, clock=clock) as h:
        clock.set(due - 1)
        await outbox_pass(h)
        assert second.attempts_to(CUSTOMER) == []
        clock.set(due)
        await h.wait_for_texts(MERCHANT, 1)
        await settle(h)
        assert second.attempts_to(CUSTOMER) == [due]
        assert [template_params(s) for s in second.to(CUSTOMER)] == [["Customer", "2,500", "1001", created["pay_link"]]]
        assert second.texts(MERCHANT) == [confirmation("1001", CUSTOMER)]
        sent = await invoice_row(h, "1001")
        assert (sent["status"], sent["attempts"]) == ("SENT", 2)
    assert first.sent == []  # the first daemon's only attempt failed
    assert first.attempts_to(CUSTOMER) == [START]


async def test_a_send_left_in_flight_by_a_dead_process_is_taken_over_when_its_lease_ends(
        database_url: str, clock: ManualClock) -> None:
    settings = make_settings(database_url)
    ids = itertools.count(1)
    first = Scripted(clock=clock, _ids=ids)
    first.wa_script[CUSTOMER] = [wa_error("131000")]
    async with running_daemon(settings, providers=first, clock=clock) as h:
        await new_invoice(h)
        await wait_invoice_row(h, "1001", "the failure", status="PENDING", attempts=1)
        # As if another process had claimed it and died mid-send: SENDING, leased for a minute.
        lease_until = clock.now_ms() + 60_000
        await h.store.write(lambda tx: tx.execute(
            "UPDATE outbox SET status = 'SENDING', claimed_by = 'dead:1', claimed_until_ms = :u,"
            " attempts = attempts + 1 WHERE invoice_id = '1001'", {"u": lease_until}))
    second = Scripted(clock=clock, _ids=ids)
    async with running_daemon(settings, providers=second, clock=clock) as h:
        clock.set(lease_until)
        await outbox_pass(h)
        assert second.attempts_to(CUSTOMER) == []  # the lease still holds
        clock.set(lease_until + 1)
        await h.wait_for_texts(MERCHANT, 1)
        await settle(h)
        assert second.attempts_to(CUSTOMER) == [lease_until + 1]
        assert len(second.to(CUSTOMER)) == 1 and second.texts(MERCHANT) == [confirmation("1001", CUSTOMER)]
        row = await invoice_row(h, "1001")
        assert (row["status"], row["attempts"], row["claimed_until_ms"]) == ("SENT", 3, None)


# -- broken credentials ----------------------------------------------------------------------------------


async def test_an_expired_whatsapp_token_pauses_the_channel_without_spending_attempts(
        database_url: str, providers: Scripted, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="invoiceiq")
    providers.wa_token_expired = True
    # Two attempts only: a broken token that spent them would send both invoices to SMS.
    settings = make_settings(database_url, INVOICEIQ_OUTBOX_MAX_ATTEMPTS="2")
    async with running_daemon(settings, providers=providers, clock=clock) as h:
        assert (await h.client.get("/readyz")).status_code == 200
        await new_invoice(h, CUSTOMER)
        await new_invoice(h, OTHER, 300, "Airtime top-up")
        await wait_invoice_row(h, "1001", "the refused send", last_error=(
            "190: Error validating access token: Session has expired on Friday, 26-Apr-24 06:00:00 PDT."
            " The current time is Sunday, 28-Apr-24 03:40:10 PDT."))
        ready = await h.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "fail", "checks": {"channels": "whatsapp: credentials rejected (190)"}}
        alerts = [r for r in caplog.records if getattr(r, "event", None) == "channel_auth_failed"]
        assert alerts and all(r.levelno == logging.ERROR and r.context["alert"] is True
                              and r.context["code"] == "190" for r in alerts)
        # However many rounds pass, the invoices keep their attempts.
        for round_no in range(4):
            now = clock.now_ms()

            async def round_over() -> bool:
                tried = {to for c, to, t in providers.attempts if t == now and c == "WHATSAPP"}
                found = await rows(h, "kind = 'invoice'")
                assert h.daemon.outbox is not None
                # The first round may meet one invoice only (the channel pauses at the first refusal).
                return (round_no == 0 or {CUSTOMER, OTHER} <= tried) and h.daemon.outbox.in_flight == 0 and all(
                    r["status"] == "PENDING" and (r["attempts"] == 0 or round_no == 0) for r in found)

            await until(round_over, f"round {round_no} of refusals")
            found = await rows(h, "kind = 'invoice'")
            assert [(r["status"], r["attempts"]) for r in found] == [("PENDING", 0), ("PENDING", 0)]
            assert (await h.client.get("/readyz")).status_code == 503
            if round_no < 3:
                clock.advance(60_000)
        assert providers.sent == []  # nothing went anywhere, no SMS fallback either
        assert len(providers.attempts) >= 7
        # The token works again: the next round delivers both, once each.
        providers.wa_token_expired = False
        clock.advance(60_000)
        await h.wait_for_texts(MERCHANT, 2)
        await settle(h)
        assert [template_params(s)[2] for s in providers.to(CUSTOMER)] == ["1001"]
        assert [template_params(s)[2] for s in providers.to(OTHER)] == ["1002"]
        assert sorted(providers.texts(MERCHANT)) == sorted([confirmation("1001", CUSTOMER), confirmation("1002", OTHER)])
        assert [(r["status"], r["attempts"]) for r in await rows(h, "kind = 'invoice'")] == [("SENT", 1), ("SENT", 1)]
        ready = await h.client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ok"}


async def test_a_rejected_sms_api_key_pauses_sms_only(h: Handle, providers: Scripted, clock: ManualClock) -> None:
    providers.wa_fail_for[CUSTOMER] = NOT_ON_WHATSAPP
    providers.sms_key_rejected = True
    created = await new_invoice(h)
    await wait_invoice_row(h, "1001", "the refused SMS", channel="SMS",
                           last_error="401: The supplied authentication is invalid")
    ready = await h.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"channels": "sms: credentials rejected (401)"}
    # WhatsApp still flows while SMS is paused.
    await outbox_pass(h, Channel.WHATSAPP)
    row = await invoice_row(h, "1001", "SMS")
    assert (row["status"], row["attempts"], row["next_attempt_at_ms"]) == ("PENDING", 0, START + 60_000)
    providers.sms_key_rejected = False
    clock.advance(60_000)
    await h.wait_for_texts(MERCHANT, 2)
    await settle(h)
    assert providers.texts(CUSTOMER) == [
        f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: {created['pay_link']}"]
    assert (await invoice_row(h, "1001", "SMS"))["attempts"] == 1
    assert (await h.client.get("/readyz")).status_code == 200


# -- Africa's Talking per-recipient status codes ------------------------------------------------------------

SMS_CODES = {100: "Processed", 101: "Success", 102: "Queued", 403: "InvalidPhoneNumber", 406: "UserInBlacklist",
             500: "InternalServerError", 501: "GatewayError", 502: "RejectedByGateway"}


def code_msisdn(code: int) -> str:
    return f"25471100{code:04d}"  # 254711000100 ... 254711000502


async def test_sms_recipient_status_codes_accept_fail_or_retry(
        h: Handle, providers: Scripted, clock: ManualClock) -> None:
    """Every customer here is not on WhatsApp; each one's first SMS gets one statusCode."""
    invoices: dict[int, dict[str, Any]] = {}
    for code in SMS_CODES:
        providers.wa_fail_for[code_msisdn(code)] = NOT_ON_WHATSAPP
        providers.sms_script[code_msisdn(code)] = [code]
    for code in SMS_CODES:
        invoices[code] = await new_invoice(h, code_msisdn(code), 1000 + code, "Cleaning service")
    await until(lambda: _all_sms_rows_answered(h), "every SMS row to be answered")
    await settle(h)

    def short(code: int) -> str:
        return f"0711\u2026{code:03d}"

    for code, name in SMS_CODES.items():
        inv = invoices[code]
        row = await invoice_row(h, inv["id"], "SMS")
        if code < 200:  # accepted
            assert (row["status"], row["attempts"]) == ("SENT", 1), code
            assert row["provider_message_id"].startswith(f"ATXid_code{code}_")
            assert (await h.client.get(f"/invoices/{inv['id']}", headers=AUTH)).json()["status"] == "SENT"
        elif code < 500:  # permanent: failed with the reason, the merchant told
            assert (row["status"], row["attempts"], row["last_error"]) == ("FAILED", 1, f"{code}: {name}"), code
            assert (await h.client.get(f"/invoices/{inv['id']}", headers=AUTH)).json()["status"] == "FAILED"
            failed = [p for c, _, e, p in await log_events(h, inv["id"]) if (c, e) == ("SMS", "failed")]
            assert [(p["code"], p["reason"]) for p in failed] == [(str(code), f"{code}: {name}")]
            amount = f"{1000 + code:,}"
            assert (f"Invoice #{inv['id']} (KES {amount}) could not be delivered to {short(code)} by WhatsApp or SMS.\n"
                    "Check the number, then send a new invoice.") in providers.texts(MERCHANT)
        else:  # transient: back off and retry
            assert (row["status"], row["attempts"], row["last_error"]) == ("PENDING", 1, f"{code}: {name}"), code
            assert in_jitter(row["next_attempt_at_ms"], START, 2_000)
    clock.advance(2_500)
    await until(lambda: _retries_done(h), "the retried SMS")
    await settle(h)
    for code in (500, 501, 502):
        row = await invoice_row(h, invoices[code]["id"], "SMS")
        assert (row["status"], row["attempts"], row["last_error"]) == ("SENT", 2, None)
        assert len(providers.to(code_msisdn(code))) == 1
    # Each accepted or retried invoice: the confirmation and the SMS notice, once.
    for code in (100, 101, 102, 500, 501, 502):
        inv = invoices[code]
        mine = [t for t in providers.texts(MERCHANT) if f"#{inv['id']} " in t]
        assert mine == [confirmation(inv["id"], code_msisdn(code)),
                        f"Invoice #{inv['id']} (KES {1000 + code:,}) went to {short(code)} by SMS because the"
                        " number is not on WhatsApp."], code
    for code in (403, 406):
        assert providers.to(code_msisdn(code)) == []


async def _all_sms_rows_answered(h: Handle) -> bool:
    found = await rows(h, "channel = 'SMS' AND kind = 'invoice'")
    return len(found) == len(SMS_CODES) and all(r["status"] != "SENDING" and r["attempts"] == 1 for r in found)


async def _retries_done(h: Handle) -> bool:
    found = await rows(h, "channel = 'SMS' AND kind = 'invoice' AND status IN ('PENDING', 'SENDING')")
    return not found


async def test_an_empty_sms_balance_is_an_account_alert_not_a_bad_number(
        h: Handle, providers: Scripted, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="invoiceiq")
    providers.wa_fail_for[CUSTOMER] = NOT_ON_WHATSAPP
    providers.sms_script[CUSTOMER] = [(201, {"SMSMessageData": {"Message": "Sent to 0/1 Total Cost: 0", "Recipients": [
        {"statusCode": 405, "number": f"+{CUSTOMER}", "status": "InsufficientBalance", "cost": "0",
         "messageId": "None"}]}}, {})]
    await new_invoice(h)
    await until(lambda: _sms_answered(h), "the SMS to be answered")
    await outbox_pass(h)
    row = await invoice_row(h, "1001", "SMS")
    assert row["status"] != "FAILED", row["last_error"]
    assert (await h.client.get("/invoices/1001", headers=AUTH)).json()["status"] != "FAILED"
    assert not [t for t in providers.texts(MERCHANT) if "Check the number" in t]
    assert [r for r in caplog.records if getattr(r, "context", {}).get("alert") is True]


async def _sms_answered(h: Handle) -> bool:
    found = await rows(h, "channel = 'SMS' AND kind = 'invoice' AND status <> 'SENDING' AND last_error IS NOT NULL")
    return bool(found)


async def test_a_burst_of_sends_reads_the_next_due_time_once_not_per_claim(
        h: Handle, providers: Scripted, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The earliest future due time walks every unfinished row (in a reader thread); it used
    to be read after every claim that left a slot free, several times per send. Now it is
    kept for ``NEXT_DUE_TTL_MS`` of the outbox's clock (here standing still): ten invoices,
    twenty sends, at most a couple of reads. A retry the outbox schedules itself still goes at its
    time (the backoff tests above step the clock to it)."""
    from invoiceiq.actors import outbox as outbox_actor

    reads = {"n": 0}
    real = outbox.next_due_ms

    async def counted(tx: Tx, now_ms: int, channels: Any = (Channel.WHATSAPP, Channel.SMS)) -> int | None:
        reads["n"] += 1
        return await real(tx, now_ms, channels)

    monkeypatch.setattr(outbox, "next_due_ms", counted)
    for n in range(10):
        await new_invoice(h, msisdn=f"2547123450{n:02d}")
    await h.wait_for(lambda: len(providers.to(MERCHANT)) >= 10, what="ten confirmations")
    await settle(h)
    assert len([s for s in providers.sent if s.kind == "template"]) == 10
    assert reads["n"] <= 2, reads  # (read at start-up, kept since: 0 here)
    # And once the clock has moved past the time kept, it is read again.
    before = reads["n"]
    clock.advance(outbox_actor.NEXT_DUE_TTL_MS)
    await outbox_pass(h)
    assert reads["n"] > before


async def test_a_retry_scheduled_while_the_next_due_time_is_read_is_not_hidden_by_it(clock: ManualClock) -> None:
    """The outbox reads the earliest due time in a reader thread and keeps it for a second of
    its clock. A send failing meanwhile schedules its retry after the read began: the answer
    may not include it, and keeping it hid the retry until the kept time ran out (with the
    test's clock standing still: for ever; a full-suite run caught it). A read that overlaps
    a retry is used once and not kept."""
    from types import SimpleNamespace

    from invoiceiq.actors.outbox import OutboxActor

    now = clock.now_ms()
    retry_at = now + 400
    answers = iter([None, retry_at])  # the first read's snapshot predates the retry

    class Reader:
        reads = 0

        async def scan(self, job: Any) -> Any:
            Reader.reads += 1
            answer = next(answers)
            if Reader.reads == 1:
                actor._due_at(retry_at)  # the failing send, while this read is in flight
            return answer

    core = SimpleNamespace(store=Reader(), clock=clock, settings=make_settings("sqlite:///unused.db"),
                           sms_configured=False)
    actor = OutboxActor(core=core, whatsapp=None, sms=None, stopping=anyio.Event(),  # type: ignore[arg-type]
                        worker_id="test")
    channels = (Channel.WHATSAPP,)
    assert await actor._next_due(now, channels) is None
    assert await actor._next_due(now, channels) == retry_at  # read again, not the kept None
    assert Reader.reads == 2
    assert await actor._next_due(now, channels) == retry_at  # and this answer is kept
    assert Reader.reads == 2


async def test_no_more_sends_are_in_flight_than_outbox_max_in_flight(database_url: str, clock: ManualClock) -> None:
    """``outbox.max_in_flight`` is how many sends wait on the provider at once: with the Graph
    API holding every answer, eight queued sends to eight recipients reach it three at a time
    (not one, not all eight), and all eight go out once it answers."""
    from invoiceiq.daemon import Daemon
    from harness import serving

    held = anyio.Event()
    seen: list[str] = []
    state = {"now": 0, "peak": 0}

    async def graph(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            await held.wait()
        finally:
            state["now"] -= 1
        seen.append(body["to"])
        return httpx.Response(200, json={"messaging_product": "whatsapp", "contacts": [],
                                         "messages": [{"id": f"wamid.H{len(seen)}"}]})

    recipients = [f"2547123460{n:02d}" for n in range(8)]
    async with httpx.AsyncClient(transport=httpx.MockTransport(graph)) as http:
        daemon = Daemon(make_settings(database_url, INVOICEIQ_OUTBOX_MAX_IN_FLIGHT="3"), clock=clock, http=http)
        async with serving(daemon):
            now = clock.now_ms()

            async def queue(tx: Tx) -> None:
                for to in recipients:
                    await outbox.enqueue(tx, recipient=to, channel=Channel.WHATSAPP, kind="reply", now_ms=now,
                                         content=delivery.reply_content(copy.Reply("hello")))

            await daemon.store.write(queue)
            daemon.dispatch.wake("outbox")
            await until(lambda: state["now"] >= 3, "three sends waiting on the provider")
            # The outbox claims as many rows as it has free slots in one statement, before
            # the sends start: had the limit not held, all eight would be claimed already.
            claimed = await daemon.store.read(lambda tx: tx.all(
                "SELECT status, COUNT(*) AS n FROM outbox GROUP BY status ORDER BY status"))
            assert [(r["status"], r["n"]) for r in claimed] == [("PENDING", 5), ("SENDING", 3)]
            assert state["peak"] == 3
            held.set()
            await until(lambda: len(seen) == 8, "all eight sends")
    assert sorted(seen) == recipients and state["peak"] == 3


def test_the_daemons_provider_client_has_a_connection_for_every_send_and_the_payments() -> None:
    """Fewer pooled connections than sends in flight would cap the outbox below its setting
    silently (the extra sends queue for a connection, their time counting against their
    timeout): the daemon's client holds ``outbox.max_in_flight`` plus one connection for each
    payment turn (``mpesa.max_in_flight``)."""
    from invoiceiq.daemon import _make_http

    http = _make_http(7, 5)
    pool = http._transport._pool  # type: ignore[attr-defined]
    assert pool._max_connections == pool._max_keepalive_connections == 12
