"""Delivery that loses nothing: a daemon subprocess, a real Mosquitto killed with SIGKILL mid-stream,
and the on-disk spool carrying events across a daemon restart."""

from __future__ import annotations

import sqlite3
import time

import pytest

from audio_bursts import burst_wav, silence_wav
from brokers import Subscriber
from daemonproc import TOPIC, DaemonProcess, daemon_config, first_seen
from earshot.spool import SPOOL_FILE

pytestmark = pytest.mark.timeout(120)


def test_broker_killed_midstream_every_event_arrives(tmp_path, tiny_checkpoint, mosquitto_factory):
    """SIGKILL of the broker while the daemon streams events, restart a few seconds later: every
    event the daemon produced reaches a persistent subscriber, in order, including those produced
    while the broker was dead."""
    wav = burst_wav(tmp_path / "bursts.wav", duration_s=18.0)
    # autosave_interval 1: the subscriber's session reaches the broker's disk before the SIGKILL.
    broker = mosquitto_factory("autosave_interval 1\n", persistence=True).start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    time.sleep(1.5)
    config = daemon_config(tmp_path / "a.toml", tiny_checkpoint, broker.port, wav, tmp_path / "state")
    with DaemonProcess(config) as daemon:
        assert sub.wait_for(lambda m: len(m) >= 4, timeout_s=40), "no events before the kill"
        broker.proc.kill()
        broker.proc.wait(5)
        broker.proc = None
        killed_at = time.monotonic()
        received_before = len(sub.messages)
        time.sleep(4.0)
        broker.start()
        restarted_at = time.monotonic()
        assert daemon.wait(90) == 0, daemon.log
    produced = daemon.produced()
    during_outage = [e for t, e in daemon.timed if killed_at < t < restarted_at]
    assert len(produced) >= 16 and during_outage, f"{len(produced)} events, {len(during_outage)} in the outage"
    assert received_before < len(produced)
    assert sub.wait_for(lambda m: len(first_seen([p for _, p, _ in m])) >= len(produced), timeout_s=15), \
        f"got {len(first_seen(sub.on(TOPIC)))} of {len(produced)}; daemon log:\n{daemon.log}"
    assert first_seen(sub.on(TOPIC)) == produced
    assert "MQTT connection lost" in daemon.log
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

    with DaemonProcess(daemon_config(tmp_path / "a.toml", tiny_checkpoint, broker.port,
                                     burst_wav(tmp_path / "bursts.wav", duration_s=8.0), state, realtime=False)) as first:
        assert first.wait(90) == 0, first.log
    produced = first.produced()
    assert len(produced) >= 6
    assert "kept in the spool for the next start" in first.log
    with sqlite3.connect(state / SPOOL_FILE) as db:
        topics = [t for (t,) in db.execute("SELECT topic FROM spool ORDER BY seq")]
    assert topics.count(TOPIC) == len(produced)  # each event and its retained state, nothing else

    broker.start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    with DaemonProcess(daemon_config(tmp_path / "b.toml", tiny_checkpoint, broker.port,
                                     silence_wav(tmp_path / "quiet.wav", 3.0), state)) as second:
        assert second.wait(90) == 0, second.log
    assert not second.events
    assert "from a previous run will be sent first" in second.log
    assert sub.wait_for(lambda m: len(first_seen([p for _, p, _ in m])) >= len(produced), timeout_s=10)
    assert first_seen(sub.on(TOPIC)) == produced
    with sqlite3.connect(state / SPOOL_FILE) as db:
        assert db.execute("SELECT count(*) FROM spool").fetchone()[0] == 0
    sub.close()
