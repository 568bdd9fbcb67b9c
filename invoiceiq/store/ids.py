"""Identifiers the store hands out: sortable row ids and unguessable tokens."""

from __future__ import annotations

import os
import random
import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
# Two base32 digits per table entry: half the steps of a digit-by-digit loop.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]

# Row ids need to be unique, not secret (tokens below are the secrets): a generator seeded
# from the OS once, rather than a getrandom() system call per row on the webhook's hot path.
_ROW_RANDOM = random.Random(os.urandom(32))
# A forked child must not repeat its parent's sequence (same millisecond, same "random" bits).
os.register_at_fork(after_in_child=lambda: _ROW_RANDOM.seed(os.urandom(32)))


def _b32(value: int, width: int) -> str:
    """``value`` in ``width`` base32 digits (``width`` even), most significant first."""
    out = []
    for _ in range(width // 2):
        value, rem = divmod(value, 1024)
        out.append(_PAIRS[rem])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """``ml_01jd…``: time-ordered (48-bit ms) then 60 random bits, like a ULID."""
    return f"{prefix}_{_b32(time.time_ns() // 1_000_000, 10)}{_b32(_ROW_RANDOM.getrandbits(60), 12)}"


def new_token(nbytes: int = 18) -> str:
    """An unguessable URL-safe token (pay links, callback secret)."""
    return secrets.token_urlsafe(nbytes)
