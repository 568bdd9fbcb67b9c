"""Helpers for tests that drive the simulator in-process (the sandbox's own and the daemon's).

``Recorder`` stands in for the daemon's webhook endpoints: an ASGI app that records every POST and
answers with scripted statuses. ``harness()`` wires a simulator to a recorder, runs its delivery
loop for the duration of a block and gives an httpx client for its provider and control APIs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import anyio
import httpx

from .config import SimConfig
from .simulator import Simulator

DAEMON = "http://daemon.test"
WA_HOOK = "/whatsapp/webhook"
SMS_INBOUND = "/sms/inbound"
SMS_STATUS = "/sms/status"
STK_CALLBACK = "/payments/stk/callback"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Received:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode("utf-8"), keep_blank_values=True))

    def signature_ok(self, app_secret: str) -> bool:
        """Verify X-Hub-Signature-256 over the raw bytes, the way a receiver must."""
        expected = "sha256=" + hmac.new(app_secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("x-hub-signature-256", ""))


class Recorder:
    """A bare ASGI receiver; ``script(path, 503, 503)`` makes its next answers on ``path`` fail."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._scripts: dict[str, deque[int]] = {}

    def script(self, path: str, *statuses: int) -> None:
        self._scripts.setdefault(path, deque()).extend(statuses)

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self), base_url=DAEMON)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        script = self._scripts.get(path)
        status = script.popleft() if script else 200
        self.requests.append(Received(path, headers, body))
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": b'{"ok":true}' if status < 300 else b'{"error":"scripted"}'})


class FakeClock:
    """An injectable ``now`` that only moves when told to."""

    def __init__(self, start: float = 1_795_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def recorder_config(**overrides: Any) -> SimConfig:
    """Webhook URLs pointing at the recorder, no artificial delays, fast retries."""
    base = SimConfig(
        whatsapp_webhook_url=DAEMON + WA_HOOK,
        sms_inbound_url=DAEMON + SMS_INBOUND,
        sms_status_url=DAEMON + SMS_STATUS,
        status_delay_ms=0,
        callback_delay_ms=0,
        delivery_backoff_ms=10,
        delivery_max_attempts=4,
    )
    return replace(base, **overrides)


@dataclass(slots=True)
class Harness:
    sim: Simulator
    recorder: Recorder
    api: httpx.AsyncClient  # talks to sim.asgi_app

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        return await self.sim.wait_for(predicate, timeout)

    async def hooks(self, path: str, count: int, timeout: float = 5.0) -> list[Received]:
        """Wait until the daemon side has received ``count`` requests on ``path``; return them all."""
        await self.wait_for(lambda: len(self.recorder.on(path)) >= count, timeout)
        return self.recorder.on(path)


@asynccontextmanager
async def running(sim: Simulator) -> AsyncIterator[Simulator]:
    async with anyio.create_task_group() as tg:
        tg.start_soon(sim.run)
        try:
            yield sim
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def harness(config: SimConfig | None = None, now: Callable[[], float] | None = None) -> AsyncIterator[Harness]:
    recorder = Recorder()
    async with recorder.client() as http:
        sim = Simulator(config or recorder_config(), http=http, **({"now": now} if now else {}))
        transport = httpx.ASGITransport(app=sim.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sandbox.test") as api, running(sim):
            yield Harness(sim, recorder, api)


def json_shape(value: Any) -> Any:
    """The structure of a JSON value: keys (minus ``_comment``-style notes) and value types."""
    if isinstance(value, dict):
        return {k: json_shape(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [json_shape(v) for v in value]
    return type(value).__name__
