"""A tiny fake Graph API and Africa's Talking for the daemon's outbox during ingest benchmarks.

``python -m bench.sink --port N [--latency-ms 0]`` serves, on 127.0.0.1:

* ``POST .../{phone_id}/messages``: the Graph API's send; answers 200 with a fresh ``wamid``;
* ``POST /version1/messaging``: Africa's Talking's SMS send; answers 201 "Success";
* ``GET /_stats``: what was received (counts, distinct recipients, identical bodies repeated);
* ``GET /healthz``.

It is a raw asyncio protocol (HTTP/1.1 keep-alive, Content-Length bodies) so that it costs
little on the load generator's core. Anything else is answered 404 and counted under
``unknown``. The harness runs it pinned to the load generator's core, never the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import signal
import sys
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

import orjson


class Stats:
    def __init__(self) -> None:
        self.graph = 0
        self.sms = 0
        self.unknown = 0
        self.bad = 0
        self.by_type: Counter[str] = Counter()
        self.recipients: set[str] = set()
        self.digests: set[bytes] = set()
        self.repeated = 0  # identical (path, body) received again: a duplicate send
        self.ids = itertools.count(1)

    def seen(self, path: str, body: bytes) -> None:
        digest = hashlib.blake2b(path.encode() + b"\0" + body, digest_size=16).digest()
        if digest in self.digests:
            self.repeated += 1
        else:
            self.digests.add(digest)

    def as_dict(self) -> dict[str, Any]:
        return {"graph_messages": self.graph, "sms_messages": self.sms, "unknown_requests": self.unknown,
                "bad_requests": self.bad, "by_type": dict(self.by_type), "distinct_recipients": len(self.recipients),
                "identical_bodies_repeated": self.repeated}


def _response(status: int, reason: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class SinkProtocol(asyncio.Protocol):
    def __init__(self, stats: Stats, latency_s: float) -> None:
        self.stats = stats
        self.latency_s = latency_s
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, _version = head[0].split(" ", 2)
            except ValueError:
                self._close(400)
                return
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    length = int(value.strip())
                elif lname == "transfer-encoding" and "chunked" in value.lower():
                    self._close(411)
                    return
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = bytes(self.buf[end + 4:total])
            del self.buf[:total]
            reply = self.handle(method, target, body)
            if self.latency_s > 0:
                asyncio.get_running_loop().call_later(self.latency_s, self._write, reply)
            else:
                self._write(reply)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self, status: int) -> None:
        self._write(_response(status, "Error", b"{}"))
        if self.transport is not None:
            self.transport.close()

    def handle(self, method: str, target: str, body: bytes) -> bytes:
        s = self.stats
        path = target.split("?", 1)[0]
        if method == "POST" and path.endswith("/messages"):
            try:
                req = orjson.loads(body)
                to = str(req["to"])
            except Exception:  # noqa: BLE001
                s.bad += 1
                return _response(400, "Bad Request", b'{"error":{"message":"bad body","code":100}}')
            s.graph += 1
            s.by_type[f"whatsapp:{req.get('type', '?')}"] += 1
            s.recipients.add(to)
            s.seen(path, body)
            wamid = f"wamid.SINK{next(s.ids)}"
            return _response(200, "OK", orjson.dumps({"messaging_product": "whatsapp",
                                                      "contacts": [{"input": to, "wa_id": to}],
                                                      "messages": [{"id": wamid}]}))
        if method == "POST" and path == "/version1/messaging":
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            to = form.get("to", "")
            s.sms += 1
            s.by_type["sms"] += 1
            s.recipients.add(to.lstrip("+"))
            s.seen(path, body)
            mid = f"ATXid_SINK{next(s.ids)}"
            return _response(201, "Created", orjson.dumps({"SMSMessageData": {
                "Message": "Sent to 1/1 Total Cost: KES 0.8000",
                "Recipients": [{"statusCode": 101, "number": to, "status": "Success", "cost": "KES 0.8000",
                                "messageId": mid}]}}))
        if method == "GET" and path == "/_stats":
            return _response(200, "OK", orjson.dumps(s.as_dict()))
        if method == "GET" and path == "/healthz":
            return _response(200, "OK", b'{"status":"ok"}')
        # Daraja is not faked here: the end-to-end scenarios use the sandbox simulators
        # (bench/simhost.py), which speak all three providers' wire formats.
        s.unknown += 1
        return _response(404, "Not Found", b'{"error":"not found"}')


async def serve(port: int, latency_ms: int) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(stats, latency_ms / 1000.0), "127.0.0.1", port,
                                      backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sink listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()
    print("sink stats " + orjson.dumps(stats.as_dict()).decode(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sink")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.latency_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
