"""The HTTP surface of the foundation: health, readiness, limits, the internal API."""

from __future__ import annotations

import anyio
import httpx
import pytest

from harness import AUTH, MERCHANT, Handle, make_settings, running_daemon
from invoiceiq.store import Tx

pytestmark = pytest.mark.anyio
GOOD = {"msisdn": "0712345678", "amount_cents": 250_000, "description": "Cleaning service"}


async def count(h: Handle, sql: str) -> int:
    async def job(tx: Tx) -> int:
        return int(await tx.val(sql) or 0)
    return await h.store.read(job)


@pytest.fixture
async def daemon(database_url: str):  # type: ignore[no-untyped-def]
    async with running_daemon(make_settings(database_url)) as handle:
        yield handle


async def test_healthz_and_readyz(daemon: Handle) -> None:
    health = await daemon.client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = await daemon.client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok"}


async def test_readyz_names_the_database_when_it_is_gone(daemon: Handle) -> None:
    await daemon.store.close()
    ready = await daemon.client.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "fail" and "database" in body["checks"]
    # Liveness is not readiness: the process itself is fine.
    assert (await daemon.client.get("/healthz")).status_code == 200


async def test_api_requires_the_admin_token(daemon: Handle) -> None:
    assert (await daemon.client.post("/invoices", json=GOOD)).status_code == 401
    wrong = await daemon.client.post("/invoices", json=GOOD, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert (await daemon.client.get("/invoices", headers={"Authorization": "Basic x"})).status_code == 401
    assert await count(daemon, "SELECT COUNT(*) FROM invoices") == 0


async def test_api_disabled_without_an_admin_token(database_url: str) -> None:
    async with running_daemon(make_settings(database_url, ADMIN_TOKEN="")) as h:
        response = await h.client.post("/invoices", json=GOOD, headers=AUTH)
        assert response.status_code == 403
        assert "admin.token" in response.json()["error"]


async def test_create_invoice_returns_201_and_queues_delivery(daemon: Handle) -> None:
    response = await daemon.client.post("/invoices", json=GOOD, headers=AUTH)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == "1001" and body["msisdn"] == "254712345678" and body["status"] == "PENDING"
    assert body["amount_cents"] == 250_000 and body["pay_link"].startswith("https://pay.test/p/")
    fetched = await daemon.client.get("/invoices/1001", headers=AUTH)
    assert fetched.status_code == 200 and fetched.json()["description"] == "Cleaning service"
    # Delivered exactly like a chat invoice, and the merchant is told on WhatsApp.
    texts = await daemon.wait_for_texts(MERCHANT, 1)
    assert texts[0].startswith("Invoice #1001 sent to 254712345678.")
    listing = await daemon.client.get("/invoices?status=sent&limit=5", headers=AUTH)
    assert [i["id"] for i in listing.json()["invoices"]] == ["1001"]


@pytest.mark.parametrize(("patch", "field"), [
    ({"msisdn": "12345"}, "msisdn"),
    ({"msisdn": 712345678}, "msisdn"),
    ({"amount_cents": 250_050}, "amount_cents"),
    ({"amount_cents": 0}, "amount_cents"),
    ({"amount_cents": 2_500.0}, "amount_cents"),
    ({"amount_cents": True}, "amount_cents"),
    ({"amount_cents": 25_000_100}, "amount_cents"),
    ({"description": "ab"}, "description"),
    ({"description": "x" * 121}, "description"),
    ({"customer_name": "A"}, "customer_name"),
    ({"surprise": 1}, "surprise"),
])
async def test_validation_names_each_bad_field(daemon: Handle, patch: dict, field: str) -> None:  # type: ignore[type-arg]
    response = await daemon.client.post("/invoices", json={**GOOD, **patch}, headers=AUTH)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert list(errors) == [field] and errors[field]
    assert await count(daemon, "SELECT COUNT(*) FROM invoices") == 0


async def test_validation_reports_every_field_at_once(daemon: Handle) -> None:
    response = await daemon.client.post("/invoices", json={"amount_cents": "lots"}, headers=AUTH)
    assert response.status_code == 422
    assert set(response.json()["errors"]) == {"msisdn", "amount_cents", "description"}


async def test_malformed_json_is_a_400(daemon: Handle) -> None:
    for body in (b"{not json", b"[1,2]", b"\xff\xfe"):
        response = await daemon.client.post("/invoices", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == 400


async def test_oversized_body_is_a_413(daemon: Handle) -> None:
    big = b'{"description":"' + b"x" * 70_000 + b'"}'
    response = await daemon.client.post("/invoices", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    webhook = await daemon.client.post("/whatsapp/webhook", content=big)
    assert webhook.status_code == 413


async def test_idempotency_key_replays_the_first_response(daemon: Handle) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-77"}
    first = await daemon.client.post("/invoices", json=GOOD, headers=headers)
    again = await daemon.client.post("/invoices", json=GOOD, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers.get("Idempotent-Replayed") == "true"
    other = await daemon.client.post("/invoices", json={**GOOD, "amount_cents": 100}, headers=headers)
    assert other.status_code == 409
    assert await count(daemon, "SELECT COUNT(*) FROM invoices") == 1


async def test_concurrent_requests_with_one_key_create_one_invoice(daemon: Handle) -> None:
    headers = {**AUTH, "Idempotency-Key": "same-key"}
    responses: list[httpx.Response] = []

    async def post() -> None:
        responses.append(await daemon.client.post("/invoices", json=GOOD, headers=headers))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(post)
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count(daemon, "SELECT COUNT(*) FROM invoices") == 1


async def test_unknown_invoice_and_bad_listing_arguments(daemon: Handle) -> None:
    assert (await daemon.client.get("/invoices/9999", headers=AUTH)).status_code == 404
    bad = await daemon.client.get("/invoices?status=LOST&limit=0", headers=AUTH)
    assert bad.status_code == 422 and "status" in bad.json()["errors"]
    bad_limit = await daemon.client.get("/invoices?limit=100000", headers=AUTH)
    assert bad_limit.status_code == 422 and "limit" in bad_limit.json()["errors"]


async def test_metrics_are_exposed(daemon: Handle) -> None:
    await daemon.client.post("/invoices", json=GOOD, headers=AUTH)
    text = (await daemon.client.get("/metrics")).text
    assert "invoiceiq_invoices_created_total 1.0" in text
    assert 'invoiceiq_http_request_duration_seconds_count{method="POST",route="/invoices"} 1.0' in text


async def test_request_metrics_have_a_bounded_set_of_labels(daemon: Handle) -> None:
    """Methods and paths are the client's to choose: made-up methods count as OTHER and
    unknown paths as "unmatched", so no client can mint new series (and a route's count is
    kept per route, not per path)."""
    for i in range(5):
        await daemon.client.request(f"BREW{i}", "/invoices")
        await daemon.client.get(f"/nothing-here-{i}")
    for _ in range(2):
        await daemon.client.get("/invoices/9999", headers=AUTH)
    text = (await daemon.client.get("/metrics")).text
    counts = [line for line in text.splitlines() if line.startswith("invoiceiq_http_request_duration_seconds_count")]
    assert 'invoiceiq_http_request_duration_seconds_count{method="OTHER",route="unmatched"} 5.0' in counts
    assert 'invoiceiq_http_request_duration_seconds_count{method="GET",route="unmatched"} 5.0' in counts
    assert 'invoiceiq_http_request_duration_seconds_count{method="GET",route="/invoices/<invoice_id>"} 2.0' in counts
    assert not any("BREW" in line or "nothing-here" in line for line in counts)
