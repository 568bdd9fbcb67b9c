"""Validators for what a merchant types: phone numbers, amounts, names, descriptions, invoice refs.

Pure functions, no I/O. Each either returns the canonical value or says why not: the ``normalize_*``
functions return ``None`` (the caller only needs yes/no), the ``parse_*``/``validate_*`` functions
raise :class:`ValidationError` (the caller may want the reason for a log line).

Canonical forms:

* a phone number (``msisdn``) is 12 ASCII digits, ``2547XXXXXXXX`` or ``2541XXXXXXXX``: the brief
  says ``^2547\\d{8}$`` but Safaricom's 011x numbers pay with M-PESA too, and rejecting them is a
  known bug in other integrations (SmoDav/mpesa#49);
* an amount is an ``int`` of whole shillings, never a float;
* an invoice id is the decimal string of a counter that starts at 1001.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "DESCRIPTION_MAX",
    "DESCRIPTION_MIN",
    "NAME_MAX",
    "NAME_MIN",
    "AmountTooLarge",
    "Field",
    "ValidationError",
    "clean_input",
    "is_currency_word",
    "local_msisdn",
    "looks_like_amount",
    "mask_msisdn",
    "normalize_invoice_ref",
    "normalize_msisdn",
    "parse_amount_kes",
    "short_msisdn",
    "validate_description",
    "validate_name",
]

Field = Literal["phone", "name", "amount", "description", "invoice"]

NAME_MIN, NAME_MAX = 2, 60
DESCRIPTION_MIN, DESCRIPTION_MAX = 3, 120

_ASCII_DIGITS = frozenset("0123456789")


class ValidationError(Exception):
    """Input rejected: ``field`` says which one, ``reason`` says why in a few English words."""

    def __init__(self, field: Field, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field: Field = field
        self.reason = reason


class AmountTooLarge(ValidationError):
    """A well-formed amount above the configured ceiling; the chat names the ceiling."""

    def __init__(self, max_kes: int) -> None:
        super().__init__("amount", f"the maximum is KES {max_kes:,}")
        self.max_kes = max_kes


# Invisible characters that copy-paste drags along: WhatsApp on Android wraps a shared number in
# LTR embedding marks (U+202A ... U+202C), and phones use no-break spaces as digit-group separators.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                               "\u2066\u2067\u2068\u2069\ufeff"))
_SPACES = dict.fromkeys(map(ord, "\u00a0\u2007\u202f"), " ")


def clean_input(text: str) -> str:
    """Drop invisible formatting marks and turn no-break spaces into spaces (nothing else)."""
    return text.translate(_INVISIBLE).translate(_SPACES)


# ---------------------------------------------------------------------------------------------
# Phone numbers

_PHONE_SEPARATORS = frozenset(" -.()")


def normalize_msisdn(text: str) -> str | None:
    """Any Kenyan mobile number form -> ``2547XXXXXXXX`` / ``2541XXXXXXXX``, else ``None``.

    Accepted: ``0712345678``, ``712345678``, ``254712345678``, ``+254712345678`` (and the same with
    7 -> 1), with spaces, dashes, dots or one pair of parentheses between digits. Not accepted:
    landlines (``2542...``), other country codes, a ``+`` before anything but ``254``, letters.
    """
    s = clean_input(text).strip()
    plus = s.startswith("+")
    if plus:
        s = s[1:]
    if not s or not all(c in _ASCII_DIGITS or c in _PHONE_SEPARATORS for c in s):
        return None
    # One optional pair of parentheses, opened before it is closed: "(0712) 345678".
    opened, closed = s.count("("), s.count(")")
    if opened != closed or opened > 1 or (opened and s.index("(") > s.index(")")):
        return None
    digits = "".join(c for c in s if c in _ASCII_DIGITS)
    national: str | None = None
    if len(digits) == 12 and digits.startswith("254"):
        national = digits[3:]
    elif plus:
        national = None  # "+0712..." or "+712...": a plus promises a country code
    elif len(digits) == 10 and digits[0] == "0":
        national = digits[1:]
    elif len(digits) == 9:
        national = digits
    # Kenyan mobile ranges are 7xx and 1xx; 2xx-6xx are landlines, 8xx/9xx toll-free/premium.
    if national is None or national[0] not in "17":
        return None
    return "254" + national


def mask_msisdn(msisdn: str) -> str:
    """For logs: ``254712345678`` -> ``*********678``. Short inputs are masked entirely."""
    if len(msisdn) <= 3:
        return "*" * len(msisdn)
    return "*" * (len(msisdn) - 3) + msisdn[-3:]


def local_msisdn(msisdn: str) -> str:
    """``254712345678`` -> ``0712345678``, the form Kenyans read; anything else is returned as is."""
    if len(msisdn) == 12 and msisdn.startswith("254"):
        return "0" + msisdn[3:]
    return msisdn


def short_msisdn(msisdn: str) -> str:
    """For chat copy: ``254712345678`` -> ``0712…678`` (recognisable, middle hidden)."""
    local = local_msisdn(msisdn)
    if len(local) != 10:
        return mask_msisdn(msisdn)
    return f"{local[:4]}\u2026{local[-3:]}"


# ---------------------------------------------------------------------------------------------
# Amounts

# A currency word in front ("KES 2500", "Ksh. 2,500", "sh2500"): Kenyans write all of these.
# "/-" or "/=" after the number is the Kenyan way of writing "and no cents" ("2,500/-").
_CURRENCY_PREFIX = re.compile(r"(?:kes|kshs?|shs?)\.?\s*", re.ASCII)
_CURRENCY_WORD = re.compile(r"(?:kes|kshs?|shs?)\.?", re.ASCII)
_WHOLE = re.compile(r"[1-9][0-9]{0,2}(?:,[0-9]{3})+|[1-9][0-9]*", re.ASCII)
_DECIMAL = re.compile(r"[0-9,]*\.[0-9]*", re.ASCII)


def is_currency_word(token: str) -> bool:
    """``KES``, ``Ksh.``, ``shs``: a token that announces the amount that follows it."""
    return _CURRENCY_WORD.fullmatch(token.casefold()) is not None


def parse_amount_kes(text: str, max_kes: int) -> int:
    """Whole shillings, ``1 <= amount <= max_kes``.

    Accepts ``2500``, ``2,500`` (thousands groups of three), a currency prefix ``KES``/``Ksh``/
    ``Kshs``/``Sh``/``Shs`` in any case with an optional dot and space, and a trailing ``/-``.
    Rejects cents (even ``.00``: M-PESA takes whole shillings and ``2500.00`` hints at a typo),
    leading zeros, spaces inside the number, signs and words.
    """
    s = clean_input(text).strip().casefold()
    prefix = _CURRENCY_PREFIX.match(s)
    if prefix is not None:
        s = s[prefix.end():]
    if s.endswith(("/-", "/=")):
        s = s[:-2]
    if not s:
        raise ValidationError("amount", "empty")
    if _WHOLE.fullmatch(s) is None:
        if s.startswith("-") or ("0" in s and s.strip("0,") == ""):
            raise ValidationError("amount", "must be at least KES 1")
        if _DECIMAL.fullmatch(s):
            raise ValidationError("amount", "whole shillings only, no cents")
        raise ValidationError("amount", "not a whole number")
    digits = s.replace(",", "")
    # Compare lengths first: int() of a 5,000-digit string is refused by Python >= 3.11 anyway.
    if len(digits) > len(str(max_kes)) or int(digits) > max_kes:
        raise AmountTooLarge(max_kes)
    return int(digits)


def looks_like_amount(token: str) -> bool:
    """Does ``token`` start an amount (valid or not)? Used to find where a name ends."""
    s = token.casefold()
    prefix = _CURRENCY_PREFIX.match(s)
    if prefix is not None:
        s = s[prefix.end():]
    s = s.removeprefix("-")
    return bool(s) and s[0] in _ASCII_DIGITS


# ---------------------------------------------------------------------------------------------
# Free text


def _collapse(text: str) -> str:
    return " ".join(clean_input(text).split())


def validate_name(text: str) -> str:
    """Trimmed, inner whitespace collapsed, ``NAME_MIN``–``NAME_MAX`` characters."""
    name = _collapse(text)
    if len(name) < NAME_MIN:
        raise ValidationError("name", "too short")
    if len(name) > NAME_MAX:
        raise ValidationError("name", "too long")
    return name


def validate_description(text: str) -> str:
    """Trimmed, ``DESCRIPTION_MIN``–``DESCRIPTION_MAX`` characters.

    Inner whitespace (newlines included) is collapsed too: the description is one ``Item:`` line
    in the invoice message and part of a 160-character SMS, where a line break would break both.
    """
    description = _collapse(text)
    if len(description) < DESCRIPTION_MIN:
        raise ValidationError("description", "too short")
    if len(description) > DESCRIPTION_MAX:
        raise ValidationError("description", "too long")
    return description


# ---------------------------------------------------------------------------------------------
# Invoice references

# "1042", "#1042", "INV1042", "inv-1042", "#INV-1042". Ids come from a counter starting at 1001,
# so a leading zero is never part of a real id ("01042" is refused rather than guessed at).
_INVOICE_REF = re.compile(r"#?(?:inv-?)?(?P<id>[1-9][0-9]{0,9})", re.ASCII)


def normalize_invoice_ref(text: str) -> str | None:
    """The way a merchant writes an invoice number -> its id (``"1042"``), else ``None``."""
    m = _INVOICE_REF.fullmatch(clean_input(text).strip().casefold())
    return m.group("id") if m else None
