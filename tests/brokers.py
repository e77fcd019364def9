"""Test helpers: a real Mosquitto broker on a free loopback port, and a collecting subscriber.

`Mosquitto` can be stopped and restarted on the same port (broker-restart tests).
Import the fixtures into a test module with `from brokers import mosquitto, Subscriber`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout_s` passes; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


class Mosquitto:
    """A mosquitto process with a temporary config: anonymous access, no persistence by default.

    With `persistence=True` the broker keeps sessions of clients connected with
    `clean_session=False` across a restart, so a test subscriber gets, deterministically,
    the messages published while it (or the broker) was away.
    """

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "", persistence: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = Path(workdir)
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            + (f"persistence true\npersistence_location {self.workdir}/\n" if persistence else "persistence false\n")
            + f"log_dest file {self.log}\n"
            + "log_type error\nlog_type warning\nlog_type notice\n"
            # As root, mosquitto would switch to user "mosquitto", who cannot read pytest's 0700 tmp dirs.
            + ("user root\n" if os.geteuid() == 0 else "")
            + extra_conf
        )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """`mqtt://127.0.0.1:PORT`."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        """Start the broker and wait until it accepts TCP connections."""
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log.read_text() if self.log.exists() else ""
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start: {err} {log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout_s}s")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A running broker on a free port, stopped after the test."""
    broker = Mosquitto(tmp_path).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path: Path):
    """Make brokers (not started) with extra config lines; all are stopped after the test."""
    made: list[Mosquitto] = []

    def make(extra_conf: str = "", port: int | None = None, persistence: bool = False) -> Mosquitto:
        d = tmp_path / f"broker{len(made)}"
        d.mkdir()
        made.append(Mosquitto(d, port=port, extra_conf=extra_conf, persistence=persistence))
        return made[-1]

    try:
        yield make
    finally:
        for b in made:
            b.stop()


class Subscriber:
    """A real paho client subscribed to `topics`, collecting (topic, payload, retain) in order."""

    def __init__(
        self, broker: Mosquitto, topics: list[str], protocol: int = mqtt.MQTTv311, client_id: str | None = None
    ) -> None:
        """Connect and subscribe (QoS 1); with `client_id` the session is persistent (clean_session=False)."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = topics
        persistent = client_id is not None and protocol != mqtt.MQTTv5
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
            clean_session=False if persistent else None,
        )
        self.client.reconnect_delay_set(0.2, 0.5)  # a restarted broker is back within a second
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError("test subscriber could not subscribe")

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        client.subscribe([(t, 1) for t in self._topics])

    def _on_message(self, client, userdata, msg) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self._cond.notify_all()

    def on(self, topic: str) -> list[bytes]:
        """Payloads received so far on exactly `topic`, in order."""
        with self._cond:
            return [p for t, p, _ in self.messages if t == topic]

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout_s: float = 10.0) -> bool:
        """Wait until `predicate(messages)` holds; returns whether it did."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def retained(broker: Mosquitto, topic: str, timeout_s: float = 5.0) -> bytes | None:
    """The retained payload on `topic` as a fresh subscriber sees it (None if nothing is retained)."""
    sub = Subscriber(broker, [topic])
    try:
        # Retained messages are delivered right after SUBACK; a short wait covers the none case.
        sub.wait_for(lambda m: any(r for _, _, r in m), timeout_s=min(timeout_s, 1.0))
        got = [p for t, p, r in sub.messages if r]
        return got[-1] if got else None
    finally:
        sub.close()


@pytest.fixture
def closing():
    """MQTT publishers to close after the test even if it fails: pass each one to the fixture's value."""
    made: list = []
    yield made.append
    for p in made:
        p.close(1.0)
