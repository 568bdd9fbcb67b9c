"""Liveness, readiness and metrics."""

from __future__ import annotations

from quart import Blueprint, Response, request

from .common import error, json_response, secrets_equal
from .context import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
async def healthz() -> Response:
    # Alive means the event loop answers; it says nothing about the database (that is /readyz).
    return json_response({"status": "ok"})


@bp.get("/readyz")
async def readyz() -> Response:
    problems = await services().readiness()
    if problems:
        return json_response({"status": "fail", "checks": problems}, 503)
    return json_response({"status": "ok"})


@bp.get("/metrics")
async def metrics() -> Response:
    svc = services()
    token = svc.settings.metrics.token
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets_equal(given.strip(), token):
            svc.metrics.webhook_rejected.labels("metrics_auth").inc()
            return error(401, "missing or wrong bearer token")
    return Response(svc.metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")
