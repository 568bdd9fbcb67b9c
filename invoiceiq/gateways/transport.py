"""An httpx transport whose connection pool checks its idle connections cheaply, keeps its
books in one pass and hands each connection to one request at a time (``_Pool``).

httpcore asks every idle connection "has the server closed you?" each time a request joins
or leaves the pool (``has_expired`` -> ``get_extra_info("is_readable")``). Through anyio,
each question first builds a dict of all the socket's attributes, with a ``getpeername()``
system call, and only then polls the socket. With the outbox's sends in flight and its
connections kept alive, that was a third of the outbox's CPU in the end-to-end bench
(py-spy: ``TransportSocket.getpeername`` alone 14%). This backend keeps the raw socket from
the moment the connection is made and answers with the poll alone: same httpx, same
httpcore pool, same answers, a fraction of the work.

httpcore's anyio backend is internal to it; ``httpx<0.29`` (and with it httpcore 1.0) is
pinned in pyproject.toml, and tests/test_gateway_http.py fails if the pool stops using
this backend.
"""

from __future__ import annotations

import socket
import ssl
import time
import typing
import urllib.request

import anyio.abc
import httpcore
import httpx
from httpcore._backends.anyio import AnyIOBackend, AnyIOStream
from httpcore._utils import is_socket_readable


class _Stream(AnyIOStream):
    """anyio's stream, with its raw socket looked up once."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        super().__init__(stream)
        self._sock: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return is_socket_readable(self._sock)
        return super().get_extra_info(info)

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = await super().start_tls(ssl_context, server_hostname, timeout)
        assert isinstance(tls, AnyIOStream)
        return _Stream(tls._stream)


class _Backend(AnyIOBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable[typing.Any] | None = None) -> httpcore.AsyncNetworkStream:
        stream = await super().connect_tcp(host, port, timeout, local_address, socket_options)
        assert isinstance(stream, AnyIOStream)
        return _Stream(stream._stream)


class _Pool(httpcore.AsyncConnectionPool):
    """httpcore's pool with its bookkeeping made linear in the number of connections, and the
    question "has the server closed you?" asked of the connection about to be used.

    Each time a request joins or leaves, the pool reviews its connections. httpcore 1.0 asks,
    for every idle connection, for a list as long as the pool (``len([c.is_idle() for c in
    connections])``, which is just the pool's size), and builds two full lists of candidates
    for every queued request where it uses the first: with the outbox's 50 kept-alive
    connections that was 2,500 calls per review, two reviews per send (py-spy, end-to-end
    bench: 3% of the daemon). The same decisions, in the same order, with one pass.

    It also polls every idle socket in every review (``has_expired``): 50 polls per review,
    two reviews per send, about 4% of the daemon in the end-to-end bench once the rest was
    linear. What the poll protects is the request about to be written: it must not go out on
    a connection the server has closed (the request would fail after it may have been sent).
    So the connection chosen for a request is checked right then, exactly as before, and the
    others in a full review at most once every ``FULL_REVIEW_EVERY_S`` (closing the ones the
    server dropped or that idled past the keep-alive expiry, as httpcore does, a moment later).
    """

    FULL_REVIEW_EVERY_S = 1.0

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_full_review = 0.0

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        connections = self._connections
        now = time.monotonic()
        full = now >= self._next_full_review
        if full:
            self._next_full_review = now + self.FULL_REVIEW_EVERY_S
        # Closed, expired, or idle beyond the keep-alive limit (httpcore compares the pool's
        # whole size with that limit, and so do we: same connections closed). Only an idle
        # HTTP/1.1 connection can expire (a busy one has no expiry time and is not polled),
        # and between full reviews it is asked when it comes to be used.
        for connection in list(connections):
            if connection.is_closed():
                connections.remove(connection)
                continue
            idle = connection.is_idle()
            if idle and full and connection.has_expired():
                connections.remove(connection)
                closing.append(connection)
            elif idle and len(connections) > self._max_keepalive_connections:
                connections.remove(connection)
                closing.append(connection)

        # A connection handed to a request stays idle until that request's task runs and
        # starts it. httpcore hands the same idle connection to every request that asks
        # meanwhile: all but one then fail with ConnectionNotAvailable and go round again,
        # each with a review of its own (with 48 sends in flight, 16 tries per request).
        # One request per connection at a time (HTTP/1.1): skip the ones already handed out.
        queued = [r for r in self._requests if r.is_queued()]
        taken = {r.connection for r in self._requests if r.connection is not None}
        for pool_request in queued:
            origin = pool_request.request.url.origin
            available = self._first_available(origin, checked=full, closing=closing, taken=taken)
            if available is not None:
                pool_request.assign_to_connection(available)
                taken.add(available)
            elif len(connections) < self._max_connections:
                connection = self.create_connection(origin)
                connections.append(connection)
                pool_request.assign_to_connection(connection)
            elif (idle := next((c for c in connections if c not in taken and c.is_idle()), None)) is not None:
                connections.remove(idle)
                closing.append(idle)
                connection = self.create_connection(origin)
                connections.append(connection)
                pool_request.assign_to_connection(connection)
        return closing

    def _first_available(self, origin: httpcore.Origin, *, checked: bool,
                         closing: list[httpcore.AsyncConnectionInterface],
                         taken: set[httpcore.AsyncConnectionInterface]) -> httpcore.AsyncConnectionInterface | None:
        """The first connection not handed out that can take a request to ``origin`` now; an
        idle one is asked whether it expired (unless this review just asked), dropped if so."""
        connections = self._connections
        i = 0
        while i < len(connections):
            connection = connections[i]
            if connection not in taken and connection.can_handle_request(origin) and connection.is_available():
                if checked or not connection.is_idle() or not connection.has_expired():
                    return connection
                del connections[i]
                closing.append(connection)
                continue
            i += 1
        return None


class PoolTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` (HTTP/1.1, certificates verified as httpx does): the pool
    and the backend above."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits)
        self._pool = _Pool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(),
        )


def pool_transport(limits: httpx.Limits) -> PoolTransport | None:
    """The transport for an ``AsyncClient`` with these limits, or None to keep httpx's own:
    httpx honours HTTP(S)_PROXY from the environment only for the transports it builds."""
    proxies = urllib.request.getproxies()
    if any(proxies.get(scheme) for scheme in ("http", "https", "all")):
        return None
    return PoolTransport(limits)
