"""Small pieces every route uses: JSON responses, admin auth, the client's address."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Any

import anyio
import orjson
from quart import Response, request

from ..observability import get_logger
from .context import services

log = get_logger(__name__)


MAX_JSON_DEPTH = 32  # no provider or client of ours nests deeper; orjson writes at most 254


def decode_json(raw: bytes) -> tuple[bool, Any]:
    """(True, value) for JSON no deeper than ``MAX_JSON_DEPTH``; (False, None) otherwise.

    orjson reads 1,024 levels but writes only 254: a body we could read but not store again
    would fail later, inside a transaction. Refuse it at the door instead."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, None
    if raw.count(b"{") + raw.count(b"[") <= MAX_JSON_DEPTH:
        # Each level opens one bracket, so this body cannot nest deeper (brackets inside
        # strings only make the count larger): skip the walk, the common case by far.
        return True, value
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return False, None
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True, value


async def store_durably(job: Any) -> Any:
    """A webhook's write, finished even if the client hangs up meanwhile: the job commits
    anyway (it is queued), and finishing here lets the handler still post its mailbox kick
    (which is synchronous) instead of leaving the event to the scheduler's sweep."""
    with anyio.CancelScope(shield=True):
        return await services().store.write(job)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def error(status: int, message: str, **extra: Any) -> Response:
    return json_response({"error": message, **extra}, status)


def secrets_equal(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected secret never matches."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def admin_denied() -> Response | None:
    """None when the request carries the admin token; else the response to send."""
    token = services().settings.admin.token
    if not token:
        return error(403, "the internal API is disabled: set admin.token (or ADMIN_TOKEN) to enable it")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets_equal(given.strip(), token):
        services().metrics.webhook_rejected.labels("admin_auth").inc()
        log.warning("api_auth_failed", route=request.path)
        return error(401, "missing or wrong bearer token", )
    return None


def _in(address: str, networks: Iterable[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


def client_ip() -> str:
    """The caller's address; ``X-Forwarded-For`` is believed only from a trusted proxy."""
    peer = (request.scope.get("client") or ("", 0))[0] or ""
    trusted = services().settings.server.trusted_proxies
    if trusted and _in(peer, trusted):
        forwarded = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
        # Walk from the nearest hop back, skipping our own proxies.
        for hop in reversed(forwarded):
            if not _in(hop, trusted):
                return hop
    return peer


def ip_allowed(address: str, allow: Iterable[str]) -> bool:
    allow = list(allow)
    return not allow or _in(address, allow)
