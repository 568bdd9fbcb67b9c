"""Headless Chromium for the browser tests, driven with plain W3C WebDriver calls over httpx.

No Python package beyond the project's own: chromedriver (Debian's ``chromium-driver``) speaks
WebDriver over HTTP, and ``Browser`` sends it just the handful of commands the tests use.

``require_browser()`` decides what happens on a machine without Chromium: the calling test
is skipped with the reason (``pytest -ra`` prints it), except when
``INVOICEIQ_TEST_REQUIRE_BROWSER=1`` (CI sets it in .ci/run): then the missing browser is a
failure, so a CI image that lost its browser cannot pass by skipping.

Everything here is synchronous (blocking httpx calls). A test that runs the daemon in its own
event loop must call the browser from a worker thread (``anyio.to_thread.run_sync``), or the
page load would wait on a server that cannot answer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
REQUIRE_ENV = "INVOICEIQ_TEST_REQUIRE_BROWSER"
T = TypeVar("T")


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
    if not missing:
        return None
    return (f"needs {' and '.join(missing)} on PATH (Debian: apt-get install chromium chromium-driver)")


def require_browser() -> None:
    """Skip the calling test without a browser; fail it instead when the environment requires one.

    Call it from an autouse fixture of the browser test module, not at import: a failure while
    collecting would interrupt the whole run instead of failing one test."""
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get(REQUIRE_ENV, "").strip() == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the browser test cannot run: {reason}", pytrace=False)
    print(f"skipping browser test: {reason}")  # shown with -s; -ra prints the skip reason too
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(check: Callable[[], T | None], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy (transport and lookup errors count as
    "not yet"); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (httpx.TransportError, LookupError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 10 s."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Browser:
    """Just enough W3C WebDriver: one session in headless Chromium."""

    def __init__(self, url: str, *, window: str = "1400,1000", javascript: bool = True) -> None:
        assert CHROMIUM is not None
        self.http = httpx.Client(base_url=url, timeout=30)
        options: dict[str, Any] = {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={window}"],
        }
        if not javascript:
            # The page's own scripts are off (as for a user who disabled them); WebDriver's
            # element commands still work, ``js`` does not.
            options["prefs"] = {"profile.managed_default_content_settings.javascript": 2}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        r = self.http.request(method, path, json=body)
        value = r.json()["value"]
        if r.status_code != 200:
            raise LookupError(f"{path}: {value}")
        return value

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def go(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def url(self) -> str:
        return str(self._call("GET", self._s("/url")))

    def title(self) -> str:
        return str(self._call("GET", self._s("/title")))

    def find(self, css: str) -> str:
        return self._call("POST", self._s("/element"), {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", self._s("/elements"), {"using": "css selector", "value": css})
        return [e[ELEMENT] for e in found]

    def text(self, css: str) -> str:
        """The rendered text of the first element matching ``css``."""
        return str(self._call("GET", self._s(f"/element/{self.find(css)}/text")))

    def click(self, css: str) -> None:
        self._call("POST", self._s(f"/element/{self.find(css)}/click"), {})

    def type(self, css: str, text: str) -> None:
        self._call("POST", self._s(f"/element/{self.find(css)}/value"), {"text": text})

    def js(self, script: str, *args: Any) -> Any:
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def cookies(self) -> list[dict[str, Any]]:
        return list(self._call("GET", self._s("/cookie")))

    def close(self) -> None:
        try:
            self._call("DELETE", self._s(""))
        finally:
            self.http.close()


@contextmanager
def start_browser(**kwargs: Any) -> Iterator[Browser]:
    """chromedriver on a free port and one headless Chromium session; both gone on exit."""
    assert CHROMEDRIVER is not None, missing_browser()
    port = free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: httpx.get(url + "/status", timeout=1).json()["value"]["ready"], 15, "chromedriver")
        b = Browser(url, **kwargs)
        try:
            yield b
        finally:
            b.close()
    finally:
        stop_process(driver)
