"""Worker processes (`[worker] processes`): `earshot run` with its sources spread over spawned
processes behaves as one daemon: events of every source reach a real Mosquitto and ZeroMQ with
clips written by the worker processes; a killed worker process stops the daemon with exit code 1;
SIGTERM stops everything within bounds. Plus the automatic process count and its config checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf
import zmq

from brokers import Subscriber, free_port, wait_until
from earshot import synth
from earshot.config import ConfigError, from_dict
from earshot.workers import process_count

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    audio, truth = synth.scene(duration_s=12.0, seed=11)
    path = tmp_path_factory.mktemp("audio") / "scene.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")
    return path, truth


def _config(tmp_path: Path, model: Path, wav: Path, n: int, *, realtime: bool, processes: int, mqtt_port: int,
            zmq_port: int) -> Path:
    sources = "".join(f'[[source]]\nname = "s{i}"\nkind = "file"\npath = "{wav}"\nrealtime = {str(realtime).lower()}\n'
                      f'loop = {str(realtime).lower()}\n' for i in range(n))
    path = tmp_path / "earshot.toml"
    path.write_text(f'node = "testnode"\nstate_dir = "{tmp_path / "state"}"\n{sources}'
                    f'[model]\npath = "{model}"\n[worker]\nprocesses = {processes}\n'
                    f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nreconnect_max_s = 2\n'
                    f'[zmq]\nendpoint = "tcp://127.0.0.1:{zmq_port}"\n'
                    f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n[clips]\nlisten = "127.0.0.1:0"\n')
    return path


def _earshot(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "earshot", "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(entry))
    return out


def _wait_line(proc: subprocess.Popen, text: str, timeout_s: float) -> list[str]:
    """Read stderr lines until one contains `text` (returns them all); fails on exit or timeout."""
    lines: list[str] = []
    done = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if text in line:
                done.set()
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert done.wait(timeout_s), "".join(lines)[-3000:]
    return lines


def test_sources_over_two_processes_reach_mqtt_zmq_and_clips(tmp_path, tiny_checkpoint, scene, mosquitto):
    """Three file sources on two worker processes: every source's sounds arrive as events on MQTT and
    ZeroMQ (same bytes), each start has an end, clips are written for them, and the daemon exits 0."""
    wav, truth = scene
    zmq_port = free_port()
    cfg = _config(tmp_path, tiny_checkpoint, wav, 3, realtime=False, processes=2, mqtt_port=mosquitto.port,
                  zmq_port=zmq_port)
    sub = Subscriber(mosquitto, ["earshot/#"])
    ctx = zmq.Context()
    zsub = ctx.socket(zmq.SUB)
    zsub.connect(f"tcp://127.0.0.1:{zmq_port}")
    zsub.setsockopt(zmq.SUBSCRIBE, b"event.")
    received: list[bytes] = []
    done = threading.Event()

    def pump() -> None:
        while not done.is_set():
            if zsub.poll(100):
                received.append(zsub.recv_multipart()[1])

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        proc = _earshot(cfg)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert "2 worker processes" in err
        assert wait_until(lambda: any(t == "earshot/testnode/status" and p == b"offline" for t, p, _ in sub.messages),
                          timeout_s=10)
        time.sleep(0.3)
    finally:
        done.set()
        pumper.join(2)
        zsub.close(linger=0)
        ctx.term()
        sub.close()
    events = [json.loads(p) for t, p, _ in sub.messages if t.endswith("/event")]
    for i in range(3):
        mine = [e for e in events if e["source"] == f"s{i}"]
        starts = [e for e in mine if e["type"] == "start"]
        for onset, _offset, label in truth:
            assert any(e["label"] == label and abs(e["onset"] - onset) <= 0.5 for e in starts), (i, label, onset)
        assert {e["id"] for e in starts} == {e["id"] for e in mine if e["type"] == "end"}
        assert all(e.get("clip") for e in mine)
    assert sorted(p for t, p, _ in sub.messages if t.endswith("/event")) == sorted(received)
    clips = tmp_path / "state" / "clips"
    ids = {e["clip"] for e in events}
    assert wait_until(lambda: all((clips / f"{c}.flac").is_file() for c in ids), timeout_s=10)
    meta = json.loads((clips / f"{sorted(ids)[0]}.json").read_text())
    assert meta["duration_s"] > 1.0


def test_dead_worker_process_is_fatal_and_sigterm_is_bounded(tmp_path, tiny_checkpoint, scene, mosquitto):
    """Killing one worker process makes the daemon exit 1 (systemd restarts it) within seconds, with the
    reason in the log; a second daemon stops on SIGTERM with exit 0 and no worker process left."""
    wav, _ = scene
    cfg = _config(tmp_path, tiny_checkpoint, wav, 2, realtime=True, processes=2, mqtt_port=mosquitto.port,
                  zmq_port=free_port())
    proc = _earshot(cfg)
    try:
        _wait_line(proc, "listening on", 180)
        workers = [p for p in _children(proc.pid) if "earshot" in Path(f"/proc/{p}/cmdline").read_text()
                   or "multiprocessing" in Path(f"/proc/{p}/cmdline").read_text()]
        workers = [p for p in workers if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        started = time.monotonic()
        assert proc.wait(30) == 1
        assert time.monotonic() - started < 20
        err = proc.stderr.read()
        assert "died" in err and "stopping earshot" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc = _earshot(cfg)
    try:
        _wait_line(proc, "listening on", 180)
        kids = _children(proc.pid)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
        assert time.monotonic() - started < 25
        assert "Traceback" not in err
        assert wait_until(lambda: not any(Path(f"/proc/{k}").exists() and
                                          "Z" not in Path(f"/proc/{k}/stat").read_text().split()[2] for k in kids),
                          timeout_s=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_process_count_and_config():
    """Automatic: one process per streams_per_process sources, at most one per core; explicit values are
    capped by the number of sources; out-of-range values are configuration errors naming the key."""
    def config(n: int, **worker) -> object:
        return from_dict({"source": [{"name": f"s{i}", "kind": "demo"} for i in range(n)], "worker": worker})

    assert process_count(config(1), cores=8) == 1
    assert process_count(config(32), cores=8) == 1
    assert process_count(config(33), cores=8) == 2
    assert process_count(config(300), cores=2) == 2
    assert process_count(config(10, streams_per_process=2), cores=4) == 4
    assert process_count(config(3, processes=8), cores=2) == 3
    assert process_count(config(5, processes=1), cores=16) == 1
    with_stdin = from_dict({"source": [{"name": "a", "kind": "stdin"}, {"name": "b", "kind": "demo"}],
                            "worker": {"processes": 2}})
    assert process_count(with_stdin, cores=4) == 1
    for bad in ({"processes": -1}, {"processes": 65}, {"streams_per_process": 0}):
        with pytest.raises(ConfigError, match="worker."):
            config(2, **bad)
    with pytest.raises(ConfigError, match="worker.processes"):
        config(2, processes=1.5)
