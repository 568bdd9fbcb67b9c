"""core/delivery.py without I/O: which message an invoice becomes, how long a retry waits, and
what a failure leads to (issue 4, "Reaching the customer").

* The 24-hour rule: inside 24 hours of the customer's last inbound message the invoice is the
  brief's interactive message (7.3.6) with ``Pay with M-PESA`` / ``View details``; otherwise the
  approved template ``whatsapp.invoice_template`` in ``whatsapp.template_language`` with body
  parameters name, amount, invoice id and pay URL (in that order) and a quick-reply payload
  carrying the invoice id. The window is judged at ``now_ms`` (send time).
* ``retry_delay_ms``: exponential backoff with +/-25 % jitter, never sooner than Retry-After.
* ``after_failure``: transient -> retry until ``max_attempts``, then fallback (WhatsApp with SMS
  configured) or fail; permanent -> fallback or fail at once; auth -> pause the channel.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from invoiceiq.core import copy, delivery
from invoiceiq.core.delivery import Decision, ErrorKind, Outcome, Template
from invoiceiq.core.model import Button, Channel, Invoice, InvoiceStatus
from invoiceiq.gateways.whatsapp import WhatsAppClient

SCHEMA = json.loads((Path(__file__).resolve().parent / "fixtures" / "providers" / "meta-openapi"
                     / "send_message.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)

HOUR_MS = 3_600_000
NOW = 1_764_158_400_000  # 2025-11-26 12:00 UTC
PAY_URL = "https://pay.test/p/Zq3xK9vT2mWcR8yL4nBd6fHs"
TEMPLATE = "invoice_notification"


def make_invoice(invoice_id: str = "1001", *, name: str | None = "Mary Wanjiku", amount_kes: int = 2500,
                 description: str = "Cleaning service", msisdn: str = "254712345678") -> Invoice:
    return Invoice(id=invoice_id, msisdn=msisdn, customer_name=name, amount_cents=amount_kes * 100,
                   description=description, status=InvoiceStatus.SENT, pay_token="tok", created_at_ms=NOW)


def render(invoice: Invoice, *, last_inbound_ms: int | None, now_ms: int = NOW, purpose: str = "invoice",
           template: str = TEMPLATE, language: str = "en", pay_url: str = PAY_URL) -> copy.Reply | Template:
    return delivery.invoice_message(invoice, purpose, last_inbound_ms=last_inbound_ms, now_ms=now_ms,
                                    template=template, language=language, pay_url=pay_url)


# -- the 24-hour window ----------------------------------------------------------------------------


def test_the_window_is_24_hours_after_the_last_inbound_message() -> None:
    assert delivery.WINDOW_MS == 24 * HOUR_MS
    assert not delivery.in_window(None, NOW)  # never wrote to us
    assert delivery.in_window(NOW, NOW)
    assert delivery.in_window(NOW - 24 * HOUR_MS + 1, NOW)  # one millisecond left
    assert not delivery.in_window(NOW - 24 * HOUR_MS, NOW)  # exactly 24 hours: closed
    assert not delivery.in_window(NOW - 30 * 24 * HOUR_MS, NOW)


def test_inside_the_window_the_invoice_is_the_briefs_interactive_message() -> None:
    message = render(make_invoice(), last_inbound_ms=NOW - 23 * HOUR_MS)
    assert isinstance(message, copy.Reply)
    # 7.3.6 word for word.
    assert message.text == ("InvoiceIQ \u2014 Invoice #1001\nAmount: KES 2,500\nFor: Mary Wanjiku\n"
                            "Item: Cleaning service")
    assert message.buttons == (Button("pay_now:1001", "Pay with M-PESA"), Button("view_details:1001", "View details"))
    assert message.footer is None


def test_inside_the_window_without_a_name_the_message_says_customer() -> None:
    message = render(make_invoice("1042", name=None, amount_kes=250_000, description="Logo design"),
                     last_inbound_ms=NOW - 1)
    assert isinstance(message, copy.Reply)
    assert message.text == "InvoiceIQ \u2014 Invoice #1042\nAmount: KES 250,000\nFor: Customer\nItem: Logo design"
    assert [b.id for b in message.buttons] == ["pay_now:1042", "view_details:1042"]


def test_a_reminder_inside_the_window_is_the_reminder_message_with_the_same_buttons() -> None:
    message = render(make_invoice(), last_inbound_ms=NOW - HOUR_MS, purpose="reminder")
    assert isinstance(message, copy.Reply)
    assert message.text == "Reminder: Invoice #1001 (KES 2,500) is still unpaid.\nItem: Cleaning service"
    assert message.buttons == (Button("pay_now:1001", "Pay with M-PESA"), Button("view_details:1001", "View details"))


@pytest.mark.parametrize("last_inbound_ms", [None, NOW - 24 * HOUR_MS, NOW - 24 * HOUR_MS - 1, NOW - 90 * 24 * HOUR_MS])
def test_outside_the_window_the_invoice_is_the_approved_template(last_inbound_ms: int | None) -> None:
    message = render(make_invoice(), last_inbound_ms=last_inbound_ms)
    # Body parameters in the template's order: name, amount, invoice id, pay URL.
    assert message == Template(name=TEMPLATE, language="en",
                               params=("Mary Wanjiku", "2,500", "1001", PAY_URL), payloads=("pay_now:1001",))


def test_the_template_name_and_language_come_from_the_settings_and_a_missing_name_says_customer() -> None:
    message = render(make_invoice("1077", name=None, amount_kes=1), last_inbound_ms=None,
                     template="invoice_v2", language="sw", pay_url="https://pay.example.co.ke/p/abc")
    assert message == Template(name="invoice_v2", language="sw",
                               params=("Customer", "1", "1077", "https://pay.example.co.ke/p/abc"),
                               payloads=("pay_now:1077",))


def test_a_reminder_outside_the_window_is_still_the_template() -> None:
    # Only a template may open a conversation: a reminder outside the window goes as one too.
    message = render(make_invoice(), last_inbound_ms=NOW - 25 * HOUR_MS, purpose="reminder")
    assert isinstance(message, Template)
    assert message.params == ("Mary Wanjiku", "2,500", "1001", PAY_URL)


def test_the_window_is_judged_when_the_message_leaves_not_when_it_was_queued() -> None:
    invoice = make_invoice()
    wrote = NOW - 23 * HOUR_MS
    assert isinstance(render(invoice, last_inbound_ms=wrote, now_ms=NOW), copy.Reply)
    # The same queued invoice, sent an hour later (a retry in backoff): the window has closed.
    assert isinstance(render(invoice, last_inbound_ms=wrote, now_ms=NOW + HOUR_MS), Template)


@pytest.mark.parametrize("invoice_id", ["1001", "1042", "987654"])
def test_every_button_id_and_payload_carries_the_invoice_id(invoice_id: str) -> None:
    invoice = make_invoice(invoice_id)
    inside = render(invoice, last_inbound_ms=NOW)
    reminder = render(invoice, last_inbound_ms=NOW, purpose="reminder")
    outside = render(invoice, last_inbound_ms=None)
    assert isinstance(inside, copy.Reply) and isinstance(reminder, copy.Reply) and isinstance(outside, Template)
    ids = [b.id for b in inside.buttons] + [b.id for b in reminder.buttons] + list(outside.payloads)
    assert ids and all(i.endswith(f":{invoice_id}") for i in ids), ids
    assert outside.params[2] == invoice_id


@pytest.mark.anyio
async def test_the_template_on_the_wire_has_the_parameters_in_order_and_a_quick_reply_payload() -> None:
    """The Template rendered by the real WhatsApp client: the body Meta receives."""
    bodies: list[dict] = []  # type: ignore[type-arg]

    def graph(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"messaging_product": "whatsapp", "contacts": [
            {"input": "254712345678", "wa_id": "254712345678"}], "messages": [{"id": "wamid.X", "message_status": "accepted"}]})

    message = render(make_invoice(), last_inbound_ms=None)
    assert isinstance(message, Template)
    async with httpx.AsyncClient(transport=httpx.MockTransport(graph)) as http:
        client = WhatsAppClient(http, "https://graph.test/v25.0", "106540352242922", "token")
        await client.send_template("254712345678", message.name, message.language, message.params, message.payloads)
    (body,) = bodies
    assert not list(VALIDATOR.iter_errors(body))
    assert body["template"] == {
        "name": "invoice_notification", "language": {"code": "en"},
        "components": [
            {"type": "body", "parameters": [{"type": "text", "text": t}
                                           for t in ("Mary Wanjiku", "2,500", "1001", PAY_URL)]},
            {"type": "button", "sub_type": "quick_reply", "index": "0",
             "parameters": [{"type": "payload", "payload": "pay_now:1001"}]},
        ]}


# -- the SMS form of an invoice --------------------------------------------------------------------


def test_the_sms_forms_of_an_invoice_and_a_reminder() -> None:
    invoice = make_invoice()
    assert delivery.invoice_sms(invoice, "invoice", PAY_URL) == (
        f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: {PAY_URL}")
    assert delivery.invoice_sms(invoice, "reminder", PAY_URL) == (
        f"Reminder: Invoice #1001, KES 2,500 is still unpaid. Pay with M-PESA: {PAY_URL}")


@pytest.mark.parametrize("description", [
    "x" * 120,
    "Logo design first milestone, revisions included, delivered as PNG and SVG files with the brand guide",
    "Caf\u00e9 \u2014 \u201cdeluxe\u201d \U0001f9f9 cleaning \u2026 na ma\u00f1ana",
])
def test_an_invoice_sms_is_one_gsm7_message_with_number_amount_and_link(description: str) -> None:
    invoice = make_invoice("1001", amount_kes=250_000, description=description)
    for purpose in ("invoice", "reminder"):
        text = delivery.invoice_sms(invoice, purpose, PAY_URL)
        length = copy.gsm7_length(text)
        assert length is not None and length <= 160, (length, text)
        assert "Invoice #1001" in text and "KES 250,000" in text and text.endswith(f"Pay with M-PESA: {PAY_URL}")


def test_a_long_description_is_cut_in_the_sms_never_the_link() -> None:
    text = delivery.invoice_sms(make_invoice(description="y" * 120), "invoice", PAY_URL)
    assert text == f"Invoice #1001, KES 2,500 for {'y' * 66}... Pay with M-PESA: {PAY_URL}"
    assert len(text) == 159


def test_the_sms_form_of_a_queued_text_is_gsm7() -> None:
    content = delivery.reply_content(copy.Reply("Invoice #1001 (KES 2,500) \u2014 thanks \u2019n\u2019 all \u2714"))
    assert delivery.sms_from_content(content) == "Invoice #1001 (KES 2,500) - thanks 'n' all "
    # Its own SMS form wins over the WhatsApp body.
    with_sms = delivery.reply_content(copy.Reply("WhatsApp words"), sms="SMS words")
    assert delivery.sms_from_content(with_sms) == "SMS words"
    assert delivery.reply_from_content(with_sms) == copy.Reply("WhatsApp words")


def test_a_buttons_message_survives_the_outbox_round_trip() -> None:
    reply = copy.customer_invoice(make_invoice())
    stored = json.loads(json.dumps(delivery.reply_content(reply)))  # as the outbox keeps it
    assert stored["type"] == "buttons"
    assert delivery.reply_from_content(stored) == reply
    # A plain text keeps its footer by appending it (text messages have none).
    assert delivery.plain_text(copy.Reply("Body", footer="Foot")) == "Body\n\nFoot"


# -- retry_delay_ms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "low", "mid"), [
    (0, 1_500, 2_000),    # before any attempt: the base
    (1, 1_500, 2_000),
    (2, 3_000, 4_000),
    (3, 6_000, 8_000),
    (5, 24_000, 32_000),
    (9, 384_000, 512_000),
])
def test_backoff_doubles_from_the_base_with_jitter_of_a_quarter_each_way(attempts: int, low: int, mid: int) -> None:
    def delay(jitter: float) -> int:
        return delivery.retry_delay_ms(attempts, base_s=2, max_s=600, retry_after_s=None, jitter=jitter)

    assert delay(0.0) == low           # -25 %
    assert delay(0.5) == mid           # the exponential value itself
    top = min(mid * 1.25, 600_000)  # the jitter never goes past the configured maximum
    assert delay(0.999999) <= top and delay(0.999999) >= top - 1


def test_backoff_is_capped_at_the_maximum() -> None:
    assert delivery.retry_delay_ms(10, base_s=2, max_s=600, retry_after_s=None, jitter=0.5) == 600_000
    assert delivery.retry_delay_ms(60, base_s=2, max_s=600, retry_after_s=None, jitter=0.5) == 600_000
    assert delivery.retry_delay_ms(10, base_s=2, max_s=600, retry_after_s=None, jitter=0.0) == 450_000


def test_retry_after_is_a_floor_not_a_replacement() -> None:
    # The provider's Retry-After when it is longer than our backoff...
    assert delivery.retry_delay_ms(1, base_s=2, max_s=600, retry_after_s=120, jitter=0.5) == 120_000
    # ...even beyond our own maximum (the provider decides when it takes messages again)...
    assert delivery.retry_delay_ms(1, base_s=2, max_s=600, retry_after_s=3_600, jitter=0.0) == 3_600_000
    # ...and our backoff when it is longer than Retry-After.
    assert delivery.retry_delay_ms(5, base_s=2, max_s=600, retry_after_s=1, jitter=0.5) == 32_000
    assert delivery.retry_delay_ms(1, base_s=2, max_s=600, retry_after_s=0, jitter=0.5) == 2_000


@given(attempts=st.integers(min_value=1, max_value=40), base_s=st.integers(min_value=1, max_value=30),
       extra_s=st.integers(min_value=0, max_value=3_600), jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
       retry_after_s=st.one_of(st.none(), st.integers(min_value=0, max_value=7_200)))
def test_retry_delay_stays_within_the_jittered_bounds(attempts: int, base_s: int, extra_s: int, jitter: float,
                                                      retry_after_s: int | None) -> None:
    max_s = base_s + extra_s
    backoff = min(max_s * 1000, base_s * 1000 * 2 ** (attempts - 1))
    delay = delivery.retry_delay_ms(attempts, base_s=base_s, max_s=max_s, retry_after_s=retry_after_s, jitter=jitter)
    floor = max(int(backoff * 0.75), (retry_after_s or 0) * 1000)
    assert floor <= delay <= max(backoff * 1.25, (retry_after_s or 0) * 1000)
    # More jitter never means a shorter wait (the spread is monotonic in the random draw).
    assert delivery.retry_delay_ms(attempts, base_s=base_s, max_s=max_s, retry_after_s=retry_after_s,
                                   jitter=jitter + (1.0 - jitter) / 2) >= delay


def test_the_jittered_delay_never_exceeds_the_configured_maximum() -> None:
    for jitter in (0.5, 0.75, 0.999):
        assert delivery.retry_delay_ms(12, base_s=2, max_s=600, retry_after_s=None, jitter=jitter) <= 600_000


# -- after_failure ---------------------------------------------------------------------------------


def decide(kind: ErrorKind, *, channel: Channel = Channel.WHATSAPP, attempts: int = 1, max_attempts: int = 10,
           can_fallback: bool = True, retry_after_s: int | None = None, jitter: float = 0.5) -> Decision:
    return delivery.after_failure(kind, channel=channel, attempts=attempts, max_attempts=max_attempts,
                                  can_fallback=can_fallback, retry_after_s=retry_after_s, base_s=2, max_s=600,
                                  jitter=jitter)


def test_a_transient_failure_is_retried_with_the_backoff_until_the_last_attempt() -> None:
    assert decide(ErrorKind.TRANSIENT, attempts=1) == Decision(Outcome.RETRY, 2_000)
    assert decide(ErrorKind.TRANSIENT, attempts=3, jitter=0.0) == Decision(Outcome.RETRY, 6_000)
    assert decide(ErrorKind.TRANSIENT, attempts=9, max_attempts=10) == Decision(Outcome.RETRY, 512_000)
    assert decide(ErrorKind.TRANSIENT, attempts=1, retry_after_s=120) == Decision(Outcome.RETRY, 120_000)
    assert decide(ErrorKind.TRANSIENT, channel=Channel.SMS, attempts=2) == Decision(Outcome.RETRY, 4_000)


def test_an_exhausted_transient_failure_falls_back_to_sms_or_fails() -> None:
    assert decide(ErrorKind.TRANSIENT, attempts=10, max_attempts=10) == Decision(Outcome.FALLBACK)
    assert decide(ErrorKind.TRANSIENT, attempts=3, max_attempts=3) == Decision(Outcome.FALLBACK)
    assert decide(ErrorKind.TRANSIENT, attempts=11, max_attempts=10) == Decision(Outcome.FALLBACK)
    # No SMS configured, or already the SMS: nothing left to try.
    assert decide(ErrorKind.TRANSIENT, attempts=10, can_fallback=False) == Decision(Outcome.FAIL)
    assert decide(ErrorKind.TRANSIENT, channel=Channel.SMS, attempts=10) == Decision(Outcome.FAIL)


def test_a_permanent_failure_never_retries() -> None:
    assert decide(ErrorKind.PERMANENT, attempts=1) == Decision(Outcome.FALLBACK)
    assert decide(ErrorKind.PERMANENT, attempts=1, retry_after_s=30) == Decision(Outcome.FALLBACK)
    assert decide(ErrorKind.PERMANENT, attempts=1, can_fallback=False) == Decision(Outcome.FAIL)
    assert decide(ErrorKind.PERMANENT, channel=Channel.SMS, attempts=1) == Decision(Outcome.FAIL)


def test_a_throttled_account_holds_the_channel_longer_each_time_and_never_falls_back() -> None:
    def hold(holds: int, *, attempts: int = 1, retry_after_s: int | None = None, channel: Channel = Channel.WHATSAPP,
             can_fallback: bool = True) -> Decision:
        return delivery.after_failure(ErrorKind.THROTTLED, channel=channel, attempts=attempts, max_attempts=10,
                                      can_fallback=can_fallback, retry_after_s=retry_after_s, base_s=2, max_s=600,
                                      jitter=0.5, holds_in_a_row=holds)

    assert [hold(n).delay_ms for n in (1, 2, 3, 6, 7, 8, 1000)] == [
        1_000, 2_000, 4_000, 32_000, 60_000, 60_000, 60_000]
    # However many attempts: the account's limit says nothing about the message or the person.
    for attempts in (1, 10, 11):
        for channel in Channel:
            assert hold(1, attempts=attempts, channel=channel) == Decision(Outcome.HOLD, 1_000)
    assert hold(1, retry_after_s=30) == Decision(Outcome.HOLD, 30_000)
    assert hold(7, retry_after_s=30) == Decision(Outcome.HOLD, 60_000)
    assert hold(1, retry_after_s=300) == Decision(Outcome.HOLD, 300_000)  # Retry-After is never cut short


def test_an_auth_failure_pauses_the_channel_whatever_the_attempts() -> None:
    for attempts in (1, 10, 50):
        for channel in Channel:
            assert decide(ErrorKind.AUTH, channel=channel, attempts=attempts) == Decision(Outcome.PAUSE, 60_000)
    assert delivery.after_failure(ErrorKind.AUTH, channel=Channel.WHATSAPP, attempts=1, max_attempts=10,
                                  can_fallback=True, retry_after_s=None, base_s=2, max_s=600, jitter=0.5,
                                  pause_ms=5_000) == Decision(Outcome.PAUSE, 5_000)


def test_why_the_customer_got_an_sms_in_the_merchants_words() -> None:
    assert delivery.fallback_reason(131026) == "the number is not on WhatsApp"
    assert delivery.fallback_reason("131026") == "the number is not on WhatsApp"
    for code in (131047, "131049", "130429", None, "local"):
        assert delivery.fallback_reason(code) == "WhatsApp could not deliver it"


def test_provider_statuses_map_to_outbox_states() -> None:
    assert delivery.WHATSAPP_STATUS == {"sent": "SENT", "delivered": "DELIVERED", "read": "READ", "failed": "FAILED"}
    # Africa's Talking: Sent/Submitted/Buffered are on the way, Success is on the handset.
    assert delivery.SMS_STATUS == {"Sent": "SENT", "Submitted": "SENT", "Buffered": "SENT", "Success": "DELIVERED",
                                   "Failed": "FAILED", "Rejected": "FAILED"}
