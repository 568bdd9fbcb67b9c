"""Delivery rules, without I/O: which message a queued send becomes, and what a failure means.

* The invoice to a customer is the interactive message of the brief (7.3.6) inside the
  24 hours after that customer last wrote to us, and the approved template otherwise: the
  window is judged when the message leaves, not when it was queued.
* A failure is transient (retry with backoff and jitter, honouring Retry-After), permanent
  (fall back to SMS, or fail with the reason) or an authentication problem (pause the channel
  without spending the message's attempts).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from . import copy
from .model import Button, Channel, Invoice, format_kes

WINDOW_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True, slots=True)
class Template:
    """An approved WhatsApp template: positional body parameters and quick-reply payloads."""

    name: str
    language: str
    params: tuple[str, ...]
    payloads: tuple[str, ...]


def window_start_ms(timestamp_s: int | None, now_ms: int) -> int:
    """A message opens the WhatsApp 24-hour window at its own time (never in the future)."""
    return min(now_ms, timestamp_s * 1000) if timestamp_s else now_ms


def in_window(last_inbound_ms: int | None, now_ms: int) -> bool:
    return last_inbound_ms is not None and now_ms - last_inbound_ms < WINDOW_MS


def invoice_message(
    invoice: Invoice,
    purpose: str,
    *,
    last_inbound_ms: int | None,
    now_ms: int,
    template: str,
    language: str,
    pay_url: str,
) -> copy.Reply | Template:
    """The WhatsApp form of an invoice (or reminder) for this customer at this moment."""
    if in_window(last_inbound_ms, now_ms):
        return copy.customer_reminder(invoice) if purpose == "reminder" else copy.customer_invoice(invoice)
    # Body parameters in the order the approved template numbers them: name, amount, id, link.
    return Template(
        name=template,
        language=language,
        params=(invoice.customer_name or "Customer", format_kes(invoice.amount_kes), invoice.id, pay_url),
        payloads=(f"pay_now:{invoice.id}",),
    )


def invoice_sms(invoice: Invoice, purpose: str, pay_url: str) -> str:
    return copy.sms_reminder(invoice, pay_url) if purpose == "reminder" else copy.sms_invoice(invoice, pay_url)


def reply_from_content(content: dict[str, Any]) -> copy.Reply:
    """The stored form of a queued text or button message, back to a Reply."""
    buttons = tuple(Button(str(b[0]), str(b[1])) for b in content.get("buttons") or ())
    return copy.Reply(str(content.get("body", "")), buttons, content.get("footer"))


def reply_content(reply: copy.Reply, sms: str | None = None) -> dict[str, Any]:
    """What the outbox stores for a text or button message (``sms``: its SMS fallback text)."""
    content: dict[str, Any]
    if reply.buttons:
        content = {"type": "buttons", "body": reply.text,
                   "buttons": [[b.id, b.title] for b in reply.buttons], "footer": reply.footer}
    else:
        content = {"type": "text", "body": reply.text}
        if reply.footer:
            content["footer"] = reply.footer
    if sms is not None:
        content["sms"] = sms
    return content


def plain_text(reply: copy.Reply) -> str:
    """A message without buttons goes as plain text, which has no footer: append it."""
    return f"{reply.text}\n\n{reply.footer}" if reply.footer else reply.text


def sms_from_content(content: dict[str, Any]) -> str:
    """The SMS text of a queued text or button message: its own SMS form, else its body."""
    text = content.get("sms") or content.get("body") or ""
    return copy.to_gsm7(str(text))


class ErrorKind(StrEnum):
    TRANSIENT = "transient"   # network, timeouts, 5xx, one recipient too fast: try again later
    PERMANENT = "permanent"   # this message cannot go this way: fall back or fail
    AUTH = "auth"             # our credentials are broken: pause the channel, not the message
    THROTTLED = "throttled"   # the account's throughput limit: the channel slows down


class Outcome(StrEnum):
    RETRY = "retry"
    FALLBACK = "fallback"
    FAIL = "fail"
    PAUSE = "pause"  # the channel stops until its credentials work again (an alert)
    HOLD = "hold"    # the channel waits ``delay_ms``; the message keeps its attempt


# A throttled channel waits 1 s, then 2, 4... up to a minute while the provider keeps refusing.
HOLD_FIRST_MS = 1_000
HOLD_MAX_MS = 60_000


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    delay_ms: int = 0


def retry_delay_ms(attempts: int, *, base_s: int, max_s: int, retry_after_s: int | None, jitter: float) -> int:
    """Exponential backoff with +/-25% jitter (``jitter`` in [0, 1) from the caller), never
    sooner than the provider's Retry-After."""
    backoff_ms = min(max_s * 1000, base_s * 1000 * 2 ** max(0, attempts - 1))
    # The cap holds after the jitter too: backoff_max_s is the longest wait, as documented.
    spread = min(max_s * 1000, int(backoff_ms * (0.75 + 0.5 * jitter)))
    if retry_after_s is not None:
        spread = max(spread, retry_after_s * 1000)
    return spread


def hold_delay_ms(holds_in_a_row: int, retry_after_s: int | None) -> int:
    """How long a throttled channel waits: doubling with each hold the provider answered
    with another refusal (``holds_in_a_row``, 1 for the first), never less than its Retry-After."""
    delay = min(HOLD_MAX_MS, HOLD_FIRST_MS * 2 ** min(16, max(0, holds_in_a_row - 1)))
    if retry_after_s is not None:
        delay = max(delay, retry_after_s * 1000)
    return delay


def after_failure(
    kind: ErrorKind,
    *,
    channel: Channel,
    attempts: int,
    max_attempts: int,
    can_fallback: bool,
    retry_after_s: int | None,
    base_s: int,
    max_s: int,
    jitter: float,
    pause_ms: int = 60_000,
    holds_in_a_row: int = 1,
) -> Decision:
    if kind is ErrorKind.AUTH:
        return Decision(Outcome.PAUSE, pause_ms)
    if kind is ErrorKind.THROTTLED:
        # Not the message's fault, nor a sign that the channel cannot reach the person: no
        # attempt spent, no fallback, however long the provider keeps the account throttled.
        return Decision(Outcome.HOLD, hold_delay_ms(holds_in_a_row, retry_after_s))
    if kind is ErrorKind.TRANSIENT and attempts < max_attempts:
        return Decision(Outcome.RETRY, retry_delay_ms(
            attempts, base_s=base_s, max_s=max_s, retry_after_s=retry_after_s, jitter=jitter))
    # Permanent, or transient for too long: another channel may still reach the person.
    if channel is Channel.WHATSAPP and can_fallback:
        return Decision(Outcome.FALLBACK)
    return Decision(Outcome.FAIL)


# Statuses from the providers, as outbox states (which only ever move forward).
WHATSAPP_STATUS = {"sent": "SENT", "delivered": "DELIVERED", "read": "READ", "failed": "FAILED"}
SMS_STATUS = {"Sent": "SENT", "Submitted": "SENT", "Buffered": "SENT", "Success": "DELIVERED",
              "Failed": "FAILED", "Rejected": "FAILED"}


def fallback_reason(error_code: int | str | None) -> str:
    """Why the customer got an SMS instead, in words the merchant understands."""
    if str(error_code) == "131026":
        return copy.SMS_REASON_NOT_ON_WHATSAPP
    return copy.SMS_REASON_WHATSAPP_FAILED
