"""Test helper: a private PulseAudio server with a null sink whose monitor is the default source.

Audio played into the sink (`PulseServer.play`) can be captured from its monitor by
PortAudio through ALSA's `pulse`/`default` devices (the `libasound2-plugins` package
routes them to PulseAudio) in any process started with `PulseServer.env`. PortAudio
enumerates devices when it initialises, so capture usually runs in a subprocess
started after the server is up.

Works as root: the server runs per-user (`-n` skips the default script, modules are
loaded explicitly) with HOME/XDG_RUNTIME_DIR in a temporary directory, so it never
touches a real session. Raises `PulseUnavailable` when the server cannot start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SINK = "earshot_test"
"""Name of the null sink; its monitor source is `earshot_test.monitor`."""
SINK_RATE = 48000
"""Sample rate of the null sink (Hz)."""


class PulseUnavailable(RuntimeError):
    """PulseAudio (or its tools) is missing or would not start here."""


@dataclass
class PulseServer:
    """A running private PulseAudio server."""

    env: dict[str, str]
    """Environment for clients (PULSE_SERVER, HOME, XDG_RUNTIME_DIR, ...)."""
    socket: Path
    """The server's native-protocol unix socket."""
    root: Path
    """Temporary directory holding its runtime files and log."""
    proc: subprocess.Popen[bytes] | None = None
    """The server process (None while stopped)."""

    def pactl(self, *args: str, timeout_s: float = 10.0) -> str:
        """Run `pactl` against this server and return its stdout (raises on failure)."""
        out = subprocess.run(
            ["pactl", *args], env=self.env, capture_output=True, timeout=timeout_s, check=True, text=True
        )
        return out.stdout

    def play(self, wav: str | os.PathLike[str], timeout_s: float = 60.0) -> None:
        """Play a sound file into the null sink and wait until it has been played."""
        subprocess.run(
            ["paplay", f"--device={SINK}", str(wav)], env=self.env, check=True, timeout=timeout_s, capture_output=True
        )

    def start(self) -> None:
        """Start (or restart) the server and wait until it answers."""
        log = open(self.root / "pulseaudio.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [
                "pulseaudio",
                "--daemonize=no",
                "--exit-idle-time=-1",
                "-n",
                "--use-pid-file=no",
                "--disable-shm",
                "--log-target=stderr",
                "-L",
                f"module-native-protocol-unix socket={self.socket} auth-anonymous=1",
                "-L",
                f"module-null-sink sink_name={SINK} rate={SINK_RATE}",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PulseUnavailable(f"pulseaudio exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                self.pactl("info", timeout_s=2.0)
                break
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                time.sleep(0.1)
        else:
            self.stop()
            raise PulseUnavailable(f"pulseaudio did not answer within 10 s: {self.log_tail()}")
        self.pactl("set-default-source", f"{SINK}.monitor")
        self.pactl("set-default-sink", SINK)

    def stop(self) -> None:
        """Stop the server (bounded)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)

    def log_tail(self, n: int = 5) -> str:
        """The last lines of the server log."""
        try:
            lines = (self.root / "pulseaudio.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])


@contextlib.contextmanager
def pulse_server(root: Path) -> Iterator[PulseServer]:
    """Run a private PulseAudio server in `root` for the duration of the block."""
    for tool in ("pulseaudio", "pactl", "paplay"):
        if shutil.which(tool) is None:
            raise PulseUnavailable(f"{tool} is not installed (apt install pulseaudio pulseaudio-utils)")
    root.mkdir(parents=True, exist_ok=True)
    home, runtime = root / "home", root / "runtime"
    home.mkdir(exist_ok=True)
    runtime.mkdir(mode=0o700, exist_ok=True)
    socket = root / "native"
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(runtime),
        PULSE_RUNTIME_PATH=str(runtime / "pulse"),
        PULSE_SERVER=f"unix:{socket}",
    )
    env.pop("PULSE_SINK", None)
    env.pop("PULSE_SOURCE", None)
    server = PulseServer(env=env, socket=socket, root=root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
