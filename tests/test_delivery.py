"""Delivery that loses nothing: a daemon subprocess, a real Mosquitto killed with SIGKILL mid-stream,
and the on-disk spool carrying events across a daemon restart."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from audio_bursts import burst_wav, silence_wav
from brokers import Subscriber
from earshot.spool import SPOOL_FILE

pytestmark = pytest.mark.timeout(120)

TOPIC = "earshot/testnode/yard/event"


def _config(tmp_path: Path, model: Path, port: int, wav: Path, realtime: bool, state: Path) -> Path:
    path = tmp_path / f"earshot-{wav.stem}.toml"
    path.write_text(
        f'node = "testnode"\nstate_dir = "{state}"\n'
        f'[[source]]\nname = "yard"\nkind = "file"\npath = "{wav}"\nrealtime = {str(realtime).lower()}\n'
        f'[model]\npath = "{model}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nreconnect_max_s = 1\n'
        '[zmq]\nenabled = false\n[stdout]\nenabled = true\n[clips]\nhttp = false\n[metrics]\nenabled = false\n'
    )
    return path


class _Daemon:
    """`earshot run` as a subprocess; stdout (one event JSON per line) collected with arrival times."""

    def __init__(self, config: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("STATE_DIRECTORY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "earshot", "run", "-c", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.events: list[tuple[float, dict]] = []
        self.err = ""
        self._err: list[str] = []
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=lambda: self._err.extend(self.proc.stderr), daemon=True)]
        for r in self._readers:
            r.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.events.append((time.monotonic(), json.loads(line)))

    def wait(self, timeout_s: float) -> int:
        self.proc.wait(timeout_s)
        for r in self._readers:
            r.join(5)
        self.err = "".join(self._err)
        return self.proc.returncode


def _first_seen(payloads: list[bytes]) -> list[tuple[str, str]]:
    """(id, type) in order of first arrival: QoS 1 may deliver twice, consumers drop duplicates by id."""
    out: list[tuple[str, str]] = []
    for p in payloads:
        e = json.loads(p)
        if (e["id"], e["type"]) not in out:
            out.append((e["id"], e["type"]))
    return out


def test_broker_killed_midstream_every_event_arrives(tmp_path, tiny_checkpoint, mosquitto_factory):
    """SIGKILL of the broker while the daemon streams events, restart a few seconds later: every
    event the daemon produced reaches a persistent subscriber, in order, including those produced
    while the broker was dead."""
    wav = burst_wav(tmp_path / "bursts.wav", duration_s=18.0)
    # autosave_interval 1: the subscriber's session reaches the broker's disk before the SIGKILL.
    broker = mosquitto_factory("autosave_interval 1\n", persistence=True).start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    time.sleep(1.5)
    daemon = _Daemon(_config(tmp_path, tiny_checkpoint, broker.port, wav, True, tmp_path / "state"))
    try:
        assert sub.wait_for(lambda m: len(m) >= 4, timeout_s=40), "no events before the kill"
        broker.proc.kill()
        broker.proc.wait(5)
        broker.proc = None
        killed_at = time.monotonic()
        received_before = len(sub.messages)
        time.sleep(4.0)
        broker.start()
        restarted_at = time.monotonic()
        assert daemon.wait(90) == 0, daemon.err
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    produced = [(e["id"], e["type"]) for _, e in daemon.events]
    during_outage = [e for t, e in daemon.events if killed_at < t < restarted_at]
    assert len(produced) >= 16 and during_outage, f"{len(produced)} events, {len(during_outage)} in the outage"
    assert received_before < len(produced)
    assert sub.wait_for(lambda m: len(_first_seen([p for _, p, _ in m])) >= len(produced), timeout_s=15), \
        f"got {len(_first_seen(sub.on(TOPIC)))} of {len(produced)}; daemon log:\n{daemon.err}"
    assert _first_seen(sub.on(TOPIC)) == produced
    assert "MQTT connection lost" in daemon.err
    print(f"delivery: {len(produced)} events, {len(during_outage)} produced while the broker was dead, "
          f"{len(sub.on(TOPIC)) - len(produced)} duplicate(s), all delivered in order")
    sub.close()


def test_spool_survives_a_daemon_restart(tmp_path, tiny_checkpoint, mosquitto_factory):
    """Events detected while the broker is down are kept on disk when the daemon stops, and the
    next daemon start (broker up) delivers them, in order."""
    broker = mosquitto_factory(persistence=True).start()
    Subscriber(broker, [TOPIC], client_id="tester").close()  # a persistent session to queue into
    broker.stop()
    state = tmp_path / "state"

    first = _Daemon(_config(tmp_path, tiny_checkpoint, broker.port,
                            burst_wav(tmp_path / "bursts.wav", duration_s=8.0), False, state))
    assert first.wait(90) == 0, first.err
    produced = [(e["id"], e["type"]) for _, e in first.events]
    assert len(produced) >= 6
    assert "kept in the spool for the next start" in first.err
    with sqlite3.connect(state / SPOOL_FILE) as db:
        topics = [t for (t,) in db.execute("SELECT topic FROM spool ORDER BY seq")]
    assert topics.count(TOPIC) == len(produced)  # each event and its retained state, nothing else

    broker.start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    second = _Daemon(_config(tmp_path, tiny_checkpoint, broker.port, silence_wav(tmp_path / "quiet.wav", 3.0),
                             True, state))
    try:
        assert second.wait(90) == 0, second.err
    finally:
        if second.proc.poll() is None:
            second.proc.kill()
    assert not second.events
    assert "from a previous run will be sent first" in second.err
    assert sub.wait_for(lambda m: len(_first_seen([p for _, p, _ in m])) >= len(produced), timeout_s=10)
    assert _first_seen(sub.on(TOPIC)) == produced
    with sqlite3.connect(state / SPOOL_FILE) as db:
        assert db.execute("SELECT count(*) FROM spool").fetchone()[0] == 0
    sub.close()
