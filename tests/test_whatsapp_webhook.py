"""``POST /whatsapp/webhook`` against the running daemon: the signature over the raw bytes, the
shapes Meta sends (and the ones it may start sending), storage before acknowledgement.

The conversation behind the webhook is tested in test_chat_e2e.py; here the interest is what is
accepted, what is stored, and that nothing odd breaks the daemon.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from harness import (
    APP_SECRET,
    CUSTOMER,
    MERCHANT,
    PHONE_ID,
    FakeProviders,
    Handle,
    inbound_text,
    make_settings,
    running_daemon,
    sign,
)
from invoiceiq.clock import ManualClock
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio

PROVIDERS_DIR = Path(__file__).resolve().parent / "fixtures" / "providers"
MERCHANT_HELP = ("Create: invoice <phone or name> <amount> <description>, "
                 "e.g. invoice 254712345678 2500 Cleaning, or tap New Invoice.\n"
                 "Manage: remind <no.>, cancel <no.>, status <no.>, unpaid.")
NO_OPEN = "You have no open invoices right now. Thank you!"


@pytest.fixture
async def h(database_url: str) -> AsyncIterator[Handle]:
    providers = FakeProviders()
    async with running_daemon(make_settings(database_url), providers=providers, clock=ManualClock()) as handle:
        yield handle  # running_daemon checks every Graph API body against Meta's schema


async def val(h: Handle, sql: str) -> Any:
    async def job(tx: Tx) -> Any:
        return await tx.val(sql)
    return await h.store.read(job)


async def settle(h: Handle) -> None:
    """Inbox processed and outbox sent, judged from one snapshot (see test_chat_e2e.settle)."""
    with anyio.fail_after(5):
        while await val(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL)"
                           " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING'))") \
                or (h.daemon.outbox is not None and h.daemon.outbox.in_flight):
            await anyio.sleep(0.01)


async def post_raw(h: Handle, body: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    return (await h.client.post("/whatsapp/webhook", content=body, headers=headers)).status_code


def signature_vector() -> tuple[bytes, str]:
    lines = (PROVIDERS_DIR / "whatsapp_signature_example.txt").read_text().splitlines()
    body = lines[lines.index("Raw body (one line, exactly these bytes, no trailing newline):") + 1].encode()
    header = next(line for line in lines if line.startswith("X-Hub-Signature-256: ")).split(": ", 1)[1]
    return body, header


async def test_metas_signature_vector_is_verified_over_the_raw_bytes(h: Handle) -> None:
    body, header = signature_vector()
    assert APP_SECRET == "test_app_secret_0123456789abcdef"  # the vector's secret
    assert header == "sha256=7db22791f76d0c93fe4c84417578917237d0d0740f27730759097eea31a39143"
    # The same JSON with the em dash and check mark as raw UTF-8 no longer matches the header.
    reserialised = json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":")).encode()
    assert reserialised != body
    assert await post_raw(h, reserialised, header) == 401
    assert await val(h, "SELECT COUNT(*) FROM inbox") == 0
    assert await post_raw(h, body, header) == 200
    await settle(h)
    # Stored and logged with the text intact; the customer (nothing open) gets the short hint.
    payload = await val(h, "SELECT payload FROM message_log WHERE direction = 'IN'")
    assert "Asante sana \u2014 nimelipa \u2705" in (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False))
    assert h.providers.texts(CUSTOMER) == [NO_OPEN]


async def test_the_signature_hex_may_be_uppercase(h: Handle) -> None:
    body, header = signature_vector()
    assert await post_raw(h, body, "sha256=" + header.split("=", 1)[1].upper()) == 200
    assert await val(h, "SELECT COUNT(*) FROM inbox") == 1


async def test_several_messages_in_one_body_are_all_stored_and_answered_in_order(h: Handle) -> None:
    first = inbound_text(MERCHANT, "help", wamid="wamid.MULTI1")
    second = inbound_text(MERCHANT, "unpaid", wamid="wamid.MULTI2")
    third = inbound_text(CUSTOMER, "Habari", wamid="wamid.MULTI3")
    value = first["entry"][0]["changes"][0]["value"]
    value["messages"] += second["entry"][0]["changes"][0]["value"]["messages"]
    value["messages"] += third["entry"][0]["changes"][0]["value"]["messages"]
    value["contacts"] += third["entry"][0]["changes"][0]["value"]["contacts"]
    assert (await h.post_webhook(first)).status_code == 200
    await settle(h)
    assert h.providers.texts(MERCHANT) == [MERCHANT_HELP, "No unpaid invoices. Send 'invoice' to create one."]
    assert h.providers.texts(CUSTOMER) == [NO_OPEN]
    assert await val(h, "SELECT COUNT(*) FROM inbox") == 3
    assert await val(h, "SELECT COUNT(*) FROM message_log WHERE direction = 'IN'") == 3
    # Meta retries the body: nothing is applied, answered or logged twice (a message's log row
    # comes with its turn, once, not with each delivery of the webhook).
    assert (await h.post_webhook(first)).status_code == 200
    await settle(h)
    assert await val(h, "SELECT COUNT(*) FROM message_log WHERE direction = 'IN'") == 3
    assert len(h.providers.texts(MERCHANT)) == 2 and len(h.providers.texts(CUSTOMER)) == 1


def _variants() -> dict[str, Any]:
    """Bodies that verify but that the bot cannot (or need not) act on."""
    base = inbound_text(MERCHANT, "help", wamid="wamid.SHAPE")
    no_wa_id = copy.deepcopy(base)
    no_wa_id["entry"][0]["changes"][0]["value"]["contacts"] = [{"profile": {"name": "X"}, "user_id": "KE.1234567890"}]
    username_only = copy.deepcopy(base)
    message = username_only["entry"][0]["changes"][0]["value"]["messages"][0]
    del message["from"]
    message["id"] = "wamid.SHAPE.USERNAME"  # a message of its own (Meta's ids are unique)
    message["from_user_id"] = "KE.13491208655302741918"
    username_only["entry"][0]["changes"][0]["value"]["contacts"] = [
        {"profile": {"name": "X", "username": "@mary"}, "user_id": "KE.13491208655302741918"}]
    statuses_without_pricing = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages", "value": {"messaging_product": "whatsapp",
                                       "metadata": {"display_phone_number": "254700100200", "phone_number_id": PHONE_ID},
                                       "statuses": [{"id": "wamid.UNKNOWN", "status": "read", "timestamp": "1764158460"}]}}]}]}
    return {
        "not an object": [1, 2, 3],
        "another object": {"object": "page", "entry": []},
        "no entry": {"object": "whatsapp_business_account"},
        "entry not a list": {"object": "whatsapp_business_account", "entry": {"id": "1"}},
        "changes not a list": {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": "x"}]},
        "value missing": {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{"field": "messages"}]}]},
        "template status field": {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
            "field": "message_template_status_update", "value": {"event": "APPROVED", "message_template_id": 1}}]}]},
        "value errors": json.loads((PROVIDERS_DIR / "whatsapp_webhook_value_errors.json").read_text()),
        "message without id": {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
            "field": "messages", "value": {"messages": [{"from": MERCHANT, "type": "text", "text": {"body": "help"}}]}}]}]},
        "text without body": {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
            "field": "messages", "value": {"messages": [{"from": MERCHANT, "id": "wamid.NOBODY", "type": "text",
                                                         "text": {}}]}}]}]},
        "username-only sender": username_only,
        "status for a message we never sent": statuses_without_pricing,
        "contacts without wa_id": no_wa_id,  # last: the only one the merchant gets an answer to
    }


async def test_bodies_the_bot_does_not_act_on_are_answered_200_and_break_nothing(h: Handle) -> None:
    for name, payload in _variants().items():
        body = json.dumps(payload).encode()
        assert await post_raw(h, body, sign(body)) == 200, name
    not_json = b"{not json"
    assert await post_raw(h, not_json, sign(not_json)) == 200
    # The status for an unknown message waits a while for its message to appear (it may have
    # overtaken the send's commit); everything else settles, and the one real merchant
    # message among them (its contact lacks wa_id) is answered, once.
    with anyio.fail_after(5):
        while await val(h, "SELECT (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL AND actor <> 'delivery')"
                           " + (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING'))") \
                or not h.providers.to(MERCHANT):
            await anyio.sleep(0.01)
    assert h.providers.texts(MERCHANT) == [MERCHANT_HELP]
    assert [s.to for s in h.providers.sent] == [MERCHANT]
    assert (await h.client.get("/readyz")).status_code == 200


async def test_a_message_without_a_phone_number_is_logged_and_nothing_else_happens(h: Handle) -> None:
    # Meta's usernames: the sender is known only by a business-scoped user id (BSUID).
    no_phone = inbound_text(MERCHANT, "help", wamid="wamid.NOPHONE")
    value = no_phone["entry"][0]["changes"][0]["value"]
    del value["messages"][0]["from"]
    value["messages"][0]["from_user_id"] = "KE.13491208655302741918"
    value["contacts"] = [{"profile": {"name": "X", "username": "@mary"}, "user_id": "KE.13491208655302741918"}]
    assert (await h.post_webhook(no_phone)).status_code == 200
    assert (await h.post_webhook(no_phone)).status_code == 200  # Meta retrying: logged once
    # A message with a phone number after it: once it is answered, the first had its turn too.
    await h.say(CUSTOMER, "Habari", wamid="wamid.WITHPHONE")
    await h.wait_for_texts(CUSTOMER, 1)
    await settle(h)

    async def logged(tx: Tx) -> list[dict[str, Any]]:
        return await tx.all("SELECT channel, event, payload FROM message_log WHERE direction = 'IN' ORDER BY event")
    logged_rows = await h.store.read(logged)
    assert [r["event"] for r in logged_rows] == ["inbound", "inbound_without_phone"]
    rows = {r["event"]: r for r in logged_rows}
    row = rows["inbound_without_phone"]
    assert row["channel"] == "WHATSAPP"
    payload = json.loads(row["payload"]) if isinstance(row["payload"], str) else row["payload"]
    assert payload["wamid"] == "wamid.NOPHONE" and payload["user_id"] == "KE.13491208655302741918"
    assert payload["from"] is None and payload["kind"] == "text"
    # No more of the message than any inbound row keeps: only the user id is new.
    control = rows["inbound"]["payload"]
    control = json.loads(control) if isinstance(control, str) else control
    assert set(payload) - set(control) == {"user_id"}
    assert "help" not in json.dumps({k: v for k, v in payload.items() if k != "text"})
    # No session work and no answer: kept in the inbox only to recognise retries, already done.
    assert await val(h, "SELECT COUNT(*) FROM inbox WHERE event_id = 'wamid.NOPHONE'"
                        " AND processed_at_ms IS NOT NULL") == 1
    assert await val(h, "SELECT COUNT(*) FROM customers") == 1  # the customer who wrote with a number
    assert [s.to for s in h.providers.sent] == [CUSTOMER]


async def refuse_writes(h: Handle) -> None:
    """The database stops taking writes the way it does in production: SQLite read-only, and
    PostgreSQL after a failover left us on a read-only server (SQLSTATE 25006)."""
    if h.store.dialect == "sqlite":
        await h.store.write(lambda tx: tx.execute("PRAGMA query_only=1"))
        return

    async def job(tx: Tx) -> None:
        await tx.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'cannot execute INSERT in a read-only transaction' USING ERRCODE = '25006';"
            " END $$")
        await tx.execute("CREATE TRIGGER refuse BEFORE INSERT ON inbox FOR EACH ROW EXECUTE FUNCTION refuse()")
    await h.store.write(job)


async def test_a_message_is_never_acknowledged_unless_stored(h: Handle) -> None:
    # On PostgreSQL a server refusing writes (25006 read-only, 53100 disk full) must be a 503
    # like a lost connection, not a 500.
    await refuse_writes(h)
    response = await h.post_webhook(inbound_text(MERCHANT, "invoice 0712345678 2500 Cleaning service"))
    assert response.status_code == 503  # Meta retries; a 200 would lose the message
    assert await val(h, "SELECT COUNT(*) FROM inbox") == 0
    assert h.providers.sent == []


class StalledGraph(FakeProviders):
    """The Graph API hanging on every send until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = anyio.Event()
        self.waiting = 0

    def _graph(self, request):  # type: ignore[no-untyped-def,override]
        async def later():  # type: ignore[no-untyped-def]
            self.waiting += 1
            await self.release.wait()
            return FakeProviders._graph(self, request)
        return later()


async def test_the_webhook_answers_without_waiting_for_any_provider_call(database_url: str) -> None:
    providers = StalledGraph()
    async with running_daemon(make_settings(database_url), providers=providers) as h:
        with anyio.fail_after(3):
            assert (await h.post_webhook(inbound_text(MERCHANT, "invoice 0712345678 2500 Cleaning service"))).status_code == 200
            while not providers.waiting:  # the customer's invoice is stuck at Meta
                await anyio.sleep(0.01)
            assert (await h.post_webhook(inbound_text(MERCHANT, "help"))).status_code == 200
            assert (await h.post_webhook(inbound_text(CUSTOMER, "Habari"))).status_code == 200
        assert await val(h, "SELECT COUNT(*) FROM inbox") == 3
        assert providers.sent == []
        providers.release.set()
        await settle(h)
        assert sorted(providers.texts(MERCHANT)) == sorted([
            MERCHANT_HELP,
            "Invoice #1001 sent to 254712345678. Use 'remind 1001' to nudge or 'cancel 1001' to cancel."])
        assert [s.kind for s in providers.to(CUSTOMER)] == ["template", "interactive"]
        assert providers.texts(CUSTOMER)[1].startswith("Your open invoice: Invoice #1001 (KES 2,500)")


@pytest.mark.parametrize(("body", "readable"), [
    (b"[" * 32 + b"]" * 32, True),                      # as deep as we take
    (b"[" * 33 + b"]" * 33, False),                     # one level more: refused at the door
    (b'{"a":' * 33 + b"1" + b"}" * 33, False),
    (b'{"text":"' + b"[{" * 40 + b'"}', True),          # brackets inside a string are no depth
    (b"[" + b"[1]," * 200 + b"1]", True),               # many brackets, shallow: the walk decides
    (b"[" * 20 + b'{"x":' * 13 + b"1" + b"}" * 13 + b"]" * 20, False),
    (b"not json", False),
])
def test_decode_json_refuses_what_we_could_not_store_again(body: bytes, readable: bool) -> None:
    from invoiceiq.web.common import decode_json

    ok, value = decode_json(body)
    assert ok is readable
    assert (value is not None) is readable
