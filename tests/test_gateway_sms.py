from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, parse_qsl

import httpx
import pytest
import respx
from conftest import PROVIDERS
from hypothesis import given
from hypothesis import strategies as st

from invoiceiq.gateways.http import AuthError, GatewayError, PermanentError, RateLimited, TransientError
from invoiceiq.gateways.sms import (
    AfricasTalkingClient,
    DeliveryReport,
    InboundSms,
    SmsSent,
    is_final,
    parse_delivery_report,
    parse_inbound,
)


def load(name: str) -> Any:
    return json.loads((PROVIDERS / name).read_text())


def raw_http(name: str) -> tuple[str, dict[str, str], str]:
    """(start line, headers, body) of a hand-written raw HTTP sample; '#' lines are notes."""
    lines = [line for line in (PROVIDERS / name).read_text().splitlines() if not line.startswith("#")]
    while not lines[0].strip():
        lines.pop(0)
    blank = lines.index("")
    headers = dict(line.split(": ", 1) for line in lines[1:blank])
    return lines[0], headers, "\n".join(lines[blank + 1 :]).strip()


START, SEND_HEADERS, SEND_BODY = raw_http("sms_at_send_request.txt")
SAMPLE_FORM = {k: v[0] for k, v in parse_qs(SEND_BODY).items()}
API = "https://" + SEND_HEADERS["Host"]
URL = f"{API}/version1/messaging"
API_KEY = SEND_HEADERS["apiKey"]
OK = load("sms_at_send_response.json")
MIXED = load("sms_at_send_response_mixed.json")
STATUS_CODES = {int(k): v for k, v in load("sms_at_status_codes.json").items() if not k.startswith("_")}


def at_response(*recipients: dict[str, Any], status: int = 201) -> httpx.Response:
    summary = f"Sent to 1/{len(recipients)} Total Cost: KES 0.8000"
    return httpx.Response(
        status, json={"SMSMessageData": {"Message": summary, "Recipients": list(recipients)}}
    )


@pytest.fixture
def at() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        router.post(URL, name="send").mock(
            return_value=httpx.Response(OK["http_status"], json=OK["body"], headers=OK["headers"])
        )
        yield router


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def client(http: httpx.AsyncClient) -> AfricasTalkingClient:
    return AfricasTalkingClient(http, API, SAMPLE_FORM["username"], API_KEY, SAMPLE_FORM["from"])


def sent_form(at: respx.MockRouter) -> dict[str, str]:
    request = at["send"].calls.last.request
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    pairs = parse_qsl(request.content.decode(), keep_blank_values=True)
    assert len(pairs) == len(dict(pairs))  # no repeated fields
    return dict(pairs)


# --- send -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_send_request_matches_the_sample(at: respx.MockRouter, client: AfricasTalkingClient) -> None:
    assert START.startswith("POST /version1/messaging ")
    result = await client.send("254712345678", SAMPLE_FORM["message"])
    assert sent_form(at) == SAMPLE_FORM
    headers = at["send"].calls.last.request.headers
    assert headers["apiKey"] == API_KEY and headers["Accept"] == "application/json"
    recipient = OK["body"]["SMSMessageData"]["Recipients"][0]
    assert result == SmsSent(message_id=recipient["messageId"], status_code=101, status="Success")


@pytest.mark.anyio
async def test_send_without_sender_id_and_with_plus(at: respx.MockRouter, http: httpx.AsyncClient) -> None:
    client = AfricasTalkingClient(http, API + "/", "sandbox", API_KEY, None)
    await client.send("+254712345678", "hi")
    form = sent_form(at)
    assert "from" not in form and form["to"] == "+254712345678"
    assert str(at["send"].calls.last.request.url) == URL


@pytest.mark.parametrize(
    ("to", "message"), [("0712 345 678", "hi"), ("", "hi"), ("+", "hi"), ("254712345678", "")]
)
@pytest.mark.anyio
async def test_send_refuses_bad_input(
    at: respx.MockRouter, client: AfricasTalkingClient, to: str, message: str
) -> None:
    with pytest.raises(ValueError):
        await client.send(to, message)
    assert not at["send"].called


@pytest.mark.anyio
async def test_mixed_response_recipients(at: respx.MockRouter, client: AfricasTalkingClient) -> None:
    ok, invalid, blacklisted = MIXED["body"]["SMSMessageData"]["Recipients"]
    at["send"].mock(return_value=at_response(ok, invalid, blacklisted))
    assert (await client.send("254712345678", "hi")).message_id == ok["messageId"]

    at["send"].mock(return_value=at_response(invalid))
    with pytest.raises(PermanentError) as info:
        await client.send("25471234", "hi")
    assert (info.value.code, info.value.reason) == ("403", "InvalidPhoneNumber")

    at["send"].mock(return_value=at_response(blacklisted))
    with pytest.raises(PermanentError) as info:
        await client.send("254733000111", "hi")
    assert (info.value.code, info.value.reason) == ("406", "UserInBlacklist")


@pytest.mark.parametrize("code", sorted(STATUS_CODES))
@pytest.mark.anyio
async def test_every_status_code(at: respx.MockRouter, client: AfricasTalkingClient, code: int) -> None:
    name = STATUS_CODES[code]
    recipient = {
        "statusCode": code,
        "number": "+254712345678",
        "status": name,
        "cost": "0",
        "messageId": "ATXid_1" if code < 200 else "None",
    }
    at["send"].mock(return_value=at_response(recipient))
    if code in (100, 101, 102):
        assert await client.send("254712345678", "hi") == SmsSent("ATXid_1", code, name)
        return
    expected = TransientError if code in (500, 501, 502) else PermanentError  # 401-409: issue 4
    with pytest.raises(expected) as info:
        await client.send("254712345678", "hi")
    assert type(info.value) is expected
    assert (info.value.provider, info.value.code, info.value.reason) == ("africastalking", str(code), name)


@pytest.mark.anyio
async def test_auth_error_sample(at: respx.MockRouter, client: AfricasTalkingClient) -> None:
    start, headers, body = raw_http("sms_at_auth_error.txt")
    status = int(start.split()[1])
    at["send"].mock(return_value=httpx.Response(status, text=body, headers=headers))
    with pytest.raises(AuthError) as info:
        await client.send("254712345678", "hi")
    assert (info.value.code, info.value.reason) == ("401", "The supplied authentication is invalid")
    assert API_KEY not in str(info.value) and API_KEY not in repr(info.value) and API_KEY not in repr(client)


@pytest.mark.parametrize(
    ("resp", "cls", "code"),
    [
        (httpx.Response(500, text="Internal Server Error"), TransientError, "500"),
        (httpx.Response(503), TransientError, "503"),
        (httpx.Response(429, headers={"Retry-After": "12"}), RateLimited, "429"),
        (httpx.Response(400, text="Invalid request"), PermanentError, "400"),
        (
            httpx.Response(201, json={"SMSMessageData": {"Message": "InvalidSenderId", "Recipients": []}}),
            PermanentError,
            "402",
        ),
        (
            httpx.Response(201, json={"SMSMessageData": {"Message": "Something odd", "Recipients": []}}),
            PermanentError,
            "no_recipients",
        ),
        (httpx.Response(201, text="not json"), TransientError, "bad_response"),
        (at_response({"statusCode": None, "status": "?"}), TransientError, "bad_response"),
        (at_response({"statusCode": 999, "status": "New"}), TransientError, "999"),
        (at_response({"statusCode": 410, "status": "New"}), PermanentError, "410"),
    ],
)
@pytest.mark.anyio
async def test_other_outcomes(
    at: respx.MockRouter,
    client: AfricasTalkingClient,
    resp: httpx.Response,
    cls: type[GatewayError],
    code: str,
) -> None:
    at["send"].mock(return_value=resp)
    with pytest.raises(cls) as info:
        await client.send("254712345678", "hi")
    assert info.value.code == code and type(info.value) is cls
    if code == "429":
        assert info.value.retry_after_s == 12


@pytest.mark.anyio
async def test_timeout_is_transient(at: respx.MockRouter, client: AfricasTalkingClient) -> None:
    at["send"].mock(side_effect=httpx.ReadTimeout)
    with pytest.raises(TransientError) as info:
        await client.send("254712345678", "hi")
    assert info.value.code == "timeout"


# --- callbacks ------------------------------------------------------------------------


def test_delivery_report_raw_sample() -> None:
    _, headers, body = raw_http("sms_at_delivery_report.txt")
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    report = parse_delivery_report(dict(parse_qsl(body, keep_blank_values=True)))
    assert report == DeliveryReport(
        id="ATXid_4a1b2c3d4e5f60718293a4b5c6d7e8f9",
        status="Failed",
        phone="254712345678",
        network_code="63902",
        failure_reason="UserIsInactive",
        retry_count=3,
    )
    assert is_final(report.status)


@pytest.mark.parametrize(("case", "final"), [("delivered", True), ("failed", True), ("rejected", True)])
def test_delivery_report_json_samples(case: str, final: bool) -> None:
    form = load("sms_at_delivery_report.json")[case]
    report = parse_delivery_report(form)
    assert report is not None
    assert (report.id, report.status, report.network_code) == (
        form["id"],
        form["status"],
        form["networkCode"],
    )
    assert report.phone == form["phoneNumber"].removeprefix("+")
    assert report.failure_reason == form.get("failureReason")
    assert report.retry_count == int(form["retryCount"])
    assert is_final(report.status) is final


def test_delivery_report_tolerance() -> None:
    assert parse_delivery_report({"status": "Success"}) is None
    assert parse_delivery_report({"id": "  "}) is None
    minimal = parse_delivery_report(
        {"id": "ATXid_1", "status": "Buffered", "new": "field", "retryCount": "x"}
    )
    assert minimal == DeliveryReport("ATXid_1", "Buffered", None, None, None, None)
    assert not is_final(minimal.status)
    # parse_qs-style dicts (lists of values) are read too
    assert parse_delivery_report({"id": ["ATXid_2"], "status": ["Sent"]}) == DeliveryReport(
        "ATXid_2", "Sent", None, None, None, None
    )


@pytest.mark.parametrize(
    "status", ["Sent", "Submitted", "Buffered", "InsufficientBalance", "", None, "success"]
)
def test_non_final_statuses(status: str | None) -> None:
    assert is_final(status) is False


def test_inbound_sample() -> None:
    _, _, body = raw_http("sms_at_inbound.txt")
    sms = parse_inbound(dict(parse_qsl(body, keep_blank_values=True)))
    assert sms == InboundSms(
        id="5a9c1e7f-3b2d-4c8a-9e6f-1d2c3b4a5f60",
        from_msisdn="254712345678",
        to="21345",
        text="PAID INV-2026-0042",
        date="2026-11-26 13:20:11",
        link_id=None,
        network_code="63902",
    )


def test_inbound_tolerance() -> None:
    assert parse_inbound({"from": "+254712345678", "text": "hi"}) is None  # no id
    assert parse_inbound({"id": "1", "text": "hi"}) is None  # no sender
    assert parse_inbound({"id": "1", "from": "Safaricom", "text": "hi"}) is None  # not a number
    sms = parse_inbound({"id": "1", "from": "254712345678"})
    assert sms is not None and sms.text == "" and sms.to is None and sms.date is None


form_values = st.one_of(
    st.none(), st.integers(), st.text(max_size=20), st.lists(st.text(max_size=5), max_size=2)
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "status",
                "phoneNumber",
                "networkCode",
                "failureReason",
                "retryCount",
                "from",
                "to",
                "text",
                "date",
                "linkId",
                "x",
            ]
        ),
        form_values,
    )
)
def test_parsers_never_raise(form: dict[str, Any]) -> None:
    parse_delivery_report(form)
    parse_inbound(form)
