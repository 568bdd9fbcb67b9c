"""wrk: the command line the harness runs, and a parser for what wrk prints."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LUA = Path(__file__).resolve().parent / "cycle.lua"

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def find_wrk() -> str | None:
    return shutil.which("wrk")


def wrk_version(exe: str) -> str:
    # `wrk -v` prints its version line and then usage, and exits 1.
    out = subprocess.run([exe, "-v"], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def command(exe: str, url: str, bodies: Path, *, threads: int, connections: int, duration_s: float,
            latency: bool, pin: str | None, timeout_s: float | None = None) -> list[str]:
    cmd = [] if pin is None else ["taskset", "-c", pin]
    cmd += [exe, f"-t{threads}", f"-c{connections}", f"-d{_dur(duration_s)}"]
    if timeout_s is not None:
        cmd += ["--timeout", f"{_dur(timeout_s)}"]
    if latency:
        cmd.append("--latency")
    cmd += ["-s", str(LUA), url, "--", str(bodies), str(threads)]
    return cmd


def _dur(seconds: float) -> str:
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{int(seconds * 1000)}ms"


@dataclass
class WrkResult:
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0})
    latency_avg_ms: float | None = None
    latency_max_ms: float | None = None
    percentiles_ms: dict[str, float] = field(default_factory=dict)
    sent: int = 0          # request() calls in the Lua script: bodies put on the wire
    bodies: int = 0        # bodies loaded by the script
    bytes_read: str = ""

    @property
    def ok_2xx(self) -> int:
        # wrk counts every completed response in `requests`; non-2xx/3xx are counted apart. The
        # webhook never answers 3xx, so what is left is the 2xx (in practice: 200) responses.
        return self.requests - self.non_2xx_3xx

    @property
    def p50_ms(self) -> float | None:
        return self.percentiles_ms.get("50")

    @property
    def p99_ms(self) -> float | None:
        return self.percentiles_ms.get("99")

    @property
    def repeated(self) -> int:
        return max(0, self.sent - self.bodies)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok_2xx=self.ok_2xx, p50_ms=self.p50_ms, p99_ms=self.p99_ms, repeated_bodies=self.repeated)
        return d


def to_ms(value: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse(output: str) -> WrkResult:
    """Parse wrk 4.x's report (with or without --latency) plus cycle.lua's BENCH lines."""
    r = WrkResult()
    m = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),\s*(\S+) read", output, re.M)
    if not m:
        raise ValueError("wrk output has no 'N requests in T' line:\n" + output[-2000:])
    r.requests = int(m.group(1))
    r.duration_s = to_ms(m.group(2) + m.group(3)) / 1000.0
    r.bytes_read = m.group(4)
    m = re.search(r"^Requests/sec:\s*([0-9.]+)", output, re.M)
    if m:
        r.rps = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    if m:
        r.non_2xx_3xx = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if m:
        r.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"^\s*Latency\s+([0-9.]+\w+)\s+([0-9.]+\w+)\s+([0-9.]+\w+)", output, re.M)
    if m:
        r.latency_avg_ms = to_ms(m.group(1))
        r.latency_max_ms = to_ms(m.group(3))
    dist = output.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pct, value in re.findall(r"^\s*(\d+(?:\.\d+)?)%\s+([0-9.]+(?:us|ms|s|m|h))\s*$", dist[1], re.M):
            r.percentiles_ms[pct.removesuffix(".000").removesuffix(".0")] = to_ms(value)
    for sent, bodies in re.findall(r"^BENCH tid=\d+ sent=(\d+) bodies=(\d+)", output, re.M):
        r.sent += int(sent)
        r.bodies += int(bodies)
    return r
