"""JSON columns: written as text on both dialects, read back from text (or a parsed value)."""

from __future__ import annotations

from typing import Any

import orjson


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def loads(value: Any) -> Any:
    if value is None or isinstance(value, (dict, list)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return orjson.loads(bytes(value))
    return orjson.loads(value)
