"""Fault injection: nothing lost, nothing exhausted. Each test runs `earshot run` (or the ZeroMQ
publisher) as a real process against a real Mosquitto on loopback, injects one fault, and counts
the events the daemon produced (its stdout) against those a persistent MQTT subscriber received.

- the daemon SIGKILLed with events in its spool (broker down), then restarted;
- the state directory on a small tmpfs filled while the broker is down, freed, the daemon
  SIGKILLed: the spool went back to disk, so nothing is lost;
- a state directory that is full before the daemon starts;
- a retained OFF command, a later plain ON, then a broker restart;
- a hostile ZeroMQ subscriber flooding subscriptions, next to an honest one;
- a clip written on a full disk says so.
(The broker SIGKILLed and restarted mid-stream is tests/test_delivery.py.)

The tmpfs tests need root (`mount`); CI runs the suite as root, elsewhere they skip with the reason.
Figures are printed (`pytest -s tests/test_faults.py`) and quoted in the README.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import paho.mqtt.publish as mqtt_publish
import pytest
import zmq

from audio_bursts import burst_wav, silence_wav
from brokers import Subscriber, free_port, retained, wait_until
from daemonproc import NODE, SOURCE, TOPIC, DaemonProcess, daemon_config, first_seen
from hostile_zmq import HostileSubscriber

pytestmark = pytest.mark.timeout(180)

HERE = Path(__file__).parent


def _delivered_all(sub: Subscriber, produced: list[tuple[str, str]], timeout_s: float = 20.0) -> list[tuple[str, str]]:
    sub.wait_for(lambda m: set(produced) <= set(first_seen([p for t, p, _ in m if t == TOPIC])), timeout_s)
    return first_seen(sub.on(TOPIC))


def _metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf'^{re.escape(name)}{{publisher="mqtt"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def _replay_spool(tmp_path: Path, model: Path, broker, state: Path) -> DaemonProcess:
    """A second daemon on silence with the same state directory: it sends what the spool kept."""
    quiet = daemon_config(tmp_path / "quiet.toml", model, broker.port, silence_wav(tmp_path / "quiet.wav", 3.0), state)
    second = DaemonProcess(quiet)
    assert second.wait(90) == 0, second.log
    assert not second.events
    return second


@pytest.fixture
def small_fs(tmp_path):
    """Mount small tmpfs file systems (size in KiB) under tmp_path; unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited tmpfs (CI runs the suite as root)")
    mounted: list[Path] = []

    def make(name: str, size_kb: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full (ENOSPC at every size down to one byte)."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return path


def _persistent_session(broker) -> None:
    """Create the subscriber's persistent session, so the broker queues for it from now on."""
    Subscriber(broker, [TOPIC], client_id="tester").close()


# ---------------------------------------------------------------------------------------------


def test_daemon_killed_with_events_spooled(tmp_path, tiny_checkpoint, mosquitto_factory):
    """Broker down, the daemon detects events and is SIGKILLed: the next start sends every one, in order."""
    broker = mosquitto_factory(persistence=True).start()
    _persistent_session(broker)
    broker.stop()
    state = tmp_path / "state"
    wav = burst_wav(tmp_path / "bursts.wav", duration_s=30.0)
    with DaemonProcess(daemon_config(tmp_path / "a.toml", tiny_checkpoint, broker.port, wav, state)) as first:
        assert wait_until(lambda: len(first.events) >= 10, 60), first.log
        first.kill()
    produced = first.produced()

    broker.start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    second = _replay_spool(tmp_path, tiny_checkpoint, broker, state)
    got = _delivered_all(sub, produced)
    sub.close()
    print(f"\nfaults: daemon SIGKILLed with {len(produced)} events spooled: {len(got)}/{len(produced)} delivered")
    assert got == produced, second.log
    assert "from a previous run will be sent first" in second.log


def test_state_dir_fills_and_frees_while_broker_is_down(tmp_path, tiny_checkpoint, mosquitto_factory, small_fs):
    """The state directory (a 2 MiB tmpfs) fills while the broker is down: the spool goes to memory
    (logged, metric 1); once space is freed it goes back to disk with everything it held; the daemon
    is then SIGKILLed and a restart delivers every event it produced: zero lost."""
    state = small_fs("state", 2048)
    broker = mosquitto_factory(persistence=True).start()
    _persistent_session(broker)
    broker.stop()
    mport = free_port()
    wav = burst_wav(tmp_path / "bursts.wav", duration_s=45.0)
    config = daemon_config(tmp_path / "a.toml", tiny_checkpoint, broker.port, wav, state, metrics_port=mport)
    with DaemonProcess(config) as daemon:
        assert wait_until(lambda: len(daemon.events) >= 2, 60), daemon.log
        filler = _fill(state)
        before_full = len(daemon.events)
        assert daemon.wait_log("IN MEMORY ONLY", 30), daemon.log
        assert wait_until(lambda: len(daemon.events) >= before_full + 4, 30)
        assert _metric(mport, "earshot_publisher_spool_in_memory") == 1.0
        in_memory = len(daemon.events) - before_full
        filler.unlink()
        assert daemon.wait_log("on disk again", 20), daemon.log
        assert _metric(mport, "earshot_publisher_spool_in_memory") == 0.0
        memory_s = _metric(mport, "earshot_publisher_spool_memory_seconds_total")
        assert memory_s is not None and memory_s > 0
        n = len(daemon.events)
        assert wait_until(lambda: len(daemon.events) >= n + 2, 30)
        daemon.kill()
    produced = daemon.produced()
    assert daemon.proc.returncode == -signal.SIGKILL

    broker.start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    second = _replay_spool(tmp_path, tiny_checkpoint, broker, state)
    got = _delivered_all(sub, produced)
    sub.close()
    print(f"\nfaults: state dir full while the broker was down: {in_memory} events produced while the spool "
          f"was in memory ({memory_s:.1f} s); daemon SIGKILLed after space came back; "
          f"{len(got)}/{len(produced)} delivered after restart")
    assert got == produced, second.log


def test_full_state_dir_at_start(tmp_path, tiny_checkpoint, mosquitto_factory, small_fs):
    """A state directory full before the start does not stop the daemon: it detects and publishes
    (every event delivered), warns loudly, reports the spool in memory, says a clip could not be
    written because the disk is full, and takes the disk back once space is freed."""
    state = small_fs("state", 512)
    filler = _fill(state)
    broker = mosquitto_factory(persistence=True).start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    mport = free_port()
    wav = burst_wav(tmp_path / "bursts.wav", duration_s=30.0)
    config = daemon_config(tmp_path / "a.toml", tiny_checkpoint, broker.port, wav, state, metrics_port=mport, clips=True)
    with DaemonProcess(config) as daemon:
        assert daemon.wait_log("IN MEMORY ONLY", 60), daemon.log
        assert wait_until(lambda: len(daemon.events) >= 4, 60), daemon.log
        assert wait_until(lambda: _metric(mport, "earshot_publisher_spool_in_memory") == 1.0, 10)
        assert daemon.wait_log("cannot write clip", 30), daemon.log
        filler.unlink()
        assert daemon.wait_log("on disk again", 20), daemon.log
        assert _metric(mport, "earshot_publisher_spool_in_memory") == 0.0
        assert daemon.wait(90) == 0, daemon.log
    produced = daemon.produced()
    got = _delivered_all(sub, produced)
    sub.close()
    clip_lines = [line for line in daemon.lines if "cannot write clip" in line]
    print(f"\nfaults: full state dir at start: the daemon ran, {len(got)}/{len(produced)} events delivered; "
          f"clip error: {clip_lines[0].strip()[-110:]}")
    assert got == produced and len(produced) >= 4
    assert "No space left on device" in clip_lines[0] and "ENOSPC" in clip_lines[0]
    assert "flac" not in clip_lines[0].lower()


def test_retained_off_command_is_not_replayed_after_a_broker_restart(tmp_path, tiny_checkpoint, mosquitto_factory):
    """A retained `enabled/set OFF` (a common mistake) is applied once when it arrives live; a later
    plain ON wins; after a broker restart the retained OFF comes back flagged retained and is
    ignored: detection goes on and every event arrives."""
    broker = mosquitto_factory(persistence=True).start()
    sub = Subscriber(broker, [TOPIC], client_id="tester")
    wav = burst_wav(tmp_path / "bursts.wav", duration_s=40.0)
    base = f"earshot/{NODE}/{SOURCE}"
    config = daemon_config(tmp_path / "a.toml", tiny_checkpoint, broker.port, wav, tmp_path / "state")
    with DaemonProcess(config) as daemon:
        assert wait_until(lambda: len(daemon.events) >= 2, 60), daemon.log
        mqtt_publish.single(f"{base}/enabled/set", "OFF", qos=1, retain=True, hostname=broker.host, port=broker.port)
        assert wait_until(lambda: retained(broker, f"{base}/enabled") == b"OFF", 10), daemon.log
        mqtt_publish.single(f"{base}/enabled/set", "ON", qos=1, hostname=broker.host, port=broker.port)
        assert wait_until(lambda: retained(broker, f"{base}/enabled") == b"ON", 10), daemon.log
        broker.restart()
        restarted = len(daemon.events)
        assert daemon.wait_log("ignoring the retained command", 20), daemon.log
        assert wait_until(lambda: len(daemon.events) >= restarted + 4, 40), "no detection after the broker restart"
        assert retained(broker, f"{base}/enabled") == b"ON"
        assert daemon.wait(90) == 0, daemon.log
    produced = daemon.produced()
    got = _delivered_all(sub, produced)
    sub.close()
    after = len(produced) - restarted
    print(f"\nfaults: retained OFF, plain ON, broker restart: {after} events after the restart, "
          f"{len(got)}/{len(produced)} delivered")
    assert got == produced


def _victim(mode: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "daemon"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "hostile_zmq.py"), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, proc.stdout.readline().strip()


def _ask(proc: subprocess.Popen, command: str) -> int:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return int(proc.stdout.readline())


def _settled_rss(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """The victim's RSS (kB) once it stops growing (the flood is read from the kernel buffers)."""
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        time.sleep(0.5)
        rss = _ask(proc, "rss")
        if abs(rss - last) < 512:
            return rss
        last = rss
    return last


def _flood(mode: str, n: int, size: int, rounds: int) -> dict:
    """Run a victim, an honest SUB and `rounds` hostile floods; returns the figures."""
    proc, endpoint = _victim(mode)
    ctx = zmq.Context()
    honest = ctx.socket(zmq.SUB)
    got: list[int] = []
    try:
        honest.connect(endpoint)
        honest.setsockopt(zmq.SUBSCRIBE, b"event.yard.")
        while len(got) < 5 and honest.poll(10_000):
            got.append(json.loads(honest.recv_multipart()[1])["n"])
        assert len(got) == 5, "the honest subscriber got nothing"
        host, port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
        rss0 = _settled_rss(proc)
        peaks, sent = [], []
        for _ in range(rounds):
            hostile = HostileSubscriber(host, int(port))
            sent.append(hostile.flood(n, size)[0])
            peaks.append(_settled_rss(proc))
            hostile.close()
        time.sleep(0.5)
        while honest.poll(0):
            got.append(json.loads(honest.recv_multipart()[1])["n"])
        produced = _ask(proc, "stop")
        while honest.poll(500):
            got.append(json.loads(honest.recv_multipart()[1])["n"])
    finally:
        honest.close(linger=0)
        ctx.term()
        proc.wait(10)
    return {"rss0_mb": rss0 / 1024, "peaks_mb": [p / 1024 for p in peaks], "growth_mb": (max(peaks) - rss0) / 1024,
            "sent": sent, "got": got, "produced": produced, "log": proc.stderr.read()}


def test_hostile_zmq_subscriber(tmp_path):
    """A local client sending 200,000 subscriptions of 200 bytes, three times over, next to an honest
    subscriber: earshot's publisher cuts it off and grows by a few MB (a plain PUB socket, measured
    the same way, grows by about 9 KB per subscription), and the honest subscriber loses nothing."""
    ours = _flood("earshot", 200_000, 200, rounds=3)
    got, produced = ours["got"], ours["produced"]
    lost = sorted(set(range(got[0], produced)) - set(got))
    plain = _flood("pub", 20_000, 200, rounds=1)
    print(f"\nfaults: hostile ZeroMQ subscriber, 200,000 x 200 B subscriptions x 3 connections: earshot RSS "
          f"{ours['rss0_mb']:.0f} -> {max(ours['peaks_mb']):.0f} MB (+{ours['growth_mb']:.1f}), requests the "
          f"client got in before being cut off: {ours['sent']}; honest subscriber "
          f"{len(set(got))}/{produced - got[0]} events, {len(lost)} lost. Plain PUB socket, 20,000 x 200 B once: "
          f"+{plain['growth_mb']:.0f} MB")
    assert not lost and got == sorted(got)
    assert all(s < 200_000 for s in ours["sent"]) and ours["log"].count("cut off subscriber") == 3, ours["log"]
    assert ours["growth_mb"] < 64  # vs about 1,000 MB for a plain PUB socket at this flood
    assert plain["growth_mb"] > 100  # the measurement would see the old behaviour


def test_clip_on_a_full_disk_says_the_disk_is_full(small_fs, caplog):
    """A clip written where no space is left is reported as ENOSPC, not as a FLAC encoder problem."""
    from earshot.clips import ClipRecorder
    from earshot.events import Event, iso_utc

    d = small_fs("clips", 256)
    _fill(d)
    caplog.set_level(logging.ERROR, logger="earshot.clips")
    rec = ClipRecorder(d / "clips", 16000, pre_s=0.5, post_s=0.5, max_total_bytes=10**9, max_age_s=1e9)
    rec.on_audio("yard", np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 2).astype(np.float32))
    rec.on_event(Event(type="start", id="c" * 32, label="gunshot", source="yard", node="n", onset=1.0, offset=None,
                       onset_time=iso_utc(1.7e9), offset_time=None, score=0.9))
    rec.on_audio("yard", np.zeros(16000, dtype=np.float32))
    assert wait_until(lambda: rec.failed == 1, 10)
    rec.close(2.0)
    assert rec.written == 0 and not [f for f in (d / "clips").iterdir()]  # no partial file left behind
    assert "No space left on device" in caplog.text and "ENOSPC" in caplog.text
    assert "decoder" not in caplog.text
