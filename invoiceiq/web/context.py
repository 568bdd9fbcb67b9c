"""What the thin web layer may use: handed in by the daemon, reached through ``services()``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from quart import current_app

from ..clock import Clock
from ..observability import Metrics
from ..store import Store

if TYPE_CHECKING:
    from ..config import Settings


class Dispatch(Protocol):
    """Posting to actor mailboxes: a hint that stored work is waiting (the work itself is in
    the database already, so a lost hint only delays it until the next sweep)."""

    def kick(self, actor: str, key: str) -> None: ...

    def wake(self, actor: str) -> None: ...


@dataclass
class Services:
    settings: Settings
    store: Store
    metrics: Metrics
    clock: Clock
    dispatch: Dispatch
    readiness: Callable[[], Awaitable[dict[str, str]]]
    extras: dict[str, Any] = field(default_factory=dict)


def services() -> Services:
    return current_app.extensions["invoiceiq"]  # type: ignore[no-any-return]
