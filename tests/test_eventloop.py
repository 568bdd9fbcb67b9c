"""server.event_loop: which loop `invoiceiq serve` runs on (invoiceiq/eventloop.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from invoiceiq import eventloop
from invoiceiq.eventloop import LoopUnavailable, backend_options, running_loop_name

UVLOOP = importlib.util.find_spec("uvloop") is not None


async def _name() -> str:
    return running_loop_name()


def test_asyncio_is_asyncio_whatever_is_installed() -> None:
    options = backend_options("asyncio")
    assert options == {"use_uvloop": False}
    assert anyio.run(_name, backend_options=options) == "asyncio"


@pytest.mark.skipif(not UVLOOP, reason="uvloop is not installed (it is a dependency on Linux)")
@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_auto_and_uvloop_run_on_uvloop_where_it_is_installed(choice: str) -> None:
    options = backend_options(choice)
    assert options == {"use_uvloop": True}
    assert anyio.run(_name, backend_options=options) == "uvloop"


def test_without_uvloop_auto_falls_back_and_uvloop_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop.importlib.util, "find_spec", lambda name: None)
    assert backend_options("auto") == {"use_uvloop": False}
    with pytest.raises(LoopUnavailable, match='server.event_loop is "uvloop" but uvloop is not installed'):
        backend_options("uvloop")


def test_serve_refuses_a_missing_uvloop_before_binding(tmp_path: Path) -> None:
    # As if uvloop were not installed: a None in sys.modules makes find_spec answer None.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path), "INVOICEIQ_SERVER_EVENT_LOOP": "uvloop",
           "INVOICEIQ_SERVER_BIND": "127.0.0.1:1", "DATABASE_URL": f"sqlite:///{tmp_path / 'd.db'}"}
    result = subprocess.run([sys.executable, "-m", "invoiceiq", "serve"], cwd=tmp_path, env=env,
                            capture_output=True, timeout=60)
    assert result.returncode == 2, result.stderr.decode()
    assert 'server.event_loop is "uvloop" but uvloop is not installed' in result.stderr.decode()
    assert not (tmp_path / "d.db").exists()  # refused before opening anything
