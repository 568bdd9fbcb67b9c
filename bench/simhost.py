"""The sandbox simulators on their own core, for the end-to-end benchmarks (issue 8, points 3-4).

``python -m bench.simhost --bind 127.0.0.1:P --config sim.json [--latency-ms 200]
[--rewrite https://pay.test=http://127.0.0.1:D]``

The same as ``python -m invoiceiq.sandbox`` (same :class:`~invoiceiq.sandbox.Simulator`, same
Quart app on hypercorn, same control API), with one addition the benchmark needs: ``--rewrite``.
In live mode the daemon refuses an ``http://`` public URL or M-PESA callback URL, so the STK
Push carries ``CallBackURL=https://pay.test/payments/stk/callback/<secret>``; the simulator's
HTTP client here sends whatever starts with the first URL to the second one instead (what DNS
plus a TLS-terminating proxy would do in production). The path, the body and the headers are
left untouched. The daemon's webhook URLs are plain ``http://127.0.0.1`` ones in ``sim.json``
and are not affected.

It only uses the simulator's public in-process API (``Simulator(config, http=...)``, ``run``,
``asgi_app``); nothing under ``invoiceiq/`` is changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Any

import anyio
import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from invoiceiq.sandbox import SimConfig, Simulator

from .loopback import LoopbackTransport


class RewriteTransport(httpx.AsyncBaseTransport):
    """Send requests for ``src`` (scheme://host[:port]) to ``dst`` instead, path kept."""

    def __init__(self, rewrites: list[tuple[str, str]], inner: httpx.AsyncBaseTransport) -> None:
        self.rewrites = [(httpx.URL(s), httpx.URL(d)) for s, d in rewrites]
        self.inner = inner
        self.rewritten = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for src, dst in self.rewrites:
            url = request.url
            if url.scheme == src.scheme and url.host == src.host and url.port == src.port:
                request.url = url.copy_with(scheme=dst.scheme, host=dst.host, port=dst.port)
                request.headers["Host"] = request.url.netloc.decode("ascii")
                self.rewritten += 1
                break
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_client(config: SimConfig, rewrites: list[tuple[str, str]]) -> httpx.AsyncClient:
    # The bench's lean loopback transport (bench/loopback.py), one keep-alive connection per
    # concurrent delivery: the simulators share the load core with the driver and were the
    # first to fill it with httpx's own transport (about 1 ms of CPU per webhook).
    inner = LoopbackTransport(max_connections=config.delivery_concurrency + 8, timeout_s=config.delivery_timeout_s)
    return httpx.AsyncClient(transport=RewriteTransport(rewrites, inner), timeout=config.delivery_timeout_s)


async def main(args: argparse.Namespace) -> None:
    config = SimConfig.load(args.config) if args.config else SimConfig()
    if args.latency_ms is not None:
        config = dataclasses.replace(config, latency_ms=args.latency_ms)
    rewrites = []
    for spec in args.rewrite or []:
        src, sep, dst = spec.partition("=")
        if not sep:
            raise ValueError(f"--rewrite wants SRC=DST, got {spec!r}")
        rewrites.append((src, dst))
    client = make_client(config, rewrites)
    sim = Simulator(config, http=client)
    app: Any = sim.asgi_app
    hc = HypercornConfig()
    hc.bind = [args.bind]
    hc.accesslog = None
    hc.keep_alive_timeout = 120
    hc.backlog = 1024
    stop = anyio.Event()

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    print(f"simhost on http://{args.bind}/ latency_ms={config.latency_ms} rewrites={rewrites}", flush=True)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals)
            tg.start_soon(sim.run)
            await serve(app, hc, shutdown_trigger=stop.wait)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simhost", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8100")
    parser.add_argument("--config", help="JSON file of SimConfig fields")
    parser.add_argument("--latency-ms", type=int)
    parser.add_argument("--rewrite", action="append", help="SRC=DST: deliveries to SRC go to DST (repeatable)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        anyio.run(main, args)
    except (ValueError, OSError) as exc:
        print(f"simhost: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
