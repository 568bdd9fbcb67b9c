"""Plumbing shared by the simulated providers: requests and replies as plain values, the
serialisation and signature Meta uses, Nairobi clock stamps, and identifier factories.

Kept free of any web framework so that each provider's rules are plain functions of a request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import random
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

NAIROBI = timezone(timedelta(hours=3), "EAT")


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-cased names
    query: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it isn't."""
        return json.loads(self.body.decode("utf-8"))


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    data: Any = None  # the object a JSON body was made from, so the journal needn't re-parse it

    @classmethod
    def json(cls, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> Reply:
        return cls(status, compact_json(obj), "application/json", headers or {}, obj)

    @classmethod
    def text(cls, status: int, text: str, headers: Mapping[str, str] | None = None) -> Reply:
        return cls(status, text.encode("utf-8"), "text/plain", headers or {})

    def parsed(self) -> Any:
        """The body as the journal keeps it: JSON when it is JSON, else text."""
        if self.data is not None:
            return self.data
        if self.content_type == "application/json":
            return json.loads(self.body)
        return self.body.decode("utf-8", "replace")


def compact_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def meta_json(obj: Any) -> bytes:
    """Meta signs an ASCII body with \\uXXXX escapes (lowercase hex); receivers must HMAC the raw
    bytes, so the simulator serialises exactly the way the samples say Meta does."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def hub_signature(app_secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(app_secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def nairobi_stamp(t: float) -> str:
    """``YYYYMMDDHHmmss`` in East Africa Time, the clock Daraja's Timestamp is read on."""
    return datetime.fromtimestamp(t, NAIROBI).strftime("%Y%m%d%H%M%S")


def parse_nairobi_stamp(stamp: str) -> float | None:
    if len(stamp) != 14 or not stamp.isdigit():
        return None
    try:
        return datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI).timestamp()
    except ValueError:
        return None


_ALNUM_UPPER = string.ascii_uppercase + string.digits
_ALNUM = string.ascii_letters + string.digits


class Ids:
    """Identifiers shaped like each provider's; a counter inside each makes them unique even if
    the random part repeats. Only the access token is a credential and comes from ``secrets``;
    the rest use a fast PRNG, since the Graph send path makes several per call."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._receipts: set[str] = set()
        self._rng = random.Random(secrets.randbits(64))

    def _pick(self, alphabet: str, n: int) -> str:
        return "".join(self._rng.choices(alphabet, k=n))

    def _hex(self, nbytes: int) -> str:
        return self._rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big").hex()

    def _next(self) -> int:
        return next(self._counter)

    def wamid(self, msisdn: str, inbound: bool = False) -> str:
        # Real wamids are base64 of a small binary record holding the phone number: keep that
        # shape so a parser that peeks at them (it shouldn't) sees what it would see live.
        digits = msisdn.encode("ascii")
        tag = b"\x15\x02\x00\x12\x18\x14" if inbound else b"\x15\x02\x00\x11\x18\x12"
        width = 20 if inbound else 18
        serial = f"{self._next():08X}{self._hex(6).upper()}"[:width].ljust(width, "0")
        raw = b"\x1c\x18" + bytes([len(digits)]) + digits + tag + serial.encode("ascii") + b"\x00"
        return "wamid." + base64.b64encode(raw).decode("ascii")

    def fbtrace_id(self) -> str:
        return self._pick(_ALNUM, 23)

    def daraja_request_id(self) -> str:
        return f"{self._hex(2)}-{self._hex(2)}-{self._hex(2)}-{self._hex(6)}{self._next()}"

    def merchant_request_id(self) -> str:
        return self.daraja_request_id()

    def checkout_request_id(self, t: float, msisdn: str) -> str:
        # ws_CO_ + ddmmyyyyHHMMSS + 3 digits + the subscriber number without 254, like the samples.
        when = datetime.fromtimestamp(t, NAIROBI).strftime("%d%m%Y%H%M%S")
        return f"ws_CO_{when}{self._next() % 1000:03d}{msisdn[3:]}"

    def access_token(self) -> str:
        return "".join(secrets.choice(_ALNUM) for _ in range(28))

    def receipt(self) -> str:
        # 10 characters, letters first (NLJ7RT61SV); remembered so no receipt repeats.
        while True:
            candidate = self._pick(string.ascii_uppercase, 3) + self._pick(_ALNUM_UPPER, 7)
            if candidate not in self._receipts:
                self._receipts.add(candidate)
                return candidate

    def at_message_id(self) -> str:
        return f"ATXid_{self._hex(16)}"

    def uuid(self) -> str:
        h = self._hex(16)
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def conversation_id(self) -> str:
        return self._hex(16)


class SandboxError(Exception):
    """A control action the world can't take (unknown phone message, prompt already answered...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
