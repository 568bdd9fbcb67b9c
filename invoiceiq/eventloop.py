"""Which event loop the daemon runs on (``server.event_loop``).

anyio runs the daemon on asyncio; the loop underneath is either asyncio's own (pure Python
callbacks, timers and selector) or uvloop's (the same interface in C, on libuv). Nothing in
InvoiceIQ depends on which: "auto" takes uvloop where it is installed (a dependency on Linux
and macOS) because the daemon spends a fifth of its CPU in the loop's own machinery under
load (bench/README: 38-39 ms against 44-47 ms of CPU per end-to-end flow).
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any


class LoopUnavailable(Exception):
    """``event_loop = "uvloop"`` was asked for and uvloop is not installed."""


def backend_options(choice: str) -> dict[str, Any]:
    """``anyio.run``'s backend options for a ``server.event_loop`` setting."""
    if choice == "asyncio":
        return {"use_uvloop": False}
    installed = importlib.util.find_spec("uvloop") is not None
    if not installed and choice == "uvloop":
        raise LoopUnavailable('server.event_loop is "uvloop" but uvloop is not installed '
                              '(pip install uvloop, or set it to "auto" or "asyncio")')
    return {"use_uvloop": installed}


def running_loop_name() -> str:
    """"uvloop" or "asyncio": the loop this coroutine runs on (for the start-up log line)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
