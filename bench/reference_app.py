"""The reference: a bare Quart JSON-POST endpoint on hypercorn, no database (stack.md case "c").

Run by the harness as ``hypercorn -w 1 -b 127.0.0.1:PORT bench.reference_app:app`` (the same
command shape as notes/stack.md section 7) and posted the same webhook bodies as the daemon.
"""

from __future__ import annotations

import orjson
from quart import Quart, Response, request

app = Quart(__name__)

_OK = orjson.dumps({"status": "ok"})


@app.post("/json")
async def json_post() -> Response:
    body = await request.get_data()
    data = orjson.loads(body)
    return Response(orjson.dumps({"status": "ok", "keys": len(data)}), content_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(_OK, content_type="application/json")
