"""Merchant command parsing: one line of chat text -> one small immutable :data:`Command`.

Pure and total: :func:`parse_command` never raises, whatever it is given; text that is not a
command comes back as :class:`Unknown`. A tapped button arrives as its id, and every button id the
bot uses is the text a merchant could type for the same thing (``new invoice``, ``remind 1042``),
so a tap and the typed words parse to the same command.

Grammar (words are case-insensitive, runs of whitespace count as one space)::

    invoice | new invoice                          -> StartGuided
    invoice <phone_or_name> <amount> <desc...>     -> OneLine | BadOneLine
    remind <ref> | cancel <ref> | status <ref>     -> Remind | CancelInvoice | Status | BadInvoiceRef
    cancel                                         -> BareCancel
    unpaid                                         -> Unpaid
    help                                           -> Help
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from invoiceiq.core.validate import (
    AmountTooLarge,
    ValidationError,
    clean_input,
    is_currency_word,
    looks_like_amount,
    normalize_invoice_ref,
    normalize_msisdn,
    parse_amount_kes,
    validate_description,
    validate_name,
)

__all__ = [
    "BadInvoiceRef",
    "BadOneLine",
    "BareCancel",
    "CancelInvoice",
    "Command",
    "Help",
    "OneLine",
    "OneLineField",
    "Remind",
    "StartGuided",
    "Status",
    "Unknown",
    "Unpaid",
    "parse_command",
]

OneLineField = Literal["phone", "name", "amount", "description"]
InvoiceVerb = Literal["remind", "cancel", "status"]


@dataclass(frozen=True, slots=True)
class StartGuided:
    """Start the step-by-step flow (brief 7.3 entry points)."""


@dataclass(frozen=True, slots=True)
class OneLine:
    """A complete one-line invoice. Exactly one of ``msisdn`` / ``name_query`` is set."""

    msisdn: str | None
    name_query: str | None
    amount_kes: int
    description: str


@dataclass(frozen=True, slots=True)
class BadOneLine:
    """A one-line invoice with a field that does not validate (the first one, in grammar order).

    ``over_max`` is set when the amount is well-formed but above the configured maximum, so the
    reply can name the maximum instead of asking for "a whole number".
    """

    field: OneLineField
    over_max: bool = False


@dataclass(frozen=True, slots=True)
class Remind:
    invoice_id: str


@dataclass(frozen=True, slots=True)
class CancelInvoice:
    invoice_id: str


@dataclass(frozen=True, slots=True)
class Status:
    invoice_id: str


@dataclass(frozen=True, slots=True)
class BadInvoiceRef:
    """``remind``/``cancel``/``status`` without a usable invoice number."""

    verb: InvoiceVerb


@dataclass(frozen=True, slots=True)
class Unpaid:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class BareCancel:
    """Just ``cancel``: stops a guided flow; outside one there is nothing to stop."""


@dataclass(frozen=True, slots=True)
class Unknown:
    text: str


Command = (
    StartGuided | OneLine | BadOneLine | Remind | CancelInvoice | Status | BadInvoiceRef
    | Unpaid | Help | BareCancel | Unknown
)

# Whole messages that are a command on their own (after casefold and whitespace collapse).
_EXACT: dict[str, Command] = {
    "invoice": StartGuided(),
    "new invoice": StartGuided(),
    "help": Help(),
    "unpaid": Unpaid(),
    "cancel": BareCancel(),
}

_INVOICE_VERBS: dict[str, type[Remind] | type[CancelInvoice] | type[Status]] = {
    "remind": Remind,
    "cancel": CancelInvoice,
    "status": Status,
}

# The longest phone rendering we accept has 12 digits; past that no run of tokens can be a phone.
_MAX_PHONE_DIGITS = 12


def parse_command(text: str, max_kes: int) -> Command:
    """Parse one merchant message. Never raises."""
    tokens = clean_input(text).split()
    words = [t.casefold() for t in tokens]
    key = " ".join(words)
    if key in _EXACT:
        return _EXACT[key]
    if not words:
        return Unknown(text)
    verb = words[0]
    if verb in _INVOICE_VERBS:
        invoice_id = normalize_invoice_ref(" ".join(tokens[1:]))
        if invoice_id is None:
            return BadInvoiceRef(cast(InvoiceVerb, verb))
        return _INVOICE_VERBS[verb](invoice_id)
    if verb == "invoice":
        return _parse_one_line(tokens[1:], max_kes)
    # "new invoice 0712345678 2500 Cleaning" reads the same as "invoice ..." to a merchant.
    if words[:2] == ["new", "invoice"]:
        return _parse_one_line(tokens[2:], max_kes)
    return Unknown(text)


def _parse_one_line(args: list[str], max_kes: int) -> OneLine | BadOneLine:
    """``<phone_or_name> <amount> <desc...>``; ``args`` is non-empty (bare ``invoice`` is exact)."""
    msisdn: str | None = None
    name: str | None = None
    rest: list[str] = []
    if args[0][0] in "+(" or args[0][0].isdigit():
        # Phone mode. The shortest run of tokens that makes a number wins, so a spaced-out
        # "+254 712 345 678" is read whole while "0712345678 2500" stops before the amount.
        # No valid rendering has a valid proper prefix (9 digits never start with 0 or 2, 10
        # never with 2), so "shortest" cannot cut a real number short.
        digits = 0
        for end in range(1, len(args) + 1):
            digits += sum(c.isdigit() for c in args[end - 1])
            if digits > _MAX_PHONE_DIGITS:
                break
            msisdn = normalize_msisdn(" ".join(args[:end]))
            if msisdn is not None:
                rest = args[end:]
                break
        if msisdn is None:
            return BadOneLine("phone")
    else:
        # Name mode: the name runs up to the first token that starts an amount. A name that
        # ends in a number ("Shop 24") is read as name + amount; the phone form avoids that.
        start = next((i for i, t in enumerate(args) if _starts_amount(args, i)), len(args))
        try:
            name = validate_name(" ".join(args[:start]))
        except ValidationError:
            return BadOneLine("name")
        rest = args[start:]

    if not rest or not _starts_amount(rest, 0):
        return BadOneLine("amount")
    width = 2 if is_currency_word(rest[0]) else 1
    try:
        amount = parse_amount_kes(" ".join(rest[:width]), max_kes)
    except AmountTooLarge:
        return BadOneLine("amount", over_max=True)
    except ValidationError:
        return BadOneLine("amount")
    try:
        description = validate_description(" ".join(rest[width:]))
    except ValidationError:
        return BadOneLine("description")
    return OneLine(msisdn=msisdn, name_query=name, amount_kes=amount, description=description)


def _starts_amount(tokens: list[str], i: int) -> bool:
    """``tokens[i]`` is an amount (``2500``, ``KES2500``) or a currency word before one."""
    if looks_like_amount(tokens[i]):
        return True
    return is_currency_word(tokens[i]) and i + 1 < len(tokens) and looks_like_amount(tokens[i + 1])
