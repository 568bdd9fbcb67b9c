"""The layers stay apart: SQL lives in invoiceiq/store only, and the pure core does no I/O.

A grep, not a proof; it catches the easy slips (a quick ``tx.val("SELECT ...")`` in an actor)
before they spread.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "invoiceiq"
# Statements as the store writes them: upper-case keywords, so English copy ("Create an
# invoice", "with M-PESA") is not mistaken for SQL.
SQL = re.compile(r"^\s*(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX|UNIQUE)"
                 r"|ALTER\s+TABLE|DROP\s+(TABLE|INDEX)|BEGIN(\s+IMMEDIATE)?\s*$|COMMIT\s*$|PRAGMA\s|WITH\s+\w+\s+AS\s*\()",
                 re.S)
TX_CALLS = {"execute", "val", "one", "all", "fetch_all", "fetch_one", "fetch_val"}
# Modules the pure core may import: the standard library's pure parts and the core itself.
CORE_FORBIDDEN = ("anyio", "asyncio", "httpx", "quart", "hypercorn", "databases", "sqlite3", "asyncpg",
                  "socket", "invoiceiq.store", "invoiceiq.gateways", "invoiceiq.actors", "invoiceiq.web")


def _modules(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py"))


def _sql_strings(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            found.append((node.lineno, node.value[:60]))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TX_CALLS
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "tx"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value[:60]))
    return found


def test_sql_lives_in_the_store_only() -> None:
    offenders = {
        str(path.relative_to(PACKAGE.parent)): hits
        for path in _modules(PACKAGE)
        if "store" not in path.relative_to(PACKAGE).parts and (hits := _sql_strings(path))
    }
    assert offenders == {}


def test_the_checker_sees_sql(tmp_path: Path) -> None:
    sample = tmp_path / "actor.py"
    sample.write_text('async def f(tx):\n    return await tx.val("SELECT id FROM payments WHERE x = :x", {})\n')
    assert _sql_strings(sample) == [(2, "SELECT id FROM payments WHERE x = :x"), (2, "SELECT id FROM payments WHERE x = :x")]
    copy = tmp_path / "copy.py"
    copy.write_text('A = "Create an invoice"\nB = "Select a customer from the list"\nC = "UPDATE outbox SET x = 1"\n')
    assert _sql_strings(copy) == [(3, "UPDATE outbox SET x = 1")]


def test_the_core_does_no_io() -> None:
    offenders = []
    for path in _modules(PACKAGE / "core"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [("invoiceiq." + (node.module or "").lstrip(".")) if node.level >= 2 else (node.module or "")]
                     if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names
                          if any(n == f or n.startswith(f + ".") for f in CORE_FORBIDDEN)]
    assert offenders == []
