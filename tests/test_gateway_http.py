from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import anyio
import httpx
import pytest
import respx

from invoiceiq import __version__
from invoiceiq.gateways.http import (
    AuthError,
    GatewayError,
    PermanentError,
    TransientError,
    classify_transport_error,
    json_body,
    make_client,
    parse_retry_after,
    request,
)

NOW_MS = 1_764_158_400_000  # 2025-11-26T12:00:00Z


def http_date(epoch_s: int) -> str:
    return format_datetime(datetime.fromtimestamp(epoch_s, tz=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120),
        (" 7 ", 7),
        ("0", 0),
        (http_date(NOW_MS // 1000 + 30), 30),
        (http_date(NOW_MS // 1000 - 30), 0),  # a date already past: retry now
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0),
        ("-5", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("٣", None),  # a non-ASCII digit is not delay-seconds
        ("Wed, 21 Oct 2015 07:28:00", None),  # no zone: not an HTTP-date
    ],
)
def test_parse_retry_after(value: str | None, expected: int | None) -> None:
    assert parse_retry_after(value, NOW_MS) == expected


def test_taxonomy_shape_and_no_secret_in_text() -> None:
    err = TransientError("whatsapp", 130429, "Rate limit hit", http_status=400, retry_after_s=5)
    assert isinstance(err, GatewayError)
    assert (err.provider, err.code, err.reason, err.retry_after_s) == (
        "whatsapp",
        "130429",
        "Rate limit hit",
        5,
    )
    assert str(err) == "whatsapp 130429: Rate limit hit"
    assert "TransientError" in repr(err)
    assert issubclass(PermanentError, GatewayError) and issubclass(AuthError, GatewayError)
    assert not issubclass(AuthError, (TransientError, PermanentError))
    long = PermanentError("x", "1", "y" * 1000)
    assert len(long.reason) <= 200


@pytest.mark.parametrize(
    ("exc", "code", "maybe_processed"),
    [
        (httpx.ConnectTimeout("t"), "timeout", False),
        (httpx.PoolTimeout("t"), "timeout", False),
        (httpx.ConnectError("refused"), "connect", False),
        (httpx.ReadTimeout("t"), "timeout", True),
        (httpx.WriteTimeout("t"), "timeout", True),
        (httpx.ReadError("reset"), "network", True),
        (httpx.RemoteProtocolError("closed"), "network", True),
    ],
)
def test_transport_errors_are_transient(exc: Exception, code: str, maybe_processed: bool) -> None:
    err = classify_transport_error(exc, "mpesa")
    assert isinstance(err, TransientError)
    assert (err.provider, err.code, err.maybe_processed, err.retry_after_s) == (
        "mpesa",
        code,
        maybe_processed,
        None,
    )


def test_malformed_request_is_permanent() -> None:
    assert isinstance(classify_transport_error(httpx.UnsupportedProtocol("ftp")), PermanentError)


def test_transport_error_reason_does_not_quote_the_message() -> None:
    err = classify_transport_error(httpx.ConnectError("https://user:secret@host/path"))
    assert "secret" not in str(err) and "secret" not in repr(err)


@pytest.mark.anyio
async def test_request_translates_transport_errors() -> None:
    async with httpx.AsyncClient() as http:
        with respx.mock() as router:
            router.get("https://api.example/x").mock(side_effect=httpx.ConnectTimeout)
            with pytest.raises(TransientError) as info:
                await request(http, "p", "GET", "https://api.example/x")
    assert info.value.provider == "p"


def test_json_body_never_raises() -> None:
    assert json_body(httpx.Response(200, content=b"<html>")) is None
    assert json_body(httpx.Response(200)) is None
    assert json_body(httpx.Response(200, json={"a": 1})) == {"a": 1}


@pytest.mark.anyio
async def test_make_client() -> None:
    client = make_client(3.0)
    try:
        assert client.headers["User-Agent"] == f"InvoiceIQ/{__version__}"
        assert client.timeout.read == 3.0 and client.timeout.connect == 3.0
        assert client.follow_redirects is False
    finally:
        await client.aclose()
    default = make_client()
    try:
        assert default.timeout.read == 10.0 and default.timeout.connect == 5.0
    finally:
        await default.aclose()



@pytest.mark.anyio
async def test_a_provider_call_ends_before_the_shortest_outbox_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx's timeouts are per phase (pool 10 + connect 5 + write 10 + read 10 s could add up
    to 35 s); the outbox leases a row for as little as 15 s while it sends it, and a call that
    outlived the lease would let another worker send the message again. ``request`` bounds the
    whole call, and a call cut off counts as an answer lost (it may have been sent)."""
    from invoiceiq.config import _VALIDATORS, _Invalid
    from invoiceiq.gateways import http as gw

    with pytest.raises(_Invalid):  # the shortest lease config allows is 15 s
        _VALIDATORS["outbox.lease_s"](14, True)
    assert gw.TOTAL_TIMEOUT_S < 15

    async def trickle(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(10)  # every phase within its own timeout, the whole too long
        return httpx.Response(200)

    monkeypatch.setattr(gw, "TOTAL_TIMEOUT_S", 0.05)
    async with httpx.AsyncClient(transport=httpx.MockTransport(trickle)) as client:
        with anyio.fail_after(5):
            with pytest.raises(TransientError) as caught:
                await gw.request(client, "whatsapp", "POST", "https://graph.test/x")
    assert caught.value.code == "timeout" and caught.value.maybe_processed


# -- the pool's transport (gateways/transport.py) ---------------------------------------------


async def _keepalive_server(close_after_each: bool = False):  # type: ignore[no-untyped-def]
    """A tiny HTTP/1.1 server on loopback: answers 200 and keeps the connection open, or closes
    it right after each answer without saying so (as a server timing out idle clients does)."""
    import asyncio

    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
                await writer.drain()
                if close_after_each:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


@pytest.mark.anyio
async def test_the_pool_checks_idle_connections_without_asking_the_socket_everything(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request makes httpcore ask every idle connection whether the server closed it;
    through anyio that cost a getpeername() (and a dict of every attribute) per connection
    per question. Our transport asks with one poll: 20 requests over 5 kept-alive connections
    make no getpeername at all after the connections are made."""
    import socket

    from invoiceiq.gateways.transport import PoolTransport, _Backend

    server, port, connections = await _keepalive_server()
    calls = {"n": 0}
    real = socket.socket.getpeername

    def counting(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(self)

    async with server, make_client() as client:
        assert isinstance(client._transport, PoolTransport)
        assert isinstance(client._transport._pool._network_backend, _Backend)  # an httpx upgrade must not drop it
        async with anyio.create_task_group() as tg:  # 5 connections, then all idle
            for _ in range(5):
                tg.start_soon(client.post, f"http://127.0.0.1:{port}/x", )
        monkeypatch.setattr(socket.socket, "getpeername", counting)
        for _ in range(20):
            response = await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})
            assert response.status_code == 200
    assert len(connections) == 5  # kept alive and reused
    assert calls["n"] == 0


@pytest.mark.anyio
async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    """The cheaper check still answers the question: a server that closes idle connections
    without a word costs a new connection, never a failed (maybe sent) request."""
    server, port, connections = await _keepalive_server(close_after_each=True)
    async with server, make_client() as client:
        for _ in range(5):
            response = await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})
            assert response.status_code == 200
            await anyio.sleep(0.02)  # let the server's close arrive before the next request
    assert len(connections) == 5


@pytest.mark.anyio
async def test_the_pools_bookkeeping_is_linear_in_its_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpcore 1.0 reviews its connections each time a request joins or leaves, and asked
    every idle connection for a list as long as the pool: quadratic in the connections kept
    alive (3% of the daemon in the end-to-end bench). Ours makes the same decisions in one
    pass: with 20 idle connections, 10 requests cost a few ``is_idle`` calls per connection
    per request, not 20 x 20."""
    from httpcore._async.http11 import AsyncHTTP11Connection

    from invoiceiq.gateways.transport import _Pool

    server, port, connections = await _keepalive_server()
    calls = {"n": 0}
    real = AsyncHTTP11Connection.is_idle

    def counting(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(self)

    async with server, make_client() as client:
        assert isinstance(client._transport._pool, _Pool)

        async def held() -> None:
            await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})

        async with anyio.create_task_group() as tg:  # 20 connections at once, then all idle
            for _ in range(20):
                tg.start_soon(held)
        assert len(connections) == 20
        monkeypatch.setattr(AsyncHTTP11Connection, "is_idle", counting)
        for _ in range(10):
            assert (await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})).status_code == 200
    assert len(connections) == 20  # all reused: same decisions
    assert calls["n"] <= 10 * 20 * 4, calls  # httpcore's own pool: 8,600


@pytest.mark.anyio
async def test_requests_beyond_the_pools_limit_wait_for_a_connection_and_all_succeed() -> None:
    """The queued path of the pool's bookkeeping: 12 requests at once through 3 connections."""
    from invoiceiq.gateways.transport import PoolTransport

    server, port, connections = await _keepalive_server()
    limits = httpx.Limits(max_connections=3, max_keepalive_connections=3)
    async with server, httpx.AsyncClient(transport=PoolTransport(limits)) as client:
        results: list[int] = []

        async def one() -> None:
            results.append((await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})).status_code)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(one)
    assert results == [200] * 12
    assert len(connections) == 3


def test_environment_proxies_keep_httpxs_own_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    from invoiceiq.gateways.transport import pool_transport

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert pool_transport(httpx.Limits()) is None
