"""The simulated WhatsApp Cloud API: auth, Meta's validation rules, signed webhooks shaped like the
samples, the 24 h window (131047), not-on-WhatsApp (131026), inbound texts and button taps."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from invoiceiq.sandbox.testing import WA_HOOK, FakeClock, Harness, harness, json_shape, recorder_config
from invoiceiq.sandbox.wire import hub_signature, meta_json

pytestmark = pytest.mark.anyio

PROVIDERS = Path(__file__).resolve().parent / "fixtures" / "providers"
CUSTOMER = "254712345678"
TOKEN = {"Authorization": "Bearer sandbox-wa-token"}
URL = "/graph/v25.0/106540352242922/messages"


def sample(name: str) -> Any:
    return json.loads((PROVIDERS / name).read_text())


def text_body(body: str = "Hello from the bot", to: str = CUSTOMER) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": body},
    }


def buttons_body(*titles: str, body: str = "Your invoice", **extra: Any) -> dict[str, Any]:
    buttons = [{"type": "reply", "reply": {"id": f"b{i}", "title": t}} for i, t in enumerate(titles)]
    interactive = {"type": "button", "body": {"text": body}, "action": {"buttons": buttons}, **extra}
    return {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "interactive", "interactive": interactive}


def template_body(
    params: int = 4, payload: str | None = "pay:INV-1", name: str = "invoice_notification"
) -> dict[str, Any]:
    components: list[dict[str, Any]] = [
        {"type": "body", "parameters": [{"type": "text", "text": f"p{i + 1}"} for i in range(params)]}
    ]
    if payload is not None:
        components.append(
            {
                "type": "button",
                "sub_type": "quick_reply",
                "index": "0",
                "parameters": [{"type": "payload", "payload": payload}],
            }
        )
    return {
        "messaging_product": "whatsapp",
        "to": CUSTOMER,
        "type": "template",
        "template": {"name": name, "language": {"code": "en"}, "components": components},
    }


async def send(h: Harness, body: Any, headers: dict[str, str] | None = None, url: str = URL) -> httpx.Response:
    return await h.api.post(url, json=body, headers=TOKEN if headers is None else headers)


def statuses(h: Harness) -> list[dict[str, Any]]:
    out = []
    for r in h.recorder.on(WA_HOOK):
        out.extend(r.json()["entry"][0]["changes"][0]["value"].get("statuses", []))
    return out


async def wait_status(h: Harness, wamid: str, status: str) -> dict[str, Any]:
    return await h.wait_for(lambda: next((s for s in statuses(h) if s["id"] == wamid and s["status"] == status), None))


# -- auth ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sandbox-wa-token"}])
async def test_bad_token_is_oauth_190_with_http_401(headers: dict[str, str]) -> None:
    async with harness() as h:
        r = await send(h, text_body(), headers=headers)
        assert r.status_code == 401
        error = r.json()["error"]
        assert error["message"] == "Invalid OAuth access token."
        assert (error["type"], error["code"]) == ("OAuthException", 190)
        assert isinstance(error["fbtrace_id"], str) and error["fbtrace_id"]
        assert h.sim.world.sent_whatsapp() == []


async def test_wrong_phone_number_id_is_code_100() -> None:
    async with harness() as h:
        r = await send(h, text_body(), url="/graph/v25.0/999/messages")
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["code"], error["type"], error["error_subcode"]) == (100, "GraphMethodException", 33)


@pytest.mark.parametrize("version", ["v18.0", "v25.0", "v26.0"])
async def test_any_graph_version_is_accepted(version: str) -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        r = await send(h, text_body(), url=f"/graph/{version}/106540352242922/messages")
        assert r.status_code == 200


async def test_malformed_version_is_unknown_path() -> None:
    async with harness() as h:
        r = await send(h, text_body(), url="/graph/latest/106540352242922/messages")
        assert r.status_code == 400 and r.json()["error"]["code"] == 2500


# -- validation -----------------------------------------------------------------------------------


INVALID: list[tuple[str, Callable[[], dict[str, Any]], int, int, str]] = [
    (
        "no messaging_product",
        lambda: {k: v for k, v in text_body().items() if k != "messaging_product"},
        400,
        100,
        "messaging_product",
    ),
    ("wrong messaging_product", lambda: {**text_body(), "messaging_product": "sms"}, 400, 100, "messaging_product"),
    ("no to", lambda: {k: v for k, v in text_body().items() if k != "to"}, 400, 100, "to"),
    ("to not digits", lambda: text_body(to="07-12 345"), 400, 100, "to"),
    ("unsupported type", lambda: {**text_body(), "type": "sticker"}, 400, 100, "type"),
    ("text body missing", lambda: {**text_body(), "text": {}}, 400, 131008, "text['body']"),
    ("text body too long", lambda: text_body("x" * 4097), 400, 100, "at most 4096"),
    ("no buttons", lambda: buttons_body(), 400, 131009, "buttons count"),
    ("four buttons", lambda: buttons_body("a", "b", "c", "d"), 400, 131009, "buttons count"),
    ("title too long", lambda: buttons_body("Pay with M-PESA now!!"), 400, 100, "must be at most 20 characters long"),
    ("empty title", lambda: buttons_body(""), 400, 131009, "title length invalid"),
    ("duplicate titles", lambda: buttons_body("Pay", "Pay"), 400, 131009, "titles must be unique"),
    ("interactive body too long", lambda: buttons_body("Pay", body="x" * 1025), 400, 100, "at most 1024"),
    ("footer too long", lambda: buttons_body("Pay", footer={"text": "f" * 61}), 400, 100, "at most 60"),
    ("header too long", lambda: buttons_body("Pay", header={"type": "text", "text": "h" * 61}), 400, 100, "at most 60"),
    ("template unknown", lambda: template_body(name="invoice_v9"), 404, 132001, "does not exist in en"),
    (
        "template 3 params",
        lambda: template_body(params=3),
        400,
        132000,
        "(3) does not match the expected number of params (4)",
    ),
    (
        "template no body",
        lambda: {**template_body(), "template": {"name": "invoice_notification", "language": {"code": "en"}}},
        400,
        132000,
        "(0)",
    ),
]


def _dup_ids() -> dict[str, Any]:
    body = buttons_body("Pay", "View")
    body["interactive"]["action"]["buttons"][1]["reply"]["id"] = "b0"
    return body


def _long_id() -> dict[str, Any]:
    body = buttons_body("Pay")
    body["interactive"]["action"]["buttons"][0]["reply"]["id"] = "i" * 257
    return body


def _no_interactive_body() -> dict[str, Any]:
    body = buttons_body("Pay")
    del body["interactive"]["body"]
    return body


def _url_button_type() -> dict[str, Any]:
    body = buttons_body("Pay")
    body["interactive"]["action"]["buttons"][0]["type"] = "url"
    return body


def _template_language(code: str) -> dict[str, Any]:
    body = template_body()
    body["template"]["language"]["code"] = code
    return body


def _template_newline() -> dict[str, Any]:
    body = template_body()
    body["template"]["components"][0]["parameters"][0]["text"] = "two\nlines"
    return body


def _template_button(index: str, sub_type: str) -> dict[str, Any]:
    body = template_body()
    body["template"]["components"][1].update(index=index, sub_type=sub_type)
    return body


INVALID += [
    ("duplicate ids", _dup_ids, 400, 131009, "IDs must be unique"),
    ("id too long", _long_id, 400, 100, "at most 256"),
    ("interactive body missing", _no_interactive_body, 400, 131008, "interactive['body']"),
    ("button type not reply", _url_button_type, 400, 131009, "'reply'"),
    ("template wrong language", lambda: _template_language("sw"), 404, 132001, "does not exist in sw"),
    ("template param newline", _template_newline, 400, 100, "new-line/tab"),
    ("template button index missing", lambda: _template_button("5", "quick_reply"), 400, 131009, "index 5"),
    ("template button wrong sub_type", lambda: _template_button("0", "url"), 400, 132012, "quick_reply"),
]


@pytest.mark.parametrize(("case", "make", "status", "code", "detail"), INVALID, ids=[c[0] for c in INVALID])
async def test_invalid_sends_get_the_graph_error_envelope(
    case: str, make: Callable[[], dict[str, Any]], status: int, code: int, detail: str
) -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")  # window open: only the body can be at fault
        r = await send(h, make())
        assert r.status_code == status, r.text
        body = r.json()
        # The envelope of whatsapp_error_responses.json, code by code.
        assert json_shape(body) == json_shape(sample("whatsapp_error_responses.json")["131009"]["body"])
        error = body["error"]
        assert error["code"] == code
        assert error["message"].startswith(f"(#{code}) ")
        assert error["error_data"]["messaging_product"] == "whatsapp"
        assert detail in error["error_data"]["details"]
        # Rejected means nothing happened: no message, no status webhook.
        assert h.sim.world.sent_whatsapp() == []
        assert h.sim.world.calls("whatsapp")[-1].status == status
        await h.sim.settle()
        assert statuses(h) == []


async def test_limits_are_inclusive() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        body = buttons_body(
            "T" * 20,
            "Two",
            "Three",
            body="b" * 1024,
            footer={"text": "f" * 60},
            header={"type": "text", "text": "h" * 60},
        )
        body["interactive"]["action"]["buttons"][0]["reply"]["id"] = "i" * 256
        assert (await send(h, body)).status_code == 200
        assert (await send(h, text_body("x" * 4096))).status_code == 200
        assert (await send(h, {**text_body(), "to": "+" + CUSTOMER})).status_code == 200
        assert len(h.sim.world.sent_whatsapp(CUSTOMER)) == 3


def _template_config() -> Any:
    # The samples use a 3-parameter template with a quick reply and a dynamic URL button.
    return recorder_config(
        wa_template_name="invoice_notice_v1",
        wa_template_params=3,
        wa_template_buttons=("quick_reply:Pay now", "url:View invoice:https://pay.example.co.ke/i/{{1}}"),
    )


async def test_meta_schema_and_simulator_agree_on_the_samples() -> None:
    schema = json.loads((PROVIDERS / "meta-openapi" / "send_message.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    names = [
        "whatsapp_send_text_request.json",
        "whatsapp_send_interactive_buttons_request.json",
        "whatsapp_send_template_request.json",
    ]
    async with harness(_template_config()) as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        for name in names:
            body = sample(name)
            validator.validate(body)
            r = await send(h, body)
            assert r.status_code == 200, (name, r.text)
        # Bodies Meta's own schema rejects are rejected here too.
        base = sample("whatsapp_send_interactive_buttons_request.json")
        for mutate in (
            lambda b: b["interactive"]["action"]["buttons"][0]["reply"].update(title="x" * 21),
            lambda b: b["interactive"]["action"]["buttons"].append(
                copy.deepcopy(b["interactive"]["action"]["buttons"][0])
            ),
            lambda b: b["interactive"]["body"].update(text="x" * 1025),
            lambda b: b["interactive"]["footer"].update(text="x" * 61),
        ):
            bad = copy.deepcopy(base)
            mutate(bad)
            assert not validator.is_valid(bad)
            assert (await send(h, bad)).status_code == 400


async def test_sample_template_renders_with_its_buttons() -> None:
    async with harness(_template_config()) as h:
        r = await send(h, sample("whatsapp_send_template_request.json"))
        wamid = r.json()["messages"][0]["id"]
        message = h.sim.world.wa_messages[wamid]
        assert [(b.kind, b.title, b.id) for b in message.buttons] == [
            ("quick_reply", "Pay now", "pay:INV-2026-0042"),
            ("url", "View invoice", "https://pay.example.co.ke/i/INV-2026-0042"),
        ]
        # A URL button with a {{1}} suffix needs its parameter.
        body = sample("whatsapp_send_template_request.json")
        body["template"]["components"].pop()
        r = await send(h, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == 131008


# -- sends and status webhooks --------------------------------------------------------------------


async def test_text_in_window_gets_signed_sent_and_delivered_statuses() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        r = await send(h, text_body())
        assert r.status_code == 200
        body = r.json()
        assert json_shape(body) == json_shape(sample("whatsapp_send_success_response.json"))
        assert body["contacts"] == [{"input": CUSTOMER, "wa_id": CUSTOMER}]
        wamid = body["messages"][0]["id"]
        assert wamid.startswith("wamid.") and "message_status" not in body["messages"][0]
        sent = await wait_status(h, wamid, "sent")
        delivered = await wait_status(h, wamid, "delivered")
        assert [s["status"] for s in statuses(h)] == ["sent", "delivered"]  # in order
        for got, name in ((sent, "whatsapp_status_sent.json"), (delivered, "whatsapp_status_delivered.json")):
            assert json_shape(got) == json_shape(sample(name)["entry"][0]["changes"][0]["value"]["statuses"][0])
        # Inside the window a service message is free.
        assert sent["pricing"] == {
            "billable": False,
            "pricing_model": "PMP",
            "category": "service",
            "type": "free_customer_service",
        }
        for hook in h.recorder.on(WA_HOOK):
            assert hook.signature_ok("sandbox-wa-app-secret")
            assert hook.headers["content-type"] == "application/json"
            assert hook.body == meta_json(hook.json())  # compact, ASCII-escaped: exactly what was signed
            value = hook.json()["entry"][0]["changes"][0]["value"]
            assert value["metadata"] == {"display_phone_number": "254700100200", "phone_number_id": "106540352242922"}
        assert h.sim.world.sent_whatsapp(CUSTOMER) == [text_body()]


async def test_template_outside_window_is_accepted_billed_and_rendered() -> None:
    async with harness() as h:
        r = await send(h, template_body())
        assert r.status_code == 200
        body = r.json()
        assert json_shape(body) == json_shape(sample("whatsapp_send_template_success_response.json"))
        wamid = body["messages"][0]["id"]
        assert body["messages"][0]["message_status"] == "accepted"
        sent = await wait_status(h, wamid, "sent")
        assert sent["pricing"]["billable"] is True and sent["pricing"]["category"] == "utility"
        assert sent["conversation"]["origin"] == {"type": "utility"}
        await wait_status(h, wamid, "delivered")
        thread = h.sim.world.phone(CUSTOMER).thread
        assert thread[-1].id == wamid and "p1" in thread[-1].text and "KES p2" in thread[-1].text
        assert [(b.title, b.id) for b in thread[-1].buttons] == [
            ("Pay with M-PESA", "pay:INV-1"),
            ("View details", "View details"),
        ]


@pytest.mark.parametrize("kind", ["text", "interactive"])
async def test_free_form_outside_window_fails_131047_after_acceptance(kind: str) -> None:
    async with harness() as h:
        r = await send(h, text_body() if kind == "text" else buttons_body("Pay"))
        assert r.status_code == 200  # Meta accepts it...
        wamid = r.json()["messages"][0]["id"]
        failed = await wait_status(h, wamid, "failed")  # ...and fails it on the status webhook
        expected = sample("whatsapp_status_failed_131047.json")["entry"][0]["changes"][0]["value"]["statuses"][0]
        assert json_shape(failed) == json_shape(expected)
        assert failed["errors"] == expected["errors"]
        assert all(m.id != wamid for m in h.sim.world.phone(CUSTOMER).thread)  # never reached the phone


async def test_window_closes_24_hours_after_the_last_customer_message() -> None:
    clock = FakeClock()
    async with harness(now=clock) as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        clock.advance(24 * 3600 - 60)
        ok = (await send(h, text_body())).json()["messages"][0]["id"]
        clock.advance(120)
        late = (await send(h, text_body())).json()["messages"][0]["id"]
        await wait_status(h, ok, "delivered")
        failed = await wait_status(h, late, "failed")
        assert failed["errors"][0]["code"] == 131047
        assert h.sim.state()["phones"][1]["window_open"] is False


async def test_not_on_whatsapp_fails_131026_for_every_type() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        h.sim.phone_settings(CUSTOMER, on_whatsapp=False)
        ids = [
            (await send(h, body)).json()["messages"][0]["id"]
            for body in (template_body(), text_body(), buttons_body("Pay"))
        ]
        expected = sample("whatsapp_status_failed_131026.json")["entry"][0]["changes"][0]["value"]["statuses"][0]
        for wamid in ids:
            failed = await wait_status(h, wamid, "failed")
            assert json_shape(failed) == json_shape(expected) and failed["errors"] == expected["errors"]
        r = await h.api.post(f"/api/phones/{CUSTOMER}/whatsapp", json={"text": "hello?"})
        assert r.status_code == 409


# -- the phone's side -----------------------------------------------------------------------------


async def test_inbound_text_webhook_matches_the_sample_and_verifies() -> None:
    async with harness() as h:
        h.sim.phone_settings(CUSTOMER, name="Wanjiku Kamau")
        r = await h.api.post(f"/api/phones/{CUSTOMER}/whatsapp", json={"text": "Asante sana \u2014 nimelipa \u2705"})
        assert r.status_code == 200
        (hook,) = await h.hooks(WA_HOOK, 1)
        assert hook.signature_ok("sandbox-wa-app-secret")
        assert b"\\u2014" in hook.body and hook.body.isascii()
        payload = hook.json()
        assert json_shape(payload) == json_shape(sample("whatsapp_inbound_text.json"))
        value = payload["entry"][0]["changes"][0]["value"]
        assert value["contacts"] == [{"profile": {"name": "Wanjiku Kamau"}, "wa_id": CUSTOMER}]
        message = value["messages"][0]
        assert message["id"] == r.json()["message_id"] and message["from"] == CUSTOMER
        assert message["text"] == {"body": "Asante sana \u2014 nimelipa \u2705"}


def test_signature_matches_the_worked_example() -> None:
    text = (PROVIDERS / "whatsapp_signature_example.txt").read_text()
    body = next(line for line in text.splitlines() if line.startswith('{"object"')).encode()
    assert hub_signature("test_app_secret_0123456789abcdef", body) == (
        "sha256=7db22791f76d0c93fe4c84417578917237d0d0740f27730759097eea31a39143"
    )
    assert meta_json(json.loads(body)) == body


async def test_tapping_a_reply_button_posts_button_reply_with_context() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        wamid = (await send(h, buttons_body("Pay with M-PESA", "View details"))).json()["messages"][0]["id"]
        r = await h.api.post(f"/api/phones/{CUSTOMER}/tap", json={"message_id": wamid, "button_id": "b0"})
        assert r.status_code == 200
        hook = await h.wait_for(lambda: next((x for x in h.recorder.on(WA_HOOK) if b'"button_reply"' in x.body), None))
        assert hook.signature_ok("sandbox-wa-app-secret")
        assert json_shape(hook.json()) == json_shape(sample("whatsapp_inbound_button_reply.json"))
        message = hook.json()["entry"][0]["changes"][0]["value"]["messages"][0]
        assert message["context"] == {"from": "254700100200", "id": wamid}
        assert message["interactive"] == {
            "type": "button_reply",
            "button_reply": {"id": "b0", "title": "Pay with M-PESA"},
        }


async def test_tapping_a_template_quick_reply_posts_its_payload_and_opens_the_window() -> None:
    async with harness() as h:
        wamid = (await send(h, template_body(payload="pay:INV-7"))).json()["messages"][0]["id"]
        assert h.sim.world.phone(CUSTOMER).window_open(h.sim.now()) is False
        h.sim.phone_tap(CUSTOMER, wamid, "pay:INV-7")
        hook = await h.wait_for(lambda: next((x for x in h.recorder.on(WA_HOOK) if b'"payload"' in x.body), None))
        assert json_shape(hook.json()) == json_shape(sample("whatsapp_inbound_template_quick_reply.json"))
        message = hook.json()["entry"][0]["changes"][0]["value"]["messages"][0]
        assert message["type"] == "button"
        assert message["button"] == {"payload": "pay:INV-7", "text": "Pay with M-PESA"}
        assert message["context"]["id"] == wamid
        # The tap is a customer message: free-form replies now get through.
        receipt = (await send(h, text_body("Paid, thanks"))).json()["messages"][0]["id"]
        await wait_status(h, receipt, "delivered")
        # A quick reply sent without a payload echoes its label, like Meta does.
        plain = (await send(h, template_body(payload=None))).json()["messages"][0]["id"]
        h.sim.phone_tap(CUSTOMER, plain, "View details")
        hook = await h.wait_for(lambda: next((x for x in h.recorder.on(WA_HOOK) if b'"View details"' in x.body), None))
        assert hook.json()["entry"][0]["changes"][0]["value"]["messages"][0]["button"]["payload"] == "View details"


async def test_tap_errors_come_back_from_the_control_api() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        wamid = (await send(h, buttons_body("Pay"))).json()["messages"][0]["id"]
        cases = [
            (CUSTOMER, {"message_id": "wamid.nope", "button_id": "b0"}, 404),
            (CUSTOMER, {"message_id": wamid, "button_id": "nope"}, 404),
            ("254799999999", {"message_id": wamid, "button_id": "b0"}, 404),  # someone else's message
            (CUSTOMER, {"message_id": wamid}, 400),
        ]
        for phone, body, status in cases:
            r = await h.api.post(f"/api/phones/{phone}/tap", json=body)
            assert r.status_code == status, (body, r.text)
            assert "error" in r.json()


async def test_reading_posts_a_read_status() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        wamid = (await send(h, text_body())).json()["messages"][0]["id"]
        await wait_status(h, wamid, "delivered")
        r = await h.api.post(f"/api/phones/{CUSTOMER}/read", json={})
        assert r.json() == {"read": [wamid]}
        read = await wait_status(h, wamid, "read")
        assert json_shape(read) == json_shape(
            sample("whatsapp_status_read.json")["entry"][0]["changes"][0]["value"]["statuses"][0]
        )
        assert h.sim.phone_read(CUSTOMER) == []  # read once


async def test_biz_opaque_callback_data_is_echoed_on_statuses() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        wamid = (await send(h, {**text_body(), "biz_opaque_callback_data": "invoice:42"})).json()["messages"][0]["id"]
        sent = await wait_status(h, wamid, "sent")
        assert sent["biz_opaque_callback_data"] == "invoice:42"


async def test_every_webhook_is_valid_signed_json() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi \u00e4\u00f6\u00e5")
        wamid = (await send(h, buttons_body("Pay"))).json()["messages"][0]["id"]
        h.sim.phone_tap(CUSTOMER, wamid, "b0")
        h.sim.phone_read(CUSTOMER)
        await send(h, text_body(to="254799000111"))  # 131047
        await h.sim.settle()
        hooks = h.recorder.on(WA_HOOK)
        assert len(hooks) >= 6
        for hook in hooks:
            payload = json.loads(hook.body.decode("ascii"))
            expected = "sha256=" + hmac.new(b"sandbox-wa-app-secret", hook.body, hashlib.sha256).hexdigest()
            assert hook.headers["x-hub-signature-256"] == expected
            assert payload["object"] == "whatsapp_business_account"
            assert payload["entry"][0]["changes"][0]["field"] == "messages"
