"""What every gateway shares: one HTTP client shape and one error taxonomy.

Each gateway translates its provider's failures into three kinds the caller can act on
without knowing the provider:

* ``TransientError``: try the same message again later (``retry_after_s`` if the provider said when).
* ``PermanentError``: this message will never go through as it is; do not retry it.
* ``AuthError``: our credentials are wrong or expired; every message will fail the same way,
  so the caller stops the channel instead of burning retries.

Nothing here logs, and no message, ``reason`` or ``repr`` ever carries a token, key or
request body: the caller logs, and it logs these exceptions.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import orjson

from invoiceiq import __version__

from .transport import pool_transport

USER_AGENT = f"InvoiceIQ/{__version__}"
# One provider call, start to finish. httpx's timeouts are per phase (pool, connect, write,
# read: up to 35 s together with make_client's), and the outbox leases a row for as little
# as 15 s (outbox.lease_s) while it sends it: a call outliving the lease would let another
# worker send the same message again.
TOTAL_TIMEOUT_S = 12.0

# Provider texts end up in logs; keep them short so one odd response can't flood a log line.
_REASON_MAX = 200


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class GatewayError(Exception):
    """A provider call that did not do what was asked.

    ``code`` is always a string: the provider's own code (``"131026"``, ``"500.003.02"``,
    ``"405"``) when it sent one, otherwise the HTTP status, otherwise a short token such as
    ``"timeout"``. ``reason`` is a short human text taken from the provider's answer.
    """

    def __init__(
        self, provider: str, code: str | int, reason: str, *, http_status: int | None = None
    ) -> None:
        self.provider = provider
        self.code = str(code)
        self.reason = _short(reason)
        self.http_status = http_status
        # What was sent, without credentials, where the caller keeps it (an STK Push's body):
        # set by the gateway on the way out, for the record of a refused or unanswered call.
        self.request_for_log: Mapping[str, object] | None = None
        super().__init__(f"{provider} {self.code}: {self.reason}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(provider={self.provider!r}, code={self.code!r}, reason={self.reason!r})"
        )


class TransientError(GatewayError):
    """Retry later.

    ``maybe_processed`` is True when the request may have reached the provider before the
    failure (a read timeout, a dropped connection): retrying may then duplicate a message or
    an STK prompt, so the caller may want to check first (e.g. an STK query) rather than resend.
    """

    def __init__(
        self,
        provider: str,
        code: str | int,
        reason: str,
        *,
        http_status: int | None = None,
        retry_after_s: int | None = None,
        maybe_processed: bool = False,
    ) -> None:
        super().__init__(provider, code, reason, http_status=http_status)
        self.retry_after_s = retry_after_s
        self.maybe_processed = maybe_processed


class RateLimited(TransientError):
    """The provider refused for the account's (or the app's) throughput, not for this
    message: everything sent through that account should wait, not only this one."""


class PermanentError(GatewayError):
    """Do not retry this message: invalid parameter, undeliverable, outside the window, blacklisted..."""


class AuthError(GatewayError):
    """Invalid or expired credentials: stop the channel and alert, don't retry message by message."""


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def classify_transport_error(exc: BaseException, provider: str = "http") -> GatewayError:
    """Map an httpx exception raised before any response arrived.

    Only the exception's class name goes into the result: httpx messages can quote URLs.
    """
    name = type(exc).__name__
    # The request never left us: resending cannot duplicate anything.
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connect"
        return TransientError(provider, code, name)
    # Sent (or partly sent), answer lost: the provider may have acted on it.
    if isinstance(exc, httpx.TimeoutException):
        return TransientError(provider, "timeout", name, maybe_processed=True)
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)):
        return TransientError(provider, "network", name, maybe_processed=True)
    # UnsupportedProtocol, LocalProtocolError (e.g. a header we can't encode), a body too
    # large...: our request is malformed, so sending it again fails the same way.
    return PermanentError(provider, "transport", name)


def parse_retry_after(value: str | None, now: int) -> int | None:
    """``Retry-After`` (RFC 9110: delay-seconds or an HTTP-date) as whole seconds from ``now``.

    ``now`` is Unix milliseconds, the project's clock unit. Dates in the past give 0;
    anything unparseable gives None (the caller then uses its own backoff).
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are always GMT; a naive one is junk
        return None
    delta_s = when.timestamp() - now / 1000
    return max(0, math.ceil(delta_s))


def retry_after_of(response: httpx.Response, now: int) -> int | None:
    return parse_retry_after(response.headers.get("retry-after"), now)


def json_body(response: httpx.Response) -> Any:
    """The decoded JSON body, or None when there is none or it is not JSON (never raises)."""
    try:
        return orjson.loads(response.content)
    except (orjson.JSONDecodeError, TypeError):
        return None


def as_mapping(value: object) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one: lets parsers chain ``.get`` safely."""
    if type(value) is dict:  # decoded JSON, nearly always: skips the ABC check (webhook hot path)
        return value
    return value if isinstance(value, Mapping) else {}


async def request(
    http: httpx.AsyncClient, provider: str, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    """``http.request`` with transport failures already translated into the taxonomy."""
    try:
        with anyio.fail_after(TOTAL_TIMEOUT_S):
            return await http.request(method, url, **kwargs)
    except httpx.RequestError as exc:
        raise classify_transport_error(exc, provider) from exc
    except TimeoutError as exc:
        # Cut off in any phase: it may have been sent, so it counts as an answer lost.
        raise TransientError(provider, "timeout", "TotalTimeout", maybe_processed=True) from exc


def make_client(timeout_s: float = 10.0, max_connections: int = 50) -> httpx.AsyncClient:
    """The one AsyncClient the daemon shares between gateways (tests pass their own).

    ``max_connections`` covers everything in flight at once: the outbox's sends plus the
    payment actors' calls; a request over it waits for a connection.
    """
    # Every connection opened is kept alive for reuse: with fewer kept than sends in flight,
    # each send over the limit would reconnect.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=30.0)
    return httpx.AsyncClient(
        # Connecting should be quick; a provider that can't accept a connection in a few
        # seconds is down, and a short connect timeout fails the safe (unsent) way sooner.
        timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
        limits=limits,
        transport=pool_transport(limits),
        headers={"User-Agent": USER_AGENT},
        # Provider APIs never redirect a POST legitimately; following one could resend a payment.
        follow_redirects=False,
    )
