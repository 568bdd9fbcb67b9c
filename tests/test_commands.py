from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invoiceiq.core.commands import (
    BadInvoiceRef,
    BadOneLine,
    BareCancel,
    CancelInvoice,
    Command,
    Help,
    OneLine,
    Remind,
    StartGuided,
    Status,
    Unknown,
    Unpaid,
    parse_command,
)

MAX = 250_000


def parse(text: str) -> Command:
    return parse_command(text, MAX)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("invoice", StartGuided()),
        ("  Invoice ", StartGuided()),
        ("INVOICE", StartGuided()),
        ("new invoice", StartGuided()),
        ("New   Invoice", StartGuided()),
        ("help", Help()),
        (" HELP ", Help()),
        ("unpaid", Unpaid()),
        ("cancel", BareCancel()),
        ("Cancel", BareCancel()),
        ("remind 1042", Remind("1042")),
        ("Remind #INV-1042", Remind("1042")),
        ("cancel 1042", CancelInvoice("1042")),
        ("cancel inv1042", CancelInvoice("1042")),
        ("status #1042", Status("1042")),
        ("remind", BadInvoiceRef("remind")),
        ("remind abc", BadInvoiceRef("remind")),
        ("cancel it", BadInvoiceRef("cancel")),
        ("status", BadInvoiceRef("status")),
        ("status 1042 please", BadInvoiceRef("status")),
        ("hello", Unknown("hello")),
        ("", Unknown("")),
        ("new", Unknown("new")),
        ("invoices", Unknown("invoices")),
        ("help me", Unknown("help me")),
    ],
)
def test_commands(text: str, expected: Command) -> None:
    assert parse(text) == expected


def test_button_ids_parse_like_typed_words() -> None:
    # The ids copy.py puts on buttons: tapped and typed must be the same command.
    assert parse("new invoice") == StartGuided()
    assert parse("remind 1042") == Remind("1042")
    assert parse("cancel 1042") == CancelInvoice("1042")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("invoice 0712345678 2500 Cleaning", OneLine("254712345678", None, 2500, "Cleaning")),
        (
            "invoice +254 712 345 678 2500 Cleaning",
            OneLine("254712345678", None, 2500, "Cleaning"),
        ),
        (
            "invoice 254-712-345-678 KES 2,500 Cleaning service (Wed 3pm)",
            OneLine("254712345678", None, 2500, "Cleaning service (Wed 3pm)"),
        ),
        ("invoice (0712) 345678 Ksh 2,500 Wed job", OneLine("254712345678", None, 2500, "Wed job")),
        ("invoice 0112345678 KES2500 Logo", OneLine("254112345678", None, 2500, "Logo")),
        # The description is everything after the amount, numbers included.
        ("invoice 0712345678 2500 2 hours, 3 rooms", OneLine("254712345678", None, 2500, "2 hours, 3 rooms")),
        (
            "invoice Mary Wanjiku 2,500 Logo design",
            OneLine(None, "Mary Wanjiku", 2500, "Logo design"),
        ),
        ("INVOICE mary  ksh. 2500   Logo   design", OneLine(None, "mary", 2500, "Logo design")),
        ("invoice Mary KES 300 tea", OneLine(None, "Mary", 300, "tea")),
        ("new invoice 0712345678 2500 Cleaning", OneLine("254712345678", None, 2500, "Cleaning")),
        # Name mode ends the name at the first number: documented ambiguity.
        ("invoice Shop 24 2500 Cleaning", OneLine(None, "Shop", 24, "2500 Cleaning")),
    ],
)
def test_one_line(text: str, expected: OneLine) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("invoice 0712345678", BadOneLine("amount")),
        ("invoice 0712345678 2500", BadOneLine("description")),
        ("invoice 0712345678 2500 ab", BadOneLine("description")),
        ("invoice 0712345678 2500 " + "x" * 121, BadOneLine("description")),
        ("invoice 0712345678 Mary 2500 Cleaning", BadOneLine("amount")),
        ("invoice 0712345678 2500.50 Cleaning", BadOneLine("amount")),
        ("invoice 0712345678 0 Cleaning", BadOneLine("amount")),
        ("invoice 0712345678 -5 Cleaning", BadOneLine("amount")),
        ("invoice 0712345678 KES Cleaning", BadOneLine("amount")),
        ("invoice 0712345678 250001 Cleaning", BadOneLine("amount", over_max=True)),
        ("invoice 0712345678 " + "9" * 5000 + " Cleaning", BadOneLine("amount", over_max=True)),
        ("invoice 071234567 2500 Cleaning", BadOneLine("phone")),
        ("invoice 0202345678 2500 Cleaning", BadOneLine("phone")),
        ("invoice +255712345678 2500 Cleaning", BadOneLine("phone")),
        ("invoice 2500 0712345678 Cleaning", BadOneLine("phone")),
        ("invoice (0712 2500 Cleaning", BadOneLine("phone")),
        ("invoice M 2500 Cleaning", BadOneLine("name")),
        ("invoice KES 2500 Cleaning", BadOneLine("name")),
        ("invoice " + "x" * 61 + " 2500 Cleaning", BadOneLine("name")),
        ("invoice Mary", BadOneLine("amount")),
        ("invoice Mary Wanjiku for the logo", BadOneLine("amount")),
        ("invoice Mary 2500", BadOneLine("description")),
        # First failing field wins: the name is checked before the amount and the description.
        ("invoice M 0 x", BadOneLine("name")),
        ("invoice 0712 0 x", BadOneLine("phone")),
    ],
)
def test_one_line_bad_field(text: str, expected: BadOneLine) -> None:
    assert parse(text) == expected


# --- properties -------------------------------------------------------------------------------

nationals = st.from_regex(r"[17][0-9]{8}", fullmatch=True)


@st.composite
def phone_renderings(draw: st.DrawFn) -> tuple[str, str]:
    """(text as a merchant might type it, canonical msisdn)."""
    national = draw(nationals)
    form = draw(st.sampled_from(["0", "", "254", "+254", "(0", "+254 "]))
    sep = draw(st.sampled_from(["", " ", "-", "."]))
    groups = [national[:3], national[3:6], national[6:]]
    if form == "(0":
        text = f"(0{groups[0]}) {groups[1]}{sep}{groups[2]}"
    else:
        text = form + sep.join(groups)
    return text, "254" + national


@st.composite
def amount_renderings(draw: st.DrawFn) -> tuple[str, int]:
    amount = draw(st.integers(min_value=1, max_value=MAX))
    number = f"{amount:,}" if draw(st.booleans()) else str(amount)
    prefix = draw(st.sampled_from(["", "KES ", "KES", "Ksh ", "ksh. ", "Kshs ", "sh "]))
    return prefix + number, amount


words = st.text(
    alphabet=st.characters(categories=["L", "N", "P", "S"], exclude_characters="\x85"),
    min_size=1,
    max_size=12,
)
descriptions = st.lists(words, min_size=1, max_size=12).map(" ".join).filter(
    lambda d: 3 <= len(d) <= 120
)
spaces = st.sampled_from([" ", "  ", "\t", " \u00a0"])


@given(phone_renderings(), amount_renderings(), descriptions, spaces)
def test_property_phone_one_line(
    phone: tuple[str, str], amount: tuple[str, int], description: str, sp: str
) -> None:
    text = sp.join(["invoice", phone[0], amount[0], description])
    assert parse(text) == OneLine(phone[1], None, amount[1], description)


name_words = st.from_regex(r"[A-Za-z][a-z'\-]{0,11}", fullmatch=True).filter(
    lambda w: w.casefold().rstrip(".") not in {"kes", "ksh", "kshs", "sh", "shs"}
)
names = st.lists(name_words, min_size=1, max_size=4).map(" ".join).filter(
    lambda n: 2 <= len(n) <= 60
)


@given(names, amount_renderings(), descriptions)
def test_property_name_one_line(name: str, amount: tuple[str, int], description: str) -> None:
    text = f"invoice {name} {amount[0]} {description}"
    assert parse(text) == OneLine(None, name, amount[1], description)


@given(st.text(max_size=200))
def test_property_garbage_never_raises(text: str) -> None:
    assert isinstance(
        parse(text),
        (StartGuided, OneLine, BadOneLine, Remind, CancelInvoice, Status, BadInvoiceRef, Unpaid,
         Help, BareCancel, Unknown),
    )


@given(st.lists(st.sampled_from(["0712", "345", "678", "+254", "(", ")", "KES", "2,500", "x", "-"]),
                max_size=30))
def test_property_phone_like_garbage_never_raises(tokens: list[str]) -> None:
    result = parse("invoice " + " ".join(tokens))
    if isinstance(result, OneLine):
        assert result.msisdn is None or len(result.msisdn) == 12
        assert 1 <= result.amount_kes <= MAX
        assert 3 <= len(result.description) <= 120


def test_phone_scan_stops_once_no_number_can_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Past 12 digits no run of tokens can be a phone number; a long message must not be scanned
    # token by token to the end (quadratic in its length).
    import invoiceiq.core.commands as commands

    calls: list[str] = []

    def counting(text: str) -> str | None:
        calls.append(text)
        return None

    monkeypatch.setattr(commands, "normalize_msisdn", counting)
    assert parse("invoice " + " ".join(["1"] * 10_000)) == BadOneLine("phone")
    assert len(calls) <= 12
