"""The daemon as the sysadmin runs it: a real `invoiceiq serve` process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# The console script pip installed beside the interpreter, as ExecStart= runs it.
CONSOLE_SCRIPT = Path(sys.executable).parent / "invoiceiq"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    # Also drop a NOTIFY_SOCKET/WATCHDOG_* the test run may itself have been given by systemd.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INVOICEIQ_", "WABA_", "MPESA_", "SMS_", "DATABASE_URL", "ADMIN_TOKEN", "MERCHANT_",
                                "NOTIFY_SOCKET", "WATCHDOG_"))}
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
    # server.event_loop "auto": uvloop, a dependency on this platform (tests/test_eventloop.py).
    starting = next(line for line in lines if line["event"] == "starting")
    assert starting["event_loop"] == "uvloop"
    # The served process runs the collector policy of gc_policy: start-up frozen, fewer
    # young collections (a daemon inside a test process leaves its collector alone).
    from invoiceiq import gc_policy

    tuned = [line for line in lines if line["event"] == "gc_tuned"]
    assert len(tuned) == 1 and tuned[0]["frozen_objects"] > 10_000
    assert tuned[0]["thresholds"] == [gc_policy.YOUNG_THRESHOLD, gc_policy.MIDDLE_THRESHOLD, gc_policy.OLD_THRESHOLD]
    assert events.index("gc_tuned") < events.index("ready")


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


# -- sd_notify, as systemd sees it ---------------------------------------------------------------


@dataclass
class Notice:
    fields: dict[str, str]
    pid: int  # the sender, from SCM_CREDENTIALS: what systemd checks for NotifyAccess=main
    at: float


@dataclass
class NotifySocket:
    """What systemd binds for a Type=notify unit: an AF_UNIX datagram socket asking for the
    sender's credentials with every datagram."""

    sock: socket.socket
    path: str
    notices: list[Notice] = field(default_factory=list)

    def _read(self, until: float) -> bool:
        self.sock.settimeout(max(0.001, until - time.monotonic()))
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return False
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.notices.append(Notice(fields, pid, time.monotonic()))
        return True

    def wait_for(self, check: Callable[[list[Notice]], bool], what: str, proc: subprocess.Popen[bytes],
                 timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.notices):
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {what}; got {[n.fields for n in self.notices]}")
            if not self._read(min(deadline, time.monotonic() + 0.2)) and proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode} before {what}; "
                                     f"got {[n.fields for n in self.notices]}")

    def collect_until(self, until: float) -> None:
        """Everything sent before ``until`` (an observation window, for what must NOT be sent)."""
        while time.monotonic() < until:
            self._read(until)

    def index(self, key: str, value: str = "1") -> int:
        return next(i for i, n in enumerate(self.notices) if n.fields.get(key) == value)

    def count(self, key: str, value: str = "1") -> int:
        return sum(1 for n in self.notices if n.fields.get(key) == value)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # AF_UNIX paths are capped at 108 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="iq-notify-", dir="/tmp") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(path)
        try:
            yield NotifySocket(sock, path)
        finally:
            sock.close()


def ready_port(notices: list[Notice]) -> int:
    ready = next(n for n in notices if n.fields.get("READY") == "1")
    match = re.fullmatch(r"serving on port (\d+)", ready.fields.get("STATUS", ""))
    assert match, ready.fields
    return int(match.group(1))


def test_notify_sequence_ready_watchdog_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    assert CONSOLE_SCRIPT.exists(), CONSOLE_SCRIPT
    env = clean_env(INVOICEIQ_SERVER_BIND="127.0.0.1:0", DATABASE_URL=f"sqlite:///{tmp_path / 'd.db'}",
                    NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="200000")
    # As systemd does: WATCHDOG_PID is the service's main PID, which sh keeps through exec.
    log = (tmp_path / "out.log").open("wb")
    proc = subprocess.Popen(["/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" serve', str(CONSOLE_SCRIPT)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        notify_socket.wait_for(lambda ns: any(n.fields.get("READY") == "1" for n in ns), "READY=1", proc)
        # READY=1 means "/readyz answers 200" (Type=notify units are started at that moment).
        port = ready_port(notify_socket.notices)
        readyz = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert readyz.status_code == 200, readyz.text
        assert notify_socket.index("READY") == 0  # nothing before it, no watchdog ping either

        # WatchdogSec=0.2s: a ping every 0.1 s from then on.
        notify_socket.wait_for(lambda ns: sum(n.fields.get("WATCHDOG") == "1" for n in ns) >= 3,
                               "three WATCHDOG=1", proc, timeout=10)

        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for(lambda ns: any(n.fields.get("STOPPING") == "1" for n in ns), "STOPPING=1", proc)
        assert proc.wait(timeout=20) == 0, (tmp_path / "out.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    notify_socket.collect_until(time.monotonic() + 0.05)  # anything still queued in the socket
    notices = notify_socket.notices
    ready, stopping = notify_socket.index("READY"), notify_socket.index("STOPPING")
    pings = [i for i, n in enumerate(notices) if n.fields.get("WATCHDOG") == "1"]
    assert len(pings) >= 3 and ready < min(pings) and max(pings) < stopping, [n.fields for n in notices]
    # At the interval (half of WATCHDOG_USEC = 0.1 s), not in a burst: no more pings than fit
    # between READY and STOPPING (read times, so allow a little slack).
    window = notices[stopping].at - notices[ready].at
    assert len(pings) <= (window + 0.5) / 0.1 + 2, (len(pings), window)
    assert notify_socket.count("READY") == notify_socket.count("STOPPING") == 1
    # Every notice came from the main process itself (NotifyAccess=main would drop the others).
    assert {n.pid for n in notices} == {proc.pid}


def test_sigint_stops_cleanly_and_another_pids_watchdog_is_not_ours(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    # Ctrl-C in a terminal, `kill -INT`: the same orderly stop as SIGTERM. WATCHDOG_PID names
    # another process (ours, the parent), as when the variables leak into a child: no pings.
    env = clean_env(INVOICEIQ_SERVER_BIND="127.0.0.1:0", DATABASE_URL=f"sqlite:///{tmp_path / 'd.db'}",
                    NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="200000", WATCHDOG_PID=str(os.getpid()))
    proc = subprocess.Popen([str(CONSOLE_SCRIPT), "serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        notify_socket.wait_for(lambda ns: any(n.fields.get("READY") == "1" for n in ns), "READY=1", proc)
        port = ready_port(notify_socket.notices)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        # Ten ping intervals in which a daemon that ignored WATCHDOG_PID would have pinged.
        notify_socket.collect_until(time.monotonic() + 1.0)
        proc.send_signal(signal.SIGINT)
        notify_socket.wait_for(lambda ns: any(n.fields.get("STOPPING") == "1" for n in ns), "STOPPING=1", proc)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert notify_socket.count("WATCHDOG") == 0, [n.fields for n in notify_socket.notices]
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("ready") < names.index("signal_received") < names.index("stopped")
    assert [e["signal"] for e in events if e["event"] == "signal_received"] == ["SIGINT"]
    assert not [e for e in events if e["level"] in ("error", "critical")], events
    assert b"Traceback" not in out and b"KeyboardInterrupt" not in out
