"""A lean HTTP/1.1 transport for the bench's own clients (the simulators' webhooks and the
driver's control calls), so that the load side is not what limits the end-to-end runs.

The issue asks for a load generator that is not the bottleneck. httpx with httpcore costs
0.9-1.4 ms of CPU per request on this VM (``bench/README.md``), and a flow makes about 19
webhooks from the simulators and 10 control calls from the driver: the load core filled up
before the daemon's. This transport keeps httpx's API (the simulators and the driver are
unchanged) and replaces only what is under it: plain asyncio streams to loopback, one
keep-alive connection per request in flight, ``Content-Length`` or chunked bodies.

Bench only: the daemon's own providers keep httpx's transport (with TLS, proxies and the
pool in ``invoiceiq/gateways/transport.py``). Plain ``http://`` only.
"""

from __future__ import annotations

import asyncio

import httpx

_MAX_HEAD = 64 * 1024


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class LoopbackTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over plain TCP, connections kept alive and reused per (host, port)."""

    def __init__(self, max_connections: int = 100, timeout_s: float = 60.0) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout_s = timeout_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{url.scheme}: the bench's loopback transport speaks http only")
        key = (url.host, url.port or 80)
        body = await request.aread()
        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1\r\n".encode("ascii")]
        for name, value in request.headers.raw:
            if name.lower() not in (b"content-length", b"transfer-encoding"):
                head.append(name + b": " + value + b"\r\n")
        head.append(b"Content-Length: %d\r\n\r\n" % len(body))
        payload = b"".join(head) + body
        timeout = request.extensions.get("timeout", {}).get("read") or self._timeout_s
        async with self._slots:
            # A kept-alive connection the server closed meanwhile fails before any answer:
            # then once more on a new connection (the bench's requests are all idempotent:
            # webhooks carry their ids, control calls their own).
            for reused in (True, False):
                conn = self._take(key) if reused else None
                if reused and conn is None:
                    continue
                fresh = conn is None
                if conn is None:
                    try:
                        reader, writer = await asyncio.wait_for(asyncio.open_connection(*key), timeout)
                    except (OSError, asyncio.TimeoutError) as exc:
                        raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc
                    conn = _Conn(reader, writer)
                try:
                    conn.writer.write(payload)
                    status, headers, content, keep = await asyncio.wait_for(self._read(conn.reader), timeout)
                except asyncio.TimeoutError as exc:
                    conn.close()
                    raise httpx.ReadTimeout("no answer in time", request=request) from exc
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    conn.close()
                    if not fresh:
                        continue
                    raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
                if keep:
                    self._idle.setdefault(key, []).append(conn)
                else:
                    conn.close()
                return httpx.Response(status, headers=headers, content=content, request=request)
        raise AssertionError("unreachable")

    def _take(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        raw = await reader.readuntil(b"\r\n\r\n")
        if len(raw) > _MAX_HEAD:
            raise ValueError("response head too large")
        lines = raw[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status = int(rest[:3])
        headers = []
        length: int | None = None
        chunked = False
        keep = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
                continue  # the body handed to httpx is whole
            elif lower == b"connection":
                keep = value.lower() != b"close" if keep else value.lower() == b"keep-alive"
            headers.append((name, value))
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers from our servers
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            content = b"".join(parts)
        elif length is not None:
            content = await reader.readexactly(length)
        elif status in (204, 304) or 100 <= status < 200:
            content = b""
        else:
            content = await reader.read()  # until the server closes
            keep = False
        return status, headers, content, keep

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
