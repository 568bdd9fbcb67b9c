"""A small closed-loop load generator (httpx, asyncio) for machines without wrk.

``python -m bench.pyload URL BODIES_FILE --connections 16 --duration 2`` posts the file's
pre-signed bodies in order, each at most once, from ``connections`` concurrent workers, stops
starting new requests after ``duration`` seconds, lets the ones in flight finish, and prints
one JSON object with the same fields as the wrk parser's result.

It is far slower than wrk (one Python core drives maybe 1-2k requests/s), so its numbers
measure the generator as much as the server: the report says which generator was used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from .bodies import read_bodies


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(pct / 100.0 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


async def run(url: str, bodies_path: Path, connections: int, duration_s: float) -> dict[str, object]:
    bodies = read_bodies(bodies_path)
    latencies: list[float] = []
    counts = {"ok_2xx": 0, "non_2xx_3xx": 0, "errors": 0, "sent": 0}
    next_index = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0)) as client:
        started = time.perf_counter()
        deadline = started + duration_s

        async def worker() -> None:
            nonlocal next_index
            while time.perf_counter() < deadline:
                sig, body = bodies[next_index % len(bodies)]
                next_index += 1
                counts["sent"] += 1
                t0 = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers={
                        "Content-Type": "application/json", "X-Hub-Signature-256": sig})
                except httpx.HTTPError:
                    counts["errors"] += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000.0)
                if 200 <= response.status_code < 400:
                    counts["ok_2xx"] += 1
                else:
                    counts["non_2xx_3xx"] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    requests = counts["ok_2xx"] + counts["non_2xx_3xx"]
    return {
        "requests": requests,
        "duration_s": elapsed,
        "rps": requests / elapsed if elapsed > 0 else 0.0,
        "non_2xx_3xx": counts["non_2xx_3xx"],
        "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0, "other": counts["errors"]},
        "latency_avg_ms": sum(latencies) / len(latencies) if latencies else None,
        "latency_max_ms": latencies[-1] if latencies else None,
        "percentiles_ms": {p: _percentile(latencies, float(p)) for p in ("50", "75", "90", "99")},
        "sent": counts["sent"],
        "bodies": len(bodies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload")
    parser.add_argument("url")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=2.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.url, args.bodies, args.connections, args.duration))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
