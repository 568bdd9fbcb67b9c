"""sd_notify over a real AF_UNIX datagram socket, the way systemd listens for it."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from harness import make_settings, running_daemon
from invoiceiq.systemd import Notifier, watchdog_interval_s


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are capped at 108 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="iq-sd-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture
def path_listener(sock_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(sock_dir / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"invoiceiq-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    yield sock, "@" + name  # the form systemd puts in NOTIFY_SOCKET
    sock.close()


def test_ready_with_status_is_one_datagram(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("listening on 127.0.0.1:8000") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:8000\n"
    assert n.errors == 0


def test_ready_without_status(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    Notifier.from_env({"NOTIFY_SOCKET": path}).ready()
    assert sock.recv(4096) == b"READY=1\n"


def test_watchdog_stopping_status_reloading(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"
    n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\n"
    n.status("draining 3 requests")
    assert sock.recv(4096) == b"STATUS=draining 3 requests\n"
    n.reloading()
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=", 1)[1]) > 0
    assert n.errors == 0


def test_abstract_socket(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, address = abstract_listener
    n = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert n.ready("up")
    assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1\n"


def test_newline_in_a_value_cannot_forge_another_field(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    Notifier.from_env({"NOTIFY_SOCKET": path}).status("bad\nREADY=1")
    assert sock.recv(4096) == b"STATUS=bad READY=1\n"


def test_notify_sends_arbitrary_fields_in_order(path_listener: tuple[socket.socket, str]) -> None:
    sock, path = path_listener
    Notifier.from_env({"NOTIFY_SOCKET": path}).notify(STATUS="x", ERRNO=5)
    assert sock.recv(4096) == b"STATUS=x\nERRNO=5\n"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1234"}])
def test_no_socket_is_a_no_op(env: dict[str, str]) -> None:
    n = Notifier.from_env(env)
    assert not n.enabled
    assert n.ready("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.errors == 0


def test_from_env_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert Notifier.from_env().address == "/run/systemd/notify"


def test_vanished_socket_is_counted_not_raised(sock_dir: Path) -> None:
    path = str(sock_dir / "gone")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    sock.close()
    os.unlink(path)  # systemd went away (or was re-executed) under us
    assert n.watchdog() is False
    assert n.ready() is False
    assert n.errors == 2
    assert n.last_error is not None and "FileNotFoundError" in n.last_error


def test_unbound_abstract_name_is_counted() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": f"@invoiceiq-test-nobody-{uuid.uuid4().hex}"})
    assert n.stopping() is False
    assert n.errors == 1  # ECONNREFUSED: nobody bound that name


def test_full_receive_queue_does_not_block(path_listener: tuple[socket.socket, str]) -> None:
    # A PID 1 that stops reading must not stall the event loop: sends fail fast and are counted.
    _sock, path = path_listener
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    for _ in range(5000):
        if not n.status("x" * 1024):
            break
    assert n.errors >= 1
    assert n.last_error is not None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # armed for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env) == expected


def test_watchdog_interval_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 2.0


# -- the daemon's watchdog: liveness of the loop, not health of the actors --------------------------


async def _datagrams(sock: socket.socket, count: int, timeout: float, what: str) -> list[bytes]:
    """The next ``count`` datagrams, read without blocking the event loop the daemon runs on."""
    got: list[bytes] = []
    try:
        with anyio.fail_after(timeout):
            while len(got) < count:
                try:
                    got.append(sock.recv(4096))
                except BlockingIOError:
                    await anyio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}; got {got}") from None
    return got


@pytest.mark.anyio
async def test_watchdog_keeps_pinging_while_an_actor_crash_loops(
        database_url: str, path_listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # An actor stuck in its restart backoff (a database outage does that to them all) is a
    # readiness problem, answered by /readyz with a 503; it is no reason for systemd to kill a
    # daemon whose event loop is fine, so WATCHDOG=1 must keep coming.
    sock, path = path_listener
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    async with running_daemon(make_settings(database_url)) as h:
        (first,) = await _datagrams(sock, 1, 5, "READY=1")
        assert first.startswith(b"READY=1\n")
        supervisor = h.daemon.supervisor
        assert supervisor is not None

        async def broken() -> None:
            raise RuntimeError("database unreachable")

        supervisor.start("doomed", broken)
        with anyio.fail_after(5):
            while (r := await h.client.get("/readyz")).status_code != 503:
                await anyio.sleep(0.01)
        assert "doomed" in r.json()["checks"]["actors"]
        while True:  # forget what was sent before the failure was visible
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        pings = await _datagrams(sock, 4, 5, "WATCHDOG=1 while an actor is failing")
        assert pings == [b"WATCHDOG=1\n"] * 4
        assert "doomed" in supervisor.failing()
        assert (await h.client.get("/readyz")).status_code == 503
        assert (await h.client.get("/healthz")).status_code == 200
