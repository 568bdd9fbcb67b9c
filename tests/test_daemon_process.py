"""The daemon as the sysadmin runs it: a real `invoiceiq serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INVOICEIQ_", "WABA_", "MPESA_", "SMS_", "DATABASE_URL", "ADMIN_TOKEN", "MERCHANT_"))}
    env.update(extra)
    return env


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"daemon exited early with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("daemon never became ready")


def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(INVOICEIQ_SERVER_BIND=f"127.0.0.1:{port}", DATABASE_URL=f"sqlite:///{tmp_path / 'd.db'}")
    proc = subprocess.Popen([sys.executable, "-m", "invoiceiq", "serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_ready(port, proc)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    # One JSON object per line, with the lifecycle in order.
    assert events.index("starting") < events.index("ready") < events.index("signal_received") < events.index("stopped")
    assert all({"time", "level", "event"} <= set(line) for line in lines)
    assert (tmp_path / "d.db").exists()


def test_invalid_configuration_exits_before_binding(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "config.toml").write_text('[mpesa]\nshortcode = "17A379"\nshortcod = "1"\n')
    env = clean_env(INVOICEIQ_SERVER_BIND=f"127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-m", "invoiceiq", "serve"], cwd=tmp_path, env=env,
                            capture_output=True, timeout=30)
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "config: mpesa.shortcode: must be digits" in err
    assert "config: mpesa.shortcod: unknown key" in err
    # Nothing listened on the port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_check_config_masks_secrets(tmp_path: Path) -> None:
    env = clean_env(WABA_TOKEN="EAAGsupersecretvalue123", MPESA_PASSKEY="passkey-very-secret-1234",
                    INVOICEIQ_MODE="sandbox")
    result = subprocess.run([sys.executable, "-m", "invoiceiq", "check-config"], cwd=tmp_path, env=env,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "supersecret" not in out and "very-secret" not in out
    assert "token" in out and "***" in out


def test_migrate_command_applies_once(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"sqlite:///{tmp_path / 'm.db'}")
    first = subprocess.run([sys.executable, "-m", "invoiceiq", "migrate"], cwd=tmp_path, env=env,
                           capture_output=True, timeout=30)
    second = subprocess.run([sys.executable, "-m", "invoiceiq", "migrate"], cwd=tmp_path, env=env,
                            capture_output=True, timeout=30)
    assert first.returncode == second.returncode == 0
    assert b"applied migrations: [1" in first.stdout
    assert b"up to date" in second.stdout
