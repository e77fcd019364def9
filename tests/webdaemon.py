"""Test helpers for the web page: a running `earshot run` daemon with its web server, and headless Chromium.

Screenshots go to `$EARSHOT_SCREENSHOTS` if set, else `<pytest basetemp>/web-screenshots/`
(e.g. /tmp/pytest-of-$USER/pytest-current/web-screenshots/).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brokers import free_port

TOKEN = "correct-horse-battery-staple"


def chromium_driver(width: int = 1100, height: int = 900):
    """A headless Chromium driven by selenium; skips (with the reason) where it cannot start."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium and its driver are not installed (Debian: apt-get install chromium chromium-driver; "
                    "`make test` as root installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as e:
        pytest.skip(f"Chromium cannot start here: {(e.msg or str(e)).splitlines()[0]}")


def screenshot_dir(tmp_path_factory) -> Path:
    """Where the screenshots of this run go (created)."""
    d = Path(os.environ.get("EARSHOT_SCREENSHOTS") or tmp_path_factory.getbasetemp() / "web-screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def severe_console(driver) -> list[str]:
    """Console errors logged by the page since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


class Daemon:
    """`earshot run` on a config written here; its log goes to a file (a pipe nobody reads would block it)."""

    def __init__(self, workdir: Path, model: Path, wav: Path, mqtt_port: int, *, listen_host: str = "127.0.0.1",
                 token: str | None = TOKEN, extra: str = "", loop: bool = True, nofile: int | None = None,
                 clips: bool = True) -> None:
        self.dir = workdir
        self.port = free_port()
        self.metrics_port = free_port()
        self.token = token
        token_line = ""
        if token:
            (workdir / "token").write_text(token + "\n")
            (workdir / "token").chmod(0o600)
            token_line = f'token_file = "{workdir / "token"}"\n'
        self.config = workdir / "earshot.toml"
        self.config.write_text(
            f'node = "webnode"\nstate_dir = "{workdir / "state"}"\n'
            f'[[source]]\nname = "yard"\nkind = "file"\npath = "{wav}"\nloop = {str(loop).lower()}\n'
            f'[model]\npath = "{model}"\n'
            f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mqtt_port}\nreconnect_max_s = 2\n'
            f'[zmq]\nenabled = false\n[stdout]\nenabled = true\n'
            f'[clips]\nenabled = {str(clips).lower()}\npre_s = 1.0\npost_s = 1.0\n'
            f'[metrics]\nlisten = "127.0.0.1:{self.metrics_port}"\n'
            f'[web]\nlisten = "{listen_host}:{self.port}"\n{token_line}{extra}'
        )
        self.log = workdir / "daemon.log"
        self.out = workdir / "daemon.out"

        def limits() -> None:
            if nofile:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "earshot", "run", "-c", str(self.config)],
                                     stdout=self.out.open("w"), stderr=self.log.open("w"), env=env,
                                     preexec_fn=limits)

    def headers(self) -> dict:
        """The Authorization header with the token."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET over a fresh connection; (status, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=self.headers() if headers is None else headers)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the web server answers (model loaded, sources started)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"earshot exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if self.get("/api/state", timeout=2)[0] == 200 and "listening on" in self.log.read_text():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"earshot did not serve within {timeout_s} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM and wait (bounded); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
