"""The sandbox's own machinery: fault injection, latency, webhook retries and ordering, reset,
the state long-poll, the console, configuration, the standalone server and import isolation."""

from __future__ import annotations

import ast
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from invoiceiq.sandbox import SimConfig, Simulator
from invoiceiq.sandbox.__main__ import prefixed
from invoiceiq.sandbox.daraja import stk_password
from invoiceiq.sandbox.testing import (
    SMS_INBOUND, SMS_STATUS, STK_CALLBACK, WA_HOOK, Harness, harness, recorder_config, running,
)
from invoiceiq.sandbox.wire import nairobi_stamp

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
SANDBOX = ROOT / "invoiceiq" / "sandbox"
CUSTOMER = "254712345678"
GRAPH = "/graph/v25.0/106540352242922/messages"
TOKEN = {"Authorization": "Bearer sandbox-wa-token"}
TEXT = {"messaging_product": "whatsapp", "to": CUSTOMER, "type": "text", "text": {"body": "hello"}}


async def arm(h: Harness, **body: Any) -> httpx.Response:
    return await h.api.post("/api/faults", json=body)


async def wa_send(h: Harness) -> httpx.Response:
    return await h.api.post(GRAPH, json=TEXT, headers=TOKEN)


async def oauth(h: Harness) -> httpx.Response:
    return await h.api.get(
        "/daraja/oauth/v1/generate?grant_type=client_credentials",
        auth=("sandbox-consumer-key", "sandbox-consumer-secret"),
    )


# -- faults ---------------------------------------------------------------------------------------


async def test_whatsapp_faults_speak_graph() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        assert (await arm(h, service="whatsapp", mode="http500", count=1)).status_code == 200
        r = await wa_send(h)
        assert r.status_code == 500 and r.json()["error"]["code"] == 131000
        assert (await wa_send(h)).status_code == 200  # count=1 is spent

        await arm(h, service="whatsapp", mode="http429", count=1, retry_after_s=7)
        r = await wa_send(h)
        assert r.status_code == 429 and r.headers["retry-after"] == "7" and r.json()["error"]["code"] == 4

        await arm(h, service="whatsapp", mode="throttle", count=1)
        r = await wa_send(h)
        assert r.status_code == 400 and r.json()["error"]["code"] == 130429

        await arm(h, service="whatsapp", mode="expired_token", count=1)
        r = await wa_send(h)
        assert r.status_code == 401 and (r.json()["error"]["code"], r.json()["error"]["error_subcode"]) == (190, 463)

        await arm(h, service="whatsapp", mode="down")
        assert (await wa_send(h)).status_code == 503
        assert (await wa_send(h)).status_code == 503  # until cleared
        assert (await h.api.get("/api/state")).json()["sandbox"]["faults"][0]["mode"] == "down"
        await arm(h, service="whatsapp", mode="none")
        assert (await wa_send(h)).status_code == 200
        # Faulted calls are journaled with what was answered; only the 200s count as sent.
        assert [c.status for c in h.sim.world.calls("whatsapp")] == [500, 200, 429, 400, 401, 503, 503, 200]
        assert len(h.sim.world.sent_whatsapp(CUSTOMER)) == 2


async def test_daraja_and_sms_faults_speak_their_own_formats() -> None:
    async with harness() as h:
        await arm(h, service="daraja_oauth", mode="http500", count=1)
        r = await oauth(h)
        assert r.status_code == 500 and r.json()["errorCode"] == "500.003.1001"
        bearer = (await oauth(h)).json()["access_token"]
        push = {"Authorization": f"Bearer {bearer}"}
        await arm(h, service="daraja_push", mode="expired_token", count=1)
        r = await h.api.post("/daraja/mpesa/stkpush/v1/processrequest", json={}, headers=push)
        assert (r.status_code, r.json()["errorCode"]) == (404, "404.001.03")
        await arm(h, service="daraja_push", mode="spike_arrest", count=1)
        r = await h.api.post("/daraja/mpesa/stkpush/v1/processrequest", json={}, headers=push)
        assert (r.status_code, r.json()["errorCode"], r.json()["errorMessage"]) == (
            500,
            "500.003.02",
            "Error Occurred: Spike Arrest Violation",
        )
        await arm(h, service="daraja_query", mode="http429", count=1, retry_after_s=3)
        r = await h.api.post("/daraja/mpesa/stkpushquery/v1/query", json={}, headers=push)
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        await arm(h, service="sms", mode="http429", count=1)
        r = await h.api.post("/at/version1/messaging", data={"username": "sandbox"}, headers={"apiKey": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        await arm(h, service="sms", mode="expired_token", count=1)
        r = await h.api.post("/at/version1/messaging", data={"username": "sandbox"}, headers={"apiKey": "x"})
        assert (r.status_code, r.text) == (401, "The supplied authentication is invalid")


async def test_timeout_holds_the_request_and_does_nothing() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        await arm(h, service="whatsapp", mode="timeout", count=1, hold_s=0.3)
        started = time.monotonic()
        r = await wa_send(h)
        assert time.monotonic() - started >= 0.3
        assert r.status_code == 504
        assert h.sim.world.sent_whatsapp() == []
        # A real client gives up first.
        await arm(h, service="whatsapp", mode="timeout", count=1, hold_s=5)
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await wa_send(h)


async def test_lost_response_does_the_work_but_loses_the_answer() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        await arm(h, service="whatsapp", mode="lost_response", count=1, hold_s=0.05)
        r = await wa_send(h)
        assert r.status_code == 504
        assert len(h.sim.world.sent_whatsapp(CUSTOMER)) == 1  # the message went out anyway
        assert h.sim.world.phone(CUSTOMER).thread[-1].text == "hello"


@pytest.mark.parametrize(
    "body",
    [
        {"service": "fax", "mode": "down"},
        {"service": "sms", "mode": "spike_arrest"},
        {"service": "whatsapp", "mode": "explode"},
        {"service": "whatsapp", "mode": "down", "count": 0},
        {"service": "whatsapp"},
        {"service": "whatsapp", "mode": "timeout", "hold_s": "long"},
    ],
)
async def test_bad_fault_requests_are_refused(body: dict[str, Any]) -> None:
    async with harness() as h:
        r = await arm(h, **body)
        assert r.status_code == 400 and "error" in r.json()
        assert h.sim.faults.active() == []


async def test_latency_applies_to_provider_apis_only() -> None:
    async with harness() as h:
        r = await h.api.post("/api/latency", json={"ms": 200})
        assert r.json() == {"latency_ms": 200}
        started = time.monotonic()
        await oauth(h)
        assert time.monotonic() - started >= 0.2
        started = time.monotonic()
        await h.api.get("/api/state")
        assert time.monotonic() - started < 0.2
        assert (await h.api.post("/api/latency", json={"ms": -1})).status_code == 400


# -- deliveries ------------------------------------------------------------------------------------


async def test_webhooks_are_retried_until_the_receiver_answers_2xx() -> None:
    async with harness() as h:
        h.recorder.script(WA_HOOK, 503, 500)
        wamid = h.sim.phone_whatsapp(CUSTOMER, "hi")
        hooks = await h.hooks(WA_HOOK, 3)
        assert len({hook.body for hook in hooks}) == 1  # the same signed body each time
        assert all(hook.signature_ok("sandbox-wa-app-secret") for hook in hooks)
        (delivery,) = h.sim.deliveries("wa_webhook")
        await h.wait_for(lambda: delivery.state == "delivered")
        assert [a.status for a in delivery.attempts] == [503, 500, 200]
        assert wamid.encode() in delivery.body
        kinds = [e.kind for e in h.sim.world.events]
        assert kinds.count("delivery.retry") == 2


async def test_retries_are_bounded_and_the_give_up_is_logged() -> None:
    async with harness(recorder_config(delivery_max_attempts=3)) as h:
        h.recorder.script(WA_HOOK, 503, 503, 503, 503)
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        (delivery,) = h.sim.deliveries("wa_webhook")
        await h.wait_for(lambda: delivery.state == "failed")
        assert [a.status for a in delivery.attempts] == [503, 503, 503]
        assert any(e.kind == "delivery.failed" for e in h.sim.world.events)
        assert len(h.recorder.on(WA_HOOK)) == 3


async def test_connection_errors_are_retried_and_recorded() -> None:
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"ResultCode": 0, "ResultDesc": "Accepted"})

    config = recorder_config()
    async with httpx.AsyncClient(transport=httpx.MockTransport(flaky)) as http:
        sim = Simulator(config, http=http)
        async with running(sim):
            sim.phone_sms(CUSTOMER, "STOP")
            (delivery,) = sim.deliveries("sms_inbound")
            await sim.wait_for(lambda: delivery.state == "delivered")
            assert delivery.attempts[0].status is None and "ConnectError" in (delivery.attempts[0].error or "")
            assert delivery.attempts[1].status == 200


async def test_statuses_of_one_phone_stay_in_order_across_retries() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        await h.hooks(WA_HOOK, 1)
        h.recorder.script(WA_HOOK, 503, 503)  # the "sent" status fails twice
        wamid = (await wa_send(h)).json()["messages"][0]["id"]
        await h.sim.settle()
        statuses = [
            s["status"]
            for r in h.recorder.on(WA_HOOK)
            for s in r.json()["entry"][0]["changes"][0]["value"].get("statuses", [])
            if s["id"] == wamid
        ]
        assert statuses == ["sent", "sent", "sent", "delivered"]


async def test_statuses_due_later_never_hold_up_what_the_phone_writes() -> None:
    """Meta orders neither statuses among themselves nor against messages (providers/whatsapp.md
    2.5): the statuses of our send, due in a minute, do not keep the customer's reply (a tap,
    in the flows) waiting behind them; each message's own statuses keep their order. Africa's
    Talking the same: a delivery report due later does not hold up the phone's next text."""
    async with harness(recorder_config(status_delay_ms=60_000)) as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        await h.hooks(WA_HOOK, 1)
        assert (await wa_send(h)).status_code == 200  # "sent" due in 60 s, "delivered" in 120 s
        h.sim.phone_whatsapp(CUSTOMER, "and one more thing")
        hooks = await h.hooks(WA_HOOK, 2)
        value = hooks[1].json()["entry"][0]["changes"][0]["value"]
        assert value["messages"][0]["text"] == {"body": "and one more thing"} and "statuses" not in value

        sms = await h.api.post("/at/version1/messaging", data={"username": "sandbox", "to": "+" + CUSTOMER,
                               "message": "Invoice #42"}, headers={"apiKey": "sandbox-at-api-key",
                                                                   "Accept": "application/json"})
        assert sms.status_code == 201  # its delivery report is due in 60 s
        h.sim.phone_sms(CUSTOMER, "PAID")
        (inbound,) = await h.hooks(SMS_INBOUND, 1)
        assert inbound.form()["text"] == "PAID" and not h.recorder.on(SMS_STATUS)


async def stk_push(h: Harness) -> httpx.Response:
    """A valid STK Push for CUSTOMER, account INV1, KES 10."""
    bearer = (await oauth(h)).json()["access_token"]
    stamp = nairobi_stamp(h.sim.now())
    body = {
        "BusinessShortCode": "174379",
        "Password": stk_password("174379", h.sim.config.daraja_passkey, stamp),
        "Timestamp": stamp,
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 10,
        "PartyA": CUSTOMER,
        "PartyB": "174379",
        "PhoneNumber": CUSTOMER,
        "CallBackURL": "http://daemon.test" + STK_CALLBACK,
        "AccountReference": "INV1",
        "TransactionDesc": "x",
    }
    return await h.api.post(
        "/daraja/mpesa/stkpush/v1/processrequest", json=body, headers={"Authorization": f"Bearer {bearer}"}
    )


async def test_stk_callback_is_retried_on_503() -> None:
    async with harness() as h:
        h.recorder.script(STK_CALLBACK, 503)
        r = await stk_push(h)
        h.sim.stk_answer(r.json()["CheckoutRequestID"], "cancel")
        first, second = await h.hooks(STK_CALLBACK, 2)
        assert first.body == second.body
        assert [a.status for a in h.sim.deliveries("stk_callback")[0].attempts] == [503, 200]


async def test_nothing_is_posted_where_no_url_is_configured() -> None:
    async with harness(recorder_config(whatsapp_webhook_url="", sms_inbound_url="")) as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        h.sim.phone_sms(CUSTOMER, "hi")
        assert h.sim.deliveries() == []
        assert h.sim.world.phone(CUSTOMER).thread[0].text == "hi"


# -- state, reset, control API ------------------------------------------------------------------------


async def test_state_long_poll_returns_when_something_happens() -> None:
    async with harness() as h:
        seq = (await h.api.get("/api/state")).json()["seq"]
        result: dict[str, Any] = {}

        async def poll() -> None:
            r = await h.api.get(f"/api/state?since={seq}&wait=10&phones={CUSTOMER}")
            result.update(r.json())

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await anyio.wait_all_tasks_blocked()
            h.sim.phone_whatsapp(CUSTOMER, "ping")
        assert time.monotonic() - started < 5
        assert [e["kind"] for e in result["events"]] == ["wa.in"]
        assert [p["msisdn"] for p in result["phones"]] == [CUSTOMER]
        assert result["phones"][0]["thread"][0]["text"] == "ping"
        r = await h.api.get(f"/api/state?since={result['seq']}&wait=0.1")
        assert r.json()["events"] == []


async def test_events_name_the_message_and_the_checkout_they_are_about() -> None:
    """A load driver (bench/e2e.py) taps the template and pays the prompt from the event log
    alone: ``wa.out`` carries the message's wamid, ``stk.prompt`` the CheckoutRequestID."""
    async with harness() as h:
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        wamid = (await wa_send(h)).json()["messages"][0]["id"]
        checkout = (await stk_push(h)).json()["CheckoutRequestID"]
        events = (await h.api.get("/api/state")).json()["events"]
        refs = [(e["kind"], e["msisdn"], e["ref"]) for e in events if e["kind"] in ("wa.in", "wa.out", "stk.prompt")]
        assert refs == [("wa.in", CUSTOMER, None), ("wa.out", CUSTOMER, wamid), ("stk.prompt", CUSTOMER, checkout)]
        assert events[-1]["summary"].endswith(", account INV1")  # the driver's invoice number


async def test_events_never_carry_secrets() -> None:
    async with harness() as h:
        bearer = (await oauth(h)).json()["access_token"]
        h.sim.phone_whatsapp(CUSTOMER, "hi")
        await h.api.post("/api/faults", json={"service": "sms", "mode": "down", "count": 1})
        text = json.dumps((await h.api.get("/api/state")).json()) + json.dumps((await h.api.get("/api/journal")).json())
        config = h.sim.config
        for secret in (
            bearer,
            config.wa_token,
            config.wa_app_secret,
            config.daraja_consumer_secret,
            config.daraja_passkey,
            config.at_api_key,
        ):
            assert secret not in text


async def test_reset_forgets_the_world() -> None:
    async with harness() as h:
        h.sim.phone_whatsapp("254799000111", "hi")
        h.sim.set_fault("whatsapp", "down")
        r = await h.api.post("/api/reset", json={})
        assert r.json() == {"ok": True}
        state = (await h.api.get("/api/state")).json()
        assert state["msisdns"] == ["254711000111", CUSTOMER]
        assert [e["kind"] for e in state["events"]] == ["sandbox.reset"]
        assert state["sandbox"]["faults"] == [] and h.sim.world.journal == []
        assert (await oauth(h)).status_code == 200


async def test_settings_and_journal_over_http() -> None:
    async with harness() as h:
        r = await h.api.post(
            f"/api/phones/{CUSTOMER}/settings", json={"on_whatsapp": False, "blacklisted": True, "name": "Wanjiku"}
        )
        assert (r.json()["on_whatsapp"], r.json()["blacklisted"], r.json()["name"]) == (False, True, "Wanjiku")
        assert (await h.api.post(f"/api/phones/{CUSTOMER}/settings", json={"on_whatsapp": "no"})).status_code == 400
        assert (await h.api.post(f"/api/phones/{CUSTOMER}/whatsapp", json=["text"])).status_code == 400
        await oauth(h)
        journal = (await h.api.get("/api/journal?service=daraja_oauth")).json()
        assert [(c["service"], c["status"]) for c in journal] == [("daraja_oauth", 200)]
        assert (await h.api.get("/api/deliveries")).status_code == 200


# -- console ----------------------------------------------------------------------------------------

CONSOLE_IDS = [
    "banner",
    "merchant-chat",
    "merchant-input",
    "merchant-send",
    "customer-number",
    "customer-not-on-whatsapp",
    "customer-chat",
    "customer-input",
    "customer-send",
    "customer-sms",
    "customer-sms-input",
    "customer-sms-send",
    "stk-dialog",
    "stk-amount",
    "stk-account",
    "stk-merchant",
    "stk-pin",
    "stk-pay",
    "stk-cancel",
    "stk-wrong-pin",
    "stk-insufficient",
    "stk-ignore",
    "event-log",
]


async def test_console_is_served_with_its_stable_ids_and_no_external_assets() -> None:
    async with harness() as h:
        r = await h.api.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        for element_id in CONSOLE_IDS:
            assert f'id="{element_id}"' in html, element_id
        assert "SANDBOX" in html and "no real money" in html
        js = (await h.api.get("/static/console.js")).text
        css = (await h.api.get("/static/console.css")).text
        assert "dataset.buttonTitle" in js and "api/phones/" in js
        for text in (html, js, css):  # no CDN, no absolute URL of any kind
            assert "http://" not in text and "https://" not in text
        # Relative URLs only, so any mount prefix works.
        assert 'fetch("/' not in js and "'/api" not in js and '"/api' not in js
        assert 'src="/' not in html and 'href="/' not in html


def _stripping_dispatcher(app: Any, prefix: str) -> Any:
    """The other convention some dispatchers use: strip the prefix from path."""

    async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "path": scope["path"][len(prefix) :], "root_path": prefix}
        await app(scope, receive, send)

    return dispatch


@pytest.mark.parametrize("mount", [prefixed, _stripping_dispatcher])
async def test_console_and_api_work_under_a_mount_prefix(mount: Any) -> None:
    sim = Simulator(SimConfig())
    app = mount(sim.asgi_app, "/sandbox")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://host") as client:
        for path in ("/sandbox", "/sandbox/"):
            r = await client.get(path)
            assert r.status_code == 200 and 'id="stk-pay"' in r.text, path
        assert (await client.get("/sandbox/static/console.js")).status_code == 200
        assert (await client.get("/sandbox/api/state")).json()["sandbox"]["business_number"] == "254700100200"
        r = await client.post("/sandbox/graph/v25.0/106540352242922/messages", json={}, headers=TOKEN)
        assert r.json()["error"]["code"] == 100  # reached the Graph simulator, not a 404
        if mount is prefixed:
            assert (await client.get("/elsewhere")).status_code == 404


# -- configuration and isolation -------------------------------------------------------------------


def test_config_from_json(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    path.write_text(
        json.dumps(
            {"wa_token": "t", "latency_ms": 5, "prompt_timeout_s": 30, "wa_template_buttons": ["quick_reply:Pay"]}
        )
    )
    config = SimConfig.load(path)
    assert (config.wa_token, config.latency_ms, config.prompt_timeout_s, config.wa_template_buttons) == (
        "t",
        5,
        30.0,
        ("quick_reply:Pay",),
    )
    for bad in ({"nope": 1}, {"latency_ms": "5"}, {"wa_template_buttons": ["call:Ring"]}, {"delivery_max_attempts": 0}):
        with pytest.raises(ValueError):
            SimConfig.from_mapping(bad)


def test_sandbox_imports_nothing_else_from_invoiceiq() -> None:
    for module in SANDBOX.glob("*.py"):
        tree = ast.parse(module.read_text(), str(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("invoiceiq"), f"{module.name} imports {node.module}"
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                pytest.fail(f"{module.name} reaches outside the sandbox package")
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("invoiceiq") for a in node.names), module.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_standalone_server_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"merchant_msisdn": "254711222333"}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "invoiceiq.sandbox",
            "--bind",
            f"127.0.0.1:{port}",
            "--config",
            str(config),
            "--latency-ms",
            "1",
            "--prefix",
            "/sandbox",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 15
        state = None
        while time.monotonic() < deadline and state is None:
            try:
                state = httpx.get(f"http://127.0.0.1:{port}/sandbox/api/state", timeout=1).json()
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.05)
        assert state is not None and state["sandbox"]["merchant_msisdn"] == "254711222333"
        assert state["sandbox"]["latency_ms"] == 1
        r = httpx.get(
            f"http://127.0.0.1:{port}/sandbox/daraja/oauth/v1/generate?grant_type=client_credentials",
            auth=("sandbox-consumer-key", "sandbox-consumer-secret"),
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


# -- the state long poll stays cheap as the world grows -----------------------------------------


class _ForwardWalkForbidden(collections.deque):  # type: ignore[type-arg]
    """An event log that refuses to be walked from its start (it may be read from its end)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("events_since walked the whole event log")


async def test_events_since_reads_only_the_new_events_from_the_end_of_the_log() -> None:
    """A console or load driver long-polls /api/state after every change: walking the whole
    event log each time made a 1,000-flow run quadratic (6% of the simulators' CPU). The log
    holds consecutive numbers, so the new events are its newest entries; also right after a
    reset (numbers keep counting) and once the log has dropped its oldest entries."""
    from invoiceiq.sandbox import world as world_module

    async with harness() as h:
        world = h.sim.world
        for i in range(30):
            world.log("test.event", f"event {i}")
        seqs = [e.seq for e in world.events]
        assert [e.seq for e in world.events_since(seqs[-4])] == seqs[-3:]
        assert [e.seq for e in world.events_since(0)] == seqs
        assert world.events_since(seqs[-1]) == [] and world.events_since(seqs[-1] + 7) == []
        log = world.events
        world.events = _ForwardWalkForbidden(log, maxlen=log.maxlen)
        assert [e.summary for e in world.events_since(seqs[-2])] == ["event 29"]
        world.events = log
        world.clear()
        (reset,) = world.events_since(seqs[-1])
        assert reset.kind == "sandbox.reset" and reset.seq == seqs[-1] + 1
        for i in range(world_module.EVENT_LOG_LIMIT + 5):
            world.log("test.event", f"again {i}")
        newest = world.events[-1].seq
        assert len(world.events_since(0)) == world_module.EVENT_LOG_LIMIT  # what the log still holds
        assert [e.seq for e in world.events_since(newest - 2)] == [newest - 1, newest]


async def test_state_can_leave_out_the_list_of_every_number() -> None:
    """``numbers=0``: a driver polling for events does not need every known number again with
    each change; the phones asked for still come, the merchant and default customer first."""
    async with harness() as h:
        for n in ("254799000333", "254799000222"):
            h.sim.phone_whatsapp(n, "hi")
        full = (await h.api.get("/api/state")).json()
        assert full["msisdns"] == ["254711000111", CUSTOMER, "254799000333", "254799000222"]
        lean = (await h.api.get("/api/state", params={"numbers": "0", "phones": "254799000222,254711000111,0"})).json()
        assert lean["msisdns"] == []
        assert [p["msisdn"] for p in lean["phones"]] == ["254711000111", "254799000222"]
        assert lean["events"] == full["events"]
        asked = (await h.api.get("/api/state", params={"phones": "254799000222,254799000333"})).json()
        assert [p["msisdn"] for p in asked["phones"]] == ["254799000222", "254799000333"]
        assert asked["msisdns"] == full["msisdns"]
