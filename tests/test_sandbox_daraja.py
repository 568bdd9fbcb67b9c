"""The simulated Daraja: OAuth and token rotation, STK Push checks in Daraja's order and envelopes,
the subscriber lock, each customer choice -> its callback (or none) and its query answers."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from invoiceiq.sandbox.config import SANDBOX_PASSKEY
from invoiceiq.sandbox.testing import DAEMON, STK_CALLBACK, FakeClock, Harness, harness, json_shape
from invoiceiq.sandbox.wire import nairobi_stamp, parse_nairobi_stamp

pytestmark = pytest.mark.anyio

PROVIDERS = Path(__file__).resolve().parent / "fixtures" / "providers"
CUSTOMER = "254712345678"
PUSH = "/daraja/mpesa/stkpush/v1/processrequest"
QUERY = "/daraja/mpesa/stkpushquery/v1/query"
OAUTH = "/daraja/oauth/v1/generate?grant_type=client_credentials"
CREDENTIALS = ("sandbox-consumer-key", "sandbox-consumer-secret")


def sample(name: str) -> Any:
    return json.loads((PROVIDERS / name).read_text())


def password(timestamp: str, shortcode: str = "174379") -> str:
    return base64.b64encode(f"{shortcode}{SANDBOX_PASSKEY}{timestamp}".encode()).decode()


def push_body(h: Harness, **overrides: Any) -> dict[str, Any]:
    stamp = nairobi_stamp(h.sim.now())
    body = {
        "BusinessShortCode": 174379,
        "Password": password(stamp),
        "Timestamp": stamp,
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 1500,
        "PartyA": int(CUSTOMER),
        "PartyB": 174379,
        "PhoneNumber": int(CUSTOMER),
        "CallBackURL": DAEMON + STK_CALLBACK,
        "AccountReference": "INV20260042",
        "TransactionDesc": "Invoice 0042",
    }
    body.update(overrides)
    return body


async def token(h: Harness) -> str:
    r = await h.api.get(OAUTH, auth=CREDENTIALS)
    assert r.status_code == 200
    return r.json()["access_token"]


async def push(h: Harness, bearer: str, **overrides: Any) -> httpx.Response:
    return await h.api.post(PUSH, json=push_body(h, **overrides), headers={"Authorization": f"Bearer {bearer}"})


async def query(h: Harness, bearer: str, checkout_id: str) -> httpx.Response:
    stamp = nairobi_stamp(h.sim.now())
    body = {
        "BusinessShortCode": "174379",
        "Password": password(stamp),
        "Timestamp": stamp,
        "CheckoutRequestID": checkout_id,
    }
    return await h.api.post(QUERY, json=body, headers={"Authorization": f"Bearer {bearer}"})


def envelope(r: httpx.Response, status: int, code: str, message: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"requestId", "errorCode", "errorMessage"}
    assert (body["errorCode"], body["errorMessage"]) == (code, message)


# -- OAuth --------------------------------------------------------------------------------------


async def test_oauth_issues_a_token_like_the_live_api() -> None:
    async with harness() as h:
        r = await h.api.get(OAUTH, auth=CREDENTIALS)
        assert r.status_code == 200
        assert json_shape(r.json()) == json_shape(sample("mpesa_oauth_response.json")["body"])
        assert r.json()["expires_in"] == "3599"  # a string, as observed live


@pytest.mark.parametrize(
    ("url", "auth", "code", "message"),
    [
        (OAUTH, None, "400.008.01", "Invalid authentication type passed"),
        ("/daraja/oauth/v1/generate?grant_type=password", CREDENTIALS, "400.008.02", "Invalid grant type passed"),
        ("/daraja/oauth/v1/generate", CREDENTIALS, "400.008.02", "Invalid grant type passed"),
        (OAUTH, ("sandbox-consumer-key", "wrong"), "400.008.01", "Invalid Authentication passed"),
    ],
)
async def test_oauth_errors(url: str, auth: tuple[str, str] | None, code: str, message: str) -> None:
    async with harness() as h:
        r = await h.api.get(url, auth=auth) if auth else await h.api.get(url)
        envelope(r, 400, code, message)
        assert json_shape(r.json()) == json_shape(sample("mpesa_oauth_error_responses.json")[code]["body"])


async def test_a_new_token_invalidates_the_previous_one() -> None:
    async with harness() as h:
        first = await token(h)
        second = await token(h)
        assert first != second
        envelope(await push(h, first), 404, "404.001.03", "Invalid Access Token")
        assert (await push(h, second)).status_code == 200


async def test_tokens_expire_after_an_hour() -> None:
    clock = FakeClock()
    async with harness(now=clock) as h:
        bearer = await token(h)
        clock.advance(3601)
        envelope(await push(h, bearer), 404, "404.001.03", "Invalid Access Token")
        envelope(await push(h, "garbage"), 404, "404.001.03", "Invalid Access Token")


# -- STK push validation ----------------------------------------------------------------------------

BAD_PHONE = ("400.002.02", "Bad Request - Invalid PhoneNumber")
PUSH_ERRORS: list[tuple[str, dict[str, Any], int, tuple[str, str]]] = [
    (
        "shortcode not numeric",
        {"BusinessShortCode": "abc"},
        400,
        ("400.002.02", "Bad Request - Invalid BusinessShortCode"),
    ),
    ("other shortcode", {"BusinessShortCode": 600000}, 500, ("500.001.1001", "Merchant does not exist")),
    ("wrong password", {"Password": password("20200101000000")}, 500, ("500.001.1001", "Wrong credentials")),
    ("timestamp garbage", {"Timestamp": "2026-11-26"}, 400, ("400.002.02", "Bad Request - Invalid Timestamp")),
    (
        "transaction type",
        {"TransactionType": "CustomerPayOnline"},
        400,
        ("400.002.02", "Bad Request - Invalid TransactionType"),
    ),
    ("amount zero", {"Amount": 0}, 400, ("400.002.02", "Bad Request - Invalid Amount")),
    ("amount above limit", {"Amount": 250_001}, 400, ("400.002.02", "Bad Request - Invalid Amount")),
    ("amount decimal", {"Amount": 1500.5}, 400, ("400.002.02", "Bad Request - Invalid Amount")),
    ("amount decimal string", {"Amount": "1500.00"}, 400, ("400.002.02", "Bad Request - Invalid Amount")),
    ("amount float", {"Amount": 1500.0}, 400, ("400.002.02", "Bad Request - Invalid Amount")),
    ("amount missing", {"Amount": None}, 400, ("400.002.02", "Bad Request - Invalid Amount")),
    ("phone with 0", {"PhoneNumber": "0712345678"}, 400, BAD_PHONE),
    ("phone with +", {"PhoneNumber": "+254712345678"}, 400, BAD_PHONE),
    ("phone wrong prefix", {"PhoneNumber": 254612345678}, 400, BAD_PHONE),
    ("party A bad", {"PartyA": 25471234567}, 400, BAD_PHONE),
    ("party B bad", {"PartyB": "paybill"}, 400, ("400.002.02", "Bad Request - Invalid PartyB")),
    (
        "callback relative",
        {"CallBackURL": "/payments/stk/callback"},
        400,
        ("400.002.02", "Bad Request - Invalid CallBackURL"),
    ),
    ("callback ftp", {"CallBackURL": "ftp://daemon.test/cb"}, 400, ("400.002.02", "Bad Request - Invalid CallBackURL")),
    (
        "reference with dashes",
        {"AccountReference": "INV-2026-0042"},
        400,
        ("400.002.02", "Bad Request - Invalid AccountReference"),
    ),
    (
        "reference 13 chars",
        {"AccountReference": "INV2026004200"},
        400,
        ("400.002.02", "Bad Request - Invalid AccountReference"),
    ),
    ("reference empty", {"AccountReference": ""}, 400, ("400.002.02", "Bad Request - Invalid AccountReference")),
    (
        "description 14 chars",
        {"TransactionDesc": "Invoice 000042"},
        400,
        ("400.002.02", "Bad Request - Invalid TransactionDesc"),
    ),
]


@pytest.mark.parametrize(("case", "overrides", "status", "error"), PUSH_ERRORS, ids=[c[0] for c in PUSH_ERRORS])
async def test_push_validation(case: str, overrides: dict[str, Any], status: int, error: tuple[str, str]) -> None:
    async with harness() as h:
        bearer = await token(h)
        body = push_body(h, **overrides)
        body = {k: v for k, v in body.items() if v is not None}
        r = await h.api.post(PUSH, json=body, headers={"Authorization": f"Bearer {bearer}"})
        envelope(r, status, *error)
        assert h.sim.world.stk_pushes() == [] and h.sim.pending_prompt(CUSTOMER) is None


async def test_timestamp_must_be_nairobi_time_within_ten_minutes() -> None:
    clock = FakeClock()
    async with harness(now=clock) as h:
        bearer = await token(h)
        utc = nairobi_stamp(clock() - 3 * 3600)  # a server abroad forgetting Africa/Nairobi
        envelope(
            await push(h, bearer, Timestamp=utc, Password=password(utc)),
            400,
            "400.002.02",
            "Bad Request - Invalid Timestamp",
        )
        stale = nairobi_stamp(clock() - 11 * 60)
        envelope(
            await push(h, bearer, Timestamp=stale, Password=password(stale)),
            400,
            "400.002.02",
            "Bad Request - Invalid Timestamp",
        )
        recent = nairobi_stamp(clock() - 9 * 60)
        assert (await push(h, bearer, Timestamp=recent, Password=password(recent))).status_code == 200


async def test_numbers_may_be_numeric_strings_and_desc_is_optional() -> None:
    async with harness() as h:
        bearer = await token(h)
        body = push_body(
            h, BusinessShortCode="174379", Amount="1", PartyA=CUSTOMER, PartyB="174379", PhoneNumber=CUSTOMER
        )
        del body["TransactionDesc"]
        r = await h.api.post(PUSH, json=body, headers={"Authorization": f"Bearer {bearer}"})
        assert r.status_code == 200


async def test_a_body_without_json_content_type_loses_its_shortcode() -> None:
    async with harness() as h:
        bearer = await token(h)
        r = await h.api.post(PUSH, content=json.dumps(push_body(h)), headers={"Authorization": f"Bearer {bearer}"})
        envelope(r, 400, "400.002.02", "Bad Request - Invalid BusinessShortCode")


async def test_accepted_push_shows_a_prompt_and_answers_like_daraja() -> None:
    async with harness() as h:
        bearer = await token(h)
        r = await push(h, bearer)
        assert r.status_code == 200
        body = r.json()
        assert json_shape(body) == json_shape(sample("mpesa_stkpush_response.json")["body"])
        assert body["ResponseCode"] == "0"
        assert body["ResponseDescription"] == body["CustomerMessage"] == "Success. Request accepted for processing"
        assert re.fullmatch(r"ws_CO_\d{17}712345678", body["CheckoutRequestID"])
        assert h.sim.pending_prompt(CUSTOMER) == body["CheckoutRequestID"]
        prompt = h.sim.state()["phones"][1]["prompt"]
        assert (prompt["amount"], prompt["account_reference"], prompt["party_b"]) == (1500, "INV20260042", "174379")
        assert [p["Amount"] for p in h.sim.world.stk_pushes(CUSTOMER)] == [1500]
        assert h.sim.world.calls("daraja_push")[-1].body["Password"] == "<redacted>"


async def test_second_push_within_a_minute_cannot_lock_the_subscriber() -> None:
    clock = FakeClock()
    async with harness(now=clock) as h:
        bearer = await token(h)
        first = (await push(h, bearer)).json()["CheckoutRequestID"]
        lock = (
            "500.001.1001",
            "Unable to lock subscriber, a transaction is already in process for the current subscriber",
        )
        envelope(await push(h, bearer), 500, *lock)
        assert (
            await push(h, bearer, PhoneNumber=254722000111, PartyA=254722000111)
        ).status_code == 200  # others are free
        h.sim.stk_answer(first, "pay")
        clock.advance(30)
        envelope(await push(h, bearer), 500, *lock)  # paid, but still inside the minute
        clock.advance(31)
        assert (await push(h, bearer)).status_code == 200
        assert len(h.sim.world.stk_pushes(CUSTOMER)) == 2


# -- the customer's choices --------------------------------------------------------------------------

CHOICES = [
    ("pay", "1234", 0, "mpesa_callback_success.json", None),
    ("pay", None, 0, "mpesa_callback_success.json", None),
    ("pay", "0000", 2001, "mpesa_callback_wrong_pin_2001.json", None),
    ("pay", "12", 2001, "mpesa_callback_wrong_pin_2001.json", None),
    ("cancel", None, 1032, "mpesa_callback_cancelled_1032.json", "mpesa_stkquery_response_cancelled.json"),
    ("wrong_pin", None, 2001, "mpesa_callback_wrong_pin_2001.json", None),
    ("insufficient", None, 1, "mpesa_callback_insufficient_1.json", None),
]


@pytest.mark.parametrize(("action", "pin", "code", "callback_sample", "query_sample"), CHOICES)
async def test_each_choice_posts_its_callback_and_query_answer(
    action: str, pin: str | None, code: int, callback_sample: str, query_sample: str | None
) -> None:
    async with harness() as h:
        bearer = await token(h)
        accepted = (await push(h, bearer)).json()
        checkout_id = accepted["CheckoutRequestID"]
        envelope(await query(h, bearer, checkout_id), 500, "500.001.1001", "The transaction is being processed")
        assert (await query(h, bearer, checkout_id)).json()["requestId"] == checkout_id
        body: dict[str, Any] = {"action": action}
        if pin is not None:
            body["pin"] = pin
        r = await h.api.post(f"/api/stk/{checkout_id}", json=body)
        assert r.status_code == 200 and r.json()["result_code"] == code
        (hook,) = await h.hooks(STK_CALLBACK, 1)
        assert hook.headers["content-type"] == "application/json"
        callback = hook.json()
        expected = sample(callback_sample)
        assert json_shape(callback) == json_shape(expected)
        stk = callback["Body"]["stkCallback"]
        assert (stk["ResultCode"], stk["ResultDesc"]) == (code, expected["Body"]["stkCallback"]["ResultDesc"])
        assert (stk["CheckoutRequestID"], stk["MerchantRequestID"]) == (checkout_id, accepted["MerchantRequestID"])
        if code == 0:
            items = {i["Name"]: i.get("Value") for i in stk["CallbackMetadata"]["Item"]}
            assert items["Amount"] == 1500.0 and isinstance(items["Amount"], float)
            assert re.fullmatch(r"[A-Z][A-Z0-9]{9}", items["MpesaReceiptNumber"])
            assert items["Balance"] is None and {"Name": "Balance"} in stk["CallbackMetadata"]["Item"]
            assert items["PhoneNumber"] == int(CUSTOMER)
            paid_at = parse_nairobi_stamp(str(items["TransactionDate"]))  # a number, on the EAT clock
            assert paid_at is not None and abs(paid_at - h.sim.now()) < 5
            assert h.sim.world.phone(CUSTOMER).sms[-1].peer == "MPESA"  # the customer's confirmation SMS
        answer = await query(h, bearer, checkout_id)
        assert answer.status_code == 200
        result = answer.json()
        assert json_shape(result) == json_shape(sample(query_sample or "mpesa_stkquery_response_success.json")["body"])
        assert result["ResultCode"] == str(code)  # a string in the query API
        assert result["ResponseDescription"] == "The service request has been accepted successsfully"
        assert h.sim.pending_prompt(CUSTOMER) is None
        again = await h.api.post(f"/api/stk/{checkout_id}", json={"action": "pay"})
        assert again.status_code == 409


async def test_a_dropped_callback_is_not_posted_but_the_query_knows() -> None:
    async with harness() as h:
        bearer = await token(h)
        checkout_id = (await push(h, bearer)).json()["CheckoutRequestID"]
        h.sim.stk_answer(checkout_id, "pay", pin="4321", drop_callback=True)
        await h.sim.settle()
        assert h.recorder.on(STK_CALLBACK) == []
        assert (await query(h, bearer, checkout_id)).json()["ResultCode"] == "0"


async def test_ignored_prompt_has_no_callback_and_times_out_to_1037() -> None:
    clock = FakeClock()
    async with harness(now=clock) as h:
        bearer = await token(h)
        checkout_id = (await push(h, bearer)).json()["CheckoutRequestID"]
        h.sim.stk_answer(checkout_id, "ignore")
        assert h.sim.pending_prompt(CUSTOMER) is None
        clock.advance(59)
        h.sim.tick()
        envelope(await query(h, bearer, checkout_id), 500, "500.001.1001", "The transaction is being processed")
        clock.advance(2)
        h.sim.tick()
        result = (await query(h, bearer, checkout_id)).json()
        assert (result["ResultCode"], result["ResultDesc"]) == ("1037", "DS timeout user cannot be reached")
        await h.sim.settle()
        assert h.recorder.on(STK_CALLBACK) == []


async def test_an_unanswered_prompt_times_out_with_a_1037_callback() -> None:
    clock = FakeClock()
    async with harness(now=clock) as h:
        bearer = await token(h)
        checkout_id = (await push(h, bearer)).json()["CheckoutRequestID"]
        clock.advance(61)  # run() notices on its next housekeeping beat
        (hook,) = await h.hooks(STK_CALLBACK, 1)
        assert json_shape(hook.json()) == json_shape(sample("mpesa_callback_timeout_1037.json"))
        assert hook.json()["Body"]["stkCallback"]["ResultCode"] == 1037
        assert h.sim.pending_prompt(CUSTOMER) is None
        assert (await h.api.post(f"/api/stk/{checkout_id}", json={"action": "pay"})).status_code == 409


async def test_query_checks() -> None:
    async with harness() as h:
        bearer = await token(h)
        envelope(await query(h, bearer, "ws_CO_000"), 400, "400.002.02", "Bad Request - Invalid CheckoutRequestID")
        envelope(await query(h, "stale", "ws_CO_000"), 404, "404.001.03", "Invalid Access Token")
        checkout_id = (await push(h, bearer)).json()["CheckoutRequestID"]
        stamp = nairobi_stamp(h.sim.now())
        bad = {
            "BusinessShortCode": "174379",
            "Password": password("20200101000000"),
            "Timestamp": stamp,
            "CheckoutRequestID": checkout_id,
        }
        r = await h.api.post(QUERY, json=bad, headers={"Authorization": f"Bearer {bearer}"})
        envelope(r, 500, "500.001.1001", "Wrong credentials")


async def test_receipts_and_checkout_ids_are_unique() -> None:
    clock = FakeClock()
    async with harness(now=clock) as h:
        bearer = await token(h)
        seen_ids, receipts = set(), set()
        for _ in range(5):
            checkout_id = (await push(h, bearer)).json()["CheckoutRequestID"]
            seen_ids.add(checkout_id)
            receipts.add(h.sim.stk_answer(checkout_id, "pay")["receipt"])
            clock.advance(61)
        assert len(seen_ids) == 5 and len(receipts) == 5


async def test_stk_control_api_validates_its_input() -> None:
    async with harness() as h:
        bearer = await token(h)
        checkout_id = (await push(h, bearer)).json()["CheckoutRequestID"]
        assert (await h.api.post(f"/api/stk/{checkout_id}", json={"action": "dance"})).status_code == 400
        assert (await h.api.post(f"/api/stk/{checkout_id}", json={})).status_code == 400
        assert (await h.api.post("/api/stk/ws_CO_nope", json={"action": "pay"})).status_code == 404
        assert (await h.api.post(f"/api/stk/{checkout_id}", json={"action": "pay", "pin": 1234})).status_code == 400


async def test_unknown_daraja_path_is_resource_not_found() -> None:
    async with harness() as h:
        envelope(
            await h.api.post("/daraja/mpesa/b2c/v1/paymentrequest", json={}), 404, "404.001.01", "Resource not found"
        )
