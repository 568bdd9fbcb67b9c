from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import respx
from conftest import META_OPENAPI, PROVIDERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invoiceiq.core.model import Button
from invoiceiq.gateways.http import AuthError, GatewayError, PermanentError, RateLimited, TransientError
from invoiceiq.gateways.whatsapp import (
    InboundMessage,
    SentMessage,
    WhatsAppClient,
    parse_webhook,
    verify_signature,
)

API = "https://graph.facebook.com/v25.0"
PHONE_ID = "106540352242922"
TOKEN = "EAAtest-secret-token-0123456789"
URL = f"{API}/{PHONE_ID}/messages"
TO = "254712345678"
NOW_MS = 1_764_158_400_000


def load(name: str) -> Any:
    return json.loads((PROVIDERS / name).read_text())


SCHEMA = json.loads((META_OPENAPI / "send_message.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
EXAMPLES: dict[str, Any] = json.loads((META_OPENAPI / "webhook_examples.json").read_text())
SUCCESS = load("whatsapp_send_success_response.json")


@pytest.fixture
def graph() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as router:
        yield router


@pytest.fixture
async def client() -> AsyncIterator[WhatsAppClient]:
    async with httpx.AsyncClient() as http:
        yield WhatsAppClient(http, API + "/", PHONE_ID, TOKEN, now=lambda: NOW_MS)


def sent_body(route: respx.Route) -> Any:
    request = route.calls.last.request
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json"
    assert str(request.url) == URL  # no double slash even though api_base had one
    body = json.loads(request.content)
    VALIDATOR.validate(body)  # Meta's own definition of the request body
    return body


# --- sends ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_send_text_matches_sample_and_schema(graph: respx.MockRouter, client: WhatsAppClient) -> None:
    route = graph.post(URL).mock(return_value=httpx.Response(200, json=SUCCESS))
    sample = load("whatsapp_send_text_request.json")
    result = await client.send_text(TO, sample["text"]["body"])
    assert result == SentMessage(message_id=SUCCESS["messages"][0]["id"], status=None)
    assert sent_body(route) == sample


@pytest.mark.anyio
async def test_send_buttons_matches_sample_and_schema(
    graph: respx.MockRouter, client: WhatsAppClient
) -> None:
    route = graph.post(URL).mock(return_value=httpx.Response(200, json=SUCCESS))
    sample = load("whatsapp_send_interactive_buttons_request.json")
    inter = sample["interactive"]
    buttons = [Button(id=b["reply"]["id"], title=b["reply"]["title"]) for b in inter["action"]["buttons"]]
    await client.send_buttons(
        TO, inter["body"]["text"], buttons, footer=inter["footer"]["text"], header=inter["header"]["text"]
    )
    assert sent_body(route) == sample


@pytest.mark.anyio
async def test_send_buttons_at_the_limits_is_valid(graph: respx.MockRouter, client: WhatsAppClient) -> None:
    route = graph.post(URL).mock(return_value=httpx.Response(200, json=SUCCESS))
    buttons = [Button(id=str(i) * 256, title=f"{i}" * 20) for i in range(3)]
    await client.send_buttons(TO, "b" * 1024, buttons, footer="f" * 60, header="h" * 60)
    body = sent_body(route)
    await client.send_buttons(TO, "body", [Button("only", "Only")])
    minimal = sent_body(route)
    assert "header" not in minimal["interactive"] and "footer" not in minimal["interactive"]
    assert len(body["interactive"]["action"]["buttons"]) == 3


@pytest.mark.anyio
async def test_send_template_matches_sample_and_schema(
    graph: respx.MockRouter, client: WhatsAppClient
) -> None:
    success = load("whatsapp_send_template_success_response.json")
    route = graph.post(URL).mock(return_value=httpx.Response(200, json=success))
    result = await client.send_template(
        TO, "invoice_notice_v1", "en", ["Njeri Hardware", "INV-2026-0042"], ["pay:INV-2026-0042"]
    )
    assert result == SentMessage(message_id=success["messages"][0]["id"], status="accepted")
    # Our API sends text parameters and quick-reply buttons only: the sample minus its
    # currency parameter and URL button is exactly what must go on the wire.
    sample = load("whatsapp_send_template_request.json")
    comps = sample["template"]["components"]
    comps[0]["parameters"] = [p for p in comps[0]["parameters"] if p["type"] == "text"]
    sample["template"]["components"] = [c for c in comps if c.get("sub_type") != "url"]
    assert sent_body(route) == sample


@pytest.mark.anyio
async def test_send_template_indexes_buttons_and_omits_empty_body(
    graph: respx.MockRouter, client: WhatsAppClient
) -> None:
    route = graph.post(URL).mock(return_value=httpx.Response(200, json=SUCCESS))
    await client.send_template(TO, "reminder", "en_US", [], ["pay:1", "view:1", "stop"])
    comps = sent_body(route)["template"]["components"]
    assert [c["type"] for c in comps] == ["button"] * 3
    assert [c["index"] for c in comps] == ["0", "1", "2"]
    assert [c["parameters"][0]["payload"] for c in comps] == ["pay:1", "view:1", "stop"]
    await client.send_template(TO, "hello", "en", [])
    assert "components" not in sent_body(route)["template"]


B = Button("pay", "Pay")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.send_buttons(TO, "body", []),
        lambda c: c.send_buttons(TO, "body", [Button(str(i), str(i)) for i in range(4)]),
        lambda c: c.send_buttons(TO, "body", [Button("id", "t" * 21)]),
        lambda c: c.send_buttons(TO, "body", [Button("i" * 257, "title")]),
        lambda c: c.send_buttons(TO, "body", [Button("", "title")]),
        lambda c: c.send_buttons(TO, "body", [Button("id", "")]),
        lambda c: c.send_buttons(TO, "body", [Button(" id", "title")]),
        lambda c: c.send_buttons(TO, "body", [Button("same", "A"), Button("same", "B")]),
        lambda c: c.send_buttons(TO, "body", [Button("a", "Same"), Button("b", "Same")]),
        lambda c: c.send_buttons(TO, "b" * 1025, [B]),
        lambda c: c.send_buttons(TO, "", [B]),
        lambda c: c.send_buttons(TO, "body", [B], footer="f" * 61),
        lambda c: c.send_buttons(TO, "body", [B], header="h" * 61),
        lambda c: c.send_buttons("", "body", [B]),
        lambda c: c.send_text(TO, ""),
        lambda c: c.send_text(TO, "x" * 4097),
        lambda c: c.send_template(TO, "", "en", []),
        lambda c: c.send_template(TO, "t", "en", ["line\nbreak"]),
        lambda c: c.send_template(TO, "t", "en", [""]),
        lambda c: c.send_template(TO, "t", "en", ["a", "b"], [""]),
    ],
)
@pytest.mark.anyio
async def test_invalid_messages_fail_before_any_http(
    graph: respx.MockRouter, client: WhatsAppClient, call: Any
) -> None:
    route = graph.post(URL).mock(return_value=httpx.Response(200, json=SUCCESS))
    with pytest.raises(ValueError):
        await call(client)
    assert not route.called


# --- errors -----------------------------------------------------------------------------

ERROR_SAMPLES = {k: v for k, v in load("whatsapp_error_responses.json").items() if not k.startswith("_")}
EXPECTED_CLASS: dict[str, type[GatewayError]] = {
    "100": PermanentError,
    "131009": PermanentError,
    "131030": PermanentError,
    "131026": PermanentError,
    "131047": PermanentError,
    "131056": TransientError,
    "130429": RateLimited,
    "132001": PermanentError,
    "190": AuthError,
    "131000": TransientError,
}


def test_every_error_sample_has_an_expectation() -> None:
    assert set(ERROR_SAMPLES) == set(EXPECTED_CLASS)


@pytest.mark.parametrize("code", sorted(ERROR_SAMPLES))
@pytest.mark.anyio
async def test_error_samples_map_by_code(graph: respx.MockRouter, client: WhatsAppClient, code: str) -> None:
    sample = ERROR_SAMPLES[code]
    graph.post(URL).mock(return_value=httpx.Response(sample["http_status"], json=sample["body"]))
    with pytest.raises(EXPECTED_CLASS[code]) as info:
        await client.send_text(TO, "hi")
    err = info.value
    assert type(err) is EXPECTED_CLASS[code]  # not a subclass: RateLimited holds the channel
    assert (err.provider, err.code, err.http_status) == ("whatsapp", code, sample["http_status"])
    assert err.reason == sample["body"]["error"]["message"][:200]
    assert TOKEN not in str(err) and TOKEN not in repr(err)


def graph_error(code: int, status: int = 400, **extra: Any) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": f"(#{code}) x", "code": code, **extra}})


@pytest.mark.parametrize(
    ("response", "cls", "code"),
    [
        # The app's and the number's throughput limits hold back every send, not only this one:
        (graph_error(4), RateLimited, "4"),
        (graph_error(80007), RateLimited, "80007"),
        (graph_error(130429), RateLimited, "130429"),
        (graph_error(131048), TransientError, "131048"),
        (graph_error(1, 500), TransientError, "1"),
        (graph_error(2, 503), TransientError, "2"),
        (graph_error(131008), PermanentError, "131008"),
        (graph_error(131049), PermanentError, "131049"),
        (graph_error(132000), PermanentError, "132000"),
        (graph_error(132012), PermanentError, "132012"),
        (graph_error(10, 403), AuthError, "10"),
        (graph_error(200, 403), AuthError, "200"),
        (graph_error(0, 401), AuthError, "0"),
        # The code decides, not the HTTP status:
        (graph_error(131056, 500), TransientError, "131056"),
        (graph_error(100, 503), PermanentError, "100"),
        # Unknown codes fall back on the status (and on Meta's newer is_transient flag):
        (graph_error(999999, 400), PermanentError, "999999"),
        (graph_error(999999, 400, is_transient=True), TransientError, "999999"),
        (graph_error(999999, 401), AuthError, "999999"),
        (graph_error(999999, 502), TransientError, "999999"),
        (httpx.Response(401, text="Unauthorized"), AuthError, "401"),
        (httpx.Response(503, text="<html>Service Unavailable</html>"), TransientError, "503"),
        (httpx.Response(502, content=b"\xff\xfe not json"), TransientError, "502"),
        (httpx.Response(429), RateLimited, "429"),
        (httpx.Response(418, json=[1, 2]), PermanentError, "418"),
        (httpx.Response(400, json={"error": "string"}), PermanentError, "400"),
        (httpx.Response(400, json={"error": {"code": "131056"}}), TransientError, "131056"),
        (httpx.Response(400, json={"error": {"code": True}}), PermanentError, "400"),
    ],
)
@pytest.mark.anyio
async def test_error_mapping_table(
    graph: respx.MockRouter,
    client: WhatsAppClient,
    response: httpx.Response,
    cls: type[GatewayError],
    code: str,
) -> None:
    graph.post(URL).mock(return_value=response)
    with pytest.raises(cls) as info:
        await client.send_text(TO, "hi")
    assert info.value.code == code
    assert type(info.value) is cls  # one recipient too fast (131056) is not the account's limit


@pytest.mark.anyio
async def test_429_with_retry_after_seconds_and_date(graph: respx.MockRouter, client: WhatsAppClient) -> None:
    graph.post(URL).mock(return_value=httpx.Response(429, headers={"Retry-After": "17"}))
    with pytest.raises(TransientError) as info:
        await client.send_text(TO, "hi")
    assert info.value.retry_after_s == 17

    graph.post(URL).mock(
        return_value=httpx.Response(
            400, headers={"Retry-After": "Wed, 26 Nov 2025 12:01:00 GMT"}, json=graph_error(130429).json()
        )
    )
    with pytest.raises(TransientError) as info:
        await client.send_text(TO, "hi")
    assert info.value.retry_after_s == 60  # from the injected clock, NOW_MS = 12:00:00Z


@pytest.mark.parametrize(
    ("exc", "maybe_processed"), [(httpx.ConnectTimeout, False), (httpx.ReadTimeout, True)]
)
@pytest.mark.anyio
async def test_timeouts_are_transient(
    graph: respx.MockRouter, client: WhatsAppClient, exc: type[Exception], maybe_processed: bool
) -> None:
    graph.post(URL).mock(side_effect=exc)
    with pytest.raises(TransientError) as info:
        await client.send_text(TO, "hi")
    assert info.value.code == "timeout" and info.value.maybe_processed is maybe_processed


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": [{"id": ""}]}, [], "ok"])
@pytest.mark.anyio
async def test_success_without_wamid_is_flagged(
    graph: respx.MockRouter, client: WhatsAppClient, body: Any
) -> None:
    graph.post(URL).mock(return_value=httpx.Response(200, json=body))
    with pytest.raises(TransientError) as info:
        await client.send_text(TO, "hi")
    assert info.value.maybe_processed is True


@pytest.mark.anyio
async def test_repr_hides_token(client: WhatsAppClient) -> None:
    assert TOKEN not in repr(client)


# --- signature --------------------------------------------------------------------------


def signature_vector() -> tuple[str, bytes, str, str]:
    lines = (PROVIDERS / "whatsapp_signature_example.txt").read_text().splitlines()
    secret = lines[lines.index("App secret (test only):") + 1]
    raw = next(line for line in lines if line.startswith('{"object"')).encode()
    header = next(line for line in lines if line.startswith("X-Hub-Signature-256: ")).split(": ", 1)[1]
    negative = next(line for line in lines if line.startswith("sha256=") and line not in header)
    return secret, raw, header, negative


def test_signature_worked_vector() -> None:
    secret, raw, header, negative = signature_vector()
    assert raw.isascii()
    assert verify_signature(secret, raw, header)
    # Re-serialising the parsed body (UTF-8, as many frameworks do) breaks the signature:
    reserialised = json.dumps(json.loads(raw), ensure_ascii=False, separators=(",", ":")).encode()
    assert reserialised != raw
    assert not verify_signature(secret, reserialised, header)
    # ...and the file's negative vector is exactly the signature of those other bytes.
    assert verify_signature(secret, reserialised, negative)
    assert not verify_signature(secret, raw, negative)


@pytest.mark.parametrize(
    "header",
    [None, "", "sha256=", "sha1=abc", "7db22791f76d", "sha256=zz", "sha256=ü", 42, "sha256:" + "0" * 64],
)
def test_signature_garbage_is_false(header: Any) -> None:
    secret, raw, _, _ = signature_vector()
    assert verify_signature(secret, raw, header) is False


def test_signature_wrong_secret_or_empty_secret() -> None:
    secret, raw, header, _ = signature_vector()
    assert not verify_signature(secret + "x", raw, header)
    assert not verify_signature("", raw, header)
    assert not verify_signature(secret, raw + b" ", header)


# --- webhooks: our samples --------------------------------------------------------------


def only_message(obj: Any) -> InboundMessage:
    batch = parse_webhook(obj)
    assert len(batch.messages) == 1 and not batch.statuses
    return batch.messages[0]


def test_inbound_text_sample() -> None:
    m = only_message(load("whatsapp_inbound_text.json"))
    assert m == InboundMessage(
        id="wamid.HBgMMjU0NzEyMzQ1Njc4FQIAEhgUM0FCNzQ0NUI2QjQ0RkM3MjE5QjIA",
        from_msisdn="254712345678",
        user_id=None,
        timestamp_s=1764158400,
        kind="text",
        text="invoice 1500 Mama Njeri for 10 bags cement",
        title=None,
        context_id=None,
        profile_name="Wanjiku Kamau",
        phone_number_id="106540352242922",
    )


def test_inbound_button_reply_sample() -> None:
    m = only_message(load("whatsapp_inbound_button_reply.json"))
    assert (m.kind, m.text, m.title) == ("button_reply", "pay:INV-2026-0042", "Pay with M-PESA")
    assert m.context_id == "wamid.HBgMMjU0NzEyMzQ1Njc4FQIAERgSQjdBQkQ3OUQxQTM2NjE4QTJBAA=="
    assert m.timestamp_s == 1764158460


def test_inbound_template_quick_reply_sample() -> None:
    m = only_message(load("whatsapp_inbound_template_quick_reply.json"))
    assert (m.kind, m.text, m.title) == ("quick_reply", "pay:INV-2026-0042", "Pay now")
    assert m.context_id == "wamid.HBgMMjU0NzEyMzQ1Njc4FQIAERgSMUY4QkQ5RTk3QjY0NjI1MUE2AA=="


@pytest.mark.parametrize(
    ("name", "status", "error_code"),
    [
        ("whatsapp_status_sent.json", "sent", None),
        ("whatsapp_status_delivered.json", "delivered", None),
        ("whatsapp_status_read.json", "read", None),
        ("whatsapp_status_failed_131026.json", "failed", 131026),
        ("whatsapp_status_failed_131047.json", "failed", 131047),
    ],
)
def test_status_samples(name: str, status: str, error_code: int | None) -> None:
    batch = parse_webhook(load(name))
    assert not batch.messages and not batch.ignored
    (st,) = batch.statuses
    assert st.message_id == "wamid.HBgMMjU0NzEyMzQ1Njc4FQIAERgSQjdBQkQ3OUQxQTM2NjE4QTJBAA=="
    assert (st.status, st.recipient, st.phone_number_id) == (status, "254712345678", PHONE_ID)
    assert isinstance(st.timestamp_s, int)
    if error_code is None:
        assert st.errors == ()
    else:
        (err,) = st.errors
        assert err.code == error_code and err.title and err.details


def test_value_errors_sample() -> None:
    batch = parse_webhook(load("whatsapp_webhook_value_errors.json"))
    assert not batch.messages and not batch.statuses
    (err,) = batch.errors
    assert (err.code, err.title) == (130429, "Rate limit hit")
    assert err.details and err.details.startswith("Message failed to send")


# --- webhooks: Meta's 16 examples -------------------------------------------------------

EXPECTED_KIND = {
    "Text Message": ("text", "Does it come in another color?", None),
    "Text Message with Context (Product Inquiry)": ("text", "Is this still available?", None),
    "Text Message from Click to WhatsApp Ad": ("text", "Hello! Can I get more info on this?", None),
    "Reaction Message": ("other:reaction", None, None),
    "Image Message": ("other:image", None, None),
    "Location Message": ("other:location", None, None),
    "Contact Sharing Message": ("other:contacts", None, None),
    "Unsupported Message": ("other:unsupported", None, None),
    "Button Message": ("quick_reply", "Unsubscribe", "Unsubscribe"),
    "Interactive List Reply Message": ("list_reply", "priority_express", "Priority Mail Express"),
    "Interactive Button Reply Message": ("button_reply", "cancel-button", "Cancel"),
    "Order Message": ("other:order", None, None),
    "System Message": ("other:system", None, None),
}
GROUP_EVENTS = {"Group Create Message", "Group Settings Update", "Group Remove Participants"}


def test_every_meta_example_has_an_expectation() -> None:
    assert set(EXAMPLES) == set(EXPECTED_KIND) | GROUP_EVENTS


@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_meta_message_examples(name: str) -> None:
    kind, text, title = EXPECTED_KIND[name]
    m = only_message(EXAMPLES[name])
    assert (m.kind, m.text, m.title) == (kind, text, title)
    assert m.id.startswith("wamid.") and m.from_msisdn == "16505551234"
    assert m.phone_number_id == "106540352242922" and isinstance(m.timestamp_s, int)
    # Every example but the system message carries the sender's contact card.
    assert m.profile_name == (None if name == "System Message" else "Sheena Nelson")
    if kind in ("quick_reply", "button_reply", "list_reply"):
        assert m.context_id and m.context_id.startswith("wamid.")
    if name == "Unsupported Message":
        assert [e.code for e in m.errors] == [131051]


@pytest.mark.parametrize("name", sorted(GROUP_EVENTS))
def test_meta_group_examples_are_ignored_not_errors(name: str) -> None:
    batch = parse_webhook(EXAMPLES[name])
    assert batch.messages == () and batch.statuses == () and batch.errors == ()
    assert batch.ignored and "field" in batch.ignored[0]


# --- webhooks: tolerance ----------------------------------------------------------------


def test_bsuid_sender_without_phone() -> None:
    obj = load("whatsapp_inbound_text.json")
    value = obj["entry"][0]["changes"][0]["value"]
    value["contacts"] = [
        {"profile": {"name": "W", "username": "wanjiku"}, "user_id": "US.13491208655302741918"}
    ]
    msg = value["messages"][0]
    del msg["from"]
    msg["from_user_id"] = "US.13491208655302741918"
    m = only_message(obj)
    assert (m.from_msisdn, m.user_id, m.profile_name) == (None, "US.13491208655302741918", "W")
    assert m.kind == "text"


def test_user_id_comes_from_the_contact_card_too() -> None:
    obj = load("whatsapp_inbound_text.json")
    obj["entry"][0]["changes"][0]["value"]["contacts"][0]["user_id"] = "US.1"
    assert only_message(obj).user_id == "US.1"


def test_batches_iterate_every_entry_change_and_item() -> None:
    text = load("whatsapp_inbound_text.json")
    status = load("whatsapp_status_read.json")
    obj = {
        "object": "whatsapp_business_account",
        "entry": [
            {"changes": [text["entry"][0]["changes"][0], status["entry"][0]["changes"][0]]},
            text["entry"][0] | {"changes": text["entry"][0]["changes"] * 2},
        ],
    }
    batch = parse_webhook(obj)
    assert len(batch.messages) == 3 and len(batch.statuses) == 1 and not batch.ignored


def test_items_without_id_are_ignored_not_fatal() -> None:
    obj = load("whatsapp_inbound_text.json")
    value = obj["entry"][0]["changes"][0]["value"]
    good = value["messages"][0]
    value["messages"] = [{"type": "text", "text": {"body": "no id"}}, 7, good, {"id": 5}]
    value["statuses"] = [{"status": "read"}, None]
    batch = parse_webhook(obj)
    assert [m.id for m in batch.messages] == [good["id"]]
    assert len(batch.ignored) == 5 and all(isinstance(s, str) and len(s) < 100 for s in batch.ignored)


def test_tap_without_id_is_not_a_tap() -> None:
    obj = load("whatsapp_inbound_button_reply.json")
    del obj["entry"][0]["changes"][0]["value"]["messages"][0]["interactive"]["button_reply"]["id"]
    batch = parse_webhook(obj)
    assert batch.messages[0].kind == "other:interactive" and batch.messages[0].text is None
    assert batch.ignored


@pytest.mark.parametrize(
    "obj",
    [
        None,
        True,
        0,
        1.5,
        "",
        "text",
        [],
        [{"entry": []}],
        {},
        {"object": 5},
        {"object": "page", "entry": []},
        {"entry": None},
        {"entry": "x"},
        {"entry": [None, 1, "x", []]},
        {"entry": [{"changes": None}]},
        {"entry": [{"changes": [None, 1, {"value": []}, {"value": None}]}]},
        {"entry": [{"changes": [{"field": 7, "value": {}}]}]},
        {
            "entry": [
                {
                    "changes": [
                        {
                            "value": {
                                "messages": "x",
                                "statuses": {},
                                "errors": 5,
                                "contacts": "c",
                                "metadata": [],
                            }
                        }
                    ]
                }
            ]
        },
        {
            "entry": [
                {
                    "changes": [
                        {
                            "value": {
                                "messages": [
                                    {
                                        "id": "w",
                                        "from": 254,
                                        "timestamp": [],
                                        "type": 3,
                                        "context": "c",
                                        "text": None,
                                    }
                                ]
                            }
                        }
                    ]
                }
            ]
        },
        {
            "entry": [
                {
                    "changes": [
                        {"value": {"messages": [{"id": "w", "type": "interactive", "interactive": []}]}}
                    ]
                }
            ]
        },
        {
            "entry": [
                {
                    "changes": [
                        {"value": {"messages": [{"id": "w", "type": "button", "button": {"payload": 1}}]}}
                    ]
                }
            ]
        },
        {"entry": [{"changes": [{"value": {"messages": [{"id": "w", "timestamp": "9" * 5000}]}}]}]},
        {
            "entry": [
                {
                    "changes": [
                        {
                            "value": {
                                "statuses": [{"id": "w", "status": "failed", "errors": [None, {"code": "x"}]}]
                            }
                        }
                    ]
                }
            ]
        },
    ],
)
def test_never_raises_on_odd_shapes(obj: Any) -> None:
    batch = parse_webhook(obj)
    assert isinstance(batch.ignored, tuple)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


ALL_SAMPLES = [*EXAMPLES.values()] + [
    load(p.name)
    for p in sorted(PROVIDERS.glob("whatsapp_*.json"))
    if "inbound" in p.name or "status" in p.name or "webhook" in p.name
]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_never_raises_on_mutated_samples(data: st.DataObject) -> None:
    obj = copy.deepcopy(data.draw(st.sampled_from(ALL_SAMPLES)))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = data.draw(json_values)
    batch = parse_webhook(obj)
    for m in batch.messages:
        assert isinstance(m.id, str) and m.id
        if m.kind in ("text", "button_reply", "quick_reply", "list_reply"):
            assert isinstance(m.text, str)


@given(json_values)
def test_never_raises_on_any_json(obj: Any) -> None:
    parse_webhook(obj)
