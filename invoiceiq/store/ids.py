"""Identifiers the store hands out: sortable row ids and unguessable tokens."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, rem = divmod(value, 32)
        out.append(_ALPHABET[rem])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """``ml_01jd…``: time-ordered (48-bit ms) then 60 random bits, like a ULID."""
    return f"{prefix}_{_b32(time.time_ns() // 1_000_000, 10)}{_b32(secrets.randbits(60), 12)}"


def new_token(nbytes: int = 18) -> str:
    """An unguessable URL-safe token (pay links, callback secret)."""
    return secrets.token_urlsafe(nbytes)
