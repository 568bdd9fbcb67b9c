from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoiceiq.core.validate import (
    AmountTooLarge,
    ValidationError,
    local_msisdn,
    mask_msisdn,
    normalize_invoice_ref,
    normalize_msisdn,
    parse_amount_kes,
    short_msisdn,
    validate_description,
    validate_name,
)

MAX = 250_000


# --- phones -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "0712345678",
        "712345678",
        "254712345678",
        "+254712345678",
        "+254 712 345 678",
        "254-712-345-678",
        "0712 345 678",
        "(0712) 345678",
        "0712.345.678",
        " 0712345678 ",
        "\u202a+254 712 345678\u202c",  # as copied from a WhatsApp contact on Android
        "0712\u00a0345\u00a0678",  # no-break spaces
    ],
)
def test_msisdn_accepts_every_kenyan_mobile_form(text: str) -> None:
    assert normalize_msisdn(text) == "254712345678"


@pytest.mark.parametrize(
    "text", ["0112345678", "112345678", "254112345678", "+254 112 345 678", "(0112) 345-678"]
)
def test_msisdn_accepts_safaricom_011x(text: str) -> None:
    assert normalize_msisdn(text) == "254112345678"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "+",
        "071234567",  # 9 digits starting with 0
        "07123456789",  # 11 digits
        "2547123456789",  # 13 digits
        "25471234567",  # 11 digits
        "254212345678",  # Nairobi landline
        "0202345678",  # landline, local form
        "202345678",
        "0812345678",
        "+255712345678",  # Tanzania
        "+0712345678",  # a plus promises a country code
        "+712345678",
        "++254712345678",
        "254+712345678",
        "0712-345-67a",
        "O712345678",  # letter O
        "0712/345/678",
        "0712_345_678",
        "((0712) 345678",
        ")0712( 345678",
        "(07)(12) 345678",
        "٠٧١٢٣٤٥٦٧٨",  # Arabic-Indic digits are digits to str.isdigit, not to M-PESA
        "0712345678 ext 2",
    ],
)
def test_msisdn_rejects(text: str) -> None:
    assert normalize_msisdn(text) is None


@given(
    national=st.from_regex(r"[17][0-9]{8}", fullmatch=True),
    sep=st.sampled_from(["", " ", "-", ".", "  "]),
    form=st.sampled_from(["0{}", "{}", "254{}", "+254{}"]),
)
def test_msisdn_property_any_rendering(national: str, sep: str, form: str) -> None:
    groups = [national[:3], national[3:6], national[6:]]
    text = form.format(sep.join(groups))
    assert normalize_msisdn(text) == "254" + national


@given(st.text(max_size=40))
def test_msisdn_never_raises_and_output_is_canonical(text: str) -> None:
    out = normalize_msisdn(text)
    assert out is None or (len(out) == 12 and out[:4] in ("2547", "2541") and out.isdigit())


# Rejections, each in every form the accepting property above renders: the validator made any
# more permissive (a prefix, a country code, a length, a plus) fails one of these.

MOBILE = st.from_regex(r"[17][0-9]{8}", fullmatch=True)  # a Kenyan mobile's 9 national digits
FORMS = st.sampled_from(["0{}", "{}", "254{}", "+254{}"])
SEPARATORS = st.sampled_from(["", " ", "-", "."])


def render(digits: str, sep: str) -> str:
    """``digits`` in groups of three joined by ``sep``, as people space phone numbers."""
    return sep.join(digits[i:i + 3] for i in range(0, len(digits), 3))


@given(rest=st.text(alphabet=string.digits, min_size=8, max_size=8), form=FORMS, sep=SEPARATORS)
def test_msisdn_property_rejects_non_mobile_prefixes(rest: str, form: str, sep: str) -> None:
    # Only 7xx and 1xx are mobiles: 2xx-6xx are landlines (020 Nairobi), 8xx/9xx premium/toll-free.
    for first in "02345689":  # every one, each time: widening the rule by one prefix fails at once
        assert normalize_msisdn(form.format(render(first + rest, sep))) is None, first + rest


@given(country=st.from_regex(r"[1-9][0-9]{0,2}", fullmatch=True).filter(lambda cc: cc != "254"),
       national=MOBILE, plus=st.sampled_from(["+", "", "00"]), sep=SEPARATORS)
def test_msisdn_property_rejects_other_country_codes(country: str, national: str, plus: str, sep: str) -> None:
    # A Kenyan-looking mobile behind any other code (+255 Tanzania, +256 Uganda, +1, +44...).
    assert normalize_msisdn(plus + render(country + national, sep)) is None


@settings(max_examples=300)  # cheap, and a permissive length rule may fit one form only
@given(length=st.sampled_from([8, 11, 13]), form=st.sampled_from(["0{}", "{}", "254{}"]),
       national=MOBILE, filler=st.text(alphabet=string.digits, min_size=6, max_size=6),
       plus=st.booleans(), sep=SEPARATORS)
def test_msisdn_property_rejects_wrong_lengths(length: int, form: str, national: str, filler: str, plus: bool,
                                               sep: str) -> None:
    # A real number one digit short or long (8/11/13 digits): accepted forms have 9, 10 or 12.
    digits = (form.format(national) + filler)[:length]
    assert normalize_msisdn(("+" if plus else "") + render(digits, sep)) is None


@given(national=MOBILE, zero=st.sampled_from(["0", ""]), sep=SEPARATORS)
def test_msisdn_property_rejects_a_plus_without_254(national: str, zero: str, sep: str) -> None:
    # "+0712..." and "+712...": a plus promises a country code, and these have none.
    assert normalize_msisdn("+" + render(zero + national, sep)) is None


def test_mask_short_local() -> None:
    assert mask_msisdn("254712345678") == "*********678"
    assert mask_msisdn("12") == "**"
    assert short_msisdn("254712345678") == "0712\u2026678"
    assert short_msisdn("254112345999") == "0112\u2026999"
    assert local_msisdn("254712345678") == "0712345678"
    assert local_msisdn("0712") == "0712"
    # Not a canonical number: never shown whole.
    assert short_msisdn("12345") == "**345"


# --- amounts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2500",
        "2,500",
        " 2500 ",
        "KES 2500",
        "KES2500",
        "Ksh 2,500",
        "ksh. 2500",
        "kes 2,500",
        "Kshs 2500",
        "sh 2500",
        "Shs. 2,500",
        "2,500/-",
        "KES 2,500/=",
    ],
)
def test_amount_accepts(text: str) -> None:
    assert parse_amount_kes(text, MAX) == 2500


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("2500.50", "whole shillings only, no cents"),
        ("2500.00", "whole shillings only, no cents"),
        ("2,500.00", "whole shillings only, no cents"),
        ("0", "must be at least KES 1"),
        ("000", "must be at least KES 1"),
        ("-2500", "must be at least KES 1"),
        ("KES -5", "must be at least KES 1"),
        ("two thousand", "not a whole number"),
        ("2,50", "not a whole number"),
        ("25,00", "not a whole number"),
        ("2500,", "not a whole number"),
        ("02500", "not a whole number"),
        ("2 500", "not a whole number"),
        ("1e3", "not a whole number"),
        ("USD 2500", "not a whole number"),
        ("", "empty"),
        ("KES", "empty"),
    ],
)
def test_amount_rejects_with_reason(text: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_amount_kes(text, MAX)
    assert info.value.field == "amount"
    assert info.value.reason == reason
    assert not isinstance(info.value, AmountTooLarge)


@pytest.mark.parametrize("text", ["250,001", "1000000", "9" * 5000])
def test_amount_over_maximum_names_the_maximum(text: str) -> None:
    with pytest.raises(AmountTooLarge) as info:
        parse_amount_kes(text, MAX)
    assert info.value.field == "amount"
    assert info.value.max_kes == MAX
    assert "250,000" in info.value.reason


def test_amount_bounds_are_inclusive() -> None:
    assert parse_amount_kes("1", MAX) == 1
    assert parse_amount_kes("250,000", MAX) == MAX
    assert parse_amount_kes("70000", 70_000) == 70_000
    with pytest.raises(AmountTooLarge):
        parse_amount_kes("70001", 70_000)


@given(st.integers(min_value=1, max_value=MAX), st.booleans(), st.sampled_from(["", "KES ", "Ksh"]))
def test_amount_property(amount: int, grouped: bool, prefix: str) -> None:
    text = prefix + (f"{amount:,}" if grouped else str(amount))
    assert parse_amount_kes(text, MAX) == amount
    assert type(parse_amount_kes(text, MAX)) is int


# Rejections as properties, in the renderings the accepting property above uses (with or without
# thousands commas, with or without a currency prefix or "/-"): each fails if the parser turns
# permissive about cents, zero, signs, the ceiling or words.

PREFIXES = st.sampled_from(["", "KES ", "Ksh", "ksh. ", "Shs "])
SUFFIXES = st.sampled_from(["", "/-"])


def kes(amount: int, grouped: bool) -> str:
    return f"{amount:,}" if grouped else str(amount)


def rejected(text: str, max_kes: int = MAX) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_amount_kes(text, max_kes)
    assert info.value.field == "amount"
    return info.value


@given(st.integers(min_value=0, max_value=10 * MAX), st.from_regex(r"[0-9]{1,2}", fullmatch=True),
       st.booleans(), PREFIXES, SUFFIXES)
def test_amount_property_rejects_cents(amount: int, cents: str, grouped: bool, prefix: str, suffix: str) -> None:
    # Even ".00" and ".0": M-PESA takes whole shillings; cents also win over "too large".
    error = rejected(f"{prefix}{kes(amount, grouped)}.{cents}{suffix}")
    assert error.reason == "whole shillings only, no cents" and not isinstance(error, AmountTooLarge)


@given(st.sampled_from(["0", "00", "000", "0,000", "0,000,000"]), PREFIXES, SUFFIXES)
def test_amount_property_rejects_zero(zero: str, prefix: str, suffix: str) -> None:
    error = rejected(prefix + zero + suffix)
    assert error.reason == "must be at least KES 1" and not isinstance(error, AmountTooLarge)


@given(st.integers(min_value=0, max_value=10 * MAX), st.booleans(), PREFIXES, SUFFIXES)
def test_amount_property_rejects_negatives(amount: int, grouped: bool, prefix: str, suffix: str) -> None:
    error = rejected(f"{prefix}-{kes(amount, grouped)}{suffix}")
    assert error.reason == "must be at least KES 1" and not isinstance(error, AmountTooLarge)


@given(st.integers(min_value=1, max_value=10_000_000), st.integers(min_value=1, max_value=10**15),
       st.booleans(), PREFIXES, SUFFIXES)
def test_amount_property_rejects_above_the_maximum(max_kes: int, over: int, grouped: bool, prefix: str,
                                                   suffix: str) -> None:
    with pytest.raises(AmountTooLarge) as info:
        parse_amount_kes(f"{prefix}{kes(max_kes + over, grouped)}{suffix}", max_kes)
    assert info.value.max_kes == max_kes and info.value.field == "amount"
    assert f"{max_kes:,}" in info.value.reason


@given(st.one_of(
    st.text(alphabet=string.ascii_letters + " -", min_size=1, max_size=20),
    st.text(st.characters(categories=["L"]), min_size=1, max_size=10),
    st.sampled_from(["two thousand", "elfu mbili", "2k", "2500 bob", "2.5k", "twenty-five hundred",
                     "KES two thousand", "2500 KES", "USD 2500", "$2500", "2500 shillings"]),
))
def test_amount_property_rejects_words(text: str) -> None:
    error = rejected(text)
    assert not isinstance(error, AmountTooLarge)


@given(st.text(max_size=30))
def test_amount_never_raises_anything_else(text: str) -> None:
    try:
        amount = parse_amount_kes(text, MAX)
    except ValidationError as e:
        assert e.field == "amount"
    else:
        assert 1 <= amount <= MAX


# --- names and descriptions -------------------------------------------------------------------


def test_name() -> None:
    assert validate_name("  Mary   Wanjiku ") == "Mary Wanjiku"
    assert validate_name("Al") == "Al"
    assert validate_name("x" * 60) == "x" * 60
    for bad, reason in [("A", "too short"), ("  ", "too short"), ("x" * 61, "too long")]:
        with pytest.raises(ValidationError) as info:
            validate_name(bad)
        assert (info.value.field, info.value.reason) == ("name", reason)
    # Whitespace is collapsed before measuring: 61 characters typed, a 3-character name.
    assert validate_name("A" + " " * 59 + "B") == "A B"


def test_description() -> None:
    assert validate_description("  Cleaning service (Wed 3pm) ") == "Cleaning service (Wed 3pm)"
    assert validate_description("abc") == "abc"
    assert validate_description("y" * 120) == "y" * 120
    assert validate_description("Logo\ndesign\tfirst") == "Logo design first"
    for bad, reason in [("ab", "too short"), ("   ab  ", "too short"), ("y" * 121, "too long")]:
        with pytest.raises(ValidationError) as info:
            validate_description(bad)
        assert (info.value.field, info.value.reason) == ("description", reason)


# --- invoice refs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["1042", "#1042", "INV1042", "inv-1042", "INV-1042", "#INV1042", " 1042 ", "#inv-1042"]
)
def test_invoice_ref_accepts(text: str) -> None:
    assert normalize_invoice_ref(text) == "1042"


@pytest.mark.parametrize(
    "text",
    ["", "#", "INV", "inv-", "1042a", "10 42", "01042", "12345678901", "-1042", "1042.0", "INV--1042",
     "invoice1042", "٠١٠٤٢", "1042#"],
)
def test_invoice_ref_rejects(text: str) -> None:
    assert normalize_invoice_ref(text) is None


def test_invoice_ref_max_ten_digits() -> None:
    assert normalize_invoice_ref("#1234567890") == "1234567890"
