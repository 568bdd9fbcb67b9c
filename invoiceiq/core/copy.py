"""Every text the bot says, in one place.

Section 7 of the brief (``shared/spec/invoiceiq-mvp.md``) is reproduced word for word: straight
apostrophes, ``–`` (en dash) in ranges, ``•`` bullets, ``—`` (em dash) for a missing name. Where the
brief gives a long and a short error text (7.3.1–7.3.4 vs 7.3.9) the long one is used everywhere.
Texts the brief does not give follow its Appendix B: at most two lines, the invoice number and
amount whenever an invoice is the subject, and the words "Pay with M-PESA" wherever paying is
offered. The multi-line exceptions are the brief's own (review, invoice, receipt) and lists.

Every WhatsApp message is a :class:`Reply`; its constructor enforces Meta's interactive limits
(a message breaking one is rejected whole, error 131009), so a copy bug fails in tests, not in a
customer's chat. SMS texts are plain ``str`` kept to GSM-7 so that 160 characters is one SMS.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from invoiceiq.core.model import Button, Channel, Customer, Invoice, InvoiceStatus, cents_to_kes, format_kes
from invoiceiq.core.validate import DESCRIPTION_MAX, NAME_MAX, short_msisdn

__all__ = [
    "ASK_AMOUNT",
    "ASK_DESCRIPTION",
    "ASK_NAME",
    "ASK_PHONE",
    "BTN_CANCEL",
    "BTN_EDIT_AMOUNT",
    "BTN_EDIT_DESCRIPTION",
    "BTN_NEW_INVOICE",
    "BTN_SEND",
    "BTN_SKIP",
    "CANCEL_FOOTER",
    "FLOW_CANCELLED",
    "FLOW_HELP",
    "INVALID_AMOUNT",
    "INVALID_DESCRIPTION",
    "INVALID_NAME",
    "INVALID_PHONE",
    "MAX_BODY",
    "MAX_BUTTONS",
    "MAX_BUTTON_ID",
    "MAX_BUTTON_TITLE",
    "MAX_FOOTER",
    "MAX_PICK_CANDIDATES",
    "MERCHANT_HELP",
    "NOTHING_TO_CANCEL",
    "NUDGE",
    "RATE_LIMITED",
    "SESSION_CLOSED",
    "SMS_MAX",
    "SMS_REASON_NOT_ON_WHATSAPP",
    "SMS_REASON_NO_DELIVERY",
    "SMS_REASON_WHATSAPP_FAILED",
    "UNKNOWN_COMMAND",
    "Reply",
    "already_paid",
    "payer_mismatch",
    "amount_unreadable",
    "double_payment",
    "sms_customer_hint",
    "amount_mismatch",
    "amount_too_large",
    "bad_invoice_ref",
    "cancel_already_cancelled",
    "cancel_paid",
    "customer_cancelled_notice",
    "customer_hint",
    "customer_invoice",
    "customer_reminder",
    "delivery_failed",
    "format_time_eat",
    "gsm7_length",
    "invoice_cancelled",
    "invoice_details",
    "invoice_not_found",
    "invoice_sent",
    "no_customer_match",
    "one_line_error",
    "paid_after_cancel",
    "pay_cancelled",
    "pick_customer",
    "pick_customer_invalid",
    "prompt_already_sent",
    "prompt_sent",
    "receipt",
    "remind_cancelled",
    "remind_paid",
    "remind_too_soon",
    "reminded",
    "review",
    "review_hint",
    "sent_by_sms",
    "sms_invoice",
    "sms_receipt",
    "sms_stk_failed",
    "sms_reminder",
    "status_summary",
    "stk_failed",
    "to_gsm7",
    "too_many_matches",
    "too_many_prompts",
    "unpaid_list",
    "wait_before_prompt",
]

# Meta's limits for interactive reply-button messages (shared/providers/whatsapp.md §3.2).
MAX_BUTTONS = 3
MAX_BUTTON_TITLE = 20
MAX_BUTTON_ID = 256
MAX_BODY = 1024
MAX_FOOTER = 60
# One GSM-7 SMS; past it the message is split and billed as several.
SMS_MAX = 160


@dataclass(frozen=True, slots=True)
class Reply:
    """One WhatsApp message: a body, up to three reply buttons, an optional footer.

    Used for the merchant and the customer alike; the caller knows the recipient.
    """

    text: str
    buttons: tuple[Button, ...] = ()
    footer: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.text or len(self.text) > MAX_BODY:
            problems.append(f"body is {len(self.text)} chars (1..{MAX_BODY})")
        if len(self.buttons) > MAX_BUTTONS:
            problems.append(f"{len(self.buttons)} buttons (max {MAX_BUTTONS})")
        for b in self.buttons:
            if not b.title or len(b.title) > MAX_BUTTON_TITLE:
                problems.append(f"button title {b.title!r} (1..{MAX_BUTTON_TITLE} chars)")
            if not b.id or len(b.id) > MAX_BUTTON_ID:
                problems.append(f"button id {b.id!r} (1..{MAX_BUTTON_ID} chars)")
        if len({b.id for b in self.buttons}) != len(self.buttons):
            problems.append("button ids are not unique")
        if len({b.title for b in self.buttons}) != len(self.buttons):
            problems.append("button titles are not unique")
        if self.footer is not None and not 0 < len(self.footer) <= MAX_FOOTER:
            problems.append(f"footer is {len(self.footer)} chars (1..{MAX_FOOTER})")
        if problems:
            raise ValueError("WhatsApp would reject this message: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Buttons. In the merchant's chat a button id is the word the merchant could type instead, so a
# tap and the typed word are one and the same event for the parser and the state machine.

BTN_CANCEL = Button("cancel", "Cancel")
BTN_SKIP = Button("skip", "Skip")
BTN_SEND = Button("send", "Send")
BTN_EDIT_AMOUNT = Button("edit amount", "Edit Amount")
BTN_EDIT_DESCRIPTION = Button("edit description", "Edit Description")
BTN_NEW_INVOICE = Button("new invoice", "New Invoice")


def _btn_remind(invoice_id: str) -> Button:
    return Button(f"remind {invoice_id}", "Send reminder")


def _btn_cancel_invoice(invoice_id: str) -> Button:
    return Button(f"cancel {invoice_id}", "Cancel")


def _btn_pay(invoice_id: str, title: str = "Pay with M-PESA") -> Button:
    return Button(f"pay_now:{invoice_id}", title)


def _btn_details(invoice_id: str) -> Button:
    return Button(f"view_details:{invoice_id}", "View details")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _kes(amount_kes: int) -> str:
    return f"KES {format_kes(amount_kes)}"


# An M-PESA receipt is 10 characters; a payment settled by a status query (which carries no
# receipt) is named by its CheckoutRequestID, about 32: both must show whole.
RECEIPT_MAX = 48


def _clip(text: str, limit: int) -> str:
    """Defensive: values reaching copy are validated already, but a body over 1024 is fatal."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _name(name: str | None) -> str | None:
    return _clip(name, NAME_MAX) if name else None


def _item(description: str) -> str:
    return _clip(description, DESCRIPTION_MAX)


def _subject(invoice: Invoice) -> str:
    """``Invoice #1042 (KES 2,500)``: Appendix B wants both in every invoice message."""
    return f"Invoice #{invoice.id} ({_kes(invoice.amount_kes)})"


# 7.3.5's "{{name or '—'}}": the em dash stands for "no name".
_NO_NAME = "\u2014"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _fit_lines(head: str, lines: Sequence[str], unlisted: int = 0) -> str:
    """``head`` then as many ``lines`` as fit in one WhatsApp body, then "…and N more."
    (``unlisted``: items beyond ``lines`` that are counted in N but were never given)."""
    text = head
    for i, line in enumerate(lines):
        left_after = len(lines) - i - 1 + unlisted
        # Keep room for the "…and N more." line that would follow if the next line did not fit.
        reserve = len(_more(left_after)) + 1 if left_after else 0
        if len(text) + 1 + len(line) + reserve > MAX_BODY:
            return f"{text}\n{_more(len(lines) - i + unlisted)}"
        text += "\n" + line
    if unlisted:
        text += "\n" + _more(unlisted)
    return text


def _more(n: int) -> str:
    return f"\u2026and {n} more."


# Kenya keeps East Africa Time all year (UTC+3, no daylight saving), so a fixed offset is exact
# and needs no tz database.
_EAT = timezone(timedelta(hours=3))
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _eat(ms: int) -> datetime:
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(_EAT)  # exact: no float seconds


def format_time_eat(ms: int) -> str:
    """Epoch milliseconds -> ``14:30`` in Nairobi time."""
    return f"{_eat(ms):%H:%M}"


def _format_date_eat(ms: int) -> str:
    # Month names spelled out here: strftime("%b") follows the process locale.
    t = _eat(ms)
    return f"{t.day} {_MONTHS[t.month - 1]} {t.year}, {t:%H:%M}"


# ---------------------------------------------------------------------------------------------
# 7.3 guided flow (brief, word for word)

ASK_PHONE = Reply("What is the customer's phone number? Use format 2547XXXXXXXX.", (BTN_CANCEL,))
INVALID_PHONE = Reply("Invalid phone. Please use format 2547XXXXXXXX.", (BTN_CANCEL,))

ASK_NAME = Reply(
    "Customer name? (Optional) Reply with the name or send '-' to skip.", (BTN_SKIP, BTN_CANCEL)
)
INVALID_NAME = Reply(
    "Name is too short/long. Please enter 2\u201360 characters, or send '-' to skip.",
    (BTN_SKIP, BTN_CANCEL),
)

ASK_AMOUNT = Reply("Amount in KES? (Whole number, e.g., 2500)", (BTN_CANCEL,))
INVALID_AMOUNT = Reply("Invalid amount. Enter a whole number in KES (e.g., 2500).", (BTN_CANCEL,))

ASK_DESCRIPTION = Reply("Short description of the invoice (3\u2013120 chars).", (BTN_CANCEL,))
INVALID_DESCRIPTION = Reply("Please enter 3\u2013120 characters.", (BTN_CANCEL,))

# 7.3.5 lists four buttons; WhatsApp shows at most three, so 'Cancel' moves to the footer
# (typing it works at every step anyway, 7.3.7).
CANCEL_FOOTER = "Send 'cancel' to stop."
_REVIEW_BUTTONS = (BTN_SEND, BTN_EDIT_AMOUNT, BTN_EDIT_DESCRIPTION)

FLOW_CANCELLED = Reply("Okay, cancelled. No invoice was created.")
FLOW_HELP = Reply(
    "You can create an invoice step-by-step. At any time, send 'cancel' to stop."
)

NUDGE = Reply("Still there? Reply to continue or send 'cancel' to stop.")
SESSION_CLOSED = Reply("Session closed. Send 'new invoice' to start again.", (BTN_NEW_INVOICE,))


def amount_too_large(max_kes: int) -> Reply:
    """Not in the brief (it has no ceiling): its amount error, naming the ceiling instead."""
    return Reply(f"Invalid amount. The maximum is {_kes(max_kes)} per invoice.", (BTN_CANCEL,))


def review(msisdn: str, name: str | None, amount_kes: int, description: str) -> Reply:
    """7.3.5 preview: ``Send`` / ``Edit Amount`` / ``Edit Description``, cancel in the footer."""
    text = (
        "Review invoice:\n"
        f"\u2022 To: {msisdn} ({_name(name) or _NO_NAME})\n"
        f"\u2022 Amount: {_kes(amount_kes)}\n"
        f"\u2022 Item: {_item(description)}\n"
        "\n"
        "Send to customer now?"
    )
    return Reply(text, _REVIEW_BUTTONS, CANCEL_FOOTER)


def review_hint() -> Reply:
    """Anything but the three buttons at the review step (the brief has no error text there)."""
    return Reply("Please tap Send, Edit Amount or Edit Description.", _REVIEW_BUTTONS, CANCEL_FOOTER)


def invoice_sent(invoice: Invoice) -> Reply:
    """7.3.5 merchant confirmation, sent once the provider has accepted the customer's message."""
    i = invoice.id
    return Reply(
        f"Invoice #{i} sent to {invoice.msisdn}. Use 'remind {i}' to nudge or 'cancel {i}' to cancel.",
        (_btn_remind(i), _btn_cancel_invoice(i)),
    )


# ---------------------------------------------------------------------------------------------
# Merchant commands outside the flow

MERCHANT_HELP = Reply(
    "Create: invoice <phone or name> <amount> <description>, "
    "e.g. invoice 254712345678 2500 Cleaning, or tap New Invoice.\n"
    "Manage: remind <no.>, cancel <no.>, status <no.>, unpaid.",
    (BTN_NEW_INVOICE,),
)
UNKNOWN_COMMAND = Reply(
    "Sorry, I didn't understand that. Send 'help' to see the commands, or tap New Invoice.",
    (BTN_NEW_INVOICE,),
)
RATE_LIMITED = Reply("You're sending messages too fast. Please wait a minute, then try again.")
NOTHING_TO_CANCEL = Reply(
    "There's nothing to cancel. To cancel an invoice, send 'cancel' and its number, e.g. cancel 1042."
)

_ONE_LINE_EXAMPLE = "Example: invoice 254712345678 2500 Cleaning service. Or tap New Invoice."


def one_line_error(field: str, max_kes: int, over_max: bool = False) -> Reply:
    """A one-line ``invoice ...`` with a bad field: the brief's long error, then an example.

    The name and description errors get their subject said out loud (alone, "Please enter 3–120
    characters." has no context), and the name error drops "or send '-' to skip", which only
    means something in the guided flow.
    """
    if field == "phone":
        first = INVALID_PHONE.text
    elif field == "name":
        first = "Name is too short/long. Please enter 2\u201360 characters."
    elif field == "amount":
        first = amount_too_large(max_kes).text if over_max else INVALID_AMOUNT.text
    else:
        first = "Invalid description. " + INVALID_DESCRIPTION.text
    return Reply(f"{first}\n{_ONE_LINE_EXAMPLE}", (BTN_NEW_INVOICE,))


def bad_invoice_ref(verb: str) -> Reply:
    return Reply(
        f"Please add the invoice number, e.g. '{verb} 1042'.\nSend 'unpaid' to see open invoices."
    )


def invoice_not_found(invoice_id: str) -> Reply:
    return Reply(f"I can't find invoice #{invoice_id}. Send 'unpaid' to see open invoices.")


# One-line by name --------------------------------------------------------------------------

# Candidates are picked by replying one digit; more than that is a list nobody reads in a chat.
MAX_PICK_CANDIDATES = 9


def no_customer_match(query: str) -> Reply:
    return Reply(
        f"No saved customer matches '{_name(query)}'.\n"
        "Use their phone number instead, or tap New Invoice.",
        (BTN_NEW_INVOICE,),
    )


def too_many_matches(query: str) -> Reply:
    return Reply(
        f"Too many customers match '{_name(query)}'.\nUse a fuller name or their phone number."
    )


def pick_customer(query: str, amount_kes: int, candidates: Sequence[Customer]) -> Reply:
    lines = [
        f"{n}. {_name(c.name) or _NO_NAME} ({short_msisdn(c.msisdn)})"
        for n, c in enumerate(candidates[:MAX_PICK_CANDIDATES], start=1)
    ]
    head = f"Which {_name(query)} for {_kes(amount_kes)}? Reply with the number:"
    return Reply("\n".join([head, *lines]), footer=CANCEL_FOOTER)


def pick_customer_invalid(count: int) -> Reply:
    return Reply(f"Please reply with a number from 1 to {count}, or send 'cancel' to stop.")


# remind / cancel / status / unpaid results (the actor sends these) ---------------------------


def reminded(invoice: Invoice) -> Reply:
    return Reply(f"Reminder sent for {_subject(invoice)}.")


def remind_too_soon(invoice: Invoice, allowed_at_ms: int) -> Reply:
    return Reply(
        f"{_subject(invoice)} was reminded recently.\n"
        f"You can remind #{invoice.id} again after {format_time_eat(allowed_at_ms)}."
    )


def remind_paid(invoice: Invoice) -> Reply:
    return Reply(f"{_subject(invoice)} is already paid, so no reminder was sent.")


def remind_cancelled(invoice: Invoice) -> Reply:
    return Reply(f"{_subject(invoice)} was cancelled, so no reminder was sent.")


def invoice_cancelled(invoice: Invoice) -> Reply:
    return Reply(f"{_subject(invoice)} is cancelled. We'll let the customer know.")


def cancel_paid(invoice: Invoice) -> Reply:
    return Reply(f"{_subject(invoice)} is already paid and can't be cancelled.")


def cancel_already_cancelled(invoice: Invoice) -> Reply:
    return Reply(f"{_subject(invoice)} was already cancelled.")


_STATUS_WORDS = {
    InvoiceStatus.PENDING: "not sent yet",
    InvoiceStatus.SENT: "sent, unpaid",
    InvoiceStatus.PAID: "paid",
    InvoiceStatus.CANCELLED: "cancelled",
    InvoiceStatus.FAILED: "could not be delivered",
}
_CHANNEL_WORDS = {Channel.WHATSAPP: "WhatsApp", Channel.SMS: "SMS"}


def _who(invoice: Invoice) -> str:
    phone = short_msisdn(invoice.msisdn)
    name = _name(invoice.customer_name)
    return f"{name} ({phone})" if name else phone


def status_summary(invoice: Invoice, payment_attempts: int) -> Reply:
    """``status <id>``: state, channel and delivery state, number of STK attempts."""
    state = _STATUS_WORDS[invoice.status]
    if invoice.status is InvoiceStatus.PAID and invoice.mpesa_receipt:
        state += f", receipt {_clip(invoice.mpesa_receipt, RECEIPT_MAX)}"
    if invoice.channel is None:
        delivery = "Not delivered yet"
    else:
        delivery = f"Sent by {_CHANNEL_WORDS[invoice.channel]}"
        if invoice.delivery_state:
            delivery += f" ({_clip(invoice.delivery_state.lower(), 30)})"
    attempts = _plural(payment_attempts, "payment attempt", "payment attempts")
    if payment_attempts == 0:
        attempts = "no payment attempts"
    buttons = (_btn_remind(invoice.id), _btn_cancel_invoice(invoice.id)) if invoice.is_open else ()
    return Reply(
        f"{_subject(invoice)} for {_who(invoice)}: {state}.\n{delivery}, {attempts}.", buttons
    )


def unpaid_list(invoices: Sequence[Invoice], *, count: int | None = None,
                total_cents: int | None = None) -> Reply:
    """``unpaid``: every open invoice with the total; the tail is cut to fit one message.

    ``invoices`` may be only the first of them (the actor loads a page): ``count`` and
    ``total_cents`` are then the true figures for all of them, and the ones not listed are
    counted in the "…and N more." line."""
    count = len(invoices) if count is None else max(count, len(invoices))
    if not count:
        return Reply("No unpaid invoices. Send 'invoice' to create one.", (BTN_NEW_INVOICE,))
    total = sum(i.amount_kes for i in invoices) if total_cents is None else cents_to_kes(total_cents)
    head = f"{_plural(count, 'unpaid invoice', 'unpaid invoices')}, {_kes(total)} in total:"
    lines = [f"#{i.id} \u00b7 {_kes(i.amount_kes)} \u00b7 {_who(i)}" for i in invoices]
    return Reply(_fit_lines(head, lines, unlisted=count - len(invoices)))


# Merchant alerts -------------------------------------------------------------------------------

# Reasons for sent_by_sms, finishing the sentence "... went to 0712…678 by SMS because <reason>."
SMS_REASON_NOT_ON_WHATSAPP = "the number is not on WhatsApp"
SMS_REASON_WHATSAPP_FAILED = "WhatsApp could not deliver it"
SMS_REASON_NO_DELIVERY = "WhatsApp did not confirm delivery in time"


def sent_by_sms(invoice: Invoice, reason: str) -> Reply:
    """Told to the merchant once per invoice, when the delivery layer falls back to SMS."""
    return Reply(
        f"{_subject(invoice)} went to {short_msisdn(invoice.msisdn)} by SMS "
        f"because {_clip(reason, 120)}."
    )


def delivery_failed(invoice: Invoice) -> Reply:
    return Reply(
        f"{_subject(invoice)} could not be delivered to {short_msisdn(invoice.msisdn)} "
        "by WhatsApp or SMS.\nCheck the number, then send a new invoice.",
        (BTN_NEW_INVOICE,),
    )


def amount_mismatch(invoice: Invoice, paid_kes: int, mpesa_receipt: str) -> Reply:
    return Reply(
        f"Check Invoice #{invoice.id}: it is for {_kes(invoice.amount_kes)} but M-PESA paid "
        f"{_kes(paid_kes)} (receipt {_clip(mpesa_receipt, RECEIPT_MAX)}).\n"
        "Please settle the difference with the customer."
    )


def paid_after_cancel(invoice: Invoice, paid_kes: int, mpesa_receipt: str) -> Reply:
    return Reply(
        f"{_kes(paid_kes)} arrived for cancelled Invoice #{invoice.id} "
        f"(receipt {_clip(mpesa_receipt, RECEIPT_MAX)}).\n"
        "Please refund the customer or send a new invoice."
    )


def payer_mismatch(invoice: Invoice, paid_kes: int, mpesa_receipt: str, payer: str) -> Reply:
    """M-PESA reported a payment from a phone that was never prompted: not settled, a person checks."""
    return Reply(
        f"Check Invoice #{invoice.id}: M-PESA reported {_kes(paid_kes)} from {short_msisdn(payer)}, not from "
        f"the customer's phone (receipt {_clip(mpesa_receipt, RECEIPT_MAX)}).\nIt is not marked paid; "
        "please confirm it in your M-PESA statement."
    )


def double_payment(invoice: Invoice, paid_kes: int, mpesa_receipt: str) -> Reply:
    """A second payment for an invoice already paid (a late success of an earlier prompt)."""
    return Reply(
        f"{_kes(paid_kes)} arrived again for Invoice #{invoice.id}, which was already paid "
        f"(receipt {_clip(mpesa_receipt, RECEIPT_MAX)}).\nPlease refund the customer the extra payment."
    )


def amount_unreadable(invoice: Invoice, mpesa_receipt: str) -> Reply:
    """M-PESA reported a payment whose amount we could not read: a person must check it."""
    return Reply(
        f"Check Invoice #{invoice.id}: M-PESA reported a payment (receipt {_clip(mpesa_receipt, RECEIPT_MAX)}) "
        "but not a clear amount.\nPlease confirm it in your M-PESA statement before marking it paid."
    )


# ---------------------------------------------------------------------------------------------
# Customer messages


def customer_invoice(invoice: Invoice) -> Reply:
    """7.3.6, word for word; both button ids carry the invoice id."""
    text = (
        f"InvoiceIQ \u2014 Invoice #{invoice.id}\n"
        f"Amount: {_kes(invoice.amount_kes)}\n"
        f"For: {_name(invoice.customer_name) or 'Customer'}\n"
        f"Item: {_item(invoice.description)}"
    )
    return Reply(text, (_btn_pay(invoice.id), _btn_details(invoice.id)))


def customer_reminder(invoice: Invoice) -> Reply:
    return Reply(
        f"Reminder: {_subject(invoice)} is still unpaid.\nItem: {_item(invoice.description)}",
        (_btn_pay(invoice.id), _btn_details(invoice.id)),
    )


def receipt(invoice: Invoice, mpesa_receipt: str) -> Reply:
    """8.1, word for word; sent to the customer and the merchant alike."""
    return Reply(
        f"Paid \u2714 \u2014 Invoice #{invoice.id} ({_kes(invoice.amount_kes)})\n"
        f"Receipt: {_clip(mpesa_receipt, RECEIPT_MAX)}\n"
        "Thank you!"
    )


def customer_cancelled_notice(invoice: Invoice) -> Reply:
    return Reply(f"{_subject(invoice)} has been cancelled. You don't need to pay it.")


def invoice_details(invoice: Invoice) -> Reply:
    """The ``View details`` answer: everything on the invoice, and the Pay button while open."""
    if invoice.status is InvoiceStatus.PAID:
        status = "Paid \u2714"
        if invoice.mpesa_receipt:
            status += f" (receipt {_clip(invoice.mpesa_receipt, RECEIPT_MAX)})"
    elif invoice.status is InvoiceStatus.CANCELLED:
        status = "Cancelled"
    else:
        status = "Unpaid"
    text = (
        f"Invoice #{invoice.id} \u2014 {_kes(invoice.amount_kes)}\n"
        f"For: {_name(invoice.customer_name) or 'Customer'}\n"
        f"Item: {_item(invoice.description)}\n"
        f"Issued: {_format_date_eat(invoice.created_at_ms)}\n"
        f"Status: {status}"
    )
    return Reply(text, (_btn_pay(invoice.id),) if invoice.is_open else ())


# Room for the list of invoice numbers in the hint, leaving the rest of the body for the words.
_HINT_LIST_MAX = 800


def customer_hint(invoices: Sequence[Invoice]) -> Reply:
    """A customer typed something we do not act on: point at their open invoices."""
    if not invoices:
        return Reply("You have no open invoices right now. Thank you!")
    if len(invoices) == 1:
        (invoice,) = invoices
        return Reply(
            f"Your open invoice: {_subject(invoice)} for {_item(invoice.description)}.\n"
            "Tap Pay with M-PESA to pay it now.",
            (_btn_pay(invoice.id), _btn_details(invoice.id)),
        )
    listed = ""
    for n, i in enumerate(invoices):
        item = f"#{i.id} ({_kes(i.amount_kes)})"
        if len(listed) + len(item) > _HINT_LIST_MAX:
            listed += f" and {len(invoices) - n} more"
            break
        listed += (", " if listed else "") + item
    text = f"Your open invoices: {listed}.\nTap one to Pay with M-PESA, or reply 'pay {invoices[0].id}'."
    buttons = tuple(_btn_pay(i.id, f"Pay #{i.id}") for i in invoices[:MAX_BUTTONS])
    return Reply(text, buttons)


# Payment replies (customer) -------------------------------------------------------------------


def sms_customer_hint(invoices: Sequence[Invoice]) -> Reply:
    """The hint for a customer who wrote by SMS: no buttons there, so the words to reply."""
    if not invoices:
        return Reply("You have no open invoices right now. Thank you!")
    first = invoices[0]
    if len(invoices) == 1:
        return Reply(f"{_subject(first)} is unpaid. Reply PAY {first.id} to Pay with M-PESA.")
    listed = ", ".join(f"#{i.id} ({_kes(i.amount_kes)})" for i in invoices[:4])
    more = f" and {len(invoices) - 4} more" if len(invoices) > 4 else ""
    return Reply(f"Unpaid: {listed}{more}. Reply PAY {first.id} (or another number) to Pay with M-PESA.")


def already_paid(invoice: Invoice) -> Reply:
    paid = f"{_subject(invoice)} is already paid."
    if invoice.mpesa_receipt:
        paid += f" Receipt: {_clip(invoice.mpesa_receipt, RECEIPT_MAX)}."
    return Reply(f"{paid} Thank you!")


def pay_cancelled(invoice: Invoice) -> Reply:
    return Reply(f"{_subject(invoice)} was cancelled, so there is nothing to pay.")


def prompt_sent(invoice: Invoice, msisdn: str) -> Reply:
    return Reply(
        f"M-PESA prompt sent to {short_msisdn(msisdn)} for {_subject(invoice)}.\n"
        "Enter your M-PESA PIN on your phone to pay."
    )


def prompt_already_sent(invoice: Invoice, msisdn: str) -> Reply:
    """A second tap while an STK attempt is live: no new prompt (no duplicate STK)."""
    return Reply(
        f"The M-PESA prompt for {_subject(invoice)} was already sent to "
        f"{short_msisdn(msisdn)}, check your phone."
    )


def too_many_prompts(invoice: Invoice, msisdn: str) -> Reply:
    """The per-phone limit on STK prompts was reached."""
    return Reply(
        f"Too many M-PESA prompts have been sent to {short_msisdn(msisdn)} recently.\n"
        f"Please try again later to pay {_subject(invoice)}."
    )


def wait_before_prompt(invoice: Invoice) -> Reply:
    return Reply(
        f"Please wait a minute before asking for another M-PESA prompt for {_subject(invoice)}.",
        (_btn_pay(invoice.id),),
    )


# STK result codes (shared/providers/mpesa.md §4) in plain words; the second line offers a retry.
_STK_FAILURES: dict[str, tuple[str, str]] = {
    "1032": ("You cancelled the M-PESA prompt for {s}.", "Tap Pay with M-PESA to try again."),
    "1037": (
        "We couldn't reach your phone for {s}. Keep it on and unlocked.",
        "Tap Pay with M-PESA to try again.",
    ),
    "2001": ("The M-PESA PIN was wrong for {s}.", "Tap Pay with M-PESA to try again."),
    "1": (
        "Your M-PESA balance is not enough to pay {s}.",
        "Top up, then tap Pay with M-PESA to try again.",
    ),
    "17": (
        "M-PESA asks us to wait before another prompt for {s}.",
        "Please wait two minutes, then tap Pay with M-PESA.",
    ),
    "1001": (
        "Another M-PESA payment is in progress on your phone, so {s} could not start.",
        "Please wait a minute, then tap Pay with M-PESA.",
    ),
    "1019": ("The M-PESA prompt for {s} expired.", "Tap Pay with M-PESA to try again."),
}
_STK_OTHER = ("The M-PESA payment for {s} did not go through.", "Tap Pay with M-PESA to try again.")


def stk_failed(invoice: Invoice, result_code: int | str) -> Reply:
    """A failed STK attempt; ``result_code`` as in the callback (number) or query (string)."""
    first, second = _STK_FAILURES.get(str(result_code).strip(), _STK_OTHER)
    return Reply(f"{first.format(s=_subject(invoice))}\n{second}", (_btn_pay(invoice.id),))


# ---------------------------------------------------------------------------------------------
# SMS (fallback channel). GSM-7 only, so that 160 characters is one SMS: a single non-GSM
# character (an em dash, a curly quote, an emoji) switches the whole text to UCS-2 and 70 chars.

_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")  # two septets each (escape + char)
_GSM7_SUBSTITUTES = {
    "\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": '"', "\u201d": '"',
    "\u2013": "-", "\u2014": "-", "\u2026": "...", "\u2022": "-", "\u00a0": " ", "\t": " ",
    "\u2714": "",
}


def to_gsm7(text: str) -> str:
    """Best-effort GSM-7: common punctuation replaced, accents dropped, the rest becomes ``?``."""
    out = []
    for ch in text:
        if ch in _GSM7_BASIC or ch in _GSM7_EXTENDED:
            out.append(ch)
        elif ch in _GSM7_SUBSTITUTES:
            out.append(_GSM7_SUBSTITUTES[ch])
        else:
            base = "".join(
                c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)
            )
            out.append(base if base and all(c in _GSM7_BASIC for c in base) else "?")
    return "".join(out)


def gsm7_length(text: str) -> int | None:
    """Length in GSM-7 septets, or ``None`` if ``text`` needs UCS-2."""
    n = 0
    for ch in text:
        if ch in _GSM7_BASIC:
            n += 1
        elif ch in _GSM7_EXTENDED:
            n += 2
        else:
            return None
    return n


def _sms(head: str, tail: str, free: str = "") -> str:
    """``head + free + tail`` in GSM-7 within 160 septets, shortening the free text if needed.

    ``free`` (a description) is cut with "..." or dropped; head and tail carry the invoice number,
    the amount and the link, which are never cut (a long link may still make two SMS).
    """
    head, tail, free = to_gsm7(head), to_gsm7(tail), to_gsm7(free)
    room = SMS_MAX - (gsm7_length(head + tail) or 0)
    if (gsm7_length(free) or 0) > room:
        keep = free
        while keep and (gsm7_length(keep.rstrip() + "...") or 0) > room:
            keep = keep[:-1]
        # A few letters and "..." say nothing; then the SMS goes without the description.
        free = keep.rstrip() + "..." if len(keep.strip()) >= 8 else ""
        if free and tail.startswith("."):
            tail = tail[1:]  # "milestone... Pay", not "milestone.... Pay"
    return head + free + tail


def sms_invoice(invoice: Invoice, pay_url: str) -> str:
    return _sms(
        f"Invoice #{invoice.id}, {_kes(invoice.amount_kes)}",
        f". Pay with M-PESA: {pay_url}",
        f" for {invoice.description}",
    )


def sms_reminder(invoice: Invoice, pay_url: str) -> str:
    return _sms(
        f"Reminder: Invoice #{invoice.id}, {_kes(invoice.amount_kes)} is still unpaid. "
        f"Pay with M-PESA: {pay_url}",
        "",
    )


def sms_stk_failed(invoice: Invoice, result_code: int | str, pay_url: str) -> str:
    """A failed prompt told by SMS: no button there, so the words to reply and the link."""
    first, _ = _STK_FAILURES.get(str(result_code).strip(), _STK_OTHER)
    return _sms(first.format(s=f"Invoice #{invoice.id} ({_kes(invoice.amount_kes)})"),
                f" Reply PAY {invoice.id} or open {pay_url} to try again.")


def sms_receipt(invoice: Invoice, mpesa_receipt: str, pay_url: str) -> str:
    return _sms(
        f"Paid - Invoice #{invoice.id} ({_kes(invoice.amount_kes)}). "
        f"Receipt: {_clip(mpesa_receipt, RECEIPT_MAX)}. Thank you! Details: {pay_url}",
        "",
    )
