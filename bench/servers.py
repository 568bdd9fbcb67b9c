"""Every process the harness starts: pinned, probed, and stopped again by its own PID."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from invoiceiq.eventloop import backend_options

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPU the servers get and which the load generator (and the fakes) get."""

    server: str | None
    load: str | None
    cpus: tuple[int, ...]

    @classmethod
    def detect(cls, enabled: bool = True) -> Pinning:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        if enabled and len(cpus) >= 2 and shutil.which("taskset"):
            return cls(str(cpus[0]), str(cpus[1]), cpus)
        return cls(None, None, cpus)

    def wrap(self, cmd: list[str], role: str) -> list[str]:
        cpu = self.server if role == "server" else self.load
        return cmd if cpu is None else ["taskset", "-c", cpu, *cmd]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB, from /proc."""
    result: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                result[key] = int(value.split()[0])
    except OSError:
        pass
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0): look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Proc:
    name: str
    cmd: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    env_shown: dict[str, str] = field(default_factory=dict)
    cwd: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def worker_pid(self) -> int:
        """The process doing the work: hypercorn -w 1's spawned worker, else this one (through taskset's exec)."""
        for kid in children_of(self.pid):
            try:
                cmdline = Path(f"/proc/{kid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:  # not multiprocessing's resource_tracker
                return kid
        return self.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL; children (hypercorn's worker) are reaped by PID too."""
        if not self.running():
            return self.popen.returncode
        kids = children_of(self.pid)
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        deadline = time.monotonic() + 5
        for kid in kids:
            while _alive(kid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(kid):
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.popen.returncode

    def describe(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env_shown.items())
        return (env + " " if env else "") + shlex.join(self.cmd)


class Processes:
    """Every process started, so that a failure anywhere still stops them all (by PID)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              env_shown: dict[str, str] | None = None) -> Proc:
        log_path = self.logdir / f"{name}.log"
        log = log_path.open("wb")
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=str(cwd) if cwd else None)
        log.close()
        proc = Proc(name, cmd, popen, log_path, dict(env_shown or {}), str(cwd or ""))
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def wait_http(url: str, proc: Proc, timeout: float = 30.0, expect: int = 200) -> float:
    """Poll ``url`` until it answers ``expect``; seconds it took. Raises if the process dies."""
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout:
        if not proc.running():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == expect:
                    return time.monotonic() - started
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout:.0f}s ({last}):\n{proc.log_tail()}")


def get_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


# -- the three kinds of server ---------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This process's environment without anything that could configure the daemon."""
    drop_prefixes = ("INVOICEIQ_", "WABA_", "SMS_", "MPESA_", "NOTIFY_SOCKET", "WATCHDOG_")
    drop = {"DATABASE_URL", "MERCHANT_MSISDN", "ADMIN_TOKEN"}
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop}


def start_sink(procs: Processes, pin: Pinning, name: str = "sink", latency_ms: int = 0) -> tuple[Proc, int]:
    port = free_port()
    cmd = pin.wrap([sys.executable, "-m", "bench.sink", "--port", str(port), "--latency-ms", str(latency_ms)], "load")
    env = clean_env()
    env["PYTHONPATH"] = str(REPO)
    proc = procs.start(name, cmd, env=env, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=15)
    return proc, port


_event_loop = "auto"  # --event-loop: the daemon's server.event_loop, and the reference's loop


def set_event_loop(choice: str) -> None:
    global _event_loop
    backend_options(choice)  # "uvloop" without uvloop: refuse before anything starts
    _event_loop = choice


def reference_loop() -> str:
    """The loop the daemon runs on (invoiceiq/eventloop.py), for the reference too."""
    return "uvloop" if backend_options(_event_loop)["use_uvloop"] else "asyncio"


def loop_env() -> dict[str, str]:
    """The daemon's environment for it."""
    return {"INVOICEIQ_SERVER_EVENT_LOOP": reference_loop()}


def start_reference(procs: Processes, pin: Pinning) -> tuple[Proc, int]:
    port = free_port()
    hypercorn = VENV_BIN / "hypercorn"
    exe = [str(hypercorn)] if hypercorn.exists() else [sys.executable, "-m", "hypercorn"]
    # On the daemon's event loop (server.event_loop "auto": uvloop where installed), so that the
    # ratio compares the same stack with and without InvoiceIQ's work.
    loop = ["-k", "uvloop"] if reference_loop() == "uvloop" else []
    cmd = pin.wrap([*exe, "-w", "1", *loop, "-b", f"127.0.0.1:{port}", "bench.reference_app:app"], "server")
    env = clean_env()
    env["PYTHONPATH"] = str(REPO)
    proc = procs.start("reference", cmd, env=env, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=30)
    return proc, port


# The fake credentials of tests/harness.py's base_env: every provider configured, live mode.
def daemon_env(database_url: str, port: int, sink_port: int, **extra: str) -> dict[str, str]:
    sink = f"http://127.0.0.1:{sink_port}"
    env = {
        "INVOICEIQ_MODE": "live",
        "INVOICEIQ_SERVER_BIND": f"127.0.0.1:{port}",
        "INVOICEIQ_SERVER_PUBLIC_URL": "https://pay.test",
        "INVOICEIQ_SERVER_SHUTDOWN_GRACE_S": "2",
        "DATABASE_URL": database_url,
        "MERCHANT_MSISDN": "254700000001",
        "ADMIN_TOKEN": "admin-token-for-tests-0123",
        "WABA_TOKEN": "EAAG-test-token",
        "WABA_PHONE_ID": "106540352242922",
        "WABA_VERIFY_TOKEN": "verify-token-for-tests",
        "WABA_APP_SECRET": "test_app_secret_0123456789abcdef",
        "INVOICEIQ_WHATSAPP_API_BASE": f"{sink}/v25.0",
        "SMS_USERNAME": "invoiceiq",
        "SMS_API_KEY": "at-api-key-for-tests",
        "SMS_CALLBACK_TOKEN": "bench-sms-callback-token-0123",
        "INVOICEIQ_SMS_API_BASE": sink,
        "MPESA_CONSUMER_KEY": "ck-test",
        "MPESA_CONSUMER_SECRET": "cs-test",
        "MPESA_SHORTCODE": "174379",
        "MPESA_PASSKEY": "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
        # Nothing in the ingest scenarios calls Daraja; keep it local all the same.
        "INVOICEIQ_MPESA_API_BASE": f"{sink}/daraja",
        **loop_env(),
    }
    env.update(extra)
    return env


def start_daemon(procs: Processes, pin: Pinning, name: str, workdir: Path, sink_port: int,
                 **extra: str) -> tuple[Proc, int, Path]:
    port = free_port()
    db = workdir / f"{name}.db"
    shown = daemon_env(f"sqlite:///{db}", port, sink_port, **extra)
    env = clean_env()
    env.update(shown)
    invoiceiq = VENV_BIN / "invoiceiq"
    exe = [str(invoiceiq)] if invoiceiq.exists() else [sys.executable, "-m", "invoiceiq"]
    cmd = pin.wrap([*exe, "serve"], "server")
    # cwd: the temp dir, so that no ./config.toml of the checkout is picked up.
    proc = procs.start(name, cmd, env=env, cwd=workdir, env_shown=shown)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=60)
    return proc, port, db


def daemon_code() -> Path | None:
    """Where the daemons this bench starts import ``invoiceiq`` from: the venv's Python, the
    daemon's environment, outside the checkout (as they run). A venv made by another clone
    (an editable install points at that clone) would run that clone's code under this one's
    name; ``main`` refuses to start then."""
    python = VENV_BIN / "python"
    try:
        done = subprocess.run([str(python) if python.exists() else sys.executable, "-c",
                               "import invoiceiq; print(invoiceiq.__file__)"],
                              env=clean_env(), cwd="/", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(done.stdout.strip()).resolve().parent if done.returncode == 0 and done.stdout.strip() else None


# -- CPU accounting: is the server alone on its core? ------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu_s(stat: Path) -> float | None:
    """utime + stime in seconds from a /proc ``stat`` file (a process's: all its threads)."""
    try:
        fields = stat.read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def _proc_cpu_s(pid: int) -> float | None:
    return _stat_cpu_s(Path(f"/proc/{pid}/stat"))


def thread_cpu_s(pid: int) -> tuple[float, float] | None:
    """CPU seconds of ``pid``'s main thread (the daemon's event loop) and of all its other
    threads together (the SQLite committer's fsyncs, reader threads)."""
    main = _stat_cpu_s(Path(f"/proc/{pid}/task/{pid}/stat"))
    whole = _proc_cpu_s(pid)
    if main is None or whole is None:
        return None
    return main, max(0.0, whole - main)


def _cpu_times() -> dict[str, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            out[name[3:]] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


class CpuSample:
    """Around one load run: the server's CPU use and how busy each pinned core was overall.

    ``other_on_server_cpu_pct`` (core busy minus the server's own use) shows other processes
    on the machine competing with the server: the numbers of such a run are not clean.
    """

    def __init__(self, pid: int, pin: Pinning) -> None:
        self.pid = pid
        self.pin = pin
        self.t0 = time.monotonic()
        self.p0 = _proc_cpu_s(pid)
        self.c0 = _cpu_times()
        self.load0 = Path("/proc/loadavg").read_text().split()[0]

    def finish(self) -> dict[str, object]:
        wall = time.monotonic() - self.t0
        p1 = _proc_cpu_s(self.pid)
        c1 = _cpu_times()
        result: dict[str, object] = {"wall_s": round(wall, 2), "loadavg_1m_before": float(self.load0),
                                     "loadavg_1m_after": float(Path("/proc/loadavg").read_text().split()[0])}
        server_pct = None
        if self.p0 is not None and p1 is not None and wall > 0:
            server_pct = 100.0 * (p1 - self.p0) / wall
            result["server_cpu_pct"] = round(server_pct, 1)
        for role, cpu in (("server", self.pin.server), ("load", self.pin.load)):
            if cpu is None or cpu not in c1 or cpu not in self.c0:
                continue
            busy = c1[cpu][0] - self.c0[cpu][0]
            total = c1[cpu][1] - self.c0[cpu][1]
            if total > 0:
                result[f"{role}_cpu_busy_pct"] = round(100.0 * busy / total, 1)
        if server_pct is not None and "server_cpu_busy_pct" in result:
            result["other_on_server_cpu_pct"] = round(max(0.0, float(result["server_cpu_busy_pct"]) - server_pct), 1)  # type: ignore[arg-type]
        return result
