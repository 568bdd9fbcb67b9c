"""The sandbox over HTTP: the three provider APIs, the control API and the console.

All routes are unprefixed; the daemon mounts the app under ``/sandbox``. Nothing here relies on
ASGI lifespan events (a dispatcher may not forward them): the simulator is built before the app
and its background work runs in the host's task group.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quart import Quart, Response, request

from .faults import FaultError
from .wire import HttpRequest, Reply, SandboxError

if TYPE_CHECKING:
    from .simulator import Simulator

STATIC = Path(__file__).resolve().parent / "static"
LONG_POLL_MAX_S = 25.0


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj), status=status, content_type="application/json")


def _send(reply: Reply) -> Response:
    response = Response(reply.body, status=reply.status, content_type=reply.content_type)
    for name, value in reply.headers.items():
        response.headers[name] = value
    return response


async def _provider_request() -> HttpRequest:
    return HttpRequest(
        method=request.method,
        path=request.path,
        headers={k.lower(): v for k, v in request.headers.items()},
        query=request.args.to_dict(),
        body=await request.get_data(cache=True, as_text=False, parse_form_data=False),
    )


async def _body() -> dict[str, Any]:
    data = await request.get_json(force=True, silent=True)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SandboxError(400, "expected a JSON object")
    return data


def _field(data: dict[str, Any], name: str, kind: type, required: bool = True) -> Any:
    value = data.get(name)
    if value is None:
        if required:
            raise SandboxError(400, f"{name} is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SandboxError(400, f"{name} must be a {kind.__name__}")
    return value


def mount_tolerant(app: Any) -> Any:
    """Accept a mount prefix whichever way the host's dispatcher passes it.

    Quart wants ``path`` to still carry ``root_path`` (the ASGI spec's reading) and answers 404
    for the bare prefix; some dispatchers strip the prefix instead. Normalise both, and send the
    bare ``/sandbox`` to the console like ``/sandbox/``.
    """

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            root = scope.get("root_path", "")
            path = scope.get("path", "") or "/"
            if root and (path == root or not path.startswith(root + "/")):
                path = root + ("/" if path == root else path)
            scope = {**scope, "path": path}
        await app(scope, receive, send)

    return asgi


def create_app(sim: Simulator) -> Quart:
    app = Quart(__name__, static_folder=str(STATIC), static_url_path="/static")
    app.asgi_app = mount_tolerant(app.asgi_app)  # type: ignore[method-assign]  # Quart's middleware hook
    console_html = (STATIC / "console.html").read_bytes()

    @app.errorhandler(SandboxError)
    async def sandbox_error(exc: SandboxError) -> Response:
        return _json({"error": exc.message}, exc.status)

    @app.errorhandler(FaultError)
    async def fault_error(exc: FaultError) -> Response:
        return _json({"error": str(exc)}, 400)

    # -- WhatsApp Cloud API ------------------------------------------------------------------------
    @app.post("/graph/<version>/<phone_id>/messages")
    async def graph_messages(version: str, phone_id: str) -> Response:
        req = await _provider_request()
        return _send(await sim.provider("whatsapp", req, lambda: sim.whatsapp.send(req, version, phone_id)))

    @app.route("/graph/<path:rest>", methods=["GET", "POST", "DELETE"])
    async def graph_unknown(rest: str) -> Response:
        error = {
            "message": f"Unknown path components: /{rest}",
            "type": "OAuthException",
            "code": 2500,
            "fbtrace_id": sim.ids.fbtrace_id(),
        }
        return _json({"error": error}, 400)

    # -- Daraja ------------------------------------------------------------------------------------
    @app.get("/daraja/oauth/v1/generate")
    async def daraja_oauth() -> Response:
        req = await _provider_request()
        return _send(await sim.provider("daraja_oauth", req, lambda: sim.daraja.oauth(req)))

    @app.post("/daraja/mpesa/stkpush/v1/processrequest")
    async def daraja_push() -> Response:
        req = await _provider_request()
        return _send(await sim.provider("daraja_push", req, lambda: sim.daraja.push(req)))

    @app.post("/daraja/mpesa/stkpushquery/v1/query")
    async def daraja_query() -> Response:
        req = await _provider_request()
        return _send(await sim.provider("daraja_query", req, lambda: sim.daraja.query(req)))

    @app.route("/daraja/<path:rest>", methods=["GET", "POST"])
    async def daraja_unknown(rest: str) -> Response:
        body = {
            "requestId": sim.ids.daraja_request_id(),
            "errorCode": "404.001.01",
            "errorMessage": "Resource not found",
        }
        return _json(body, 404)

    # -- Africa's Talking --------------------------------------------------------------------------
    @app.post("/at/version1/messaging")
    async def at_messaging() -> Response:
        req = await _provider_request()
        return _send(await sim.provider("sms", req, lambda: sim.sms.send(req)))

    # -- control API -------------------------------------------------------------------------------
    @app.get("/api/state")
    async def api_state() -> Response:
        try:
            since = int(request.args.get("since", "0"))
            wait = min(float(request.args.get("wait", "0")), LONG_POLL_MAX_S)
        except ValueError:
            raise SandboxError(400, "since must be an integer and wait a number of seconds") from None
        phones = [p for p in request.args.get("phones", "").split(",") if p]
        numbers = request.args.get("numbers", "1") != "0"
        if wait > 0:
            await sim.wait_change(since, wait)
        return _json(sim.state(since, phones or None, numbers=numbers))

    @app.get("/api/journal")
    async def api_journal() -> Response:
        service = request.args.get("service")
        return _json([asdict(c) for c in sim.world.calls(service)])

    @app.get("/api/deliveries")
    async def api_deliveries() -> Response:
        return _json([d.to_json() for d in sim.deliveries(request.args.get("kind"))])

    @app.post("/api/phones/<msisdn>/whatsapp")
    async def api_whatsapp(msisdn: str) -> Response:
        data = await _body()
        return _json({"message_id": sim.phone_whatsapp(msisdn, _field(data, "text", str))})

    @app.post("/api/phones/<msisdn>/tap")
    async def api_tap(msisdn: str) -> Response:
        data = await _body()
        wamid = sim.phone_tap(msisdn, _field(data, "message_id", str), _field(data, "button_id", str))
        return _json({"message_id": wamid})

    @app.post("/api/phones/<msisdn>/read")
    async def api_read(msisdn: str) -> Response:
        data = await _body()
        ids = _field(data, "message_ids", list, required=False)
        return _json({"read": sim.phone_read(msisdn, ids)})

    @app.post("/api/phones/<msisdn>/sms")
    async def api_sms(msisdn: str) -> Response:
        data = await _body()
        return _json({"id": sim.phone_sms(msisdn, _field(data, "text", str))})

    @app.post("/api/phones/<msisdn>/settings")
    async def api_settings(msisdn: str) -> Response:
        data = await _body()
        phone = sim.phone_settings(
            msisdn,
            on_whatsapp=_field(data, "on_whatsapp", bool, required=False),
            blacklisted=_field(data, "blacklisted", bool, required=False),
            name=_field(data, "name", str, required=False),
        )
        return _json(phone)

    @app.post("/api/stk/<checkout_request_id>")
    async def api_stk(checkout_request_id: str) -> Response:
        data = await _body()
        result = sim.stk_answer(
            checkout_request_id,
            _field(data, "action", str),
            pin=_field(data, "pin", str, required=False),
            drop_callback=bool(_field(data, "drop_callback", bool, required=False)),
        )
        return _json(result)

    @app.post("/api/faults")
    async def api_faults() -> Response:
        data = await _body()
        hold = data.get("hold_s")
        if hold is not None and (isinstance(hold, bool) or not isinstance(hold, (int, float)) or hold < 0):
            raise SandboxError(400, "hold_s must be a number of seconds")
        fault = sim.set_fault(
            _field(data, "service", str),
            _field(data, "mode", str),
            count=_field(data, "count", int, required=False),
            retry_after_s=_field(data, "retry_after_s", int, required=False),
            hold_s=float(hold) if hold is not None else None,
        )
        return _json({"fault": fault, "active": sim.faults.active()})

    @app.post("/api/latency")
    async def api_latency() -> Response:
        data = await _body()
        sim.set_latency(_field(data, "ms", int))
        return _json({"latency_ms": sim.latency_ms})

    @app.post("/api/reset")
    async def api_reset() -> Response:
        sim.reset()
        return _json({"ok": True})

    # -- console -----------------------------------------------------------------------------------
    @app.get("/")
    async def console() -> Response:
        response = Response(console_html, content_type="text/html; charset=utf-8")
        response.headers["Cache-Control"] = "no-store"
        return response

    return app
