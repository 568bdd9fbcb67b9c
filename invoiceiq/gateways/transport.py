"""An httpx transport whose connection pool checks its idle connections cheaply and keeps
its books in one pass.

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
    """httpcore's pool with its bookkeeping made linear in the number of connections.

    Each time a request joins or leaves, the pool reviews its connections. httpcore 1.0 asks,
    for every idle connection, for a list as long as the pool (``len([c.is_idle() for c in
    connections])``, which is just the pool's size), and builds two full lists of candidates
    for every queued request where it uses the first: with the outbox's 50 kept-alive
    connections that was 2,500 calls per review, two reviews per send (py-spy, end-to-end
    bench: 3% of the daemon). The same decisions, in the same order, with one pass."""

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        connections = self._connections
        # Closed, expired, or idle beyond the keep-alive limit (httpcore compares the pool's
        # whole size with that limit, and so do we: same connections closed).
        for connection in list(connections):
            if connection.is_closed():
                connections.remove(connection)
            elif connection.has_expired():
                connections.remove(connection)
                closing.append(connection)
            elif connection.is_idle() and len(connections) > self._max_keepalive_connections:
                connections.remove(connection)
                closing.append(connection)

        for pool_request in [r for r in self._requests if r.is_queued()]:
            origin = pool_request.request.url.origin
            available = next((c for c in connections if c.can_handle_request(origin) and c.is_available()), None)
            if available is not None:
                pool_request.assign_to_connection(available)
            elif len(connections) < self._max_connections:
                connection = self.create_connection(origin)
                connections.append(connection)
                pool_request.assign_to_connection(connection)
            elif (idle := next((c for c in connections if c.is_idle()), None)) is not None:
                connections.remove(idle)
                closing.append(idle)
                connection = self.create_connection(origin)
                connections.append(connection)
                pool_request.assign_to_connection(connection)
        return closing


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
