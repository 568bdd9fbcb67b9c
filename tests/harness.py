"""Running the real daemon in-process for tests: real HTTP on loopback, providers faked with respx.

``running_daemon(...)`` starts ``Daemon.run`` in a task group on an ephemeral port, waits for
readiness, and yields a handle with an httpx client pointed at it. The daemon's own outbound
HTTP goes to a ``respx`` router (``FakeProviders``) that records every request and answers like
the real Graph API and Africa's Talking (success by default, failures on demand).
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import anyio
import httpx
import respx
from jsonschema import Draft202012Validator

from invoiceiq.actors.runtime import Pressure
from invoiceiq.clock import Clock
from invoiceiq.config import Settings, load_settings
from invoiceiq.daemon import Daemon

APP_SECRET = "test_app_secret_0123456789abcdef"
VERIFY_TOKEN = "verify-token-for-tests"
WA_TOKEN = "EAAG-test-token"
PHONE_ID = "106540352242922"
MERCHANT = "254700000001"
CUSTOMER = "254712345678"
ADMIN_TOKEN = "admin-token-for-tests-0123"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # the internal API's header
# Meta's own error bodies (tests/fixtures/providers), keyed by case.
WA_ERRORS = json.loads((Path(__file__).resolve().parent / "fixtures" / "providers"
                        / "whatsapp_error_responses.json").read_text())
GRAPH = "https://graph.test/v25.0"
AT_BASE = "https://at.test"
DARAJA = "https://daraja.test"
PUBLIC_URL = "https://pay.test"
SMS_TOKEN = "sms-callback-token-for-tests"
# Africa's Talking's callback URLs as configured on its dashboard: with the token (live mode
# requires sms.callback_token, since AT signs nothing).
SMS_INBOUND = f"/sms/inbound?token={SMS_TOKEN}"
SMS_STATUS = f"/sms/status?token={SMS_TOKEN}"

# Meta's own JSON Schema for the body of POST /{phone-number-id}/messages (see its README).
META_SEND_SCHEMA = Draft202012Validator(json.loads(
    (Path(__file__).resolve().parent / "fixtures" / "providers" / "meta-openapi" / "send_message.schema.json")
    .read_text()))


def meta_schema_problems(body: Any) -> list[str]:
    """Why Meta's schema would reject this Graph API /messages body (empty if it would not)."""
    return [f"{err.json_path}: {err.message} in {json.dumps(body)[:300]}" for err in META_SEND_SCHEMA.iter_errors(body)]


def base_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {
        "INVOICEIQ_MODE": "live",
        "INVOICEIQ_SERVER_BIND": "127.0.0.1:0",
        "INVOICEIQ_SERVER_PUBLIC_URL": PUBLIC_URL,
        "INVOICEIQ_SERVER_SHUTDOWN_GRACE_S": "2",
        "DATABASE_URL": database_url,
        "MERCHANT_MSISDN": MERCHANT,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "WABA_TOKEN": WA_TOKEN,
        "WABA_PHONE_ID": PHONE_ID,
        "WABA_VERIFY_TOKEN": VERIFY_TOKEN,
        "WABA_APP_SECRET": APP_SECRET,
        "INVOICEIQ_WHATSAPP_API_BASE": GRAPH,
        "SMS_USERNAME": "invoiceiq",
        "SMS_API_KEY": "at-api-key-for-tests",
        "SMS_CALLBACK_TOKEN": SMS_TOKEN,
        "INVOICEIQ_SMS_API_BASE": AT_BASE,
        "MPESA_CONSUMER_KEY": "ck-test",
        "MPESA_CONSUMER_SECRET": "cs-test",
        "MPESA_SHORTCODE": "174379",
        "MPESA_PASSKEY": "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
        "INVOICEIQ_MPESA_API_BASE": DARAJA,
    }
    env.update(extra)
    return env


def make_settings(database_url: str, **extra: str) -> Settings:
    return load_settings(None, base_env(database_url, **extra))


@dataclass
class Sent:
    to: str
    kind: str  # text | interactive | template | sms
    body: dict[str, Any]
    message_id: str

    @property
    def text(self) -> str:
        if self.kind == "text":
            return str(self.body["text"]["body"])
        if self.kind == "interactive":
            return str(self.body["interactive"]["body"]["text"])
        if self.kind == "sms":
            return str(self.body["message"])
        return json.dumps(self.body["template"])

    @property
    def button_ids(self) -> list[str]:
        if self.kind == "interactive":
            return [b["reply"]["id"] for b in self.body["interactive"]["action"]["buttons"]]
        if self.kind == "template":
            return [p["payload"] for c in self.body["template"].get("components", [])
                    if c.get("type") == "button" for p in c.get("parameters", [])]
        return []


@dataclass
class FakeDaraja:
    """Daraja as the daemon sees it: OAuth, STK Push (recorded), STK Push Query (scripted)."""

    pushes: list[dict[str, Any]] = field(default_factory=list)
    queries: list[str] = field(default_factory=list)
    # CheckoutRequestID -> what the query answers: None = still processing, else a ResultCode.
    query_answers: dict[str, int | None] = field(default_factory=dict)
    push_failures: list[tuple[int, Any]] = field(default_factory=list)
    token_requests: int = 0
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def install(self, router: respx.Router) -> None:
        router.get(f"{DARAJA}/oauth/v1/generate").mock(side_effect=self._oauth)
        router.post(f"{DARAJA}/mpesa/stkpush/v1/processrequest").mock(side_effect=self._push)
        router.post(f"{DARAJA}/mpesa/stkpushquery/v1/query").mock(side_effect=self._query)

    def _oauth(self, request: httpx.Request) -> httpx.Response:
        self.token_requests += 1
        return httpx.Response(200, json={"access_token": f"tok{self.token_requests}", "expires_in": "3599"})

    def _push(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if self.push_failures:
            status, payload = self.push_failures.pop(0)
            return httpx.Response(status, json=payload)
        n = next(self._ids)
        checkout = f"ws_CO_TEST{n:06d}"
        body["_checkout"] = checkout
        self.pushes.append(body)
        return httpx.Response(200, json={"MerchantRequestID": f"mr-{n}", "CheckoutRequestID": checkout,
                                         "ResponseCode": "0", "ResponseDescription": "Success. Request accepted for processing",
                                         "CustomerMessage": "Success. Request accepted for processing"})

    def _query(self, request: httpx.Request) -> httpx.Response:
        checkout = json.loads(request.content)["CheckoutRequestID"]
        self.queries.append(checkout)
        answer = self.query_answers.get(checkout)
        if answer is None:
            return httpx.Response(500, json={"requestId": checkout, "errorCode": "500.001.1001",
                                             "errorMessage": "The transaction is being processed"})
        return httpx.Response(200, json={"ResponseCode": "0", "ResponseDescription": "The service request has been accepted successsfully",
                                         "MerchantRequestID": "mr", "CheckoutRequestID": checkout,
                                         "ResultCode": str(answer), "ResultDesc": "done"})


def stk_callback(checkout: str, code: int = 0, *, amount: Any = None, receipt: str = "NLJ7RT61SV",
                 phone: int = 254712345678, desc: str | None = None) -> dict[str, Any]:
    """A callback body shaped like Safaricom's (tests/fixtures/providers/mpesa_callback_*.json)."""
    cb: dict[str, Any] = {"MerchantRequestID": "29115-34620561-1", "CheckoutRequestID": checkout,
                          "ResultCode": code, "ResultDesc": desc or ("The service request is processed successfully."
                                                                       if code == 0 else "Request cancelled by user")}
    if code == 0:
        cb["CallbackMetadata"] = {"Item": [
            {"Name": "Amount", "Value": amount}, {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "Balance"}, {"Name": "TransactionDate", "Value": 20261126102115},
            {"Name": "PhoneNumber", "Value": phone}]}
    return {"Body": {"stkCallback": cb}}


@dataclass
class FakeProviders:
    """The Graph API and Africa's Talking as the daemon sees them, recording every send.

    Every body POSTed to the Graph API's /messages is checked against Meta's schema, whatever
    the answer (subclasses may script their own): problems go to ``schema_problems`` and
    ``running_daemon`` fails the test with them on the way out. A test that sends bad bodies
    on purpose sets ``check_schema=False``."""

    sent: list[Sent] = field(default_factory=list)
    # Per channel, a queue of canned failures: each entry is (status_code, json_or_text, headers).
    wa_failures: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)
    sms_failures: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)
    wa_fail_for: dict[str, tuple[int, Any]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    daraja: FakeDaraja = field(default_factory=FakeDaraja)
    extra_routes: list[Callable[[respx.Router], None]] = field(default_factory=list)
    check_schema: bool = True
    schema_problems: list[str] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def router(self) -> respx.Router:
        router = respx.Router(assert_all_called=False, assert_all_mocked=True)
        router.post(url__regex=rf"^{GRAPH}/{PHONE_ID}/messages$").mock(side_effect=self._checked_graph)
        router.post(f"{AT_BASE}/version1/messaging").mock(side_effect=self._sms)
        self.daraja.install(router)
        for add in self.extra_routes:
            add(router)
        return router

    def _checked_graph(self, request: httpx.Request) -> httpx.Response:
        self.schema_problems.extend(meta_schema_problems(json.loads(request.content)))
        return self._graph(request)

    def _graph(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers["Authorization"] == f"Bearer {WA_TOKEN}"
        body = json.loads(request.content)
        if self.wa_failures:
            status, payload, headers = self.wa_failures.pop(0)
            return httpx.Response(status, json=payload, headers=headers)
        if body["to"] in self.wa_fail_for:
            status, payload = self.wa_fail_for[body["to"]]
            return httpx.Response(status, json=payload)
        wamid = f"wamid.T{next(self._ids)}"
        self.sent.append(Sent(body["to"], body["type"], body, wamid))
        return httpx.Response(200, json={"messaging_product": "whatsapp",
                                         "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                                         "messages": [{"id": wamid}]})

    def _sms(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        if self.sms_failures:
            status, payload, headers = self.sms_failures.pop(0)
            if isinstance(payload, str):
                return httpx.Response(status, text=payload, headers=headers)
            return httpx.Response(status, json=payload, headers=headers)
        mid = f"ATXid_{next(self._ids)}"
        self.sent.append(Sent(form["to"].lstrip("+"), "sms", form, mid))
        return httpx.Response(201, json={"SMSMessageData": {"Message": "Sent to 1/1 Total Cost: KES 0.8000", "Recipients": [
            {"statusCode": 101, "number": form["to"], "status": "Success", "cost": "KES 0.8000", "messageId": mid}]}},
            headers={"Content-Type": "application/json"})

    def to(self, msisdn: str) -> list[Sent]:
        return [s for s in self.sent if s.to == msisdn]

    def texts(self, msisdn: str) -> list[str]:
        return [s.text for s in self.to(msisdn)]


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


_wamids = itertools.count(1)


def inbound_text(sender: str, text: str, *, wamid: str | None = None, timestamp: int = 1_764_158_400,
                 name: str = "Test") -> dict[str, Any]:
    return _envelope(sender, name, {"from": sender, "id": wamid or f"wamid.IN{next(_wamids)}",
                                    "timestamp": str(timestamp), "type": "text", "text": {"body": text}})


def inbound_button(sender: str, button_id: str, title: str = "Button", *, wamid: str | None = None,
                   context: str = "wamid.CTX") -> dict[str, Any]:
    return _envelope(sender, "Test", {
        "context": {"from": "254700100200", "id": context}, "from": sender,
        "id": wamid or f"wamid.IN{next(_wamids)}", "timestamp": "1764158400", "type": "interactive",
        "interactive": {"type": "button_reply", "button_reply": {"id": button_id, "title": title}}})


def status_event(wamid: str, status: str, recipient: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": wamid, "status": status, "timestamp": "1764158460", "recipient_id": recipient}
    if errors:
        item["errors"] = errors
    return {"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "messages", "value": {"messaging_product": "whatsapp",
                                       "metadata": {"display_phone_number": "254700100200", "phone_number_id": PHONE_ID},
                                       "statuses": [item]}}]}]}


def _envelope(sender: str, name: str, message: dict[str, Any]) -> dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": [{"id": "102290129340398", "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "254700100200", "phone_number_id": PHONE_ID},
            "contacts": [{"profile": {"name": name}, "wa_id": sender}],
            "messages": [message]}}]}]}


@dataclass
class Handle:
    daemon: Daemon
    client: httpx.AsyncClient
    providers: FakeProviders

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.daemon.store

    async def post_webhook(self, payload: dict[str, Any], *, secret: str = APP_SECRET) -> httpx.Response:
        body = json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()
        return await self.client.post("/whatsapp/webhook", content=body, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": sign(body, secret)})

    async def callback(self, payload: dict[str, Any], *, secret: str | None = None) -> httpx.Response:
        """POST an STK callback to the daemon's secret callback URL."""
        path = f"/payments/stk/callback/{secret or self.daemon.callback_secret}"
        return await self.client.post(path, json=payload)

    async def say(self, sender: str, text: str, **kw: Any) -> httpx.Response:
        response = await self.post_webhook(inbound_text(sender, text, **kw))
        assert response.status_code == 200, response.text
        return response

    async def tap(self, sender: str, button_id: str, **kw: Any) -> httpx.Response:
        response = await self.post_webhook(inbound_button(sender, button_id, **kw))
        assert response.status_code == 200, response.text
        return response

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
        try:
            with anyio.fail_after(timeout):
                while not predicate():
                    await anyio.sleep(0.01)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; sent so far: "
                                 f"{[(s.to, s.kind, s.text[:60]) for s in self.providers.sent]}") from None

    async def wait_for_texts(self, msisdn: str, count: int, timeout: float = 5.0) -> list[str]:
        await self.wait_for(lambda: len(self.providers.to(msisdn)) >= count, timeout,
                            f"{count} messages to {msisdn}")
        return self.providers.texts(msisdn)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until nothing is queued or running (inbox processed, outbox empty)."""
        async def counts(tx: Any) -> int:
            # One statement, one snapshot: two separate counts could straddle a commit that
            # moves work from the inbox to the outbox and report "idle" in between.
            return int(await tx.val(
                "SELECT (SELECT COUNT(*) FROM outbox WHERE status IN ('PENDING','SENDING'))"
                " + (SELECT COUNT(*) FROM inbox WHERE processed_at_ms IS NULL)") or 0)

        async def idle() -> bool:
            busy = await self.store.read(counts)
            return busy == 0 and (self.daemon.outbox is None or self.daemon.outbox.in_flight == 0)

        with anyio.fail_after(timeout):
            while not await idle():
                await anyio.sleep(0.01)


T = TypeVar("T")


@asynccontextmanager
async def serving(daemon: Daemon) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``daemon`` in-process until the block ends; a client on its loopback port."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(15):
            await daemon.ready.wait()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.bound_port}", timeout=10) as client:
            try:
                yield client
            finally:
                daemon.request_shutdown()


async def until(check: Callable[[], Awaitable[T | None] | T | None], what: str, timeout: float = 10.0) -> T:
    """Poll ``check`` (plain, or async: a database read) until it returns something true
    (returned); fail naming ``what`` at the deadline."""
    try:
        with anyio.fail_after(timeout):
            while True:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return result  # type: ignore[return-value]
                await anyio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@asynccontextmanager
async def busy_door(h: Handle) -> AsyncIterator[Pressure]:
    """The daemon's front door (runtime.Pressure) busy, as during a webhook flood, whatever
    its probe measures meanwhile (the test's own webhooks would otherwise measure calm);
    calm again on the way out, when everyone waiting goes."""
    pressure = h.daemon.pressure
    limits = pressure.min_rate, pressure.max_cpu_share
    pressure.min_rate = pressure.max_cpu_share = -1.0
    assert pressure.busy
    try:
        yield pressure
    finally:
        pressure.min_rate, pressure.max_cpu_share = limits
        pressure._admit()  # the admitter's next tick would too: not waiting for it


@asynccontextmanager
async def running_daemon(settings: Settings, *, providers: FakeProviders | None = None, clock: Clock | None = None,
                         idle_s: float = 30.0) -> AsyncIterator[Handle]:
    providers = providers or FakeProviders()
    router = providers.router()
    http = httpx.AsyncClient(transport=httpx.MockTransport(router.async_handler))
    daemon = Daemon(settings, clock=clock, http=http, idle_s=idle_s)
    async with serving(daemon) as client:
        yield Handle(daemon, client, providers)
    await http.aclose()
    if providers.check_schema:
        assert not providers.schema_problems, ("Graph API request bodies Meta's schema rejects:\n"
                                               + "\n".join(providers.schema_problems))
