"""copy.py: the brief's words exactly, Meta's limits for every message, SMS within one GSM-7 part.

Expected strings are typed here literally (not built from copy.py's constants) so that a changed
character in copy.py fails a test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invoiceiq.core import copy
from invoiceiq.core.copy import Reply
from invoiceiq.core.model import Button, Channel, Customer, Invoice, InvoiceStatus

NOV_26_2026_1430_EAT = 1_795_692_600_000  # 2026-11-26 11:30 UTC


def make_invoice(**kw: object) -> Invoice:
    base = Invoice(
        id="1042",
        msisdn="254712345678",
        customer_name="Mary Wanjiku",
        amount_cents=250_000,
        description="Cleaning service (Wed 3pm)",
        status=InvoiceStatus.SENT,
        pay_token="tok",
        created_at_ms=NOV_26_2026_1430_EAT,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


INV = make_invoice()
# Worst case for lengths: 10-digit id, 60-char name, 120-char description with non-GSM text.
BIG = make_invoice(
    id="1234567890",
    customer_name="N" * 60,
    amount_cents=250_000 * 100,
    description="Logo design \u2014 first milestone \u201cbrand\u201d \U0001f600 " + "d" * 80,
    mpesa_receipt="QHX1234567",
    channel=Channel.WHATSAPP,
    delivery_state="delivered",
)
assert len(BIG.description) == 120
URL = "https://pay.example.co.ke/p/AbCdEf123456"


# --- the brief's copy, word for word ----------------------------------------------------------


def test_guided_prompts_word_for_word() -> None:
    assert copy.ASK_PHONE == Reply(
        "What is the customer's phone number? Use format 2547XXXXXXXX.",
        (Button("cancel", "Cancel"),),
    )
    assert copy.ASK_NAME == Reply(
        "Customer name? (Optional) Reply with the name or send '-' to skip.",
        (Button("skip", "Skip"), Button("cancel", "Cancel")),
    )
    assert copy.ASK_AMOUNT == Reply(
        "Amount in KES? (Whole number, e.g., 2500)", (Button("cancel", "Cancel"),)
    )
    assert copy.ASK_DESCRIPTION == Reply(
        "Short description of the invoice (3–120 chars).", (Button("cancel", "Cancel"),)
    )


def test_long_errors_word_for_word() -> None:
    assert copy.INVALID_PHONE.text == "Invalid phone. Please use format 2547XXXXXXXX."
    assert copy.INVALID_NAME.text == (
        "Name is too short/long. Please enter 2–60 characters, or send '-' to skip."
    )
    assert copy.INVALID_AMOUNT.text == "Invalid amount. Enter a whole number in KES (e.g., 2500)."
    assert copy.INVALID_DESCRIPTION.text == "Please enter 3–120 characters."
    # The error keeps the step's buttons, so the merchant can still tap them.
    assert copy.INVALID_NAME.buttons == copy.ASK_NAME.buttons
    assert copy.INVALID_PHONE.buttons == (Button("cancel", "Cancel"),)


def test_short_errors_are_not_used() -> None:
    short = [
        "Invalid phone. Use 2547XXXXXXXX.",
        "Invalid amount. Use a whole number (e.g., 2500).",
        "3–120 characters, please.",
        "2–60 characters or '-' to skip.",
    ]
    source = inspect.getsource(copy)
    for text in short:
        assert text not in source


def test_dash_characters() -> None:
    # en dash in ranges, not a hyphen; straight apostrophes.
    assert "2\u201360" in copy.INVALID_NAME.text and "2-60" not in copy.INVALID_NAME.text
    assert "3\u2013120" in copy.ASK_DESCRIPTION.text
    assert "\u2019" not in inspect.getsource(copy)


def test_global_flow_texts() -> None:
    assert copy.FLOW_CANCELLED.text == "Okay, cancelled. No invoice was created."
    assert copy.FLOW_HELP.text == (
        "You can create an invoice step-by-step. At any time, send 'cancel' to stop."
    )
    assert copy.NUDGE.text == "Still there? Reply to continue or send 'cancel' to stop."
    assert copy.SESSION_CLOSED.text == "Session closed. Send 'new invoice' to start again."
    assert copy.SESSION_CLOSED.buttons == (Button("new invoice", "New Invoice"),)


def test_review() -> None:
    r = copy.review("254712345678", "Mary Wanjiku", 2500, "Cleaning service (Wed 3pm)")
    assert r.text == (
        "Review invoice:\n"
        "• To: 254712345678 (Mary Wanjiku)\n"
        "• Amount: KES 2,500\n"
        "• Item: Cleaning service (Wed 3pm)\n"
        "\n"
        "Send to customer now?"
    )
    # Four buttons in the brief, three allowed: Cancel moves to the footer.
    assert r.buttons == (
        Button("send", "Send"),
        Button("edit amount", "Edit Amount"),
        Button("edit description", "Edit Description"),
    )
    assert r.footer == "Send 'cancel' to stop."


def test_review_without_name_uses_em_dash() -> None:
    r = copy.review("254712345678", None, 100, "Tea")
    assert "• To: 254712345678 (—)\n" in r.text


def test_merchant_confirmation() -> None:
    r = copy.invoice_sent(INV)
    assert r.text == (
        "Invoice #1042 sent to 254712345678. Use 'remind 1042' to nudge or 'cancel 1042' to cancel."
    )
    assert r.buttons == (Button("remind 1042", "Send reminder"), Button("cancel 1042", "Cancel"))


def test_customer_invoice_message() -> None:
    r = copy.customer_invoice(INV)
    assert r.text == (
        "InvoiceIQ — Invoice #1042\n"
        "Amount: KES 2,500\n"
        "For: Mary Wanjiku\n"
        "Item: Cleaning service (Wed 3pm)"
    )
    assert r.buttons == (
        Button("pay_now:1042", "Pay with M-PESA"),
        Button("view_details:1042", "View details"),
    )
    assert "For: Customer\n" in copy.customer_invoice(make_invoice(customer_name=None)).text


def test_receipt() -> None:
    assert copy.receipt(INV, "QHX1234567").text == (
        "Paid ✔ — Invoice #1042 (KES 2,500)\nReceipt: QHX1234567\nThank you!"
    )


# --- texts the brief does not give -----------------------------------------------------------


def test_merchant_texts() -> None:
    assert copy.MERCHANT_HELP.buttons == (Button("new invoice", "New Invoice"),)
    for command in ("invoice <phone or name> <amount> <description>", "remind", "cancel",
                    "status", "unpaid"):
        assert command in copy.MERCHANT_HELP.text
    assert copy.UNKNOWN_COMMAND.buttons == (Button("new invoice", "New Invoice"),)
    assert "'help'" in copy.UNKNOWN_COMMAND.text
    assert copy.RATE_LIMITED.text == (
        "You're sending messages too fast. Please wait a minute, then try again."
    )
    assert copy.bad_invoice_ref("remind").text.startswith(
        "Please add the invoice number, e.g. 'remind 1042'."
    )


def test_amount_too_large_names_the_maximum() -> None:
    assert copy.amount_too_large(250_000).text == (
        "Invalid amount. The maximum is KES 250,000 per invoice."
    )


@pytest.mark.parametrize(
    ("field", "first"),
    [
        ("phone", "Invalid phone. Please use format 2547XXXXXXXX."),
        ("name", "Name is too short/long. Please enter 2–60 characters."),
        ("amount", "Invalid amount. Enter a whole number in KES (e.g., 2500)."),
        ("description", "Invalid description. Please enter 3–120 characters."),
    ],
)
def test_one_line_errors(field: str, first: str) -> None:
    r = copy.one_line_error(field, 250_000)
    assert r.text == (
        f"{first}\nExample: invoice 254712345678 2500 Cleaning service. Or tap New Invoice."
    )
    assert r.buttons == (Button("new invoice", "New Invoice"),)


def test_one_line_error_over_max() -> None:
    assert copy.one_line_error("amount", 70_000, over_max=True).text.startswith(
        "Invalid amount. The maximum is KES 70,000 per invoice.\n"
    )


def test_name_lookup_texts() -> None:
    none = copy.no_customer_match("Mary")
    assert none.text == (
        "No saved customer matches 'Mary'.\nUse their phone number instead, or tap New Invoice."
    )
    assert none.buttons == (Button("new invoice", "New Invoice"),)
    pick = copy.pick_customer(
        "Mary", 2500, [Customer("254712345678", "Mary Wanjiku"), Customer("254112000999", None)]
    )
    assert pick.text == (
        "Which Mary for KES 2,500? Reply with the number:\n"
        "1. Mary Wanjiku (0712…678)\n"
        "2. — (0112…999)"
    )
    assert pick.footer == "Send 'cancel' to stop."
    assert copy.pick_customer_invalid(3).text == (
        "Please reply with a number from 1 to 3, or send 'cancel' to stop."
    )


def test_remind_and_cancel_results() -> None:
    assert copy.reminded(INV).text == "Reminder sent for Invoice #1042 (KES 2,500)."
    # 11:30 UTC is 14:30 in Nairobi.
    assert copy.remind_too_soon(INV, NOV_26_2026_1430_EAT).text == (
        "Invoice #1042 (KES 2,500) was reminded recently.\n"
        "You can remind #1042 again after 14:30."
    )
    assert "already paid" in copy.remind_paid(INV).text
    assert "cancelled" in copy.remind_cancelled(INV).text
    assert copy.invoice_cancelled(INV).text.startswith("Invoice #1042 (KES 2,500) is cancelled.")
    assert copy.cancel_paid(INV).text == (
        "Invoice #1042 (KES 2,500) is already paid and can't be cancelled."
    )
    assert copy.cancel_already_cancelled(INV).text == (
        "Invoice #1042 (KES 2,500) was already cancelled."
    )
    assert copy.invoice_not_found("9999").text.startswith("I can't find invoice #9999.")
    assert "#1042 (KES 2,500)" in copy.customer_cancelled_notice(INV).text


def test_status_summary() -> None:
    r = copy.status_summary(
        replace(INV, channel=Channel.WHATSAPP, delivery_state="READ"), payment_attempts=2
    )
    assert r.text == (
        "Invoice #1042 (KES 2,500) for Mary Wanjiku (0712…678): sent, unpaid.\n"
        "Sent by WhatsApp (read), 2 payment attempts."
    )
    assert r.buttons == (Button("remind 1042", "Send reminder"), Button("cancel 1042", "Cancel"))
    paid = copy.status_summary(
        replace(INV, status=InvoiceStatus.PAID, mpesa_receipt="QHX1", channel=Channel.SMS,
                customer_name=None),
        payment_attempts=1,
    )
    assert paid.text == (
        "Invoice #1042 (KES 2,500) for 0712…678: paid, receipt QHX1.\n"
        "Sent by SMS, 1 payment attempt."
    )
    assert paid.buttons == ()  # nothing to remind or cancel
    pending = copy.status_summary(replace(INV, status=InvoiceStatus.PENDING), 0)
    assert pending.text.endswith(": not sent yet.\nNot delivered yet, no payment attempts.")


def test_unpaid_list() -> None:
    r = copy.unpaid_list([INV, make_invoice(id="1043", amount_cents=100_000, customer_name=None)])
    assert r.text == (
        "2 unpaid invoices, KES 3,500 in total:\n"
        "#1042 · KES 2,500 · Mary Wanjiku (0712…678)\n"
        "#1043 · KES 1,000 · 0712…678"
    )
    assert copy.unpaid_list([]).text == "No unpaid invoices. Send 'invoice' to create one."


def test_unpaid_list_is_cut_to_one_message_with_the_full_total() -> None:
    many = [replace(BIG, id=str(2000 + n)) for n in range(200)]
    r = copy.unpaid_list(many)
    assert len(r.text) <= 1024
    assert r.text.startswith("200 unpaid invoices, KES 50,000,000 in total:\n")
    shown = r.text.count("\n#")
    assert 1 <= shown < 200
    assert r.text.endswith(f"\n…and {200 - shown} more.")


def test_sms_customer_hint_says_what_to_reply() -> None:
    assert copy.sms_customer_hint([]).text == "You have no open invoices right now. Thank you!"
    one = copy.sms_customer_hint([INV])
    assert one.buttons == () and f"Reply PAY {INV.id} to Pay with M-PESA." in one.text
    several = copy.sms_customer_hint([replace(INV, id=str(1042 + n)) for n in range(6)])
    assert several.text.startswith("Unpaid: #1042 (KES") and "and 2 more" in several.text
    assert "Reply PAY 1042" in several.text


def test_customer_hint() -> None:
    assert copy.customer_hint([]).text == "You have no open invoices right now. Thank you!"
    one = copy.customer_hint([INV])
    assert one.text == (
        "Your open invoice: Invoice #1042 (KES 2,500) for Cleaning service (Wed 3pm).\n"
        "Tap Pay with M-PESA to pay it now."
    )
    assert one.buttons[0] == Button("pay_now:1042", "Pay with M-PESA")
    several = copy.customer_hint([replace(INV, id=str(1042 + n)) for n in range(5)])
    assert several.text.startswith("Your open invoices: #1042 (KES 2,500), #1043 (KES 2,500)")
    assert "Pay with M-PESA" in several.text
    assert [b.id for b in several.buttons] == ["pay_now:1042", "pay_now:1043", "pay_now:1044"]


def test_payment_replies() -> None:
    paid = replace(INV, status=InvoiceStatus.PAID, mpesa_receipt="QHX1234567")
    assert copy.already_paid(paid).text == (
        "Invoice #1042 (KES 2,500) is already paid. Receipt: QHX1234567. Thank you!"
    )
    assert copy.pay_cancelled(INV).text == (
        "Invoice #1042 (KES 2,500) was cancelled, so there is nothing to pay."
    )
    assert copy.prompt_already_sent(INV, "254712345678").text == (
        "The M-PESA prompt for Invoice #1042 (KES 2,500) was already sent to 0712…678, "
        "check your phone."
    )
    assert "0712…678" in copy.too_many_prompts(INV, "254712345678").text
    assert "wait a minute" in copy.wait_before_prompt(INV).text
    assert copy.prompt_sent(INV, "254712345678").text.startswith(
        "M-PESA prompt sent to 0712…678 for Invoice #1042 (KES 2,500)."
    )


@pytest.mark.parametrize(
    ("code", "first"),
    [
        (1032, "You cancelled the M-PESA prompt for Invoice #1042 (KES 2,500)."),
        ("1032", "You cancelled the M-PESA prompt for Invoice #1042 (KES 2,500)."),
        (1037, "We couldn't reach your phone for Invoice #1042 (KES 2,500). Keep it on and unlocked."),
        (2001, "The M-PESA PIN was wrong for Invoice #1042 (KES 2,500)."),
        (1, "Your M-PESA balance is not enough to pay Invoice #1042 (KES 2,500)."),
        (17, "M-PESA asks us to wait before another prompt for Invoice #1042 (KES 2,500)."),
        (1019, "The M-PESA prompt for Invoice #1042 (KES 2,500) expired."),
        (9999, "The M-PESA payment for Invoice #1042 (KES 2,500) did not go through."),
        ("SFC_IC0003", "The M-PESA payment for Invoice #1042 (KES 2,500) did not go through."),
    ],
)
def test_stk_failures(code: int | str, first: str) -> None:
    r = copy.stk_failed(INV, code)
    assert r.text.split("\n")[0] == first
    assert "Pay with M-PESA" in r.text.split("\n")[1]
    assert r.buttons == (Button("pay_now:1042", "Pay with M-PESA"),)


def test_stk_17_says_two_minutes() -> None:
    assert "two minutes" in copy.stk_failed(INV, 17).text


def test_merchant_alerts() -> None:
    assert copy.amount_mismatch(INV, 2000, "QHX1").text == (
        "Check Invoice #1042: it is for KES 2,500 but M-PESA paid KES 2,000 (receipt QHX1).\n"
        "Please settle the difference with the customer."
    )
    assert copy.paid_after_cancel(INV, 2500, "QHX1").text.startswith(
        "KES 2,500 arrived for cancelled Invoice #1042 (receipt QHX1)."
    )
    assert copy.sent_by_sms(INV, copy.SMS_REASON_NOT_ON_WHATSAPP).text == (
        "Invoice #1042 (KES 2,500) went to 0712…678 by SMS because the number is not on WhatsApp."
    )
    assert copy.delivery_failed(INV).text.startswith(
        "Invoice #1042 (KES 2,500) could not be delivered to 0712…678 by WhatsApp or SMS."
    )


def test_invoice_details() -> None:
    r = copy.invoice_details(INV)
    assert r.text == (
        "Invoice #1042 — KES 2,500\n"
        "For: Mary Wanjiku\n"
        "Item: Cleaning service (Wed 3pm)\n"
        "Issued: 26 Nov 2026, 14:30\n"
        "Status: Unpaid"
    )
    assert r.buttons == (Button("pay_now:1042", "Pay with M-PESA"),)
    paid = copy.invoice_details(replace(INV, status=InvoiceStatus.PAID, mpesa_receipt="QHX1"))
    assert paid.text.endswith("Status: Paid ✔ (receipt QHX1)")
    assert paid.buttons == ()  # nothing left to pay


# --- SMS ----------------------------------------------------------------------------------------


def test_sms_texts() -> None:
    assert copy.sms_invoice(INV, URL) == (
        f"Invoice #1042, KES 2,500 for Cleaning service (Wed 3pm). Pay with M-PESA: {URL}"
    )
    assert copy.sms_reminder(INV, URL) == (
        f"Reminder: Invoice #1042, KES 2,500 is still unpaid. Pay with M-PESA: {URL}"
    )
    assert copy.sms_receipt(INV, "QHX1234567", URL) == (
        f"Paid - Invoice #1042 (KES 2,500). Receipt: QHX1234567. Thank you! Details: {URL}"
    )


def test_sms_long_description_is_cut_not_the_link() -> None:
    text = copy.sms_invoice(BIG, URL)
    length = copy.gsm7_length(text)
    assert length is not None and length <= 160
    assert text.startswith("Invoice #1234567890, KES 250,000 for Logo design - first milestone")
    assert text.endswith(f"ddd... Pay with M-PESA: {URL}")
    assert "\u2014" not in text and "?" in text  # em dash replaced, emoji unrepresentable


@given(
    description=st.text(min_size=3, max_size=120),
    invoice_id=st.from_regex(r"[1-9][0-9]{3,9}", fullmatch=True),
    amount=st.integers(min_value=1, max_value=250_000),
)
def test_sms_property_one_gsm7_part_with_number_amount_link(
    description: str, invoice_id: str, amount: int
) -> None:
    invoice = make_invoice(id=invoice_id, amount_cents=amount * 100, description=description)
    for text in (
        copy.sms_invoice(invoice, URL),
        copy.sms_reminder(invoice, URL),
        copy.sms_receipt(invoice, "QHX1234567", URL),
        copy.sms_stk_failed(invoice, 1032, URL),
        copy.sms_stk_failed(invoice, "weird", URL),
    ):
        length = copy.gsm7_length(text)
        assert length is not None and length <= 160, text
        assert f"#{invoice_id}" in text
        assert f"KES {amount:,}" in text
        assert URL in text


def test_sms_stk_failed_says_what_to_reply() -> None:
    text = copy.sms_stk_failed(INV, 2001, URL)
    assert text.startswith(f"The M-PESA PIN was wrong for Invoice #{INV.id} (KES ")
    assert f"Reply PAY {INV.id} or open {URL} to try again." in text


def test_gsm7() -> None:
    assert copy.gsm7_length("abc") == 3
    assert copy.gsm7_length("a€") == 3  # extension table: two septets
    assert copy.gsm7_length("—") is None
    assert copy.to_gsm7("Wanjikũ’s “logo” — ✔…") == "Wanjiku's \"logo\" - ..."
    assert copy.to_gsm7("😀") == "?"


# --- Meta's limits, for every message copy.py can produce --------------------------------------

CUSTOMERS_9 = [Customer(f"2547{n:08d}", "N" * 60) for n in range(9)]


def every_reply() -> dict[str, list[Reply]]:
    """Every public Reply in copy.py, built with worst-case inputs, keyed by its name."""
    paid = replace(BIG, status=InvoiceStatus.PAID)
    many = [replace(BIG, id=str(1_000_000_000 + n)) for n in range(300)]
    return {
        "ASK_PHONE": [copy.ASK_PHONE],
        "ASK_NAME": [copy.ASK_NAME],
        "ASK_AMOUNT": [copy.ASK_AMOUNT],
        "ASK_DESCRIPTION": [copy.ASK_DESCRIPTION],
        "INVALID_PHONE": [copy.INVALID_PHONE],
        "INVALID_NAME": [copy.INVALID_NAME],
        "INVALID_AMOUNT": [copy.INVALID_AMOUNT],
        "INVALID_DESCRIPTION": [copy.INVALID_DESCRIPTION],
        "FLOW_CANCELLED": [copy.FLOW_CANCELLED],
        "FLOW_HELP": [copy.FLOW_HELP],
        "NUDGE": [copy.NUDGE],
        "SESSION_CLOSED": [copy.SESSION_CLOSED],
        "MERCHANT_HELP": [copy.MERCHANT_HELP],
        "UNKNOWN_COMMAND": [copy.UNKNOWN_COMMAND],
        "RATE_LIMITED": [copy.RATE_LIMITED],
        "NOTHING_TO_CANCEL": [copy.NOTHING_TO_CANCEL],
        "amount_too_large": [copy.amount_too_large(10**12)],
        "review": [copy.review("254712345678", "N" * 60, 250_000, BIG.description)],
        "review_hint": [copy.review_hint()],
        "invoice_sent": [copy.invoice_sent(BIG)],
        "one_line_error": [
            copy.one_line_error(f, 250_000, o)
            for f in ("phone", "name", "amount", "description") for o in (False, True)
        ],
        "bad_invoice_ref": [copy.bad_invoice_ref(v) for v in ("remind", "cancel", "status")],
        "invoice_not_found": [copy.invoice_not_found("1234567890")],
        "no_customer_match": [copy.no_customer_match("N" * 60)],
        "too_many_matches": [copy.too_many_matches("N" * 60)],
        "pick_customer": [copy.pick_customer("N" * 60, 250_000, CUSTOMERS_9)],
        "pick_customer_invalid": [copy.pick_customer_invalid(9)],
        "reminded": [copy.reminded(BIG)],
        "remind_too_soon": [copy.remind_too_soon(BIG, NOV_26_2026_1430_EAT)],
        "remind_paid": [copy.remind_paid(paid)],
        "remind_cancelled": [copy.remind_cancelled(BIG)],
        "invoice_cancelled": [copy.invoice_cancelled(BIG)],
        "cancel_paid": [copy.cancel_paid(paid)],
        "cancel_already_cancelled": [copy.cancel_already_cancelled(BIG)],
        "status_summary": [copy.status_summary(BIG, 10**6), copy.status_summary(paid, 0)],
        "unpaid_list": [copy.unpaid_list(many), copy.unpaid_list([])],
        "sent_by_sms": [copy.sent_by_sms(BIG, "r" * 500)],
        "delivery_failed": [copy.delivery_failed(BIG)],
        "amount_mismatch": [copy.amount_mismatch(BIG, 10**9, "R" * 100)],
        "paid_after_cancel": [copy.paid_after_cancel(BIG, 10**9, "R" * 100)],
        "customer_invoice": [copy.customer_invoice(BIG)],
        "customer_reminder": [copy.customer_reminder(BIG)],
        "receipt": [copy.receipt(BIG, "R" * 100)],
        "customer_cancelled_notice": [copy.customer_cancelled_notice(BIG)],
        "invoice_details": [copy.invoice_details(BIG), copy.invoice_details(paid)],
        "customer_hint": [copy.customer_hint(many), copy.customer_hint([BIG]), copy.customer_hint([])],
        "double_payment": [copy.double_payment(INV, 2500, "NLJ7RT61SV")],
        "payer_mismatch": [copy.payer_mismatch(INV, 2500, "NLJ7RT61SV", "254722000111")],
        "amount_unreadable": [copy.amount_unreadable(INV, "NLJ7RT61SV")],
        "sms_customer_hint": [copy.sms_customer_hint(many), copy.sms_customer_hint([BIG]),
                              copy.sms_customer_hint([])],
        "already_paid": [copy.already_paid(paid)],
        "pay_cancelled": [copy.pay_cancelled(BIG)],
        "prompt_sent": [copy.prompt_sent(BIG, "254712345678")],
        "prompt_already_sent": [copy.prompt_already_sent(BIG, "254712345678")],
        "too_many_prompts": [copy.too_many_prompts(BIG, "254712345678")],
        "wait_before_prompt": [copy.wait_before_prompt(BIG)],
        "stk_failed": [copy.stk_failed(BIG, c) for c in (1, 17, 1001, 1019, 1032, 1037, 2001, 5)],
    }


def _public_replies() -> set[str]:
    names = set()
    for name in copy.__all__:
        value = getattr(copy, name)
        if isinstance(value, Reply):
            names.add(name)
        elif inspect.isfunction(value) and inspect.signature(value).return_annotation == "Reply":
            names.add(name)
    return names


def test_every_public_reply_is_checked_below() -> None:
    assert set(every_reply()) == _public_replies()


def test_whatsapp_limits_for_every_message() -> None:
    for name, replies in every_reply().items():
        for r in replies:
            # Reply() enforces these on construction; check again so a weakened check fails here.
            assert 0 < len(r.text) <= 1024, name
            assert len(r.buttons) <= 3, name
            assert all(0 < len(b.title) <= 20 for b in r.buttons), name
            assert len({b.id for b in r.buttons}) == len(r.buttons), name
            assert r.footer is None or len(r.footer) <= 60, name


# The brief's own multi-line texts, and lists, are the exceptions to Appendix B's two lines.
MULTI_LINE = {"review", "customer_invoice", "receipt", "invoice_details", "pick_customer",
              "unpaid_list"}


def test_appendix_b_at_most_two_lines() -> None:
    for name, replies in every_reply().items():
        if name not in MULTI_LINE:
            for r in replies:
                assert r.text.count("\n") <= 1, name


INVOICE_SCOPED = {
    "reminded", "remind_too_soon", "remind_paid", "remind_cancelled", "invoice_cancelled",
    "cancel_paid", "cancel_already_cancelled", "status_summary", "sent_by_sms", "delivery_failed",
    "amount_mismatch", "paid_after_cancel", "customer_invoice", "customer_reminder", "receipt",
    "customer_cancelled_notice", "invoice_details", "already_paid", "pay_cancelled", "prompt_sent",
    "prompt_already_sent", "too_many_prompts", "wait_before_prompt", "stk_failed",
}


def test_appendix_b_invoice_number_and_amount() -> None:
    replies = every_reply()
    for name in INVOICE_SCOPED:
        for r in replies[name]:
            assert "#1234567890" in r.text, name
            assert "KES" in r.text, name


def test_paying_is_offered_as_pay_with_mpesa() -> None:
    for name, replies in every_reply().items():
        for r in replies:
            if any(b.id.startswith("pay_now:") for b in r.buttons):
                assert "Pay with M-PESA" in r.text or any(
                    b.title == "Pay with M-PESA" for b in r.buttons
                ), name


def test_every_button_id_of_an_invoice_carries_its_id() -> None:
    for name, replies in every_reply().items():
        for r in replies:
            for b in r.buttons:
                if b.id.startswith(("pay_now:", "view_details:", "remind ", "cancel ")):
                    assert b.id.split(":")[-1].split(" ")[-1].isdigit(), (name, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Reply(""),
        lambda: Reply("x" * 1025),
        lambda: Reply("x", tuple(Button(str(n), str(n)) for n in range(4))),
        lambda: Reply("x", (Button("a", "x" * 21),)),
        lambda: Reply("x", (Button("a", "A"), Button("a", "B"))),
        lambda: Reply("x", (Button("a", "A"), Button("b", "A"))),
        lambda: Reply("x", footer="f" * 61),
        lambda: Reply("x", footer=""),
    ],
)
def test_reply_refuses_what_whatsapp_refuses(make: Callable[[], Reply]) -> None:
    with pytest.raises(ValueError):
        make()


def test_format_time_eat() -> None:
    assert copy.format_time_eat(0) == "03:00"  # Nairobi is UTC+3 all year
    assert copy.format_time_eat(NOV_26_2026_1430_EAT) == "14:30"


def test_sms_drops_a_description_that_would_be_a_stub() -> None:
    long_url = "https://pay.example.co.ke/p/" + "x" * 78  # room for " for Cle..." only
    assert copy.sms_invoice(INV, long_url) == f"Invoice #1042, KES 2,500. Pay with M-PESA: {long_url}"


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=60), st.integers(min_value=1, max_value=250_000)),
        min_size=1,
        max_size=60,
    )
)
def test_unpaid_list_property_fits_and_accounts_for_every_invoice(
    rows: list[tuple[int, int]],
) -> None:
    invoices = [
        make_invoice(id=str(1001 + n), customer_name="N" * size or None, amount_cents=kes * 100)
        for n, (size, kes) in enumerate(rows)
    ]
    text = copy.unpaid_list(invoices).text  # Reply() itself refuses a body over 1024
    assert len(text) <= 1024
    shown = text.count("\n#")
    more = 0
    if text.endswith(" more."):
        more = int(text.rsplit("\u2026and ", 1)[1].split(" ")[0])
    assert shown + more == len(invoices)
    assert f"KES {sum(k for _, k in rows):,} in total:" in text


def test_unpaid_list_cut_at_every_possible_boundary() -> None:
    # Line lengths step through every value, so the cut falls at every distance from 1024.
    for size in range(61):
        invoices = [make_invoice(id=str(1001 + n), customer_name="N" * size or None)
                    for n in range(40)]
        invoices[0] = make_invoice(id="1000", customer_name="x" * (size // 2 + 2))
        text = copy.unpaid_list(invoices).text
        assert len(text) <= 1024
        assert text.count("\n#") + int(text.rsplit("\u2026and ", 1)[1].split(" ")[0]) == 40
