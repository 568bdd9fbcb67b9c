from __future__ import annotations

import base64
import copy
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
import respx
from conftest import PROVIDERS
from hypothesis import given, settings
from hypothesis import strategies as st

from invoiceiq.gateways.http import AuthError, GatewayError, PermanentError, TransientError
from invoiceiq.gateways.mpesa import (
    BUY_GOODS,
    DarajaClient,
    StkCallback,
    StkQueryResult,
    parse_callback,
    password,
    sanitise_description,
    timestamp,
)

API = "https://sandbox.safaricom.co.ke"
TOKEN_URL = f"{API}/oauth/v1/generate"
PUSH_URL = f"{API}/mpesa/stkpush/v1/processrequest"
QUERY_URL = f"{API}/mpesa/stkpushquery/v1/query"
KEY, SECRET = "consumer-key-xyz", "consumer-secret-xyz"
SHORTCODE = "174379"
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
T_PUSH_MS = 1_795_688_100_000  # 2026-11-26T10:15:00Z = 13:15:00 in Nairobi
CALLBACK = "https://pay.example.co.ke/hooks/daraja/stk/8f3c2b9e4d1a"


def load(name: str) -> Any:
    return json.loads((PROVIDERS / name).read_text())


def sample_body(name: str) -> Any:
    data = load(name)
    data.pop("_comment", None)
    return data


OAUTH = load("mpesa_oauth_response.json")
PUSH_OK = load("mpesa_stkpush_response.json")
PUSH_ERRORS = {k: v for k, v in load("mpesa_stkpush_error_responses.json").items() if not k.startswith("_")}


def response(sample: Any) -> httpx.Response:
    return httpx.Response(sample["http_status"], json=sample["body"])


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def clock() -> Clock:
    return Clock(T_PUSH_MS)


@pytest.fixture
def daraja() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        router.get(TOKEN_URL, name="token").mock(return_value=response(OAUTH))
        router.post(PUSH_URL, name="push").mock(return_value=response(PUSH_OK))
        yield router


@pytest.fixture
async def client(clock: Clock) -> AsyncIterator[DarajaClient]:
    async with httpx.AsyncClient() as http:
        yield DarajaClient(http, API + "/", KEY, SECRET, SHORTCODE, PASSKEY, now=clock)


async def push(client: DarajaClient, **overrides: Any) -> Any:
    args: dict[str, Any] = dict(
        phone="254712345678",
        amount_kes=1500,
        account_reference="INV20260042",
        description="Invoice 0042",
        callback_url=CALLBACK,
    )
    args.update(overrides)
    return await client.stk_push(**args)


def last_json(route: respx.Route) -> Any:
    return json.loads(route.calls.last.request.content)


# --- password and timestamp ------------------------------------------------------------


def test_timestamp_is_nairobi_time() -> None:
    assert timestamp(T_PUSH_MS) == "20261126131500"
    assert timestamp(T_PUSH_MS + 999) == "20261126131500"  # floor, never round up
    assert timestamp(1_767_225_599_000) == "20260101025959"  # 2025-12-31T23:59:59Z: date rolls over in EAT


def test_password_recomputes_the_sample_exactly() -> None:
    sample = sample_body("mpesa_stkpush_request.json")
    assert base64.b64decode(sample["Password"]).decode() == SHORTCODE + PASSKEY + sample["Timestamp"]
    assert password(SHORTCODE, PASSKEY, sample["Timestamp"]) == sample["Password"]
    query = sample_body("mpesa_stkquery_request.json")
    assert password(SHORTCODE, PASSKEY, query["Timestamp"]) == query["Password"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Invoice 0042", "Invoice 0042"),
        ("Invoice #0042 — cement!", "Invoice 0042"),
        ("  Malipo   ya  bidhaa  ", "Malipo ya bid"),
        ("INV-2026-0042", "INV 2026 0042"),
        ("Bill 12345678", "Bill 12345678"),
        ("Cement 10 bags", "Cement 10 bag"),
        ("Ksh 1,500/=", "Ksh 1 500"),
        ("✅✅", ""),
    ],
)
def test_sanitise_description(text: str, expected: str) -> None:
    assert sanitise_description(text) == expected


# --- STK push ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stk_push_body_equals_the_sample(daraja: respx.MockRouter, client: DarajaClient) -> None:
    accepted = await push(client)
    assert last_json(daraja["push"]) == sample_body("mpesa_stkpush_request.json")
    token = OAUTH["body"]["access_token"]
    assert daraja["push"].calls.last.request.headers["Authorization"] == f"Bearer {token}"
    token_request = daraja["token"].calls.last.request
    assert token_request.url.params["grant_type"] == "client_credentials"
    assert (
        token_request.headers["Authorization"]
        == "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
    )

    body = PUSH_OK["body"]
    assert (accepted.merchant_request_id, accepted.checkout_request_id, accepted.customer_message) == (
        body["MerchantRequestID"],
        body["CheckoutRequestID"],
        body["CustomerMessage"],
    )
    log = accepted.request_for_log
    assert "Password" not in log and "8f3c2b9e4d1a" not in json.dumps(log, ensure_ascii=False)
    assert log["Amount"] == 1500 and log["AccountReference"] == "INV20260042"
    assert PASSKEY not in repr(accepted) and SECRET not in repr(client)


@pytest.mark.anyio
async def test_stk_push_sanitises_description_and_buy_goods_uses_the_till(
    daraja: respx.MockRouter, client: DarajaClient
) -> None:
    await push(
        client, description="Invoice #42 — 10 bags cement", transaction_type=BUY_GOODS, party_b="5512345"
    )
    body = last_json(daraja["push"])
    assert body["TransactionDesc"] == "Invoice 42 10"
    assert (body["TransactionType"], body["PartyB"], body["BusinessShortCode"]) == (
        BUY_GOODS,
        5512345,
        174379,
    )
    await push(client, description="—")
    assert last_json(daraja["push"])["TransactionDesc"] == "INV20260042"  # empty after cleaning


@pytest.mark.parametrize(
    "overrides",
    [
        {"amount_kes": 0},
        {"amount_kes": 250_001},
        {"amount_kes": -5},
        {"amount_kes": True},
        {"amount_kes": 1500.0},
        {"amount_kes": "1500"},
        {"phone": "0712345678"},
        {"phone": "+254712345678"},
        {"phone": "2547123456789"},
        {"phone": "254612345678"},
        {"phone": "25471234567٨"},
        {"phone": "254712345678\n"},
        {"account_reference": "INV-2026-0042"},
        {"account_reference": ""},
        {"account_reference": "A" * 13},
        {"transaction_type": "CustomerPayBill"},
        {"transaction_type": BUY_GOODS},  # without party_b
        {"transaction_type": BUY_GOODS, "party_b": "till-1"},
        {"callback_url": "/relative/path"},
        {"callback_url": "ftp://host/x"},
    ],
)
@pytest.mark.anyio
async def test_stk_push_refuses_bad_input_before_any_call(
    daraja: respx.MockRouter, client: DarajaClient, overrides: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await push(client, **overrides)
    assert not daraja["token"].called and not daraja["push"].called


@pytest.mark.anyio
async def test_stk_push_limits_are_inclusive(daraja: respx.MockRouter, client: DarajaClient) -> None:
    await push(client, amount_kes=1, phone="254112345678", account_reference="A" * 12)
    await push(client, amount_kes=250_000)
    assert daraja["push"].call_count == 2


# --- OAuth token cache ----------------------------------------------------------------


@pytest.mark.anyio
async def test_token_is_cached_across_sequential_calls(
    daraja: respx.MockRouter, client: DarajaClient
) -> None:
    await push(client)
    await push(client)
    assert daraja["token"].call_count == 1 and daraja["push"].call_count == 2


@pytest.mark.anyio
async def test_concurrent_calls_share_one_token_fetch(daraja: respx.MockRouter, client: DarajaClient) -> None:
    async def slow_token(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.05)  # every caller arrives while the fetch is in flight
        return response(OAUTH)

    daraja["token"].mock(side_effect=slow_token)
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(push, client)
    assert daraja["token"].call_count == 1 and daraja["push"].call_count == 20


@pytest.mark.parametrize("expires_in", ["3599", 3599, 3599.0])
@pytest.mark.anyio
async def test_token_refreshes_five_minutes_before_expiry(
    daraja: respx.MockRouter, client: DarajaClient, clock: Clock, expires_in: Any
) -> None:
    daraja["token"].mock(
        return_value=httpx.Response(200, json={"access_token": "tok", "expires_in": expires_in})
    )
    await push(client)
    clock.now_ms += (3599 - 300) * 1000 - 1
    await push(client)
    assert daraja["token"].call_count == 1
    clock.now_ms += 1
    await push(client)
    assert daraja["token"].call_count == 2


@pytest.mark.parametrize("expires_in", [None, "soon", -1, True, [3599]])
@pytest.mark.anyio
async def test_unreadable_expires_in_falls_back_to_the_documented_lifetime(
    daraja: respx.MockRouter, client: DarajaClient, clock: Clock, expires_in: Any
) -> None:
    daraja["token"].mock(
        return_value=httpx.Response(200, json={"access_token": "tok", "expires_in": expires_in})
    )
    await push(client)
    clock.now_ms += 50 * 60 * 1000
    await push(client)
    assert daraja["token"].call_count == 1


@pytest.mark.anyio
async def test_invalid_token_refreshes_once_and_retries_once(
    daraja: respx.MockRouter, client: DarajaClient
) -> None:
    daraja["token"].mock(
        side_effect=[
            httpx.Response(200, json={"access_token": "old", "expires_in": "3599"}),
            httpx.Response(200, json={"access_token": "new", "expires_in": "3599"}),
        ]
    )
    daraja["push"].mock(side_effect=[response(PUSH_ERRORS["404.001.03_invalid_token"]), response(PUSH_OK)])
    accepted = await push(client)
    assert accepted.checkout_request_id == PUSH_OK["body"]["CheckoutRequestID"]
    assert daraja["token"].call_count == 2 and daraja["push"].call_count == 2
    assert [c.request.headers["Authorization"] for c in daraja["push"].calls] == ["Bearer old", "Bearer new"]
    daraja["push"].mock(return_value=response(PUSH_OK))
    await push(client)  # the new token is kept
    assert daraja["token"].call_count == 2


@pytest.mark.anyio
async def test_invalid_token_twice_is_an_auth_error(daraja: respx.MockRouter, client: DarajaClient) -> None:
    daraja["push"].mock(return_value=response(PUSH_ERRORS["404.001.03_invalid_token"]))
    with pytest.raises(AuthError) as info:
        await push(client)
    assert info.value.code == "404.001.03"
    assert daraja["token"].call_count == 2 and daraja["push"].call_count == 2


@pytest.mark.parametrize(
    ("token_response", "cls"),
    [
        (response(load("mpesa_oauth_error_responses.json")["400.008.02"]), AuthError),
        (response(load("mpesa_oauth_error_responses.json")["400.008.01"]), AuthError),
        (httpx.Response(401, text="Unauthorized"), AuthError),
        (
            httpx.Response(
                400, json={"errorCode": "400.008.99", "errorMessage": "Invalid Authentication passed"}
            ),
            AuthError,
        ),
        (httpx.Response(503, text="busy"), TransientError),
        (httpx.Response(200, json={"expires_in": "3599"}), TransientError),
    ],
)
@pytest.mark.anyio
async def test_token_errors(
    daraja: respx.MockRouter, client: DarajaClient, token_response: httpx.Response, cls: type[GatewayError]
) -> None:
    daraja["token"].mock(return_value=token_response)
    with pytest.raises(cls) as info:
        await push(client)
    assert not daraja["push"].called
    assert SECRET not in str(info.value) and KEY not in str(info.value)


# --- errors ---------------------------------------------------------------------------

EXPECTED = {
    "400.002.02_invalid_shortcode": (PermanentError, "400.002.02"),
    "400.002.02_invalid_phone": (PermanentError, "400.002.02"),
    "400.002.02_invalid_timestamp": (PermanentError, "400.002.02"),
    "400.002.02_invalid_amount": (PermanentError, "400.002.02"),
    "404.001.03_invalid_token": (AuthError, "404.001.03"),  # still invalid after one refresh
    "405.001_method": (PermanentError, "405.001"),
    "500.001.1001_wrong_credentials": (AuthError, "500.001.1001"),
    "500.001.1001_merchant_missing": (AuthError, "500.001.1001"),
    "500.001.1001_subscriber_locked": (TransientError, "subscriber_locked"),
    "500.003.02_spike_arrest": (TransientError, "500.003.02"),
    "500.003.1001_internal": (TransientError, "500.003.1001"),
}


def test_every_error_sample_has_an_expectation() -> None:
    assert set(PUSH_ERRORS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(PUSH_ERRORS))
@pytest.mark.anyio
async def test_stk_push_error_samples(daraja: respx.MockRouter, client: DarajaClient, name: str) -> None:
    sample = PUSH_ERRORS[name]
    daraja["push"].mock(return_value=response(sample))
    cls, code = EXPECTED[name]
    with pytest.raises(cls) as info:
        await push(client)
    err = info.value
    assert type(err) is cls and (err.provider, err.code) == ("mpesa", code)
    assert err.reason == sample["body"]["errorMessage"]
    assert daraja["push"].call_count == (2 if name.startswith("404.001.03") else 1)
    assert PASSKEY not in str(err) and PASSKEY not in repr(err)
    # The body as sent rides along for the record, without the password.
    sent = err.request_for_log
    assert sent is not None and "Password" not in sent and sent["Amount"] == 1500


@pytest.mark.parametrize(
    ("resp", "cls", "code"),
    [
        (
            httpx.Response(500, json={"errorCode": "500.003.03", "errorMessage": "Quota Violation"}),
            TransientError,
            "500.003.03",
        ),
        (httpx.Response(503, text="<html>"), TransientError, "503"),
        (httpx.Response(429, headers={"Retry-After": "30"}), TransientError, "429"),
        (httpx.Response(400, text="bad"), PermanentError, "400"),
        (httpx.Response(401, text="no"), AuthError, "401"),
        (
            httpx.Response(200, json={"ResponseCode": "1", "ResponseDescription": "Rejected"}),
            PermanentError,
            "1",
        ),
        (httpx.Response(200, json={"ResponseCode": "0"}), TransientError, "bad_response"),
        (httpx.Response(200, text="not json"), TransientError, "bad_response"),
    ],
)
@pytest.mark.anyio
async def test_stk_push_other_errors(
    daraja: respx.MockRouter, client: DarajaClient, resp: httpx.Response, cls: type[GatewayError], code: str
) -> None:
    daraja["push"].mock(return_value=resp)
    with pytest.raises(cls) as info:
        await push(client)
    assert info.value.code == code
    err = info.value
    if code == "429":
        assert isinstance(err, TransientError) and err.retry_after_s == 30
    if code == "bad_response":
        assert isinstance(err, TransientError) and err.maybe_processed is True


@pytest.mark.parametrize(("exc", "maybe_processed"), [(httpx.ConnectError, False), (httpx.ReadTimeout, True)])
@pytest.mark.anyio
async def test_stk_push_transport_errors(
    daraja: respx.MockRouter, client: DarajaClient, exc: type[Exception], maybe_processed: bool
) -> None:
    daraja["push"].mock(side_effect=exc)
    with pytest.raises(TransientError) as info:
        await push(client)
    # A read timeout may have put a prompt on the phone already: the caller queries first.
    assert info.value.maybe_processed is maybe_processed
    sent = info.value.request_for_log
    assert sent is not None and "Password" not in sent and sent["AccountReference"] == "INV20260042"


# --- STK query ------------------------------------------------------------------------

CHECKOUT = "ws_CO_26112026131502151712345678"


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (
            "mpesa_stkquery_processing_error.json",
            StkQueryResult(pending=True, result_code=None, result_desc="The transaction is being processed"),
        ),
        (
            "mpesa_stkquery_response_success.json",
            StkQueryResult(
                pending=False,
                result_code=0,
                result_desc="The service request is processed successfully.",
                result_code_raw="0",
            ),
        ),
        (
            "mpesa_stkquery_response_cancelled.json",
            StkQueryResult(
                pending=False,
                result_code=1032,
                result_desc="Request cancelled by user",
                result_code_raw="1032",
            ),
        ),
    ],
)
@pytest.mark.anyio
async def test_stk_query_samples(
    daraja: respx.MockRouter, client: DarajaClient, clock: Clock, sample: str, expected: StkQueryResult
) -> None:
    route = daraja.post(QUERY_URL).mock(return_value=response(load(sample)))
    clock.now_ms = T_PUSH_MS + 120_000  # 13:17:00 EAT, the sample request's Timestamp
    assert await client.stk_query(CHECKOUT) == expected
    assert last_json(route) == sample_body("mpesa_stkquery_request.json")


@pytest.mark.parametrize(
    ("resp", "cls", "code"),
    [
        (response(PUSH_ERRORS["500.003.02_spike_arrest"]), TransientError, "500.003.02"),
        (response(PUSH_ERRORS["400.002.02_invalid_timestamp"]), PermanentError, "400.002.02"),
        (response(PUSH_ERRORS["500.001.1001_wrong_credentials"]), AuthError, "500.001.1001"),
        (
            httpx.Response(
                500, json={"errorCode": "500.001.1001", "errorMessage": "Unable to lock subscriber"}
            ),
            TransientError,
            "subscriber_locked",
        ),
        (httpx.Response(200, json={"ResponseCode": "0"}), TransientError, "bad_response"),
    ],
)
@pytest.mark.anyio
async def test_stk_query_errors(
    daraja: respx.MockRouter, client: DarajaClient, resp: httpx.Response, cls: type[GatewayError], code: str
) -> None:
    daraja.post(QUERY_URL).mock(return_value=resp)
    with pytest.raises(cls) as info:
        await client.stk_query(CHECKOUT)
    assert info.value.code == code


@pytest.mark.anyio
async def test_stk_query_odd_result_codes(daraja: respx.MockRouter, client: DarajaClient) -> None:
    route = daraja.post(QUERY_URL)
    route.mock(
        return_value=httpx.Response(
            200, json={"ResultCode": "SFC_IC0003", "ResultDesc": "The operator does not exist."}
        )
    )
    assert await client.stk_query(CHECKOUT) == StkQueryResult(
        False, None, "The operator does not exist.", "SFC_IC0003"
    )
    route.mock(
        return_value=httpx.Response(200, json={"ResultCode": 4999, "ResultDesc": "still under processing"})
    )
    assert (await client.stk_query(CHECKOUT)).pending is True


@pytest.mark.anyio
async def test_stk_query_refreshes_token_once(daraja: respx.MockRouter, client: DarajaClient) -> None:
    route = daraja.post(QUERY_URL).mock(
        side_effect=[
            response(PUSH_ERRORS["404.001.03_invalid_token"]),
            response(load("mpesa_stkquery_response_success.json")),
        ]
    )
    assert (await client.stk_query(CHECKOUT)).result_code == 0
    assert route.call_count == 2 and daraja["token"].call_count == 2


# --- callbacks ------------------------------------------------------------------------

MERCHANT = "f1e2-4b95-a71d-b30d3cdbb7a7942864"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "mpesa_callback_success.json",
            StkCallback(
                merchant_request_id=MERCHANT,
                checkout_request_id=CHECKOUT,
                result_code=0,
                result_code_raw="0",
                result_desc="The service request is processed successfully.",
                amount_kes=1500,
                mpesa_receipt="TKQ4ABC12D",
                transaction_date="20261126131542",
                phone="254712345678",
            ),
        ),
        (
            "mpesa_callback_success_minimal.json",
            StkCallback(
                merchant_request_id=MERCHANT,
                checkout_request_id=CHECKOUT,
                result_code=0,
                result_code_raw="0",
                result_desc="The service request is processed successfully.",
                amount_kes=1,
                mpesa_receipt="NLJ7RT61SV",
                transaction_date="20191219102115",
                phone="254708374149",
            ),
        ),
        (
            "mpesa_callback_cancelled_1032.json",
            StkCallback(MERCHANT, CHECKOUT, 1032, "1032", "Request cancelled by user"),
        ),
        (
            "mpesa_callback_insufficient_1.json",
            StkCallback(MERCHANT, CHECKOUT, 1, "1", "The balance is insufficient for the transaction."),
        ),
        (
            "mpesa_callback_timeout_1037.json",
            StkCallback(MERCHANT, CHECKOUT, 1037, "1037", "DS timeout user cannot be reached"),
        ),
        (
            "mpesa_callback_wrong_pin_2001.json",
            StkCallback(MERCHANT, CHECKOUT, 2001, "2001", "The initiator information is invalid."),
        ),
        ("mpesa_callback_ack_response.json", None),  # our answer to Daraja, not a callback
        ("mpesa_callback_failures.json", None),  # a code table
    ],
)
def test_callback_samples(name: str, expected: StkCallback | None) -> None:
    assert parse_callback(load(name)) == expected


def test_every_callback_sample_is_covered() -> None:
    names = {p.name for p in PROVIDERS.glob("mpesa_callback_*.json")}
    covered = {
        "mpesa_callback_success.json",
        "mpesa_callback_success_minimal.json",
        "mpesa_callback_cancelled_1032.json",
        "mpesa_callback_insufficient_1.json",
        "mpesa_callback_timeout_1037.json",
        "mpesa_callback_wrong_pin_2001.json",
        "mpesa_callback_ack_response.json",
        "mpesa_callback_failures.json",
    }
    assert names == covered


@pytest.mark.parametrize(
    "code", sorted(k for k in load("mpesa_callback_failures.json") if not k.startswith("_"))
)
def test_every_documented_failure_code(code: str) -> None:
    desc = load("mpesa_callback_failures.json")[code]
    value: Any = int(code) if code.isdigit() else code
    cb = parse_callback(
        {
            "Body": {
                "stkCallback": {
                    "MerchantRequestID": "m",
                    "CheckoutRequestID": "c",
                    "ResultCode": value,
                    "ResultDesc": desc,
                }
            }
        }
    )
    assert cb is not None and cb.result_code_raw == code and cb.result_desc == desc
    assert cb.result_code == (int(code) if code.isdigit() else None)
    assert cb.amount_kes is None and cb.mpesa_receipt is None


def with_items(items: Any, result_code: Any = 0) -> Any:
    return {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "m",
                "CheckoutRequestID": "c",
                "ResultCode": result_code,
                "ResultDesc": "ok",
                "CallbackMetadata": {"Item": items},
            }
        }
    }


@pytest.mark.parametrize(
    ("amount", "kes", "invalid"),
    [
        (1500, 1500, False),
        (1500.0, 1500, False),
        ("1500.00", 1500, False),
        (1499.5, None, True),
        (0.1 + 0.2, None, True),
        ("12.5", None, True),
        ("abc", None, True),
        ("1e999999999", None, True),
        (-5, None, True),
        (True, None, True),
        (None, None, True),
        ([1500], None, True),
    ],
)
def test_callback_amount_is_exact_or_flagged(amount: Any, kes: int | None, invalid: bool) -> None:
    cb = parse_callback(with_items([{"Name": "Amount", "Value": amount}]))
    assert cb is not None and (cb.amount_kes, cb.amount_invalid) == (kes, invalid)
    assert not isinstance(cb.amount_kes, float)


def test_callback_tolerates_odd_items() -> None:
    items = [
        None,
        5,
        {"Value": 3},
        {"Name": "Amount"},
        {"Name": "Balance"},
        {"Name": "MpesaReceiptNumber", "Value": 123},
        {"Name": "PhoneNumber", "Value": "+254712345678"},
        {"Name": "TransactionDate", "Value": "20261126131542"},
        {"Name": "Mystery", "Value": {"x": 1}},
    ]
    cb = parse_callback(with_items(items, result_code="0"))
    assert cb is not None and cb.result_code == 0
    assert (cb.amount_kes, cb.amount_invalid, cb.mpesa_receipt) == (None, False, None)
    assert (cb.phone, cb.transaction_date) == ("254712345678", "20261126131542")
    for odd in ("not a list", None, {"Name": "Amount", "Value": 1}):
        cb = parse_callback(with_items(odd))
        assert cb is not None and cb.amount_kes is None


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        "x",
        {},
        {"Body": None},
        {"Body": {"stkCallback": []}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "c"}}},  # no ResultCode
        {"Body": {"stkCallback": {"ResultCode": 0}}},  # no CheckoutRequestID
        {"Body": {"stkCallback": {"CheckoutRequestID": 5, "ResultCode": 0}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "c", "ResultCode": True}}},
        {"ResultCode": 0, "ResultDesc": "Accepted"},
    ],
)
def test_not_a_callback(obj: Any) -> None:
    assert parse_callback(obj) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200)
@given(data=st.data())
def test_parse_callback_never_raises(data: st.DataObject) -> None:
    obj = copy.deepcopy(load("mpesa_callback_success.json"))
    target = data.draw(st.sampled_from(["Body", "stkCallback", "ResultCode", "Item", "item", "Value"]))
    cb = obj["Body"]["stkCallback"]
    replacement = data.draw(json_values)
    if target == "Body":
        obj["Body"] = replacement
    elif target == "stkCallback":
        obj["Body"]["stkCallback"] = replacement
    elif target == "ResultCode":
        cb["ResultCode"] = replacement
    elif target == "Item":
        cb["CallbackMetadata"]["Item"] = replacement
    elif target == "item":
        cb["CallbackMetadata"]["Item"][data.draw(st.integers(0, 4))] = replacement
    else:
        cb["CallbackMetadata"]["Item"][data.draw(st.integers(0, 4))]["Value"] = replacement
    result = parse_callback(obj)
    if result is not None:
        assert result.amount_kes is None or type(result.amount_kes) is int
    parse_callback(replacement)
