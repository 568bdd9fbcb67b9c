"""Pre-generated, pre-signed WhatsApp webhook bodies, one file per load-generator invocation.

A file holds one request per line: ``<X-Hub-Signature-256 value> TAB <raw JSON body>``. Every
body carries a message id that is unique across the whole benchmark (the id embeds the
scenario and the run label), so a body is never sent twice unless a file runs out, which the
load generators report (``sent`` > ``bodies``) and the durability check treats as a failure.

The envelope and the signature are the same as the test harness's (``tests/harness.py``:
``inbound_text``, ``sign``, and ``Handle.post_webhook``'s compact ``json.dumps``); a test
checks that they stay byte-identical.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The same fake credentials as tests/harness.py (they are test values, not secrets).
APP_SECRET = "test_app_secret_0123456789abcdef"
PHONE_ID = "106540352242922"
MERCHANT = "254700000001"
DISPLAY_NUMBER = "254700100200"
WABA_ID = "102290129340398"

CUSTOMER_TEXTS = (
    "Hello, do I owe you anything?",
    "Habari, naomba invoice yangu",
    "How much is my bill this month?",
    "Thanks, I will pay tomorrow",
)


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def envelope(sender: str, name: str, message: dict[str, Any]) -> dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": [{"id": WABA_ID, "changes": [{
        "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": DISPLAY_NUMBER, "phone_number_id": PHONE_ID},
            "contacts": [{"profile": {"name": name}, "wa_id": sender}],
            "messages": [message]}}]}]}


def inbound_text(sender: str, text: str, *, wamid: str, timestamp: int, name: str = "Test") -> dict[str, Any]:
    return envelope(sender, name, {"from": sender, "id": wamid, "timestamp": str(timestamp), "type": "text",
                                   "text": {"body": text}})


def encode(payload: dict[str, Any]) -> bytes:
    # Exactly what tests/harness.py's Handle.post_webhook sends.
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class BodySet:
    """One file of bodies for one load-generator invocation."""

    path: Path
    count: int
    id_prefix: str
    kind: str


def _customer_messages(prefix: str, count: int, first_index: int, customers: int, ts: int) -> Iterator[bytes]:
    for i in range(count):
        n = first_index + i
        sender = f"2547{20_000_000 + n % customers:08d}"  # 254720000000...: many different customers
        text = CUSTOMER_TEXTS[n % len(CUSTOMER_TEXTS)]
        yield encode(inbound_text(sender, text, wamid=f"{prefix}{i:08d}", timestamp=ts, name=f"Customer {n % customers}"))


def _merchant_invoices(prefix: str, count: int, first_index: int, ts: int) -> Iterator[bytes]:
    for i in range(count):
        n = first_index + i
        # `invoice 07XXXXXXXX 2500 Cleaning`, a different customer for every invoice of the benchmark.
        text = f"invoice 07{11_000_000 + n:08d} 2500 Cleaning"
        yield encode(inbound_text(MERCHANT, text, wamid=f"{prefix}{i:08d}", timestamp=ts, name="Merchant"))


def write_bodies(path: Path, kind: str, *, scenario: str, label: str, count: int, first_index: int = 0,
                 customers: int = 10_000, secret: str = APP_SECRET) -> BodySet:
    """Write ``count`` signed bodies of ``kind`` (``customer_text`` | ``merchant_invoice``)."""
    prefix = f"wamid.bench.{scenario}.{label}."
    ts = int(time.time())
    if kind == "customer_text":
        bodies = _customer_messages(prefix, count, first_index, customers, ts)
    elif kind == "merchant_invoice":
        bodies = _merchant_invoices(prefix, count, first_index, ts)
    elif kind == "reference":
        # The reference endpoint ignores the signature; same shape and size as the ingest bodies.
        bodies = _customer_messages(prefix, count, first_index, customers, ts)
    else:
        raise ValueError(f"unknown body kind {kind!r}")
    key = secret.encode()
    with path.open("wb") as out:
        for body in bodies:
            if b"\n" in body or b"\t" in body:  # json.dumps escapes both; keep the file format honest
                raise AssertionError("body contains a raw newline or tab")
            sig = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
            out.write(sig.encode() + b"\t" + body + b"\n")
    return BodySet(path=path, count=count, id_prefix=prefix, kind=kind)


def read_bodies(path: Path) -> list[tuple[str, bytes]]:
    result = []
    with path.open("rb") as f:
        for line in f:
            sig, _, body = line.rstrip(b"\n").partition(b"\t")
            result.append((sig.decode(), body))
    return result


def mean_body_bytes(path: Path, sample: int = 200) -> int:
    sizes = []
    with path.open("rb") as f:
        for line in f:
            sizes.append(len(line) - line.index(b"\t") - 2)
            if len(sizes) >= sample:
                break
    return round(sum(sizes) / len(sizes)) if sizes else 0
