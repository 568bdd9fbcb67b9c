"""sd_notify spoken directly: readiness, watchdog and stop notices for a Type=notify unit.

The protocol is one AF_UNIX datagram of ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET``
(sd_notify(3)); writing it ourselves saves a libsystemd binding for a few lines of code.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends sd_notify datagrams; without ``NOTIFY_SOCKET`` every call is a no-op."""

    def __init__(self, address: str | None) -> None:
        self.address = address  # socket address in Python's form ("\0name" when abstract)
        self.errors = 0  # sends that failed: counted, never raised (systemd may be gone)
        self.last_error: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        raw = env.get("NOTIFY_SOCKET", "")
        if raw.startswith("@"):  # abstract namespace: systemd writes "@", the kernel wants NUL
            return cls("\0" + raw[1:])
        # Only absolute paths otherwise; newer systemd's "vsock:" targets VMs, not this daemon.
        return cls(raw if raw.startswith("/") else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send ``fields`` as one datagram; True if the kernel accepted it."""
        if self.address is None or not fields:
            return False
        # A newline inside a value would start a new KEY= line, so flatten it.
        lines = "".join(f"{k}={str(v).replace(chr(10), ' ')}\n" for k, v in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Non-blocking: this runs on the event loop, and a stuck PID 1 must not stall it.
                sock.setblocking(False)
                sock.sendto(lines.encode("utf-8"), self.address)
        except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN...: the service must keep running
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        # Type=notify-reload (systemd 253+) wants MONOTONIC_USEC with RELOADING=1; older ones ignore it.
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)


def watchdog_interval_s(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None if no watchdog is armed for us."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
        pid = env.get("WATCHDOG_PID")
        # WATCHDOG_PID names the process systemd watches; a child that inherited the env must not ping.
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends, so one late ping is not fatal.
    return usec / 2 / 1_000_000 if usec > 0 else None
