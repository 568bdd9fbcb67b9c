"""The merchant's conversation end to end (issue 3): signed webhooks in, the real daemon, the Graph
API and Africa's Talking faked with respx.

Every test talks to the daemon through HTTP only (signed ``POST /whatsapp/webhook``), waits for
conditions with deadlines (``said``/``settle``/``wait_for``), and ends by checking that every
request body the daemon sent to the Graph API validates against Meta's own schema.

Texts are typed out literally: the brief's section 7 copy word for word, the rest as the bot's
copy defines it (with the invoice number, the amount and the times a broken daemon would get
wrong).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from harness import (
    CUSTOMER,
    GRAPH,
    MERCHANT,
    PHONE_ID,
    FakeProviders,
    Handle,
    Sent,
    inbound_text,
    make_settings,
    meta_schema_problems,
    busy_door,
    running_daemon,
    status_event,
    until,
)
from invoiceiq.clock import ManualClock
from invoiceiq.store import Store, Tx, conversations, inbox
from invoiceiq.store import customers as customer_store
from invoiceiq.store import invoices as invoice_store

pytestmark = pytest.mark.anyio

PROVIDERS_DIR = Path(__file__).resolve().parent / "fixtures" / "providers"

OTHER = "254722000111"  # a second customer

# -- the brief's copy (section 7), typed out ------------------------------------------------------

ASK_PHONE = "What is the customer's phone number? Use format 2547XXXXXXXX."
INVALID_PHONE = "Invalid phone. Please use format 2547XXXXXXXX."
ASK_NAME = "Customer name? (Optional) Reply with the name or send '-' to skip."
INVALID_NAME = "Name is too short/long. Please enter 2–60 characters, or send '-' to skip."
ASK_AMOUNT = "Amount in KES? (Whole number, e.g., 2500)"
INVALID_AMOUNT = "Invalid amount. Enter a whole number in KES (e.g., 2500)."
ASK_DESCRIPTION = "Short description of the invoice (3–120 chars)."
INVALID_DESCRIPTION = "Please enter 3–120 characters."
FLOW_CANCELLED = "Okay, cancelled. No invoice was created."
FLOW_HELP = "You can create an invoice step-by-step. At any time, send 'cancel' to stop."
NUDGE = "Still there? Reply to continue or send 'cancel' to stop."
CLOSED = "Session closed. Send 'new invoice' to start again."

# -- the bot's own copy where the brief has none ---------------------------------------------------

EXAMPLE = "Example: invoice 254712345678 2500 Cleaning service. Or tap New Invoice."
MERCHANT_HELP = ("Create: invoice <phone or name> <amount> <description>, "
                 "e.g. invoice 254712345678 2500 Cleaning, or tap New Invoice.\n"
                 "Manage: remind <no.>, cancel <no.>, status <no.>, unpaid.")
UNKNOWN = "Sorry, I didn't understand that. Send 'help' to see the commands, or tap New Invoice."
RATE_LIMITED = "You're sending messages too fast. Please wait a minute, then try again."

# Buttons as (id, title): a tap sends the id, which is also what the merchant could type.
CANCEL_BTN = [("cancel", "Cancel")]
NAME_BTNS = [("skip", "Skip"), ("cancel", "Cancel")]
REVIEW_BTNS = [("send", "Send"), ("edit amount", "Edit Amount"), ("edit description", "Edit Description")]
NEW_INVOICE_BTN = [("new invoice", "New Invoice")]


def confirm_buttons(invoice_id: str) -> list[tuple[str, str]]:
    return [(f"remind {invoice_id}", "Send reminder"), (f"cancel {invoice_id}", "Cancel")]


# -- fixtures --------------------------------------------------------------------------------------


def graph_bodies(providers: FakeProviders) -> list[dict[str, Any]]:
    """Every request body sent to the Graph API's /messages (accepted or refused by the fake)."""
    return [json.loads(r.content) for r in providers.requests
            if str(r.url) == f"{GRAPH}/{PHONE_ID}/messages"]


def schema_problems(providers: FakeProviders) -> list[str]:
    return [problem for body in graph_bodies(providers) for problem in meta_schema_problems(body)]


@pytest.fixture
def providers() -> Iterator[FakeProviders]:
    """The fake providers; at the end of each test every Graph API body must match Meta's schema."""
    fake = FakeProviders()
    yield fake
    problems = schema_problems(fake)
    assert not problems, "request bodies Meta's schema rejects:\n" + "\n".join(problems)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()  # 1_764_158_400_000 = 2025-11-26 12:00 UTC = 15:00 in Nairobi


@pytest.fixture
async def h(database_url: str, providers: FakeProviders, clock: ManualClock) -> AsyncIterator[Handle]:
    async with running_daemon(make_settings(database_url), providers=providers, clock=clock) as handle:
        yield handle


# -- helpers ---------------------------------------------------------------------------------------


def buttons(s: Sent) -> list[tuple[str, str]]:
    if s.kind != "interactive":
        return []
    return [(b["reply"]["id"], b["reply"]["title"]) for b in s.body["interactive"]["action"]["buttons"]]


def footer(s: Sent) -> str | None:
    if s.kind != "interactive":
        return None
    return s.body["interactive"].get("footer", {}).get("text")


def template_params(s: Sent) -> list[str]:
    assert s.kind == "template", s.body
    body = [c for c in s.body["template"]["components"] if c["type"] == "body"]
    return [p["text"] for p in body[0]["parameters"]]


_BACKLOG = ("SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL)"
            " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING'))")


async def settle(h: Handle, timeout: float = 5.0) -> None:
    """Nothing stored is waiting: every inbox event processed, every queued send sent.

    One statement, so one snapshot: ``Handle.settle`` reads the outbox and the inbox in two
    queries, and a session commit landing between them (inbox processed + reply queued) looks
    idle to it although the reply has not left yet.
    """
    outbox = h.daemon.outbox
    with anyio.fail_after(timeout):
        while True:
            backlog = await val(h, _BACKLOG)
            if backlog == 0 and (outbox is None or outbox.in_flight == 0):
                return
            await anyio.sleep(0.01)


async def said(h: Handle, text: str, sender: str = MERCHANT) -> list[Sent]:
    """Send ``text`` as ``sender``; once everything settled, the new messages to the merchant."""
    before = len(h.providers.to(MERCHANT))
    await h.say(sender, text)
    await settle(h)
    return h.providers.to(MERCHANT)[before:]


async def tapped(h: Handle, button_id: str) -> list[Sent]:
    before = len(h.providers.to(MERCHANT))
    await h.tap(MERCHANT, button_id)
    await settle(h)
    return h.providers.to(MERCHANT)[before:]


async def reply_to(h: Handle, text: str) -> Sent:
    """The one message the merchant gets for ``text``."""
    out = await said(h, text)
    assert len(out) == 1, [s.text for s in out]
    return out[0]


def texts(sent: list[Sent]) -> list[str]:
    return [s.text for s in sent]


async def val(h: Handle, sql: str, params: dict[str, Any] | None = None) -> Any:
    async def job(tx: Tx) -> Any:
        return await tx.val(sql, params)
    return await h.store.read(job)


async def invoice(h: Handle, invoice_id: str):  # type: ignore[no-untyped-def]
    return await h.store.read(lambda tx: invoice_store.get(tx, invoice_id))


async def one_line(h: Handle, text: str, invoice_id: str, msisdn: str) -> None:
    """A one-line invoice that must succeed: exactly the brief's confirmation comes back."""
    out = await said(h, text)
    assert texts(out) == [f"Invoice #{invoice_id} sent to {msisdn}. Use 'remind {invoice_id}' to nudge"
                          f" or 'cancel {invoice_id}' to cancel."]
    assert buttons(out[0]) == confirm_buttons(invoice_id)


async def guided(h: Handle, phone: str, name: str, amount: str, description: str) -> list[Sent]:
    """The guided flow without detours; returns what the final ``send`` produced."""
    for text in ("invoice", phone, name, amount, description):
        assert len(await said(h, text)) == 1
    return await tapped(h, "send")


async def quiet(h: Handle) -> None:
    """After moving the clock: the scheduler has looked at the new time and everything it found
    due (timers) has been processed and sent."""
    scheduler = h.daemon.scheduler
    assert scheduler is not None
    sweeps = scheduler.sweeps
    h.daemon.dispatch.wake("scheduler")
    await h.wait_for(lambda: scheduler.sweeps > sweeps, what="a scheduler sweep")

    async def nothing_due() -> bool:
        now = h.daemon.clock.now_ms()
        return not await h.store.read(lambda tx: conversations.due(tx, now))

    with anyio.fail_after(5):
        while not await nothing_due():
            await anyio.sleep(0.01)
    await settle(h)


async def conversation_stage(h: Handle) -> str:
    raw = await val(h, "SELECT state FROM conversations WHERE conv_key = :k", {"k": MERCHANT})
    state = json.loads(raw) if isinstance(raw, str) else raw
    return str(state["stage"])


def review(to: str, name: str, amount: str, item: str) -> str:
    return (f"Review invoice:\n• To: {to} ({name})\n• Amount: KES {amount}\n• Item: {item}\n\n"
            "Send to customer now?")


# -- the schema check itself must bite ------------------------------------------------------------


def test_meta_schema_rejects_what_meta_rejects() -> None:
    good = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": CUSTOMER,
            "type": "interactive", "interactive": {"type": "button", "body": {"text": "Hi"}, "action": {
                "buttons": [{"type": "reply", "reply": {"id": "a", "title": "Send reminder"}}]}}}
    assert not meta_schema_problems(good)
    too_long = json.loads(json.dumps(good))
    too_long["interactive"]["action"]["buttons"][0]["reply"]["title"] = "A title of 21 chars.."
    assert meta_schema_problems(too_long)


# -- one-line invoices -------------------------------------------------------------------------------


async def test_one_line_invoice_goes_to_the_customer_as_a_template_and_confirms(h: Handle) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", "254712345678")
    # The customer never wrote to us: outside the 24-hour window only a template may go.
    (to_customer,) = h.providers.to(CUSTOMER)
    stored = await invoice(h, "1001")
    assert to_customer.kind == "template"
    assert to_customer.body["template"]["name"] == "invoice_notification"
    assert template_params(to_customer) == ["Customer", "2,500", "1001", f"https://pay.test/p/{stored.pay_token}"]
    assert to_customer.button_ids == ["pay_now:1001"]
    # The confirmation came only after the provider accepted the customer's message.
    assert h.providers.sent.index(to_customer) < h.providers.sent.index(h.providers.to(MERCHANT)[0])
    assert stored.status.value == "SENT" and stored.amount_cents == 250_000
    assert stored.description == "Cleaning service" and stored.msisdn == CUSTOMER
    # Every message in and out is in the message log.
    assert await val(h, "SELECT COUNT(*) FROM message_log WHERE direction = 'IN'") == 1
    assert await val(h, "SELECT COUNT(*) FROM message_log WHERE direction = 'OUT' AND event = 'sent'") == 2


async def test_one_line_accepts_every_kenyan_phone_form_and_kes_amount(
        database_url: str, providers: FakeProviders) -> None:
    # Real clock here: the one-line path must not depend on a test clock.
    cases = [
        ("invoice 0712345678 2500 Cleaning service", "254712345678", 2500),
        ("invoice 0112345678 2,500 Cleaning service", "254112345678", 2500),
        ("invoice 712345678 KES 2500 Cleaning service", "254712345678", 2500),
        ("invoice 254712345678 Ksh 2,500 Cleaning service", "254712345678", 2500),
        ("invoice +254 712 345 678 1,250,000 Cleaning service", None, None),  # over the maximum
        ("invoice +254 712 345 678 250000 Logo design first milestone", "254712345678", 250_000),
        ("INVOICE 254-712-345-678 1 Cleaning service", "254712345678", 1),
        ("invoice 0712345678 300 abc", "254712345678", 300),  # the shortest description
        ("invoice 0712345678 300 " + "x" * 120, "254712345678", 300),  # and the longest
    ]
    async with running_daemon(make_settings(database_url), providers=providers) as h:
        number = 1001
        for text, msisdn, amount in cases:
            if msisdn is None:
                assert texts(await said(h, text)) == [
                    f"Invalid amount. The maximum is KES 250,000 per invoice.\n{EXAMPLE}"]
                continue
            await one_line(h, text, str(number), msisdn)
            stored = await invoice(h, str(number))
            assert (stored.msisdn, stored.amount_cents) == (msisdn, amount * 100)
            number += 1
        assert await val(h, "SELECT COUNT(*) FROM invoices") == 8
        assert len(h.providers.to("254112345678")) == 1


INVALID_ONE_LINE = [
    ("invoice 0812345678 2500 Cleaning service", f"{INVALID_PHONE}\n{EXAMPLE}"),
    ("invoice 071234567 2500 Cleaning service", f"{INVALID_PHONE}\n{EXAMPLE}"),
    ("invoice +1 650 555 1234 2500 Cleaning service", f"{INVALID_PHONE}\n{EXAMPLE}"),
    ("invoice 0712345678 25.50 Cleaning service", f"{INVALID_AMOUNT}\n{EXAMPLE}"),
    ("invoice 0712345678 2500.00 Cleaning service", f"{INVALID_AMOUNT}\n{EXAMPLE}"),
    ("invoice 0712345678 0 Cleaning service", f"{INVALID_AMOUNT}\n{EXAMPLE}"),
    ("invoice 0712345678 -500 Cleaning service", f"{INVALID_AMOUNT}\n{EXAMPLE}"),
    ("invoice 0712345678 two thousand Cleaning service", f"{INVALID_AMOUNT}\n{EXAMPLE}"),
    ("invoice 0712345678 300000 Cleaning service",
     f"Invalid amount. The maximum is KES 250,000 per invoice.\n{EXAMPLE}"),
    ("invoice 0712345678 2500 ab", f"Invalid description. {INVALID_DESCRIPTION}\n{EXAMPLE}"),
    ("invoice 0712345678 2500", f"Invalid description. {INVALID_DESCRIPTION}\n{EXAMPLE}"),
    ("invoice 0712345678 2500 " + "x" * 121, f"Invalid description. {INVALID_DESCRIPTION}\n{EXAMPLE}"),
]


async def test_invalid_one_line_creates_nothing_and_names_the_field(h: Handle) -> None:
    for text, reply in INVALID_ONE_LINE:
        answer = await reply_to(h, text)
        assert answer.text == reply, text
        assert buttons(answer) == NEW_INVOICE_BTN
        assert await val(h, "SELECT COUNT(*) FROM invoices") == 0, text
    assert [s.to for s in h.providers.sent] == [MERCHANT] * len(INVALID_ONE_LINE)
    assert await conversation_stage(h) == "IDLE"


# -- the guided flow ----------------------------------------------------------------------------------


async def test_guided_flow_every_prompt_error_edit_and_send(h: Handle) -> None:
    steps: list[tuple[str, bool, list[tuple[str, list[tuple[str, str]]]]]] = [
        ("new invoice", True, [(ASK_PHONE, CANCEL_BTN)]),  # the New Invoice button
        ("0812345678", False, [(INVALID_PHONE, CANCEL_BTN)]),
        ("help", False, [(FLOW_HELP, []), (ASK_PHONE, CANCEL_BTN)]),
        ("+254 712 345 678", False, [(ASK_NAME, NAME_BTNS)]),
        ("A", False, [(INVALID_NAME, NAME_BTNS)]),
        ("  Mary   Wanjiku ", False, [(ASK_AMOUNT, CANCEL_BTN)]),
        ("25.50", False, [(INVALID_AMOUNT, CANCEL_BTN)]),
        ("Ksh 2,500", False, [(ASK_DESCRIPTION, CANCEL_BTN)]),
        ("ab", False, [(INVALID_DESCRIPTION, CANCEL_BTN)]),
        ("Cleaning service (Wed 3pm)", False,
         [(review("254712345678", "Mary Wanjiku", "2,500", "Cleaning service (Wed 3pm)"), REVIEW_BTNS)]),
        ("edit amount", True, [(ASK_AMOUNT, CANCEL_BTN)]),  # tapped
        ("3000", False, [(review("254712345678", "Mary Wanjiku", "3,000", "Cleaning service (Wed 3pm)"), REVIEW_BTNS)]),
        ("Edit Description", False, [(ASK_DESCRIPTION, CANCEL_BTN)]),  # typed
        ("Logo design first milestone", False,
         [(review("254712345678", "Mary Wanjiku", "3,000", "Logo design first milestone"), REVIEW_BTNS)]),
        ("help", False, [(FLOW_HELP, []),
                         (review("254712345678", "Mary Wanjiku", "3,000", "Logo design first milestone"), REVIEW_BTNS)]),
    ]
    for text, tap, expected in steps:
        out = await (tapped(h, text) if tap else said(h, text))
        assert [(s.text, buttons(s)) for s in out] == expected, f"after {text!r}"
        for s in out:
            if s.text.startswith("Review invoice:"):
                assert footer(s) == "Send 'cancel' to stop."
        assert await val(h, "SELECT COUNT(*) FROM invoices") == 0
    assert h.providers.to(CUSTOMER) == []

    out = await tapped(h, "send")
    assert texts(out) == ["Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."]
    assert buttons(out[0]) == confirm_buttons("1001")
    (to_customer,) = h.providers.to(CUSTOMER)
    assert template_params(to_customer)[:3] == ["Mary Wanjiku", "3,000", "1001"]
    stored = await invoice(h, "1001")
    assert (stored.customer_name, stored.amount_cents, stored.description, stored.status.value) == (
        "Mary Wanjiku", 300_000, "Logo design first milestone", "SENT")
    # The flow is over: a stray "2500" is not an answer to anything any more.
    assert (await reply_to(h, "2500")).text == UNKNOWN


@pytest.mark.parametrize(("skip", "tap"), [("-", False), ("skip", False), ("SKIP", False), ("skip", True)])
async def test_guided_flow_name_can_be_skipped(h: Handle, skip: str, tap: bool) -> None:
    assert texts(await said(h, "invoice")) == [ASK_PHONE]
    assert texts(await said(h, "0712345678")) == [ASK_NAME]
    out = await (tapped(h, skip) if tap else said(h, skip))
    assert texts(out) == [ASK_AMOUNT]
    assert texts(await said(h, "2500")) == [ASK_DESCRIPTION]
    assert texts(await said(h, "Cleaning service")) == [review("254712345678", "—", "2,500", "Cleaning service")]
    out = await said(h, "Send")
    assert texts(out) == ["Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."]
    assert template_params(h.providers.to(CUSTOMER)[0])[0] == "Customer"
    assert (await invoice(h, "1001")).customer_name is None


@pytest.mark.parametrize(("answers", "tap"), [
    ([], False),  # at the phone step
    (["0712345678"], True),  # at the name step, the Cancel button
    (["0712345678", "Mary Wanjiku"], False),
    (["0712345678", "-", "2500"], True),
    (["0712345678", "-", "2500", "Cleaning service"], False),  # at the review
    (["0712345678", "-", "2500", "Cleaning service", "edit amount"], False),  # while editing
])
async def test_cancel_at_any_step_creates_nothing(h: Handle, answers: list[str], tap: bool) -> None:
    await said(h, "invoice")
    for text in answers:
        await said(h, text)
    out = await (tapped(h, "cancel") if tap else said(h, "Cancel"))
    assert texts(out) == [FLOW_CANCELLED]
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 0
    assert h.providers.to(CUSTOMER) == []
    assert await conversation_stage(h) == "IDLE"
    # Nothing of the draft is left: "send" now says the session is gone, "2500" is not understood.
    assert (await reply_to(h, "send")).text == CLOSED
    assert (await reply_to(h, "2500")).text == UNKNOWN
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 0


@pytest.mark.parametrize(("answers", "prompt"), [
    (["0712345678"], ASK_NAME),
    (["0712345678", "Mary Wanjiku"], ASK_AMOUNT),
    (["0712345678", "Mary Wanjiku", "2500"], ASK_DESCRIPTION),
])
async def test_help_mid_flow_repeats_the_question_and_keeps_the_draft(
        h: Handle, answers: list[str], prompt: str) -> None:
    await said(h, "new invoice")
    for text in answers:
        await said(h, text)
    assert texts(await said(h, "HELP")) == [FLOW_HELP, prompt]
    # The answers given so far survive the help.
    rest = ["0712345678", "Mary Wanjiku", "2500", "Cleaning service"][len(answers):]
    for text in rest:
        await said(h, text)
    out = await said(h, "send")
    assert texts(out)[0].startswith("Invoice #1001 sent to 254712345678.")
    stored = await invoice(h, "1001")
    assert (stored.customer_name, stored.amount_cents) == ("Mary Wanjiku", 250_000)


# -- name lookup -----------------------------------------------------------------------------------------


async def test_one_line_by_name_with_one_saved_customer(h: Handle) -> None:
    await guided(h, "0712345678", "Mary Wanjiku", "1000", "Earlier job")
    out = await said(h, "invoice mary WANJIKU Ksh 1,500 Deep clean")
    assert texts(out) == ["Invoice #1002 sent to 254712345678. Use 'remind 1002' to nudge or 'cancel 1002' to cancel."]
    stored = await invoice(h, "1002")
    assert (stored.msisdn, stored.customer_name, stored.amount_cents, stored.description) == (
        CUSTOMER, "Mary Wanjiku", 150_000, "Deep clean")
    assert template_params(h.providers.to(CUSTOMER)[-1])[:3] == ["Mary Wanjiku", "1,500", "1002"]


async def test_one_line_by_name_with_several_matches_asks_which(h: Handle) -> None:
    await guided(h, "0712345678", "Mary Wanjiku", "1000", "Earlier job")
    await guided(h, "0722000111", "MARY WANJIKU", "2000", "Another job")
    (pick,) = await said(h, "invoice Mary Wanjiku 1500 Deep clean")
    assert pick.text.startswith("Which Mary Wanjiku for KES 1,500? Reply with the number:\n"
                                "1. Mary Wanjiku (0712…678)\n"
                                "2. MARY WANJIKU (0722…111)")
    # ...and how to get out of it, in the footer or (a text message has none) in the body.
    assert "Send 'cancel' to stop." in f"{pick.text}\n{footer(pick) or ''}"
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 2
    assert texts(await said(h, "3")) == ["Please reply with a number from 1 to 2, or send 'cancel' to stop."]
    out = await said(h, "2")
    assert texts(out) == ["Invoice #1003 sent to 254722000111. Use 'remind 1003' to nudge or 'cancel 1003' to cancel."]
    stored = await invoice(h, "1003")
    assert (stored.msisdn, stored.customer_name, stored.amount_cents, stored.description) == (
        OTHER, "MARY WANJIKU", 150_000, "Deep clean")
    assert len(h.providers.to(CUSTOMER)) == 1  # nothing more for the other Mary


async def test_one_line_by_name_several_matches_then_cancel(h: Handle) -> None:
    await guided(h, "0712345678", "Mary Wanjiku", "1000", "Earlier job")
    await guided(h, "0722000111", "Mary Wanjiku", "2000", "Another job")
    await said(h, "invoice Mary Wanjiku 1500 Deep clean")
    assert texts(await said(h, "cancel")) == [FLOW_CANCELLED]
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 2
    assert (await reply_to(h, "1")).text == UNKNOWN


async def test_one_line_by_name_without_a_match_offers_the_guided_flow(h: Handle) -> None:
    await guided(h, "0712345678", "Mary Wanjiku", "1000", "Earlier job")
    answer = await reply_to(h, "invoice Peter Otieno 1500 Deep clean")
    assert answer.text == "No saved customer matches 'Peter Otieno'.\nUse their phone number instead, or tap New Invoice."
    assert buttons(answer) == NEW_INVOICE_BTN
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 1
    # The New Invoice button starts the guided flow.
    assert texts(await tapped(h, "new invoice")) == [ASK_PHONE]


async def test_one_line_by_name_with_too_many_matches_says_so(h: Handle, clock: ManualClock) -> None:
    async def seed(tx: Tx) -> None:
        for n in range(10):  # ten customers saved under the same name by earlier invoices
            await customer_store.upsert(tx, f"25472200{n:04d}", "Mary Wanjiku", clock.now_ms())
    await h.store.write(seed)
    answer = await reply_to(h, "invoice Mary Wanjiku 1500 Deep clean")
    assert answer.text == "Too many customers match 'Mary Wanjiku'.\nUse a fuller name or their phone number."
    assert await conversation_stage(h) == "IDLE"


# -- remind / cancel / status / unpaid ----------------------------------------------------------------


async def test_remind_resends_and_refuses_a_second_within_the_hour(h: Handle, clock: ManualClock) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    assert len(h.providers.to(CUSTOMER)) == 1
    # The confirmation's Send reminder button.
    assert texts(await tapped(h, "remind 1001")) == ["Reminder sent for Invoice #1001 (KES 2,500)."]
    assert len(h.providers.to(CUSTOMER)) == 2
    reminder = h.providers.to(CUSTOMER)[1]
    assert reminder.kind == "template" and template_params(reminder)[2] == "1001"
    # Within the hour: refused, with the time it is allowed again (15:00 EAT + 1 h).
    clock.advance(30 * 60_000)
    assert texts(await said(h, "remind #1001")) == [
        "Invoice #1001 (KES 2,500) was reminded recently.\nYou can remind #1001 again after 16:00."]
    assert len(h.providers.to(CUSTOMER)) == 2
    clock.advance(30 * 60_000 + 1)
    assert texts(await said(h, "Remind INV-1001")) == ["Reminder sent for Invoice #1001 (KES 2,500)."]
    assert len(h.providers.to(CUSTOMER)) == 3


async def test_remind_and_cancel_unknown_or_missing_numbers(h: Handle) -> None:
    assert texts(await said(h, "remind 9999")) == ["I can't find invoice #9999. Send 'unpaid' to see open invoices."]
    assert texts(await said(h, "status 1001")) == ["I can't find invoice #1001. Send 'unpaid' to see open invoices."]
    assert texts(await said(h, "remind")) == [
        "Please add the invoice number, e.g. 'remind 1042'.\nSend 'unpaid' to see open invoices."]
    assert texts(await said(h, "cancel")) == [
        "There's nothing to cancel. To cancel an invoice, send 'cancel' and its number, e.g. cancel 1042."]
    assert h.providers.to(CUSTOMER) == []


async def test_cancel_tells_the_customer_and_stops_reminders(h: Handle) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    assert texts(await tapped(h, "cancel 1001")) == [
        "Invoice #1001 (KES 2,500) is cancelled. We'll let the customer know."]
    assert h.providers.texts(CUSTOMER)[1] == "Invoice #1001 (KES 2,500) has been cancelled. You don't need to pay it."
    assert (await invoice(h, "1001")).status.value == "CANCELLED"
    assert texts(await said(h, "cancel #1001")) == ["Invoice #1001 (KES 2,500) was already cancelled."]
    assert texts(await said(h, "remind 1001")) == ["Invoice #1001 (KES 2,500) was cancelled, so no reminder was sent."]
    assert len(h.providers.to(CUSTOMER)) == 2  # told once, no reminder
    assert texts(await said(h, "unpaid")) == ["No unpaid invoices. Send 'invoice' to create one."]


async def test_a_paid_invoice_cannot_be_cancelled_or_reminded(h: Handle, clock: ManualClock) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    assert await h.store.write(lambda tx: invoice_store.mark_paid(tx, "1001", "TKQ1ABC2DE", clock.now_ms()))
    assert texts(await said(h, "cancel 1001")) == ["Invoice #1001 (KES 2,500) is already paid and can't be cancelled."]
    assert (await invoice(h, "1001")).status.value == "PAID"
    assert texts(await said(h, "remind 1001")) == ["Invoice #1001 (KES 2,500) is already paid, so no reminder was sent."]
    out = await said(h, "status 1001")
    assert texts(out) == ["Invoice #1001 (KES 2,500) for 0712…678: paid, receipt TKQ1ABC2DE.\n"
                          "Sent by WhatsApp (sent), no payment attempts."]
    assert buttons(out[0]) == []  # nothing to remind or cancel any more
    assert len(h.providers.to(CUSTOMER)) == 1


async def test_status_names_state_channel_delivery_and_attempts(h: Handle) -> None:
    await guided(h, "0712345678", "Mary Wanjiku", "2500", "Cleaning service")
    out = await said(h, "status 1001")
    assert texts(out) == ["Invoice #1001 (KES 2,500) for Mary Wanjiku (0712…678): sent, unpaid.\n"
                          "Sent by WhatsApp (sent), no payment attempts."]
    assert buttons(out[0]) == confirm_buttons("1001")


async def test_unpaid_lists_open_invoices_with_the_total(h: Handle, clock: ManualClock) -> None:
    answer = await reply_to(h, "unpaid")
    assert answer.text == "No unpaid invoices. Send 'invoice' to create one."
    assert buttons(answer) == NEW_INVOICE_BTN
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    await one_line(h, "invoice 0722000111 300 Airtime top-up", "1002", OTHER)
    await one_line(h, "invoice 0722000111 1000 Paid already", "1003", OTHER)
    await one_line(h, "invoice 0712345678 700 Cancelled job", "1004", CUSTOMER)
    await h.store.write(lambda tx: invoice_store.mark_paid(tx, "1003", "TKQ1ABC2DE", clock.now_ms()))
    await said(h, "cancel 1004")
    assert texts(await said(h, "Unpaid")) == ["2 unpaid invoices, KES 2,800 in total:\n"
                                              "#1001 · KES 2,500 · 0712…678\n"
                                              "#1002 · KES 300 · 0722…111"]


async def test_help_and_unknown_text(h: Handle) -> None:
    answer = await reply_to(h, "help")
    assert answer.text == MERCHANT_HELP and buttons(answer) == NEW_INVOICE_BTN
    answer = await reply_to(h, "Habari, how do I get paid?")
    assert answer.text == UNKNOWN and buttons(answer) == NEW_INVOICE_BTN
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 0


async def test_merchant_rate_limit_answers_once_politely(h: Handle, clock: ManualClock) -> None:
    for _ in range(35):
        await h.say(MERCHANT, "help")
    await settle(h)
    got = h.providers.texts(MERCHANT)
    assert got == [MERCHANT_HELP] * 30 + [RATE_LIMITED]
    # A minute later the merchant is heard again.
    clock.advance(60_000)
    assert texts(await said(h, "help")) == [MERCHANT_HELP]


# -- customers ------------------------------------------------------------------------------------------


async def test_customer_free_text_gets_one_hint_an_hour_naming_open_invoices(h: Handle, clock: ManualClock) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    before = len(h.providers.to(CUSTOMER))
    assert await said(h, "Hi, what is this for?", sender=CUSTOMER) == []  # nothing to the merchant
    hint = h.providers.to(CUSTOMER)[before:]
    assert texts(hint) == ["Your open invoice: Invoice #1001 (KES 2,500) for Cleaning service.\n"
                           "Tap Pay with M-PESA to pay it now."]
    assert buttons(hint[0]) == [("pay_now:1001", "Pay with M-PESA"), ("view_details:1001", "View details")]
    # More free text within the hour, even merchant words: no answer, no command run.
    for text in ("Hello??", "unpaid", "invoice 0712345678 100 Free stuff", "cancel 1001"):
        assert await said(h, text, sender=CUSTOMER) == []
    assert len(h.providers.to(CUSTOMER)) == before + 1
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 1
    assert (await invoice(h, "1001")).status.value == "SENT"
    # An hour later, with a second open invoice: one hint naming both.
    clock.advance(3_600_000)
    await one_line(h, "invoice 0712345678 300 Airtime top-up", "1002", CUSTOMER)
    before = len(h.providers.to(CUSTOMER))
    await said(h, "habari", sender=CUSTOMER)
    hint = h.providers.to(CUSTOMER)[before:]
    assert texts(hint) == ["Your open invoices: #1001 (KES 2,500), #1002 (KES 300).\n"
                           "Tap one to Pay with M-PESA, or reply 'pay 1001'."]
    assert buttons(hint[0]) == [("pay_now:1001", "Pay #1001"), ("pay_now:1002", "Pay #1002")]


async def test_invoice_to_a_customer_who_just_wrote_is_the_briefs_interactive_message(h: Handle) -> None:
    await said(h, "hello", sender=CUSTOMER)  # opens the 24-hour window (and gets a hint)
    assert h.providers.texts(CUSTOMER) == ["You have no open invoices right now. Thank you!"]
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    message = h.providers.to(CUSTOMER)[1]
    assert message.kind == "interactive"
    assert message.text == "InvoiceIQ — Invoice #1001\nAmount: KES 2,500\nFor: Customer\nItem: Cleaning service"
    assert buttons(message) == [("pay_now:1001", "Pay with M-PESA"), ("view_details:1001", "View details")]


# -- webhook delivery semantics ---------------------------------------------------------------------------


async def test_a_redelivered_webhook_creates_one_invoice_and_one_reply(h: Handle) -> None:
    payload = inbound_text(MERCHANT, "invoice 0712345678 2500 Cleaning service", wamid="wamid.REDELIVERED1")
    statuses: list[int] = []

    async def deliver() -> None:
        statuses.append((await h.post_webhook(payload)).status_code)

    async with anyio.create_task_group() as tg:  # Meta retrying while the first is in flight
        for _ in range(3):
            tg.start_soon(deliver)
    assert statuses == [200, 200, 200]
    await settle(h)
    response = await h.post_webhook(payload)  # and again, long after
    assert response.status_code == 200
    await settle(h)
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 1
    assert len(h.providers.to(CUSTOMER)) == 1
    assert h.providers.texts(MERCHANT) == [
        "Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."]
    assert await val(h, "SELECT COUNT(*) FROM inbox WHERE event_id = 'wamid.REDELIVERED1'") == 1
    assert await val(h, "SELECT COUNT(*) FROM message_log WHERE direction = 'IN'") == 1


async def test_bad_or_missing_signature_is_401_and_stores_nothing(h: Handle) -> None:
    payload = inbound_text(MERCHANT, "invoice 0712345678 2500 Cleaning service")
    body = json.dumps(payload, separators=(",", ":")).encode()
    assert (await h.post_webhook(payload, secret="not-the-app-secret")).status_code == 401
    assert (await h.client.post("/whatsapp/webhook", content=body,
                                headers={"Content-Type": "application/json"})).status_code == 401
    for header in ("", "sha256=", "sha256=" + "0" * 64, "sha1=" + "0" * 40, "garbage"):
        response = await h.client.post("/whatsapp/webhook", content=body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": header})
        assert response.status_code == 401, header
    # Signed, then tampered with.
    from harness import sign
    tampered = body.replace(b"2500", b"9500")
    response = await h.client.post("/whatsapp/webhook", content=tampered, headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": sign(body)})
    assert response.status_code == 401
    await settle(h)
    assert await val(h, "SELECT COUNT(*) FROM inbox") == 0
    assert await val(h, "SELECT COUNT(*) FROM message_log") == 0
    assert await val(h, "SELECT COUNT(*) FROM invoices") == 0
    assert h.providers.sent == []


async def test_get_verification_handshake(h: Handle) -> None:
    from harness import VERIFY_TOKEN
    ok = await h.client.get("/whatsapp/webhook", params={
        "hub.mode": "subscribe", "hub.challenge": "1158201444", "hub.verify_token": VERIFY_TOKEN})
    assert ok.status_code == 200
    assert ok.text == "1158201444"
    assert ok.headers["content-type"].startswith("text/plain")
    for params in (
        {"hub.mode": "subscribe", "hub.challenge": "1158201444", "hub.verify_token": "meatyhamhock"},
        {"hub.mode": "subscribe", "hub.challenge": "1158201444"},
        {"hub.mode": "unsubscribe", "hub.challenge": "1158201444", "hub.verify_token": VERIFY_TOKEN},
        {"hub.challenge": "1158201444", "hub.verify_token": VERIFY_TOKEN},
        {"hub.mode": "subscribe", "hub.challenge": "1158201444", "hub.verify_token": VERIFY_TOKEN + "x"},
        {},
    ):
        response = await h.client.get("/whatsapp/webhook", params=params)
        assert response.status_code == 403, params
        assert "1158201444" not in response.text


async def test_metas_sixteen_example_webhooks_are_accepted_and_nothing_breaks(
        database_url: str, providers: FakeProviders) -> None:
    examples = json.loads((PROVIDERS_DIR / "meta-openapi" / "webhook_examples.json").read_text())
    assert len(examples) == 16
    ids = {m["id"] for ex in examples.values() for e in ex["entry"] for c in e["changes"]
           for m in c["value"].get("messages", [])}
    async with running_daemon(make_settings(database_url), providers=providers) as h:
        for name, example in examples.items():
            response = await h.post_webhook(example)
            assert response.status_code == 200, (name, response.text)
        await settle(h)
        # Every message stored and logged once (some examples share an id), none left hanging.
        assert await val(h, "SELECT COUNT(*) FROM inbox") == len(ids)
        assert await val(h, "SELECT COUNT(*) FROM message_log WHERE direction = 'IN'") == len(ids)
        assert await val(h, "SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL") == 0
        # The sender is a customer with nothing open: one hint at most, whatever they sent.
        assert providers.texts("16505551234") == ["You have no open invoices right now. Thank you!"]
        assert await val(h, "SELECT COUNT(*) FROM invoices") == 0
        # The daemon still works for the merchant.
        assert texts(await said(h, "help")) == [MERCHANT_HELP]
        await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
        assert (await h.client.get("/readyz")).status_code == 200


# -- restarts and timers ------------------------------------------------------------------------------------


async def test_restart_in_the_middle_of_a_guided_flow_resumes_it(database_url: str) -> None:
    settings = make_settings(database_url)
    first = FakeProviders()
    async with running_daemon(settings, providers=first) as h:
        for text, prompt in (("invoice", ASK_PHONE), ("0712345678", ASK_NAME), ("Mary Wanjiku", ASK_AMOUNT),
                             ("2500", ASK_DESCRIPTION)):
            assert texts(await said(h, text)) == [prompt]
    assert not schema_problems(first)
    second = FakeProviders(_ids=itertools.count(1000))  # Meta's message ids never repeat
    async with running_daemon(settings, providers=second) as h:
        assert texts(await said(h, "Cleaning service")) == [
            review("254712345678", "Mary Wanjiku", "2,500", "Cleaning service")]
        out = await tapped(h, "send")
        assert texts(out) == ["Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."]
        assert template_params(second.to(CUSTOMER)[0])[:3] == ["Mary Wanjiku", "2,500", "1001"]
    assert not schema_problems(second)


async def test_a_message_acknowledged_but_not_processed_before_a_crash_is_resumed_at_start(
        database_url: str) -> None:
    settings = make_settings(database_url)
    first = FakeProviders()
    async with running_daemon(settings, providers=first) as h:
        assert texts(await said(h, "invoice")) == [ASK_PHONE]
        assert texts(await said(h, "0712345678")) == [ASK_NAME]
    # What the webhook stores before its 200, with the daemon gone before the session ran.
    store = Store(database_url)
    await store.open()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run_writer)
            await store.write(lambda tx: inbox.put(
                tx, source="whatsapp", event_id="wamid.ACKED_NOT_RUN", actor="session", actor_key=MERCHANT,
                kind="text", payload={"from": MERCHANT, "kind": "text", "text": "Mary Wanjiku", "title": None,
                                      "context_id": None, "timestamp_s": 1764158400},
                now_ms=1_764_158_400_000))
            tg.cancel_scope.cancel()
    finally:
        await store.close()
    second = FakeProviders(_ids=itertools.count(1000))
    async with running_daemon(settings, providers=second) as h:
        await h.wait_for_texts(MERCHANT, 1)
        await settle(h)
        assert second.texts(MERCHANT) == [ASK_AMOUNT]
        assert texts(await said(h, "2500")) == [ASK_DESCRIPTION]
        # A redelivery of the message that was already stored changes nothing.
        await h.say(MERCHANT, "Mary Wanjiku", wamid="wamid.ACKED_NOT_RUN")
        await settle(h)
        assert second.texts(MERCHANT) == [ASK_AMOUNT, ASK_DESCRIPTION]
        assert texts(await said(h, "Cleaning service")) == [
            review("254712345678", "Mary Wanjiku", "2,500", "Cleaning service")]
    assert not schema_problems(first) and not schema_problems(second)


def timer_settings(database_url: str):  # type: ignore[no-untyped-def]
    return make_settings(database_url, INVOICEIQ_CHAT_NUDGE_AFTER_S="60", INVOICEIQ_CHAT_CLOSE_AFTER_S="180")


async def test_nudge_once_then_close_discards_the_draft(
        database_url: str, providers: FakeProviders, clock: ManualClock) -> None:
    async with running_daemon(timer_settings(database_url), providers=providers, clock=clock) as h:
        await said(h, "invoice")
        await said(h, "0712345678")
        clock.advance(59_000)
        await quiet(h)
        assert h.providers.texts(MERCHANT) == [ASK_PHONE, ASK_NAME]
        clock.advance(2_000)
        await h.wait_for_texts(MERCHANT, 3)
        await quiet(h)
        assert h.providers.texts(MERCHANT)[2:] == [NUDGE]
        clock.advance(60_000)  # 121 s: no second nudge
        await quiet(h)
        assert h.providers.texts(MERCHANT)[2:] == [NUDGE]
        clock.advance(60_000)  # 181 s: closed
        await h.wait_for_texts(MERCHANT, 4)
        await quiet(h)
        closed = h.providers.to(MERCHANT)[3:]
        assert texts(closed) == [CLOSED] and buttons(closed[0]) == NEW_INVOICE_BTN
        assert await conversation_stage(h) == "IDLE"
        # The draft is gone: the next answer is not taken as the name.
        assert (await reply_to(h, "Mary Wanjiku")).text == UNKNOWN
        clock.advance(600_000)
        await quiet(h)
        assert len(h.providers.to(MERCHANT)) == 5  # nothing more once closed
        assert await val(h, "SELECT COUNT(*) FROM invoices") == 0


async def test_timers_count_from_the_last_reply(
        database_url: str, providers: FakeProviders, clock: ManualClock) -> None:
    async with running_daemon(timer_settings(database_url), providers=providers, clock=clock) as h:
        await said(h, "invoice")  # t = 0
        clock.advance(50_000)
        assert texts(await said(h, "0712345678")) == [ASK_NAME]  # t = 50 s
        clock.advance(20_000)  # t = 70 s: 20 s after the last reply, no nudge yet
        await quiet(h)
        assert h.providers.texts(MERCHANT) == [ASK_PHONE, ASK_NAME]
        clock.advance(41_000)  # t = 111 s: 61 s after the last reply
        await h.wait_for_texts(MERCHANT, 3)
        # The nudge reached Meta; let the outbox record it before moving the clock past its
        # 60 s send lease (a lease that expires mid-send would let the row be sent again).
        await settle(h)
        clock.advance(69_000)  # t = 180 s: 130 s after the last reply, still open
        await quiet(h)
        assert h.providers.texts(MERCHANT) == [ASK_PHONE, ASK_NAME, NUDGE]
        assert texts(await said(h, "Mary Wanjiku")) == [ASK_AMOUNT]


async def test_timers_survive_a_restart(database_url: str, clock: ManualClock) -> None:
    settings = timer_settings(database_url)
    first = FakeProviders()
    async with running_daemon(settings, providers=first, clock=clock) as h:
        await said(h, "invoice")
        await said(h, "0712345678")
    second = FakeProviders(_ids=itertools.count(1000))  # Meta's message ids never repeat
    async with running_daemon(settings, providers=second, clock=clock) as h:
        clock.advance(61_000)
        await h.wait_for_texts(MERCHANT, 1)
        await quiet(h)
        assert second.texts(MERCHANT) == [NUDGE]
        clock.advance(120_000)
        await h.wait_for_texts(MERCHANT, 2)
        await quiet(h)
        assert second.texts(MERCHANT) == [NUDGE, CLOSED]
    # Due while the daemon was down: a new flow, stopped, the clock passes the close time, and the
    # next start closes it (once, without a late nudge first).
    async with running_daemon(settings, providers=first, clock=clock) as h:
        await said(h, "invoice")
    clock.advance(200_000)
    third = FakeProviders(_ids=itertools.count(3000))
    async with running_daemon(settings, providers=third, clock=clock) as h:
        await h.wait_for_texts(MERCHANT, 1)
        await quiet(h)
        assert third.texts(MERCHANT) == [CLOSED]
        assert await conversation_stage(h) == "IDLE"
    for fake in (first, second, third):
        assert not schema_problems(fake)


# -- delivery statuses and the SMS fallback -----------------------------------------------------------------


async def post_status(h: Handle, payload: dict[str, Any]) -> None:
    response = await h.post_webhook(payload)
    assert response.status_code == 200, response.text
    await settle(h)


async def test_status_webhooks_move_delivery_forward_only(h: Handle) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    await one_line(h, "invoice 0722000111 300 Airtime top-up", "1002", OTHER)
    first, second = h.providers.to(CUSTOMER)[0].message_id, h.providers.to(OTHER)[0].message_id
    await post_status(h, status_event(first, "sent", CUSTOMER))
    await post_status(h, status_event(first, "delivered", CUSTOMER))
    assert texts(await said(h, "status 1001")) == [
        "Invoice #1001 (KES 2,500) for 0712…678: sent, unpaid.\nSent by WhatsApp (delivered), no payment attempts."]
    await post_status(h, status_event(first, "read", CUSTOMER))
    assert (await invoice(h, "1001")).delivery_state == "read"
    # Meta's statuses arrive out of order: read first, then the older ones, late.
    for status in ("read", "delivered", "sent"):
        await post_status(h, status_event(second, status, OTHER))
    assert texts(await said(h, "status 1002")) == [
        "Invoice #1002 (KES 300) for 0722…111: sent, unpaid.\nSent by WhatsApp (read), no payment attempts."]
    assert await val(h, "SELECT status FROM outbox WHERE provider_message_id = :p", {"p": second}) == "READ"
    assert not [s for s in h.providers.sent if s.kind == "sms"]


async def test_failed_131026_sends_the_same_invoice_by_sms_and_tells_the_merchant_once(h: Handle) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    wamid = h.providers.to(CUSTOMER)[0].message_id
    failed = json.loads((PROVIDERS_DIR / "whatsapp_status_failed_131026.json").read_text())
    failed["entry"][0]["changes"][0]["value"]["statuses"][0]["id"] = wamid
    await post_status(h, failed)
    await post_status(h, failed)  # Meta redelivers
    await post_status(h, status_event(wamid, "failed", CUSTOMER, errors=[{"code": 131026, "title": "Message undeliverable"}]))
    stored = await invoice(h, "1001")
    sms = [s for s in h.providers.sent if s.kind == "sms"]
    assert [(s.to, s.text) for s in sms] == [
        (CUSTOMER, f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: https://pay.test/p/{stored.pay_token}")]
    assert h.providers.texts(MERCHANT) == [
        "Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel.",
        "Invoice #1001 (KES 2,500) went to 0712…678 by SMS because the number is not on WhatsApp.",
    ]
    assert stored.status.value == "SENT" and stored.channel is not None and stored.channel.value == "SMS"
    assert texts(await said(h, "status 1001")) == [
        "Invoice #1001 (KES 2,500) for 0712…678: sent, unpaid.\nSent by SMS (sent), no payment attempts."]
    # A reminder goes by the channel that reached the customer.
    assert texts(await said(h, "remind 1001")) == ["Reminder sent for Invoice #1001 (KES 2,500)."]
    sms = [s for s in h.providers.sent if s.kind == "sms"]
    assert len(sms) == 2 and sms[1].to == CUSTOMER
    assert sms[1].text == f"Reminder: Invoice #1001, KES 2,500 is still unpaid. Pay with M-PESA: https://pay.test/p/{stored.pay_token}"
    assert len(h.providers.to(CUSTOMER)) == 3  # the template, then two SMS: no WhatsApp retry


async def test_whatsapp_refusing_the_invoice_at_once_falls_back_to_sms(h: Handle) -> None:
    # A synchronous, permanent refusal (not a WhatsApp number, as the send's own answer).
    h.providers.wa_fail_for[CUSTOMER] = (400, {"error": {
        "message": "(#131026) Message Undeliverable.", "type": "OAuthException", "code": 131026,
        "error_data": {"messaging_product": "whatsapp", "details": "Message Undeliverable."},
        "fbtrace_id": "AbCdEf"}})
    await said(h, "invoice 0712345678 2500 Cleaning service")
    stored = await invoice(h, "1001")
    assert [(s.kind, s.text) for s in h.providers.to(CUSTOMER)] == [
        ("sms", f"Invoice #1001, KES 2,500 for Cleaning service. Pay with M-PESA: https://pay.test/p/{stored.pay_token}")]
    assert h.providers.texts(MERCHANT) == [
        "Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel.",
        "Invoice #1001 (KES 2,500) went to 0712…678 by SMS because the number is not on WhatsApp.",
    ]
    assert stored.status.value == "SENT" and stored.channel is not None and stored.channel.value == "SMS"


async def test_cancel_reaches_a_customer_whatsapp_will_not_take_free_text_from(h: Handle) -> None:
    await one_line(h, "invoice 0712345678 2500 Cleaning service", "1001", CUSTOMER)
    # Outside the 24-hour window Meta refuses anything but a template (131047).
    h.providers.wa_fail_for[CUSTOMER] = (400, {"error": {
        "message": "(#131047) Re-engagement message", "type": "OAuthException", "code": 131047,
        "error_data": {"messaging_product": "whatsapp", "details": "Message failed to send because more "
                       "than 24 hours have passed since the customer last replied to this number."}}})
    assert texts(await said(h, "cancel 1001")) == ["Invoice #1001 (KES 2,500) is cancelled. We'll let the customer know."]
    notices = [s for s in h.providers.to(CUSTOMER) if s.kind == "sms"]
    assert [s.text for s in notices] == ["Invoice #1001 (KES 2,500) has been cancelled. You don't need to pay it."]
    assert len(h.providers.texts(MERCHANT)) == 2  # no delivery alarm about a notice


async def test_a_throttled_send_is_retried_after_retry_after_and_confirmed_once(
        h: Handle, clock: ManualClock) -> None:
    h.providers.wa_failures.append((400, {"error": {
        "message": "(#130429) Rate limit hit", "type": "OAuthException", "code": 130429,
        "error_data": {"messaging_product": "whatsapp", "details": "Cloud API message throughput has been reached."}}},
        {"Retry-After": "120"}))
    start = clock.now_ms()
    await h.say(MERCHANT, "invoice 0712345678 2500 Cleaning service")

    async def waiting_row() -> dict[str, Any] | None:
        return await h.store.read(lambda tx: tx.one(
            "SELECT status, attempts, next_attempt_at_ms FROM outbox WHERE kind = 'invoice'"))

    with anyio.fail_after(5):
        while (row := await waiting_row()) is None or row["status"] != "PENDING" or row["next_attempt_at_ms"] == start:
            await anyio.sleep(0.01)
    # Meta's Retry-After, not our one-second hold; the account's limit costs the message no attempt.
    assert row["next_attempt_at_ms"] == start + 120_000 and row["attempts"] == 0
    assert h.providers.sent == [] and (await invoice(h, "1001")).status.value == "PENDING"
    clock.advance(120_000)
    await h.wait_for_texts(MERCHANT, 1)
    await settle(h)
    assert h.providers.texts(MERCHANT) == [
        "Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."]
    assert len(h.providers.to(CUSTOMER)) == 1


async def test_restart_while_picking_a_customer_or_editing_the_review(database_url: str) -> None:
    settings = make_settings(database_url)
    ids = itertools.count(1)  # one sequence of message ids across the restarts, as at Meta
    fakes = [FakeProviders(_ids=ids) for _ in range(3)]
    async with running_daemon(settings, providers=fakes[0]) as h:
        await guided(h, "0712345678", "Mary Wanjiku", "1000", "Earlier job")
        await guided(h, "0722000111", "Mary Wanjiku", "2000", "Another job")
        assert texts(await said(h, "invoice Mary Wanjiku 1500 Deep clean"))[0].startswith("Which Mary Wanjiku")
    async with running_daemon(settings, providers=fakes[1]) as h:
        assert texts(await said(h, "2")) == [
            "Invoice #1003 sent to 254722000111. Use 'remind 1003' to nudge or 'cancel 1003' to cancel."]
        for text in ("invoice", "0712345678", "-", "2500", "Cleaning service"):
            await said(h, text)
        assert texts(await said(h, "edit amount")) == [ASK_AMOUNT]
    async with running_daemon(settings, providers=fakes[2]) as h:
        # Still editing: the answer goes back to the review, not on to the description.
        assert texts(await said(h, "3000")) == [review("254712345678", "—", "3,000", "Cleaning service")]
    assert not any(schema_problems(fake) for fake in fakes)


def _record_session_turns(h: Handle) -> list[str]:
    """Whose conversation each session turn was for, in order ("merchant" or "customer")."""
    registry = h.daemon.dispatch.registries["session"]
    handled: list[str] = []
    inner = registry._handler

    async def recording(key: str, message: Any) -> None:
        handled.append("merchant" if key == MERCHANT else "customer")
        await inner(key, message)

    registry._handler = recording
    return handled


async def _merchant_backlog(tx: Tx, prefix: str, count: int, now: int) -> None:
    """``count`` stored merchant messages ("help") waiting for the session actor."""
    for i in range(count):
        await inbox.put(tx, source="whatsapp", event_id=f"{prefix}.{i}", actor="session",
                        actor_key=MERCHANT, kind="text", now_ms=now,
                        payload={"from": MERCHANT, "kind": "text", "text": "help", "timestamp_s": now // 1000})


async def test_a_merchants_backlog_is_worked_off_in_slices_taking_turns_with_customers(h: Handle, clock: ManualClock) -> None:
    """A campaign leaves hundreds of merchant messages waiting. The session actor applies one
    slice of them per turn and goes to the back of the line (the front door's admission and
    the other conversations come in between), instead of holding the loop until the last."""
    from invoiceiq.actors.session import BATCH

    handled = _record_session_turns(h)
    waiting = 2 * BATCH + 5

    async def backlog(tx: Tx) -> None:
        now = clock.now_ms()
        await _merchant_backlog(tx, "wamid.backlog", waiting, now)
        await inbox.put(tx, source="whatsapp", event_id="wamid.customer.1", actor="session",
                        actor_key=CUSTOMER, kind="text", now_ms=now,
                        payload={"from": CUSTOMER, "kind": "text", "text": "hello", "timestamp_s": now // 1000})

    await h.store.write(backlog)
    h.daemon.dispatch.kick("session", MERCHANT)
    h.daemon.dispatch.kick("session", CUSTOMER)
    await h.settle()
    assert handled.count("merchant") == 3  # 16 + 16 + 5
    assert handled.index("customer") < len(handled) - 1  # served before the merchant's last slice
    processed = await h.store.read(lambda tx: tx.val(
        "SELECT COUNT(*) FROM inbox WHERE event_id LIKE 'wamid.backlog.%' AND processed_at_ms IS NOT NULL"))
    assert processed == waiting


async def test_while_webhooks_flood_the_door_a_backlog_moves_one_event_per_turn(h: Handle, clock: ManualClock) -> None:
    """The same backlog while the front door is busy (runtime.Pressure): each admitted turn
    applies one event, so what session work takes from the webhooks stays bounded however
    many events wait per conversation (with slices of 16 it grew with the backlog)."""
    pressure = h.daemon.pressure
    handled = _record_session_turns(h)
    waiting = 12
    await h.store.write(lambda tx: _merchant_backlog(tx, "wamid.flood", waiting, clock.now_ms()))

    async def all_processed() -> bool:
        return await h.store.read(lambda tx: tx.val(
            "SELECT COUNT(*) FROM inbox WHERE event_id LIKE 'wamid.flood.%' AND processed_at_ms IS NOT NULL")) == waiting

    async with busy_door(h):
        h.daemon.dispatch.kick("session", MERCHANT)
        await until(all_processed, "the backlog to be worked off through the door")
    # One event per turn, each admitted on its own (the last full turn asks for one more,
    # which finds nothing); in slices of 16 it would have been one turn.
    assert set(handled) == {"merchant"} and waiting <= len(handled) <= waiting + 1
    assert pressure.deferred >= waiting - 1
