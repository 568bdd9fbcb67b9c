"""Run the simulators on their own: ``python -m invoiceiq.sandbox --bind 127.0.0.1:8100 --config sim.json``.

Used to put the fakes on another core for benchmarks. With ``--prefix /sandbox`` the URLs are the
same as when the daemon mounts the sandbox itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from typing import Any

import anyio
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from .config import SimConfig
from .simulator import Simulator

log = logging.getLogger("invoiceiq.sandbox")


def prefixed(app: Any, prefix: str) -> Any:
    """Serve ``app`` under ``prefix`` (ASGI style: root_path set, path kept whole); 404 elsewhere."""
    prefix = prefix.rstrip("/")

    async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if path != prefix and not path.startswith(prefix + "/"):
                await send(
                    {"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]}
                )
                await send({"type": "http.response.body", "body": b"Not Found"})
                return
            scope = {**scope, "root_path": scope.get("root_path", "") + prefix}
        await app(scope, receive, send)

    return dispatch


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m invoiceiq.sandbox", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8100", help="host:port to listen on")
    parser.add_argument("--config", help="JSON file of SimConfig fields")
    parser.add_argument("--latency-ms", type=int, help="added to every provider API answer")
    parser.add_argument("--prefix", default="", help="mount point, e.g. /sandbox (default: none)")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    config = SimConfig.load(args.config) if args.config else SimConfig()
    if args.latency_ms is not None:
        config = dataclasses.replace(config, latency_ms=args.latency_ms)
    sim = Simulator(config)
    app = prefixed(sim.asgi_app, args.prefix) if args.prefix else sim.asgi_app
    hc = HypercornConfig()
    hc.bind = [args.bind]
    hc.accesslog = None
    stop = anyio.Event()

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s; stopping", signal.Signals(signum).name)
                stop.set()
                return

    base = f"http://{args.bind}{args.prefix.rstrip('/')}"
    log.info(
        "sandbox on %s/ (console); Graph %s/graph/v25.0, Daraja %s/daraja, Africa's Talking %s/at",
        base,
        base,
        base,
        base,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_signals)
        tg.start_soon(sim.run)
        await serve(app, hc, shutdown_trigger=stop.wait)
        tg.cancel_scope.cancel()


def run(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        anyio.run(main, args)
    except (ValueError, OSError) as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
