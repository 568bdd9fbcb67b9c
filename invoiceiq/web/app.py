"""The Quart application factory: routes, body limits, JSON errors, request metrics."""

from __future__ import annotations

import time
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from ..observability import get_logger
from ..store import StoreError
from . import api, health
from .common import error
from .context import Services

log = get_logger(__name__)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _rule() -> str:
    """The route's pattern, never the path: paths carry pay tokens and callback secrets."""
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


def create_app(svc: Services) -> Quart:
    app = Quart("invoiceiq")
    app.extensions["invoiceiq"] = svc
    limit = svc.settings.server.max_body_bytes
    app.config.update(MAX_CONTENT_LENGTH=limit, BODY_TIMEOUT=30, RESPONSE_TIMEOUT=60)

    for blueprint in (health.bp, api.bp, *svc.extras.get("blueprints", ())):
        app.register_blueprint(blueprint)

    # Bodies over the limit: Quart refuses them itself (MAX_CONTENT_LENGTH), before reading
    # them, with the 413 handler below. The start time comes from the ASGI layer (Pressure).

    # The histogram's child per (route, method), looked up once: ``labels()`` takes a lock and
    # builds a key on every call (a few percent of a webhook's CPU). Routes are a fixed set and
    # methods outside the usual ones count as OTHER, so the children (and the series) are bounded.
    latency = svc.metrics.http_latency
    children: dict[tuple[str, str], Any] = {}

    @app.after_request
    async def _observe(response: Response) -> Response:
        req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup, not four
        started = req.scope.get("iq_started")
        if started is not None:
            rule = req.url_rule
            method = req.method if req.method in _METHODS else "OTHER"  # a client picks the method
            key = (rule.rule if rule is not None else "unmatched", method)
            child = children.get(key)
            if child is None:
                child = children[key] = latency.labels(*key)
            child.observe(time.perf_counter() - started)
        return response

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 413:
            svc.metrics.webhook_rejected.labels("too_large").inc()
            log.warning("request_too_large", route=_rule(), limit=limit)
            return error(413, f"request body over {limit} bytes")
        return error(code, exc.name.lower() if exc.name else "error")

    @app.errorhandler(StoreError)
    async def _store_down(exc: StoreError) -> Response:
        # The database cannot answer now: 503 so that a provider (or a client) retries later.
        log.error("request_store_unavailable", route=_rule(), method=request.method)
        return error(503, "storage unavailable, retry later")

    @app.errorhandler(Exception)
    async def _crash(exc: Exception) -> Response:
        log.exception("request_failed", route=_rule(), method=request.method)
        return error(500, "internal error")

    return app
