"""The provider client's CPU per request with many sends in flight (bench/README.md).

``python -m bench.pool [--in-flight 48] [--requests 3000] [--latency-ms 20] [--stock]``

Starts ``bench.sink`` on the load core (answers every Graph send after ``--latency-ms``), then
posts Graph-send-like JSON through the daemon's own ``make_client()`` from this process,
pinned to the server core, ``--in-flight`` at a time, and prints the CPU this process spent
per request and how many times a request was handed a connection that another had taken
(httpcore's ``ConnectionNotAvailable`` retries). ``--stock`` uses httpx's own transport and
httpcore's pool with the same limits instead of ``invoiceiq.gateways.transport``: the
comparison behind the pool's "one request per connection" rule. Timings are this machine's;
the retry count is not.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import anyio
import httpx
from httpcore._async.connection_pool import AsyncPoolRequest

from invoiceiq.gateways.http import make_client

from . import servers


async def _measure(port: int, in_flight: int, total: int, stock: bool) -> dict[str, float]:
    client = make_client()
    if stock:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50, keepalive_expiry=30.0)
        client = httpx.AsyncClient(limits=limits, timeout=client.timeout)
    retries = {"n": 0}
    real_clear = AsyncPoolRequest.clear_connection

    def clear(self: AsyncPoolRequest) -> None:
        retries["n"] += 1
        real_clear(self)

    url = f"http://127.0.0.1:{port}/v25.0/106540352242922/messages"
    body = {"messaging_product": "whatsapp", "to": "254712345678", "type": "text", "text": {"body": "x"}}

    async def sender(n: int) -> None:
        for _ in range(n):
            response = await client.post(url, json=body)
            assert response.status_code == 200, response.status_code

    async with client:
        async with anyio.create_task_group() as tg:  # warm-up: connections made
            for _ in range(in_flight):
                tg.start_soon(sender, 5)
        AsyncPoolRequest.clear_connection = clear  # type: ignore[method-assign]
        try:
            per_sender = max(1, total // in_flight)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(in_flight):
                    tg.start_soon(sender, per_sender)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        finally:
            AsyncPoolRequest.clear_connection = real_clear  # type: ignore[method-assign]
    done = per_sender * in_flight
    return {"requests": done, "cpu_us_per_request": round(cpu / done * 1e6), "wall_s": round(wall, 2),
            "retries_per_request": round(retries["n"] / done, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.split("\n\n")[1])
    parser.add_argument("--in-flight", type=int, default=48)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--stock", action="store_true", help="httpx's own transport and httpcore's pool")
    args = parser.parse_args()
    pin = servers.Pinning.detect()
    procs = servers.Processes(Path(tempfile.mkdtemp(prefix="invoiceiq-bench-pool-")))
    try:
        _, port = servers.start_sink(procs, pin, latency_ms=args.latency_ms)
        if pin.server is not None:
            os.sched_setaffinity(0, {int(pin.server)})
        result = anyio.run(_measure, port, args.in_flight, args.requests, args.stock)
    finally:
        procs.stop_all()
    pool = "httpcore's own" if args.stock else "invoiceiq.gateways.transport"
    print(f"pool: {pool}, {args.in_flight} in flight, {args.latency_ms} ms per answer: "
          f"{result['cpu_us_per_request']} us of CPU per request, {result['retries_per_request']} retries per "
          f"request, {result['requests']} requests in {result['wall_s']} s")


if __name__ == "__main__":
    main()
