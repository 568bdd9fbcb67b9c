"""The simulated Africa's Talking: plain-text 401, per-recipient 101/403/406 inside a 201 whose
Content-Type is exactly application/json, delivery reports and inbound SMS forms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from invoiceiq.sandbox.testing import SMS_INBOUND, SMS_STATUS, Harness, harness, json_shape

pytestmark = pytest.mark.anyio

PROVIDERS = Path(__file__).resolve().parent / "fixtures" / "providers"
URL = "/at/version1/messaging"
HEADERS = {"apiKey": "sandbox-at-api-key", "Accept": "application/json"}


def sample(name: str) -> Any:
    return json.loads((PROVIDERS / name).read_text())


def raw_form(name: str) -> dict[str, str]:
    """The form body of one of the raw-HTTP samples (its last line)."""
    line = (PROVIDERS / name).read_text().strip().splitlines()[-1]
    return dict(parse_qsl(line, keep_blank_values=True))


async def send(
    h: Harness, to: str, message: str = "Invoice #42: KES 1,500", headers: dict[str, str] | None = None, **form: str
) -> httpx.Response:
    data = {"username": "sandbox", "to": to, "message": message, "bulkSMSMode": "1", **form}
    return await h.api.post(URL, data=data, headers=HEADERS if headers is None else headers)


@pytest.mark.parametrize(
    ("headers", "username"),
    [
        ({"Accept": "application/json"}, "sandbox"),
        ({"apiKey": "wrong", "Accept": "application/json"}, "sandbox"),
        (HEADERS, "live-app"),
    ],
)
async def test_bad_credentials_are_a_plain_text_401(headers: dict[str, str], username: str) -> None:
    async with harness() as h:
        r = await h.api.post(URL, data={"username": username, "to": "+254712345678", "message": "hi"}, headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"] == "text/plain"
        assert r.text == "The supplied authentication is invalid"
        assert h.sim.world.sms_sent() == []


async def test_success_is_201_with_exact_json_content_type_and_sample_shape() -> None:
    async with harness() as h:
        r = await send(h, "+254712345678")
        assert r.status_code == 201
        assert r.headers["content-type"] == "application/json"  # no charset: the python SDK checks equality
        expected = sample("sms_at_send_response.json")["body"]
        assert json_shape(r.json()) == json_shape(expected)
        (recipient,) = r.json()["SMSMessageData"]["Recipients"]
        assert recipient["statusCode"] == 101 and recipient["status"] == "Success"
        assert recipient["messageId"].startswith("ATXid_") and recipient["cost"] == "KES 0.8000"
        assert r.json()["SMSMessageData"]["Message"] == "Sent to 1/1 Total Cost: KES 0.8000"
        assert h.sim.world.phone("254712345678").sms[-1].text == "Invoice #42: KES 1,500"
        assert h.sim.world.sms_sent("254712345678")[0]["message_id"] == recipient["messageId"]


async def test_invalid_and_blacklisted_recipients_fail_inside_the_201() -> None:
    async with harness() as h:
        h.sim.phone_settings("254733000111", blacklisted=True)
        r = await send(h, "+254712345678,+25471234,+254733000111")
        assert r.status_code == 201
        expected = sample("sms_at_send_response_mixed.json")["body"]
        assert json_shape(r.json()) == json_shape(expected)
        data = r.json()["SMSMessageData"]
        assert data["Message"] == expected["SMSMessageData"]["Message"] == "Sent to 1/3 Total Cost: KES 0.8000"
        for got, want in zip(data["Recipients"], expected["SMSMessageData"]["Recipients"], strict=True):
            assert {k: got[k] for k in ("statusCode", "number", "status")} == {
                k: want[k] for k in ("statusCode", "number", "status")
            }
        assert [(x["cost"], x["messageId"]) for x in data["Recipients"][1:]] == [("0", "None"), ("0", "None")]
        assert [x["to"] for x in h.sim.world.sms_sent()] == ["+254712345678"]
        assert h.sim.world.phone("254733000111").sms == []
        r = await send(h, "254722000111")  # E.164 needs the +
        assert r.json()["SMSMessageData"]["Recipients"][0]["statusCode"] == 403


async def test_nothing_accepted_costs_zero() -> None:
    async with harness() as h:
        r = await send(h, "+25471")
        assert r.json()["SMSMessageData"]["Message"] == "Sent to 0/1 Total Cost: 0"


async def test_long_messages_cost_per_segment() -> None:
    async with harness() as h:
        r = await send(h, "+254712345678", message="x" * 161)
        assert r.json()["SMSMessageData"]["Recipients"][0]["cost"] == "KES 1.6000"


async def test_missing_fields_are_rejected() -> None:
    async with harness() as h:
        r = await h.api.post(URL, data={"username": "sandbox", "to": "+254712345678"}, headers=HEADERS)
        assert r.status_code == 400 and "message" in r.text


async def test_without_accept_json_the_answer_is_xml() -> None:
    async with harness() as h:
        r = await send(h, "+254712345678", headers={"apiKey": "sandbox-at-api-key"})
        assert r.status_code == 201
        assert r.headers["content-type"] == "application/xml"
        assert "<statusCode>101</statusCode>" in r.text
        assert len(h.sim.world.sms_sent()) == 1  # the journal keeps the results either way


async def test_delivery_report_is_posted_as_a_form() -> None:
    async with harness() as h:
        r = await send(h, "+254712345678", **{"from": "NJERIHW"})
        message_id = r.json()["SMSMessageData"]["Recipients"][0]["messageId"]
        (dlr,) = await h.hooks(SMS_STATUS, 1)
        assert dlr.headers["content-type"] == "application/x-www-form-urlencoded"
        form = dlr.form()
        assert list(form) == list(sample("sms_at_delivery_report.json")["delivered"])
        assert form == {
            "id": message_id,
            "status": "Success",
            "phoneNumber": "+254712345678",
            "networkCode": "63902",
            "retryCount": "0",
        }
        assert h.sim.world.phone("254712345678").sms[-1].peer == "NJERIHW"


async def test_inbound_sms_is_posted_like_the_sample() -> None:
    async with harness() as h:
        r = await h.api.post("/api/phones/254712345678/sms", json={"text": "PAID INV-2026-0042"})
        assert r.status_code == 200
        (hook,) = await h.hooks(SMS_INBOUND, 1)
        form = hook.form()
        assert list(form) == list(raw_form("sms_at_inbound.txt"))
        assert (form["from"], form["to"], form["text"], form["id"]) == (
            "+254712345678",
            "21345",
            "PAID INV-2026-0042",
            r.json()["id"],
        )
        assert form["linkId"] == "" and form["networkCode"] == "63902"
        assert (await h.api.post("/api/phones/254712345678/sms", json={"text": ""})).status_code == 400
