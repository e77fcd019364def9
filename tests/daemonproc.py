"""`earshot run` as a real subprocess for the delivery and fault tests: config, process, event bookkeeping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from brokers import wait_until

NODE, SOURCE = "testnode", "yard"
TOPIC = f"earshot/{NODE}/{SOURCE}/event"


def daemon_config(path: Path, model: Path, port: int, wav: Path, state: Path, realtime: bool = True,
                  metrics_port: int | None = None, clips: bool = False) -> Path:
    """A config at `path`: one file source, MQTT to 127.0.0.1:`port`, events on stdout, no ZeroMQ."""
    path.write_text(
        f'node = "{NODE}"\nstate_dir = "{state}"\n'
        f'[[source]]\nname = "{SOURCE}"\nkind = "file"\npath = "{wav}"\nrealtime = {str(realtime).lower()}\n'
        f'[model]\npath = "{model}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_max_s = 1\n'
        '[zmq]\nenabled = false\n[stdout]\nenabled = true\n[homeassistant]\nenabled = false\n'
        f'[clips]\nenabled = {str(clips).lower()}\nhttp = false\n'
        + (f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n' if metrics_port else '[metrics]\nenabled = false\n')
    )
    return path


class DaemonProcess:
    """`earshot run -c config`; its events (stdout, one JSON per line, with arrival times) and log
    lines collected live. As a context manager it is killed on the way out if still running."""

    def __init__(self, config: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("STATE_DIRECTORY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "earshot", "run", "-c", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.timed: list[tuple[float, dict]] = []
        """(monotonic arrival time, event) in the order the daemon wrote them."""
        self.lines: list[str] = []
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.timed.append((time.monotonic(), json.loads(line)))

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def events(self) -> list[dict]:
        return [e for _, e in self.timed]

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def produced(self) -> list[tuple[str, str]]:
        """(id, type) of every event written, in order."""
        return [(e["id"], e["type"]) for _, e in self.timed]

    def wait_log(self, needle: str, timeout_s: float) -> bool:
        return wait_until(lambda: needle in self.log, timeout_s, poll_s=0.1)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        for t in self._threads:
            t.join(5)

    def wait(self, timeout_s: float) -> int:
        """Exit status once it ends by itself (killed if it has not within `timeout_s`), output read to the end."""
        try:
            self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        for t in self._threads:
            t.join(5)
        return self.proc.returncode


def first_seen(payloads: list[bytes]) -> list[tuple[str, str]]:
    """(id, type) in order of first arrival (QoS 1 may deliver twice; consumers drop duplicates by id)."""
    out: list[tuple[str, str]] = []
    for p in payloads:
        e = json.loads(p)
        if (e["id"], e["type"]) not in out:
            out.append((e["id"], e["type"]))
    return out
