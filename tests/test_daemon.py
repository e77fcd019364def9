"""The daemon end to end, as a user runs it: `earshot run` / `earshot detect` subprocesses, a real
Mosquitto broker, a real ZeroMQ subscriber, real audio files, and a tiny model trained on generated
sounds (tests/tinymodel.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq

from brokers import Subscriber, free_port, wait_until
from earshot import synth
from earshot.events import SCHEMA, Event

pytestmark = pytest.mark.timeout(300)

SCHEMA_FIELDS = {"type", "id", "label", "source", "node", "onset", "offset", "onset_time", "offset_time", "score",
                 "schema"}


def _wav(path: Path, audio: np.ndarray) -> Path:
    sf.write(path, audio, 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def scene_wav(tmp_path_factory):
    """12 s of generated background with alarms, glass breaks and gunshots at known times."""
    audio, truth = synth.scene(duration_s=12.0, seed=11)
    return _wav(tmp_path_factory.mktemp("audio") / "scene.wav", audio), truth


def _config(tmp_path: Path, model: Path, body: str, zmq_port: int | None = None, mqtt_port: int | None = None) -> Path:
    mqtt = f"[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {mqtt_port}\nreconnect_max_s = 2\n" if mqtt_port \
        else "[mqtt]\nenabled = false\n"
    zmq_ = f"[zmq]\nenabled = true\nendpoint = \"tcp://127.0.0.1:{zmq_port}\"\n" if zmq_port else "[zmq]\nenabled = false\n"
    path = tmp_path / "earshot.toml"
    path.write_text(f'node = "testnode"\n{body}\n[model]\npath = "{model}"\n{mqtt}{zmq_}')
    return path


def _earshot(*args: str, env: dict | None = None) -> subprocess.Popen:
    env = env or {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "earshot", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _labels_found(events: list[dict], truth) -> None:
    """Every ground-truth sound is matched by a start event of its label within 0.5 s of its onset."""
    starts = [e for e in events if e["type"] == "start"]
    for onset, _offset, label in truth:
        assert any(e["label"] == label and abs(e["onset"] - onset) <= 0.5 for e in starts), \
            f"{label} at {onset:.2f} s not detected; got {[(e['label'], e['onset']) for e in starts]}"


def test_file_source_reaches_mqtt_and_zmq(tmp_path, tiny_checkpoint, scene_wav, mosquitto):
    """A file played at real time produces start/end events that arrive on MQTT and ZeroMQ with every
    schema field, identical bytes on both, retained ON/OFF states, and online/offline availability."""
    wav, truth = scene_wav
    zmq_port = free_port()
    cfg = _config(tmp_path, tiny_checkpoint, f'[[source]]\nname = "yard"\nkind = "file"\npath = "{wav}"\n',
                  zmq_port=zmq_port, mqtt_port=mosquitto.port)
    sub = Subscriber(mosquitto, ["earshot/#"])
    ctx = zmq.Context()
    zsub = ctx.socket(zmq.SUB)
    zsub.connect(f"tcp://127.0.0.1:{zmq_port}")  # connects once the daemon binds
    zsub.setsockopt(zmq.SUBSCRIBE, b"event.")
    received: list[tuple[bytes, bytes]] = []
    done = threading.Event()

    def pump() -> None:
        while not done.is_set():
            if zsub.poll(100):
                received.append(tuple(zsub.recv_multipart()))

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    try:
        proc = _earshot("run", "-c", str(cfg))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert wait_until(lambda: any(m[0] == "earshot/testnode/status" and m[1] == b"offline" for m in sub.messages),
                          timeout_s=10)
    finally:
        done.set()
        pumper.join(2)
        zsub.close(linger=0)
        ctx.term()
        sub.close()
    mqtt_events = [json.loads(p) for t, p, _ in sub.messages if t == "earshot/testnode/yard/event"]
    assert mqtt_events, f"no MQTT events; daemon log:\n{err}"
    for e in mqtt_events:
        assert set(e) == SCHEMA_FIELDS and e["schema"] == SCHEMA and e["node"] == "testnode" and e["source"] == "yard"
    _labels_found(mqtt_events, truth)
    assert [p for t, p, _ in sub.messages if t == "earshot/testnode/yard/event"] == [p for _, p in received]
    assert all(t == f"event.yard.{json.loads(p)['label']}".encode() for t, p in received)
    starts = {e["id"] for e in mqtt_events if e["type"] == "start"}
    assert starts == {e["id"] for e in mqtt_events if e["type"] == "end"}  # every start ends, same id
    states = [(t.rsplit("/", 1)[1], p) for t, p, _ in sub.messages if t.count("/") == 3 and not t.endswith("event")]
    assert ("gunshot", b"ON") in states and ("gunshot", b"OFF") in states
    status = [p for t, p, _ in sub.messages if t == "earshot/testnode/status"]
    assert status[0] == b"online" and status[-1] == b"offline"


def test_detect_cli_jsonl_and_dcase(tmp_path, tiny_checkpoint, scene_wav):
    """`earshot detect` finds the generated sounds through the daemon's code, in both output formats."""
    wav, truth = scene_wav
    cfg = _config(tmp_path, tiny_checkpoint, "")
    proc = _earshot("detect", "-c", str(cfg), str(wav))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows and set(rows[0]) == {"file", "label", "onset", "offset", "score"}
    _labels_found([{**r, "type": "start"} for r in rows], truth)
    assert all(r["offset"] > r["onset"] for r in rows)
    proc = _earshot("detect", "-c", str(cfg), "--format", "dcase", str(wav))
    out, _ = proc.communicate(timeout=120)
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(f, float(a), float(b), lab) for f, a, b, lab in lines] == \
        [(r["file"], pytest.approx(r["onset"], abs=1e-3), pytest.approx(r["offset"], abs=1e-3), r["label"]) for r in rows]


def test_broker_down_keeps_detecting(tmp_path, tiny_checkpoint, scene_wav):
    """With no broker listening, the daemon says so in one line, keeps detecting, and exits cleanly."""
    wav, truth = scene_wav
    cfg = _config(tmp_path, tiny_checkpoint,
                  f'[[source]]\nname = "yard"\nkind = "file"\nrealtime = false\npath = "{wav}"\n'
                  "[stdout]\nenabled = true\n", mqtt_port=free_port())
    proc = _earshot("run", "-c", str(cfg))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "unreachable" in err
    events = [Event.from_json(line).to_dict() for line in out.splitlines()]
    _labels_found(events, truth)


def test_sigterm_stops_cleanly(tmp_path, tiny_checkpoint, mosquitto):
    """SIGTERM during a live-rate stream stops the daemon within seconds, exit 0, status offline."""
    cfg = _config(tmp_path, tiny_checkpoint, '[[source]]\nname = "d"\nkind = "demo"\nloop = true\n',
                  mqtt_port=mosquitto.port)
    sub = Subscriber(mosquitto, ["earshot/testnode/status"])
    try:
        proc = _earshot("run", "-c", str(cfg))
        assert wait_until(lambda: b"online" in sub.on("earshot/testnode/status"), timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - started < 10
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert wait_until(lambda: sub.on("earshot/testnode/status")[-1:] == [b"offline"], timeout_s=5)
    finally:
        sub.close()


@pytest.mark.parametrize("body, code, needle", [
    ('[[source]]\nname = "m"\nkind = "mic"\ndevice = "no-such-device-xyz"\n', 1, "device"),
    # A file the config names is checked with the config (exit 2), before anything starts.
    ('[[source]]\nname = "f"\nkind = "file"\npath = "/nonexistent.wav"\n', 2, "/nonexistent.wav: no such file"),
    ('[detect]\nhold_s = -1\n[bogus]\n', 2, "detect.hold_s"),
    ('[frontend]\nchunk_size = 2.0\n', 2, "chunk_size"),
])
def test_user_errors_are_one_line(tmp_path, tiny_checkpoint, body, code, needle):
    """A missing device or file, or an invalid config: a clear message, the right exit code, no traceback."""
    cfg = _config(tmp_path, tiny_checkpoint, body)
    proc = _earshot("run", "-c", str(cfg))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert needle in err and "Traceback" not in err


def test_missing_model_and_corrupt_audio(tmp_path, tiny_checkpoint):
    """A missing model file is a configuration error naming it; a corrupt audio file is reported and the others
    still run."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npath = "/nope/model.pt"\n[mqtt]\nenabled = false\n[zmq]\nenabled = false\n')
    proc = _earshot("detect", "-c", str(cfg), "x.wav")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "model.path: /nope/model.pt: no such file" in err and "Traceback" not in err

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    audio, _ = synth.scene(duration_s=6.0, seed=2)
    good = _wav(tmp_path / "good.wav", audio)
    cfg = _config(tmp_path, tiny_checkpoint, "")
    proc = _earshot("detect", "-c", str(cfg), str(corrupt), str(good))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = err.strip().splitlines()  # the corrupt file's error, then the good file's summary
    assert "Traceback" not in err and len(lines) == 2 and "corrupt.wav" in lines[0]
    assert lines[1].startswith(f"earshot: {good}: 6.0 s, ") and "detection(s)" in lines[1]
    assert all(json.loads(line)["file"] == str(good) for line in out.splitlines()) and out.strip()


def test_nan_and_silence_do_not_fire(tmp_path, tiny_checkpoint):
    """Digital silence and NaN/inf samples produce no events and no crash."""
    audio = np.zeros(16000 * 5, np.float32)
    audio[16000:16100] = np.nan
    audio[20000:20010] = np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, audio, 16000, subtype="FLOAT")
    cfg = _config(tmp_path, tiny_checkpoint,
                  f'[[source]]\nname = "n"\nkind = "file"\nrealtime = false\npath = "{path}"\n[stdout]\nenabled = true\n')
    proc = _earshot("run", "-c", str(cfg))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "" and "Traceback" not in err
    assert "NaN/inf" in err or "non-finite" in err


def test_pulseaudio_microphone_to_mqtt(tmp_path, tiny_checkpoint, mosquitto):
    """Real capture: sounds played into a PulseAudio null sink are captured by the daemon through
    PortAudio (the sink's monitor as a microphone at 48 kHz) and come out as MQTT events."""
    from pulse import PulseUnavailable, pulse_server

    audio, truth = synth.scene(duration_s=10.0, seed=5)
    wav = _wav(tmp_path / "played.wav", audio)
    cfg = _config(tmp_path, tiny_checkpoint, '[[source]]\nname = "room"\nkind = "mic"\ndevice = "pulse"\n'
                  'samplerate = 48000\n', mqtt_port=mosquitto.port)
    try:
        server_cm = pulse_server(tmp_path / "pulse")
        server = server_cm.__enter__()
    except PulseUnavailable as e:
        pytest.skip(f"PulseAudio cannot start here: {e}")
    sub = Subscriber(mosquitto, ["earshot/testnode/#"])
    proc = _earshot("run", "-c", str(cfg), env={**server.env, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_until(lambda: b"online" in sub.on("earshot/testnode/status"), timeout_s=60), \
            proc.stderr.read() if proc.poll() is not None else "daemon did not come online"
        time.sleep(1.5)  # the first window needs 1 s of audio
        server.play(wav)
        events = lambda: [json.loads(p) for p in sub.on("earshot/testnode/room/event")]  # noqa: E731
        played = {label for _, _, label in truth}
        assert wait_until(lambda: {e["label"] for e in events() if e["type"] == "start"} == played, timeout_s=15), \
            f"played {sorted(played)}, got {[(e['type'], e['label']) for e in events()]}"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        sub.close()
        server_cm.__exit__(None, None, None)
    assert proc.returncode == 0, err
