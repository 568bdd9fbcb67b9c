"""The merchant chat machine (conversation.py) and the customer machine (customer.py).

Copy is asserted as literal strings from the brief (section 7), typed here, so that a typo in
copy.py fails.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoiceiq.core.conversation import (
    ChatSettings,
    ConversationState,
    CreateInvoice,
    CustomersFound,
    Draft,
    Effect,
    Event,
    FindCustomers,
    InvoiceAction,
    ListUnpaid,
    Message,
    RateWindow,
    Reply,
    Stage,
    TimerDue,
    step,
)
from invoiceiq.core.customer import (
    CustomerState,
    DetailsRequested,
    ListOpenInvoices,
    OpenInvoices,
    PayRequested,
    customer_step,
    pay_request,
)
from invoiceiq.core.model import Button, Customer, Invoice, InvoiceStatus

S = ChatSettings()
T0 = 1_800_000_000_000
NUDGE_MS, CLOSE_MS = 300_000, 900_000

# The brief's words (7.3), typed out.
ASK_PHONE = "What is the customer's phone number? Use format 2547XXXXXXXX."
ASK_NAME = "Customer name? (Optional) Reply with the name or send '-' to skip."
ASK_AMOUNT = "Amount in KES? (Whole number, e.g., 2500)"
ASK_DESCRIPTION = "Short description of the invoice (3–120 chars)."
ERR_PHONE = "Invalid phone. Please use format 2547XXXXXXXX."
ERR_NAME = "Name is too short/long. Please enter 2–60 characters, or send '-' to skip."
ERR_AMOUNT = "Invalid amount. Enter a whole number in KES (e.g., 2500)."
ERR_DESCRIPTION = "Please enter 3–120 characters."
CANCELLED = "Okay, cancelled. No invoice was created."
HELP = "You can create an invoice step-by-step. At any time, send 'cancel' to stop."
NUDGE = "Still there? Reply to continue or send 'cancel' to stop."
CLOSED = "Session closed. Send 'new invoice' to start again."

CANCEL_BTN = Button("cancel", "Cancel")
SKIP_BTN = Button("skip", "Skip")
REVIEW_BUTTONS = (
    Button("send", "Send"),
    Button("edit amount", "Edit Amount"),
    Button("edit description", "Edit Description"),
)
REVIEW_FOOTER = "Send 'cancel' to stop."


def review_text(to: str, name: str, amount: str, item: str) -> str:
    return (
        f"Review invoice:\n• To: {to} ({name})\n• Amount: KES {amount}\n• Item: {item}\n\n"
        "Send to customer now?"
    )


def run(
    state: ConversationState, *texts: str, now: int = T0, settings: ChatSettings = S
) -> tuple[ConversationState, tuple[Effect, ...]]:
    """Send messages one after the other (1 s apart); return the last state and its effects."""
    effects: tuple[Effect, ...] = ()
    for n, text in enumerate(texts):
        state, effects = step(state, Message(text), now + n * 1000, settings)
    return state, effects


def texts(effects: tuple[Effect, ...]) -> list[str]:
    return [e.text for e in effects if isinstance(e, Reply)]


def only_reply(effects: tuple[Effect, ...]) -> Reply:
    assert len(effects) == 1 and isinstance(effects[0], Reply), effects
    return effects[0]


IDLE = ConversationState()


def at(stage: Stage) -> ConversationState:
    """A state at ``stage`` reached through the real flow."""
    path = {
        Stage.PHONE: ["invoice"],
        Stage.NAME: ["invoice", "0712345678"],
        Stage.AMOUNT: ["invoice", "0712345678", "Mary Wanjiku"],
        Stage.DESCRIPTION: ["invoice", "0712345678", "Mary Wanjiku", "2500"],
        Stage.REVIEW: ["invoice", "0712345678", "Mary Wanjiku", "2500", "Cleaning"],
    }[stage]
    state, _ = run(IDLE, *path)
    assert state.stage is stage
    return state


# --- the guided flow, step by step -------------------------------------------------------------


def test_guided_flow_happy_path_with_the_briefs_words() -> None:
    s, e = step(IDLE, Message("invoice"), T0, S)
    assert s.stage is Stage.PHONE
    assert only_reply(e) == Reply(ASK_PHONE, (CANCEL_BTN,))

    s, e = step(s, Message("254712345678"), T0, S)
    assert s.stage is Stage.NAME and s.draft.msisdn == "254712345678"
    assert only_reply(e) == Reply(ASK_NAME, (SKIP_BTN, CANCEL_BTN))

    s, e = step(s, Message("  Mary   Wanjiku "), T0, S)
    assert s.stage is Stage.AMOUNT and s.draft.name == "Mary Wanjiku"
    assert only_reply(e) == Reply(ASK_AMOUNT, (CANCEL_BTN,))

    s, e = step(s, Message("2,500"), T0, S)
    assert s.stage is Stage.DESCRIPTION and s.draft.amount_kes == 2500
    assert only_reply(e) == Reply(ASK_DESCRIPTION, (CANCEL_BTN,))

    s, e = step(s, Message("Cleaning service (Wed 3pm)"), T0, S)
    assert s.stage is Stage.REVIEW
    assert only_reply(e) == Reply(
        review_text("254712345678", "Mary Wanjiku", "2,500", "Cleaning service (Wed 3pm)"),
        REVIEW_BUTTONS,
        REVIEW_FOOTER,
    )

    s, e = step(s, Message("send"), T0, S)
    # Created, and nothing said yet: "Invoice #… sent to …" comes from the delivery layer.
    assert e == (CreateInvoice("254712345678", "Mary Wanjiku", 2500, "Cleaning service (Wed 3pm)"),)
    assert s == ConversationState(rate=s.rate)
    assert s.due_ms is None


@pytest.mark.parametrize("entry", ["invoice", "new invoice", "New Invoice", " INVOICE ", "new   invoice"])
def test_entry_points(entry: str) -> None:
    # "new invoice" is also the id of the New Invoice button.
    s, e = step(IDLE, Message(entry), T0, S)
    assert s.stage is Stage.PHONE
    assert texts(e) == [ASK_PHONE]


@pytest.mark.parametrize(
    "phone", ["0712345678", "+254 712 345 678", "712345678", "(0712) 345678", "254-712-345-678"]
)
def test_phone_step_accepts_any_kenyan_form(phone: str) -> None:
    s, e = run(at(Stage.PHONE), phone)
    assert s.stage is Stage.NAME and s.draft.msisdn == "254712345678"
    assert texts(e) == [ASK_NAME]


def test_phone_step_accepts_011x() -> None:
    s, _ = run(at(Stage.PHONE), "0112345678")
    assert s.draft.msisdn == "254112345678"


@pytest.mark.parametrize("bad", ["0712", "hello", "254212345678", "+255712345678", "", "invoice"])
def test_phone_step_invalid_stays(bad: str) -> None:
    before = at(Stage.PHONE)
    s, e = step(before, Message(bad), T0 + 5000, S)
    assert s.stage is Stage.PHONE and s.draft == Draft()
    assert only_reply(e) == Reply(ERR_PHONE, (CANCEL_BTN,))


@pytest.mark.parametrize("skip", ["-", "skip", "SKIP", " Skip ", "–", "—"])
def test_name_step_skip(skip: str) -> None:
    s, e = run(at(Stage.NAME), skip)
    assert s.stage is Stage.AMOUNT and s.draft.name is None
    assert texts(e) == [ASK_AMOUNT]


@pytest.mark.parametrize("bad", ["M", " ", "x" * 61])
def test_name_step_invalid_stays(bad: str) -> None:
    s, e = run(at(Stage.NAME), bad)
    assert s.stage is Stage.NAME and s.draft.name is None
    assert only_reply(e) == Reply(ERR_NAME, (SKIP_BTN, CANCEL_BTN))


def test_name_step_boundaries() -> None:
    assert run(at(Stage.NAME), "Al")[0].draft.name == "Al"
    assert run(at(Stage.NAME), "x" * 60)[0].draft.name == "x" * 60


@pytest.mark.parametrize("bad", ["0", "-5", "2500.50", "2500.00", "two k", "2,50", ""])
def test_amount_step_invalid_stays(bad: str) -> None:
    s, e = run(at(Stage.AMOUNT), bad)
    assert s.stage is Stage.AMOUNT and s.draft.amount_kes is None
    assert only_reply(e) == Reply(ERR_AMOUNT, (CANCEL_BTN,))


def test_amount_step_over_the_maximum_names_it() -> None:
    s, e = run(at(Stage.AMOUNT), "250,001")
    assert s.stage is Stage.AMOUNT
    assert texts(e) == ["Invalid amount. The maximum is KES 250,000 per invoice."]
    s, e = run(at(Stage.AMOUNT), "250,000")
    assert s.draft.amount_kes == 250_000


@pytest.mark.parametrize("amount", ["KES 2500", "Ksh 2,500", "2500", "ksh. 2500"])
def test_amount_step_accepts(amount: str) -> None:
    assert run(at(Stage.AMOUNT), amount)[0].draft.amount_kes == 2500


@pytest.mark.parametrize("bad", ["ab", "  ab  ", "x" * 121])
def test_description_step_invalid_stays(bad: str) -> None:
    s, e = run(at(Stage.DESCRIPTION), bad)
    assert s.stage is Stage.DESCRIPTION and s.draft.description is None
    assert only_reply(e) == Reply(ERR_DESCRIPTION, (CANCEL_BTN,))


def test_review_without_name_shows_em_dash() -> None:
    s, e = run(IDLE, "invoice", "0712345678", "skip", "300", "Tea")
    assert texts(e) == [review_text("254712345678", "—", "300", "Tea")]
    s, e = run(s, "SEND")
    assert e == (CreateInvoice("254712345678", None, 300, "Tea"),)


def test_global_words_are_answers_where_the_brief_says_so() -> None:
    # During a flow only cancel/help (and skip at the name step) are global.
    s, e = run(at(Stage.DESCRIPTION), "skip")
    assert s.stage is Stage.REVIEW and s.draft.description == "skip"
    s, e = run(at(Stage.PHONE), "skip")
    assert s.stage is Stage.PHONE and texts(e) == [ERR_PHONE]
    s, e = run(at(Stage.AMOUNT), "unpaid")
    assert s.stage is Stage.AMOUNT and texts(e) == [ERR_AMOUNT]


# --- review and edits -----------------------------------------------------------------------------


def test_edit_amount_returns_to_review() -> None:
    s, e = run(at(Stage.REVIEW), "edit amount")
    assert s.stage is Stage.AMOUNT and s.editing
    assert texts(e) == [ASK_AMOUNT]
    s, e = run(s, "0")  # an invalid answer while editing stays on the edit
    assert s.stage is Stage.AMOUNT and s.editing and texts(e) == [ERR_AMOUNT]
    s, e = run(s, "3,000")
    assert s.stage is Stage.REVIEW and not s.editing
    assert texts(e) == [review_text("254712345678", "Mary Wanjiku", "3,000", "Cleaning")]
    s, e = run(s, "send")
    assert e == (CreateInvoice("254712345678", "Mary Wanjiku", 3000, "Cleaning"),)


def test_edit_description_returns_to_review() -> None:
    s, e = run(at(Stage.REVIEW), "Edit Description")
    assert s.stage is Stage.DESCRIPTION and s.editing
    assert texts(e) == [ASK_DESCRIPTION]
    s, e = run(s, "Logo design first milestone")
    assert s.stage is Stage.REVIEW
    assert texts(e) == [
        review_text("254712345678", "Mary Wanjiku", "2,500", "Logo design first milestone")
    ]


def test_edit_then_cancel_discards_everything() -> None:
    s, e = run(at(Stage.REVIEW), "edit amount", "cancel")
    assert s.stage is Stage.IDLE and s.draft == Draft() and not s.editing
    assert texts(e) == [CANCELLED]


def test_review_other_text_asks_for_a_button() -> None:
    s, e = run(at(Stage.REVIEW), "yes please")
    assert s.stage is Stage.REVIEW
    assert only_reply(e) == Reply(
        "Please tap Send, Edit Amount or Edit Description.", REVIEW_BUTTONS, REVIEW_FOOTER
    )


# --- cancel and help at every step ------------------------------------------------------------

FLOW_STAGES = [Stage.PHONE, Stage.NAME, Stage.AMOUNT, Stage.DESCRIPTION, Stage.REVIEW]


@pytest.mark.parametrize("stage", FLOW_STAGES)
@pytest.mark.parametrize("word", ["cancel", "CANCEL", " Cancel "])
def test_cancel_at_every_step(stage: Stage, word: str) -> None:
    s, e = run(at(stage), word)
    assert s.stage is Stage.IDLE and s.draft == Draft() and s.due_ms is None
    assert only_reply(e) == Reply(CANCELLED)
    # Nothing was created: no CreateInvoice anywhere.
    assert not any(isinstance(x, CreateInvoice) for x in e)


PROMPTS = {
    Stage.PHONE: ASK_PHONE,
    Stage.NAME: ASK_NAME,
    Stage.AMOUNT: ASK_AMOUNT,
    Stage.DESCRIPTION: ASK_DESCRIPTION,
    Stage.REVIEW: review_text("254712345678", "Mary Wanjiku", "2,500", "Cleaning"),
}


@pytest.mark.parametrize("stage", FLOW_STAGES)
def test_help_at_every_step_then_asks_again(stage: Stage) -> None:
    before = at(stage)
    s, e = step(before, Message("help"), T0 + 60_000, S)
    assert s.stage is stage and s.draft == before.draft
    assert texts(e) == [HELP, PROMPTS[stage]]
    assert s.close_at_ms == T0 + 60_000 + CLOSE_MS  # help is a message too: re-armed


# --- timers -------------------------------------------------------------------------------------


def test_entering_the_flow_arms_both_timers() -> None:
    s, _ = step(IDLE, Message("invoice"), T0, S)
    assert (s.nudge_at_ms, s.close_at_ms) == (T0 + NUDGE_MS, T0 + CLOSE_MS)
    assert s.due_ms == T0 + NUDGE_MS


def test_every_message_re_arms_even_invalid_ones() -> None:
    s, _ = step(IDLE, Message("invoice"), T0, S)
    s, _ = step(s, Message("nonsense"), T0 + 200_000, S)
    assert (s.nudge_at_ms, s.close_at_ms) == (T0 + 200_000 + NUDGE_MS, T0 + 200_000 + CLOSE_MS)


def test_timer_due_before_anything_is_due_is_a_no_op() -> None:
    s = at(Stage.AMOUNT)
    assert step(s, TimerDue(), s.due_ms - 1, S) == (s, ())  # type: ignore[operator]
    assert step(IDLE, TimerDue(), T0, S) == (IDLE, ())


def test_nudge_once_then_close_discards_the_draft() -> None:
    s, _ = step(at(Stage.AMOUNT), Message("2500"), T0, S)  # now at DESCRIPTION, armed at T0
    draft = s.draft

    s, e = step(s, TimerDue(), T0 + NUDGE_MS, S)
    assert only_reply(e) == Reply(NUDGE)
    assert s.stage is Stage.DESCRIPTION and s.draft == draft
    assert s.nudge_at_ms is None and s.due_ms == T0 + CLOSE_MS

    # Delivered twice, or late but before the close: nothing more is said.
    assert step(s, TimerDue(), T0 + NUDGE_MS, S) == (s, ())
    assert step(s, TimerDue(), T0 + CLOSE_MS - 1, S) == (s, ())

    s, e = step(s, TimerDue(), T0 + CLOSE_MS, S)
    assert only_reply(e) == Reply(CLOSED, (Button("new invoice", "New Invoice"),))
    assert s.stage is Stage.IDLE and s.draft == Draft() and s.due_ms is None
    assert step(s, TimerDue(), T0 + CLOSE_MS + 1, S) == (s, ())


def test_late_timer_with_both_due_only_closes() -> None:
    s, _ = step(IDLE, Message("invoice"), T0, S)
    s, e = step(s, TimerDue(), T0 + 10 * CLOSE_MS, S)
    assert texts(e) == [CLOSED]
    assert s.stage is Stage.IDLE


def test_a_message_after_the_nudge_re_arms_the_nudge() -> None:
    s, _ = step(IDLE, Message("invoice"), T0, S)
    s, _ = step(s, TimerDue(), T0 + NUDGE_MS, S)
    s, e = step(s, Message("0712345678"), T0 + NUDGE_MS + 1, S)
    assert texts(e) == [ASK_NAME]
    assert s.nudge_at_ms == T0 + NUDGE_MS + 1 + NUDGE_MS
    s, e = step(s, TimerDue(), s.nudge_at_ms, S)  # type: ignore[arg-type]
    assert texts(e) == [NUDGE]


def test_settings_drive_the_timers() -> None:
    fast = ChatSettings(nudge_after_ms=1000, close_after_ms=2000)
    s, _ = step(IDLE, Message("invoice"), T0, fast)
    assert (s.nudge_at_ms, s.close_at_ms) == (T0 + 1000, T0 + 2000)


def test_idle_commands_never_arm_timers() -> None:
    for text in ["help", "unpaid", "remind 1042", "invoice 0712345678 2500 Cleaning", "hi"]:
        s, _ = step(IDLE, Message(text), T0, S)
        assert s.due_ms is None, text


# --- rate limit ---------------------------------------------------------------------------------


def test_rate_limit_one_polite_reply_per_window() -> None:
    limited = ChatSettings(rate_limit_per_minute=3)
    s, _ = step(IDLE, Message("invoice"), T0, limited)
    s, _ = step(s, Message("0712345678"), T0 + 1, limited)
    s, _ = step(s, Message("Mary"), T0 + 2, limited)
    assert s.stage is Stage.AMOUNT
    armed = (s.nudge_at_ms, s.close_at_ms)

    s, e = step(s, Message("2500"), T0 + 3, limited)  # the 4th in the minute
    assert texts(e) == ["You're sending messages too fast. Please wait a minute, then try again."]
    assert s.stage is Stage.AMOUNT and s.draft.amount_kes is None  # the answer was not taken
    assert (s.nudge_at_ms, s.close_at_ms) == armed  # and did not re-arm anything

    s, e = step(s, Message("cancel"), T0 + 4, limited)  # the 5th: silently ignored
    assert e == () and s.stage is Stage.AMOUNT

    # A new window: messages count again from one.
    s, e = step(s, Message("2500"), T0 + 60_000, limited)
    assert s.stage is Stage.DESCRIPTION and texts(e) == [ASK_DESCRIPTION]
    assert s.rate == RateWindow(start_ms=T0 + 60_000, count=1)


def test_rate_limit_default_is_30_per_minute() -> None:
    s = IDLE
    for n in range(30):
        s, e = step(s, Message("help"), T0 + n, S)
        assert len(texts(e)) == 1 and "Create: invoice" in texts(e)[0]
    s, e = step(s, Message("help"), T0 + 31, S)
    assert texts(e) == ["You're sending messages too fast. Please wait a minute, then try again."]


def test_timer_and_lookup_events_do_not_count_against_the_rate() -> None:
    limited = ChatSettings(rate_limit_per_minute=1)
    s, _ = step(IDLE, Message("invoice"), T0, limited)
    s, _ = step(s, TimerDue(), T0 + 1, limited)
    assert s.rate.count == 1


def test_rate_limit_survives_a_clock_jump_backwards() -> None:
    s, _ = step(IDLE, Message("help"), T0, S)
    s, e = step(s, Message("help"), T0 - 3_600_000, S)
    assert s.rate == RateWindow(start_ms=T0 - 3_600_000, count=1) and texts(e)


# --- IDLE commands --------------------------------------------------------------------------------


def test_one_line_with_phone_creates_at_once() -> None:
    s, e = step(IDLE, Message("invoice +254 712 345 678 KES 2,500 Cleaning service"), T0, S)
    assert e == (CreateInvoice("254712345678", None, 2500, "Cleaning service"),)
    assert s.stage is Stage.IDLE and s.due_ms is None


@pytest.mark.parametrize(
    ("text", "first_line"),
    [
        ("invoice 0712 2500 Cleaning", "Invalid phone. Please use format 2547XXXXXXXX."),
        ("invoice M 2500 Cleaning", "Name is too short/long. Please enter 2–60 characters."),
        ("invoice 0712345678", "Invalid amount. Enter a whole number in KES (e.g., 2500)."),
        ("invoice 0712345678 300000 Cleaning", "Invalid amount. The maximum is KES 250,000 per invoice."),
        ("invoice 0712345678 2500 ab", "Invalid description. Please enter 3–120 characters."),
    ],
)
def test_one_line_errors(text: str, first_line: str) -> None:
    s, e = step(IDLE, Message(text), T0, S)
    r = only_reply(e)
    assert r.text == (
        f"{first_line}\nExample: invoice 254712345678 2500 Cleaning service. Or tap New Invoice."
    )
    assert r.buttons == (Button("new invoice", "New Invoice"),)
    assert s.stage is Stage.IDLE


@pytest.mark.parametrize(
    ("text", "effect"),
    [
        ("remind 1042", InvoiceAction("remind", "1042")),
        ("cancel #INV-1042", InvoiceAction("cancel", "1042")),
        ("status 1042", InvoiceAction("status", "1042")),
        ("unpaid", ListUnpaid()),
    ],
)
def test_idle_invoice_commands(text: str, effect: Effect) -> None:
    assert step(IDLE, Message(text), T0, S)[1] == (effect,)


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("help", "Create: invoice <phone or name> <amount> <description>, e.g. invoice "
                 "254712345678 2500 Cleaning, or tap New Invoice.\n"
                 "Manage: remind <no.>, cancel <no.>, status <no.>, unpaid."),
        ("cancel", "There's nothing to cancel. To cancel an invoice, send 'cancel' and its "
                   "number, e.g. cancel 1042."),
        ("remind", "Please add the invoice number, e.g. 'remind 1042'.\n"
                   "Send 'unpaid' to see open invoices."),
        ("status abc", "Please add the invoice number, e.g. 'status 1042'.\n"
                       "Send 'unpaid' to see open invoices."),
        ("hello", "Sorry, I didn't understand that. Send 'help' to see the commands, "
                  "or tap New Invoice."),
        # Buttons of a flow that has closed since: say so rather than "didn't understand".
        ("send", CLOSED),
        ("edit amount", CLOSED),
        ("skip", CLOSED),
    ],
)
def test_idle_replies(text: str, reply: str) -> None:
    s, e = step(IDLE, Message(text), T0, S)
    assert texts(e) == [reply]
    assert s.stage is Stage.IDLE


# --- one-line by name -----------------------------------------------------------------------------

MARY_W = Customer("254712345678", "Mary Wanjiku")
MARY_A = Customer("254112000999", "Mary Atieno")


def looked_up() -> ConversationState:
    s, e = step(IDLE, Message("invoice Mary 2,500 Logo design"), T0, S)
    assert e == (FindCustomers("Mary"),)
    assert s.stage is Stage.PICK_CUSTOMER and s.candidates == () and s.query == "Mary"
    return s


def test_name_lookup_one_match_creates() -> None:
    s, e = step(looked_up(), CustomersFound("Mary", (MARY_W,)), T0, S)
    assert e == (CreateInvoice("254712345678", "Mary Wanjiku", 2500, "Logo design"),)
    assert s.stage is Stage.IDLE and s.due_ms is None


def test_name_lookup_no_match_offers_the_guided_flow() -> None:
    s, e = step(looked_up(), CustomersFound("Mary", ()), T0, S)
    assert only_reply(e) == Reply(
        "No saved customer matches 'Mary'.\nUse their phone number instead, or tap New Invoice.",
        (Button("new invoice", "New Invoice"),),
    )
    assert s.stage is Stage.IDLE and s.due_ms is None


def test_name_lookup_several_matches_then_pick() -> None:
    s, e = step(looked_up(), CustomersFound("Mary", (MARY_W, MARY_A)), T0, S)
    assert s.stage is Stage.PICK_CUSTOMER and s.candidates == (MARY_W, MARY_A)
    assert only_reply(e) == Reply(
        "Which Mary for KES 2,500? Reply with the number:\n"
        "1. Mary Wanjiku (0712…678)\n"
        "2. Mary Atieno (0112…999)",
        footer="Send 'cancel' to stop.",
    )
    bad, e = step(s, Message("3"), T0 + 1, S)
    assert bad.stage is Stage.PICK_CUSTOMER
    assert texts(e) == ["Please reply with a number from 1 to 2, or send 'cancel' to stop."]
    for wrong in ["0", "one", "Mary Atieno", "9" * 5000]:
        assert step(s, Message(wrong), T0 + 1, S)[0].stage is Stage.PICK_CUSTOMER

    done, e = step(s, Message(" 2. "), T0 + 2, S)
    assert e == (CreateInvoice("254112000999", "Mary Atieno", 2500, "Logo design"),)
    assert done.stage is Stage.IDLE


def test_name_lookup_pick_cancel_and_help() -> None:
    s, _ = step(looked_up(), CustomersFound("Mary", (MARY_W, MARY_A)), T0, S)
    c, e = step(s, Message("cancel"), T0 + 1, S)
    assert c.stage is Stage.IDLE and texts(e) == [CANCELLED]
    h, e = step(s, Message("help"), T0 + 1, S)
    assert h.stage is Stage.PICK_CUSTOMER and texts(e)[0] == HELP
    assert texts(e)[1].startswith("Which Mary for KES 2,500? Reply with the number:\n1. ")


def test_name_lookup_too_many_matches() -> None:
    many = tuple(Customer(f"2547{n:08d}", f"Mary {n}") for n in range(10))
    s, e = step(looked_up(), CustomersFound("Mary", many), T0, S)
    assert texts(e) == ["Too many customers match 'Mary'.\nUse a fuller name or their phone number."]
    assert s.stage is Stage.IDLE
    nine, e = step(looked_up(), CustomersFound("Mary", many[:9]), T0, S)
    assert nine.stage is Stage.PICK_CUSTOMER and "9. Mary 8" in texts(e)[0]


def test_stale_or_unexpected_lookup_answers_are_ignored() -> None:
    s = looked_up()
    assert step(s, CustomersFound("John", (MARY_W,)), T0, S) == (s, ())
    assert step(IDLE, CustomersFound("Mary", (MARY_W,)), T0, S) == (IDLE, ())
    picking, _ = step(s, CustomersFound("Mary", (MARY_W, MARY_A)), T0, S)
    assert step(picking, CustomersFound("Mary", (MARY_W,)), T0, S) == (picking, ())


def test_a_message_while_the_lookup_is_lost_is_read_as_a_command() -> None:
    # The actor should answer FindCustomers at once; if it never did, the next message counts.
    s, e = step(looked_up(), Message("unpaid"), T0 + 1, S)
    assert e == (ListUnpaid(),) and s.stage is Stage.IDLE
    s, e = step(looked_up(), Message("invoice"), T0 + 1, S)
    assert s.stage is Stage.PHONE and texts(e) == [ASK_PHONE]


def test_a_lost_lookup_is_closed_by_the_timer() -> None:
    s, e = step(looked_up(), TimerDue(), T0 + CLOSE_MS, S)
    assert s.stage is Stage.IDLE and texts(e) == [CLOSED]


# --- persistence ----------------------------------------------------------------------------------


def test_to_dict_is_flat_json_of_ints_strs_lists() -> None:
    s, _ = step(looked_up(), CustomersFound("Mary", (MARY_W, Customer("254112000999", None))), T0, S)
    d = s.to_dict()
    assert d == {
        "v": 1,
        "stage": "PICK_CUSTOMER",
        "amount_kes": 2500,
        "description": "Logo design",
        "query": "Mary",
        "candidates": [["254712345678", "Mary Wanjiku"], ["254112000999", ""]],
        "nudge_at_ms": T0 + NUDGE_MS,
        "close_at_ms": T0 + CLOSE_MS,
        "rate_start_ms": T0,
        "rate_count": 1,
    }
    assert ConversationState.from_dict(json.loads(json.dumps(d))) == s


def test_editing_round_trips() -> None:
    s, _ = run(at(Stage.REVIEW), "edit description")
    assert s.to_dict()["editing"] == 1
    assert ConversationState.from_dict(s.to_dict()) == s


GOOD = at(Stage.REVIEW).to_dict()


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "IDLE",
        {},
        {**GOOD, "v": 2},
        {**GOOD, "v": "1"},
        {**GOOD, "stage": "COLLECT"},  # the brief's section 10 name, never ours
        {k: v for k, v in GOOD.items() if k != "description"},  # REVIEW without a description
        {k: v for k, v in GOOD.items() if k != "close_at_ms"},  # a flow that could never close
        {**GOOD, "amount_kes": "2500"},
        {**GOOD, "amount_kes": 2500.0},
        {**GOOD, "amount_kes": True},
        {**GOOD, "amount_kes": 0},
        {**GOOD, "msisdn": "0712345678"},  # not canonical
        {**GOOD, "description": "x"},
        {**GOOD, "editing": 1},  # editing only makes sense at AMOUNT/DESCRIPTION
        # editing comes from the review, where the description is always known
        {**{k: v for k, v in GOOD.items() if k != "description"}, "stage": "DESCRIPTION",
         "editing": 1},
        {**GOOD, "candidates": [["254712345678"]]},
        {**GOOD, "candidates": "nope"},
        {"v": 1, "stage": "IDLE", "msisdn": "254712345678"},  # IDLE with a draft
        {"v": 1, "stage": "IDLE", "close_at_ms": T0},  # IDLE with a timer
        {"v": 1, "stage": "PICK_CUSTOMER", "amount_kes": 5, "description": "abc",
         "close_at_ms": T0},  # no query
    ],
)
def test_from_dict_falls_back_to_idle(data: object) -> None:
    s = ConversationState.from_dict(data)
    assert s.stage is Stage.IDLE and s.draft == Draft() and s.due_ms is None


def test_from_dict_keeps_the_rate_window_when_the_flow_is_unusable() -> None:
    data = {**GOOD, "stage": "COLLECT", "rate_start_ms": T0, "rate_count": 31, "rate_warned": 1}
    s = ConversationState.from_dict(data)
    assert s.stage is Stage.IDLE
    assert s.rate == RateWindow(start_ms=T0, count=31, warned=True)


# Reachable states: random walks through the machine.
vocabulary = st.sampled_from(
    [
        "invoice", "new invoice", "0712345678", "+254 112 345 678", "-", "skip", "Mary Wanjiku",
        "M", "2500", "KES 250,001", "0", "Cleaning service", "ab", "send", "edit amount",
        "edit description", "cancel", "help", "1", "2", "invoice Mary 2500 Logo",
        "invoice 0712345678 2500 Tea", "remind 1042", "unpaid", "hello",
    ]
)
events = st.one_of(
    vocabulary.map(Message),
    st.just(TimerDue()),
    st.sampled_from([(), (MARY_W,), (MARY_W, MARY_A)]).map(lambda m: CustomersFound("Mary", m)),
)
walks = st.lists(st.tuples(events, st.integers(min_value=0, max_value=CLOSE_MS)), max_size=40)


@settings(max_examples=300)
@given(walks)
def test_property_every_reachable_state_round_trips_and_is_sane(
    walk: list[tuple[Event, int]],
) -> None:
    s, now = IDLE, T0
    for event, gap in walk:
        now += gap
        s, effects = step(s, event, now, ChatSettings(rate_limit_per_minute=10))
        d = s.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert all(type(v) in (int, str, list) for v in d.values())
        assert ConversationState.from_dict(d) == s
        # IDLE never has timers; a flow always has its close timer.
        assert (s.stage is Stage.IDLE) == (s.close_at_ms is None)
        assert all(isinstance(e, (Reply, FindCustomers, CreateInvoice, InvoiceAction, ListUnpaid))
                   for e in effects)
        for e in effects:
            if isinstance(e, CreateInvoice):
                assert s.stage is Stage.IDLE
                assert 1 <= e.amount_kes <= S.max_amount_kes


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)


@given(st.dictionaries(
    st.sampled_from(list(GOOD) + ["candidates", "editing", "query", "rate_count", "rate_warned",
                                  "junk"]),
    json_values,
))
def test_property_from_dict_never_raises(data: dict[str, object]) -> None:
    s = ConversationState.from_dict({**GOOD, **data})
    assert isinstance(s, ConversationState)
    assert ConversationState.from_dict(s.to_dict()) == s


def test_step_refuses_foreign_events() -> None:
    with pytest.raises(TypeError):
        step(IDLE, "invoice", T0, S)  # type: ignore[arg-type]


# --- the customer side ------------------------------------------------------------------------------


def invoice(n: int, status: InvoiceStatus = InvoiceStatus.SENT) -> Invoice:
    return Invoice(
        id=str(n), msisdn="254712345678", customer_name="Mary", amount_cents=250_000,
        description="Cleaning", status=status, pay_token="t", created_at_ms=T0,
    )


@pytest.mark.parametrize(
    ("text", "effect"),
    [
        ("pay_now:1042", PayRequested("1042")),
        ("PAY_NOW:1042", PayRequested("1042")),
        ("pay_now:garbage", PayRequested(None)),
        ("pay", PayRequested(None)),
        ("Pay now", PayRequested(None)),
        ("pay with M-PESA", PayRequested(None)),
        ("pay 1042", PayRequested("1042")),
        ("PAY #INV-1042", PayRequested("1042")),
        ("view_details:1042", DetailsRequested("1042")),
    ],
)
def test_customer_taps_and_pay(text: str, effect: object) -> None:
    state = CustomerState(last_hint_at_ms=T0)  # a recent hint does not block taps
    assert customer_step(state, Message(text), T0 + 1) == (state, (effect,))


@pytest.mark.parametrize("text", ["pay_now:1042", "pay", "Pay now", "PAY #INV-1042", "pay with mpesa"])
def test_pay_request_recognises_what_the_step_takes_as_one(text: str) -> None:
    """The front door asks ``pay_request`` which messages should go ahead of the chat during a
    flood: it must agree with the step, which decides what is paid."""
    assert pay_request(text) is not None
    assert customer_step(CustomerState(), Message(text), T0)[1] == (pay_request(text),)


@pytest.mark.parametrize("text", ["pay later", "hello", "view_details:1042", "paying?", "", "pay_now"])
def test_pay_request_is_none_for_anything_else(text: str) -> None:
    assert pay_request(text) is None
    assert not any(isinstance(e, PayRequested) for e in customer_step(CustomerState(), Message(text), T0)[1])


def test_customer_free_text_gets_one_hint_per_interval() -> None:
    s, e = customer_step(CustomerState(), Message("hello, is this Mary's shop?"), T0)
    assert e == (ListOpenInvoices(),)
    s, e = customer_step(s, OpenInvoices((invoice(1042),)), T0)
    assert s == CustomerState(last_hint_at_ms=T0)
    r = only_reply(e)  # type: ignore[arg-type]
    assert r.text == (
        "Your open invoice: Invoice #1042 (KES 2,500) for Cleaning.\nTap Pay with M-PESA to pay it now."
    )
    assert r.buttons[0] == Button("pay_now:1042", "Pay with M-PESA")

    # Within the hour: no lookup, no reply.
    assert customer_step(s, Message("hello?"), T0 + 3_599_999) == (s, ())
    assert customer_step(s, OpenInvoices((invoice(1042),)), T0 + 1000) == (s, ())
    # "pay later" is not a pay request: it is free text.
    assert customer_step(s, Message("pay later"), T0 + 1) == (s, ())
    # After the hour: again.
    assert customer_step(s, Message("hello?"), T0 + 3_600_000)[1] == (ListOpenInvoices(),)


def test_customer_hint_none_open_and_several() -> None:
    s, e = customer_step(CustomerState(), OpenInvoices(()), T0)
    assert texts(e) == ["You have no open invoices right now. Thank you!"]  # type: ignore[arg-type]
    s, e = customer_step(
        CustomerState(),
        OpenInvoices((invoice(1042), invoice(1043, InvoiceStatus.PAID), invoice(1044))),
        T0,
    )
    assert texts(e) == [  # type: ignore[arg-type]
        "Your open invoices: #1042 (KES 2,500), #1044 (KES 2,500).\n"
        "Tap one to Pay with M-PESA, or reply 'pay 1042'."
    ]


def test_customer_hint_interval_is_configurable() -> None:
    s = CustomerState(last_hint_at_ms=T0)
    assert customer_step(s, Message("hi"), T0 + 10, hint_interval_ms=10)[1] == (ListOpenInvoices(),)


def test_customer_state_round_trip() -> None:
    for s in (CustomerState(), CustomerState(last_hint_at_ms=T0)):
        assert CustomerState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for bad in (None, {}, {"v": 2, "last_hint_at_ms": T0}, {"v": 1, "last_hint_at_ms": "x"},
                {"v": 1, "last_hint_at_ms": True}):
        assert CustomerState.from_dict(bad) == CustomerState()
