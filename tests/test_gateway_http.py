from __future__ import annotations

from collections.abc import Callable

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


async def _keepalive_server(close_after_each: bool = False, closed: list[int] | None = None,  # type: ignore[no-untyped-def]
                            delay_s: float = 0.0):
    """A tiny HTTP/1.1 server on loopback: answers 200 (after ``delay_s``) and keeps the
    connection open, or closes it right after each answer without saying so (as a server
    timing out idle clients does)."""
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
                if delay_s:
                    await asyncio.sleep(delay_s)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
                await writer.drain()
                if close_after_each:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if closed is not None:
                closed.append(1)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], connections


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> dict[str, int]:
    """From now on, count the calls of ``owner.name`` (a function, or a method of a class):
    the returned dict's ``"n"``."""
    calls = {"n": 0}
    real = getattr(owner, name)

    def counting(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


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
    async with server, make_client() as client:
        assert isinstance(client._transport, PoolTransport)
        assert isinstance(client._transport._pool._network_backend, _Backend)  # an httpx upgrade must not drop it
        async with anyio.create_task_group() as tg:  # 5 connections, then all idle
            for _ in range(5):
                tg.start_soon(client.post, f"http://127.0.0.1:{port}/x", )
        calls = _count_calls(monkeypatch, socket.socket, "getpeername")
        for _ in range(20):
            response = await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})
            assert response.status_code == 200
    assert len(connections) == 5  # kept alive and reused
    assert calls["n"] == 0


@pytest.mark.anyio
async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    """The cheaper check still answers the question: a server that closes idle connections
    without a word costs a new connection, never a failed (maybe sent) request."""
    closed: list[int] = []
    server, port, connections = await _keepalive_server(close_after_each=True, closed=closed)
    async with server, make_client() as client:
        for i in range(5):
            response = await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})
            assert response.status_code == 200
            await _until(lambda: len(closed) == i + 1)  # the server's close arrived first
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
    async with server, make_client() as client:
        assert isinstance(client._transport._pool, _Pool)

        async def held() -> None:
            await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})

        async with anyio.create_task_group() as tg:  # 20 connections at once, then all idle
            for _ in range(20):
                tg.start_soon(held)
        assert len(connections) == 20
        calls = _count_calls(monkeypatch, AsyncHTTP11Connection, "is_idle")
        for _ in range(10):
            assert (await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})).status_code == 200
    assert len(connections) == 20  # all reused: same decisions
    assert calls["n"] <= 10 * 20 * 4, calls  # httpcore's own pool: 8,600


async def _idle_pool(client: httpx.AsyncClient, port: int, n: int) -> None:
    """``n`` connections made at once, then all idle in the pool."""
    async def one() -> None:
        assert (await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})).status_code == 200

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)


@pytest.mark.anyio
async def test_between_full_reviews_the_pool_polls_only_the_connection_it_uses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """httpcore polls every idle socket twice per request (4% of the daemon in the end-to-end
    bench). Ours polls the one it is about to use: 10 requests over 20 idle connections cost
    at most 2 polls each, not 20 x 2."""
    from invoiceiq.gateways import transport

    server, port, connections = await _keepalive_server()
    monkeypatch.setattr(transport._Pool, "FULL_REVIEW_EVERY_S", 3600.0)
    async with server, make_client() as client:
        await _idle_pool(client, port, 20)
        polls = _count_calls(monkeypatch, transport, "is_socket_readable")
        for _ in range(10):
            assert (await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})).status_code == 200
    assert len(connections) == 20  # reused
    assert 10 <= polls["n"] <= 20, polls  # each used connection was asked; httpcore's pool: ~400


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.002)


@pytest.mark.anyio
@pytest.mark.parametrize("full_review_every_s", [3600.0, 0.0])
async def test_connections_the_server_dropped_are_never_used(
        monkeypatch: pytest.MonkeyPatch, full_review_every_s: float) -> None:
    """20 idle connections, all closed by the server without a word. Every request still
    succeeds on a fresh connection, whether a full review finds the dropped ones (every
    review, 0 s) or the pool asks each one as it comes to use it (never a full review): none
    is reused and none is left behind."""
    from invoiceiq.gateways import transport

    closed: list[int] = []
    server, port, connections = await _keepalive_server(close_after_each=True, closed=closed)
    monkeypatch.setattr(transport._Pool, "FULL_REVIEW_EVERY_S", full_review_every_s)
    async with server, make_client() as client:
        await _idle_pool(client, port, 20)
        for i in range(5):
            await _until(lambda: len(closed) == 20 + i)  # the server's closes have arrived
            assert (await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})).status_code == 200
        left = len(client._transport._pool.connections)
    assert len(connections) == 25  # 5 new connections, none of the dropped reused
    assert left <= 1, left


@pytest.mark.anyio
async def test_a_connection_is_handed_to_one_request_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpcore hands an idle connection to every request that asks before the first of them
    starts on it; the others fail with ConnectionNotAvailable and go round again, each with a
    review of the whole pool (with 48 sends in flight: 16 tries per request, 2.5 times the
    CPU per request). Ours hands each connection out once: 40 senders, 5 requests each,
    no request goes round again, and two reviews per request (one in, one out)."""
    from httpcore._async.connection_pool import AsyncPoolRequest

    from invoiceiq.gateways.transport import _Pool

    server, port, connections = await _keepalive_server()
    retries = _count_calls(monkeypatch, AsyncPoolRequest, "clear_connection")
    reviews = _count_calls(monkeypatch, _Pool, "_assign_requests_to_connections")
    async with server, make_client() as client:

        async def sender() -> None:
            for _ in range(5):
                assert (await client.post(f"http://127.0.0.1:{port}/x", json={"n": 1})).status_code == 200

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(sender)
    assert retries["n"] == 0, retries
    assert reviews["n"] == 2 * 200, reviews
    assert len(connections) <= 40


@pytest.mark.anyio
async def test_requests_given_up_while_queued_or_on_the_wire_leave_nothing_taken() -> None:
    """The pool hands a connection to one request at a time: a request cancelled while it
    waits for one, or while its connection is handed to it, or while it is on the wire (an
    outbox lease ending, a shutdown) must give its place back. 2 connections, 12 requests of
    which every other is given up after 10 ms: the rest all succeed, then the pool is empty
    of requests and serves again at once on the same two connections."""
    from invoiceiq.gateways.transport import PoolTransport

    server, port, connections = await _keepalive_server(delay_s=0.1)
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    async with server, httpx.AsyncClient(transport=PoolTransport(limits)) as client:
        done: list[int] = []
        given_up: list[int] = []

        async def one(i: int) -> None:
            with anyio.move_on_after(0.01 if i % 2 else 10) as scope:
                done.append((await client.post(f"http://127.0.0.1:{port}/x", json={"n": i})).status_code)
            if scope.cancelled_caught:
                given_up.append(i)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(one, i)
        assert done == [200] * (12 - len(given_up)) and len(given_up) == 6, (done, given_up)
        pool = client._transport._pool
        assert pool._requests == []
        with anyio.fail_after(5):
            for _ in range(4):
                assert (await client.post(f"http://127.0.0.1:{port}/x", json={"n": 0})).status_code == 200
    assert len(connections) <= 2 + 6  # a request cut off on the wire costs its connection, no more


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
