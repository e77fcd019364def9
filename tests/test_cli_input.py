"""What a new user hits first (issue 14): every wrong input gets one clear line and the right exit code,
every short clip is scored. Each test runs the real `earshot` command from the venv, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from brokers import free_port, retained, wait_until
from earshot import synth

pytestmark = pytest.mark.timeout(180)

EARSHOT = str(Path(sys.executable).parent / "earshot")
MODEL_LABELS = "its labels: alarm, glass_break, gunshot"
QUIET = '[mqtt]\nenabled = false\n[zmq]\nenabled = false\n[metrics]\nenabled = false\n[clips]\nenabled = false\n'
SR = 16000


def earshot(*args: str, cwd: str | Path | None = None, stdin=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([EARSHOT, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=stdin, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line_error(out: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """Exit `code`, no traceback, and each needle on stderr."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


def glass_clip(seed: int = 1, seconds: float = 1.0) -> np.ndarray:
    """A generated glass break over quiet background, `seconds` long (the shipped model finds seed 1)."""
    rng = np.random.default_rng(seed)
    g = synth.glass_break(SR, rng)
    x = synth.background(SR, seconds, rng) * 0.05
    n = min(len(g), len(x) - 800)
    x[800:800 + n] += g[:n]
    return x.astype(np.float32)


def shipped_model():
    """The shipped model through the CLI's own loader (one place, wherever the model layer lives)."""
    from earshot.__main__ import _load_model
    from earshot.config import Config

    return _load_model(Config())


@pytest.fixture
def wav(tmp_path) -> Path:
    path = tmp_path / "clip.wav"
    sf.write(path, glass_clip(), SR, subtype="PCM_16")
    return path


# ---------------------------------------------------------------- item 1: labels the model does not have

def test_unknown_labels_refused_by_check_config_and_run_alike(tmp_path, wav):
    cfg = tmp_path / "earshot.toml"
    cfg.write_text(f'[[source]]\nname = "f"\nkind = "file"\npath = "{wav.name}"\nrealtime = false\n{QUIET}'
                   '[detect]\nlabels = ["gunshots"]\nthresholds = { glassbreak = 0.6 }\n')
    check, run = earshot("check-config", cfg), earshot("run", "-c", cfg)
    for out in (check, run):
        one_line_error(out, 2, f"detect.labels: 'gunshots' is not a label of the model ({MODEL_LABELS})",
                       f"detect.thresholds: 'glassbreak' is not a label of the model ({MODEL_LABELS})")
    assert check.stderr == run.stderr  # the same lines: one validation function


# ---------------------------------------------------------------- items 2, 3: short clips, file ends, summary

def test_one_second_clip_is_scored_and_detected(wav):
    out = earshot("detect", wav)
    assert out.returncode == 0, out.stderr
    found = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["label"] for d in found] == ["glass_break"]
    assert f"{wav}: 1.0 s, 1 window(s) scored, 1 detection(s)" in out.stderr


def test_event_crossing_only_in_the_last_hop_is_reported(tmp_path):
    """3 s of background, then the first 120 ms of a glass break: only the file's last window crosses
    the threshold (one hop, fewer than confirm_hops = 2); the event is still reported."""
    rng = np.random.default_rng(1)
    g = synth.glass_break(SR, rng)
    bg = synth.background(SR, 4.0, np.random.default_rng(11)) * 0.05
    n = int(0.12 * SR)
    x = np.concatenate([bg[:3 * SR], bg[3 * SR:3 * SR + n] + g[:n]]).astype(np.float32)
    path = tmp_path / "ends.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    out = earshot("detect", path, "--format", "dcase")
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [r[3] for r in rows] == ["glass_break"], out.stdout
    assert float(rows[0][1]) > 2.5


def test_clean_file_says_so_on_stderr_and_keeps_stdout_clean(tmp_path):
    path = tmp_path / "quiet.wav"
    sf.write(path, (synth.background(SR, 2.5, np.random.default_rng(3)) * 0.02).astype(np.float32), SR)
    tiny = tmp_path / "tiny.wav"
    sf.write(tiny, np.zeros(100, np.float32), SR)
    out = earshot("detect", path, tiny)
    assert out.returncode == 0 and out.stdout == ""
    assert f"earshot: {path}: 2.5 s, 16 window(s) scored, 0 detection(s)" in out.stderr
    assert f"earshot: {tiny}: 0.0 s, 0 window(s) scored, too short to score (under 25 ms of audio)" in out.stderr


# ---------------------------------------------------------------- items 4, 9: values that break detection or delivery

BAD_VALUES = [
    ("[detect]\nhold_s = nan", "detect.hold_s: nan is not a finite number"),
    ("[detect]\nmin_level_dbfs = inf", "detect.min_level_dbfs: inf is not a finite number"),
    ("[detect]\nthresholds = { glass_break = nan }", "detect.thresholds.glass_break: nan is not a finite number"),
    ("[frontend]\nchunk_hop = nan", "frontend.chunk_hop: nan is not a finite number"),
    ("[mqtt]\nqueue_limit = 0", "mqtt.queue_limit: 0 is outside 1..10000000"),
    ("[mqtt]\nreconnect_max_s = inf", "mqtt.reconnect_max_s: inf is not a finite number"),
    ("[mqtt]\nreconnect_max_s = 1e300", "mqtt.reconnect_max_s: 1e+300 is outside 1..3600"),
    ("[mqtt]\nspool_max_mb = nan", "mqtt.spool_max_mb: nan is not a finite number"),
    ("[mqtt]\nkeepalive_s = 70000", "mqtt.keepalive_s: 70000 is outside 5..65535"),
    ("[mqtt]\nsession_expiry_s = 4294967296", "mqtt.session_expiry_s: 4294967296 is outside 0..4294967295"),
    (f'[mqtt]\nclient_id = "{"x" * 70000}"', "mqtt.client_id: 70000 bytes long; at most 65535"),
    (f'[mqtt]\ntopic_prefix = "{"t" * 70000}"', "mqtt.topic_prefix: 70000 bytes long; at most 1024"),
    ("[homeassistant]\nlevel_interval_s = -inf", "homeassistant.level_interval_s: -inf is not a finite number"),
    ("[clips]\npre_s = nan", "clips.pre_s: nan is not a finite number"),
    ("[clips]\nmax_total_mb = 1e400", "clips.max_total_mb: inf is not a finite number"),
    ("[model]\nthreads = 100000", "model.threads: 100000 is outside 1..64"),
    ("a = " + "[" * 5000 + "]" * 5000, "not valid TOML: arrays or tables nested too deeply"),
]


@pytest.mark.parametrize("text,line", BAD_VALUES, ids=[b[1].split(":")[0] for b in BAD_VALUES])
def test_bad_values_are_refused_with_one_line(tmp_path, text, line):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text + "\n")
    one_line_error(earshot("check-config", cfg), 2, line)


def test_run_refuses_what_check_config_refuses(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[detect]\nhold_s = nan\n[mqtt]\nkeepalive_s = 70000\n")
    check, run = earshot("check-config", cfg), earshot("run", "-c", cfg)
    one_line_error(run, 2, "detect.hold_s: nan is not a finite number", "mqtt.keepalive_s: 70000 is outside 5..65535")
    assert check.stderr == run.stderr


def test_field_docs_state_the_checked_ranges():
    """Every range in config.RANGES is written in its field's doc, so the docs cannot drift from the checks."""
    import ast

    from earshot import config

    tree = ast.parse(Path(config.__file__).read_text())
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[(cls.name, a.target.id)] = b.value.value
    for cls, ranges in config.RANGES.items():
        for name, r in ranges.items():
            assert f"Valid: {config.range_text(*r)}." in docs[(cls.__name__, name)], (cls.__name__, name)


def test_byte_order_mark_is_accepted(tmp_path):
    cfg = tmp_path / "bom.toml"
    cfg.write_bytes(b'\xef\xbb\xbfnode = "kitchen"\n[[source]]\nname = "demo"\nkind = "demo"\n')
    out = earshot("check-config", cfg)
    assert out.returncode == 0, out.stderr
    assert "OK; node kitchen" in out.stdout


# ---------------------------------------------------------------- item 5: relative paths, files that must exist

def test_relative_paths_are_relative_to_the_config_file(tmp_path, wav):
    cfg = tmp_path / "earshot.toml"
    cfg.write_text(f'[[source]]\nname = "f"\nkind = "file"\npath = "{wav.name}"\nrealtime = false\n{QUIET}')
    out = earshot("check-config", cfg, cwd="/")
    assert out.returncode == 0, out.stderr
    cfg.write_text(f'[[source]]\nname = "f"\nkind = "file"\npath = "missing.wav"\n[[source]]\nname = "g"\n'
                   f'kind = "file"\npath = "."\n[model]\npath = "nomodel.pt"\n{QUIET}')
    for out in (earshot("check-config", cfg, cwd="/"), earshot("run", "-c", cfg, cwd="/")):
        one_line_error(out, 2, f"source[0].path: {tmp_path}/missing.wav: no such file",
                       f"source[1].path: {tmp_path}: is a directory",
                       f"model.path: {tmp_path}/nomodel.pt: no such file")


def test_two_unnamed_file_sources_are_told_to_name_them(tmp_path, wav):
    cfg = tmp_path / "two.toml"
    cfg.write_text(f'[[source]]\nkind = "file"\npath = "{wav}"\n[[source]]\nkind = "file"\npath = "{wav}"\n')
    one_line_error(earshot("check-config", cfg), 2,
                   "the name 'mic' is used more than once (a source without `name` is called 'mic': "
                   "give each source a name)")


# ---------------------------------------------------------------- item 6: no such file, a directory

@pytest.mark.parametrize("command", ["detect", "plot", "monitor"])
def test_missing_file_and_directory(tmp_path, command):
    missing, folder = tmp_path / "nofile.wav", tmp_path
    for target, why in ((missing, "no such file"), (folder, "is a directory")):
        args = ["monitor", "--file", target, "--duration", "1"] if command == "monitor" else [command, target]
        if command == "plot":
            args += ["-o", tmp_path / "out.png"]
        one_line_error(earshot(*args), 1, f"earshot: cannot read {target}: {why}")


# ---------------------------------------------------------------- item 7: plot -o

def test_plot_output_checks(tmp_path, wav):
    one_line_error(earshot("plot", wav, "-o", "/missing/dir/x.png"), 2, "-o /missing/dir/x.png: no such directory /missing/dir")
    one_line_error(earshot("plot", wav, "-o", tmp_path / "x.jpgg"), 2,
                   "cannot write '.jpgg' images; use one of .png, .svg, .pdf")
    out = earshot("plot", wav, "-o", "noext", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("noext.png: 1.0 s") and (tmp_path / "noext.png").stat().st_size > 1000


# ---------------------------------------------------------------- item 10: stdin closed

def test_stdin_source_with_stdin_closed(tmp_path):
    cfg = tmp_path / "stdin.toml"
    cfg.write_text(f'[[source]]\nname = "in"\nkind = "stdin"\n{QUIET}')
    out = subprocess.run(f"exec {EARSHOT} run -c {cfg} <&-", shell=True, capture_output=True, text=True, timeout=120)
    one_line_error(out, 1, "source 'in' (kind = \"stdin\") reads standard input, but standard input is closed")


# ---------------------------------------------------------------- item 12: start-up says what next; make shows progress

def test_run_says_where_events_go_and_what_next(tmp_path, wav):
    cfg = tmp_path / "earshot.toml"
    cfg.write_text(f'[[source]]\nname = "f"\nkind = "file"\npath = "{wav}"\nrealtime = false\n{QUIET}'
                   '[stdout]\nenabled = true\n[detect]\nlabels = ["alarm"]\n')
    out = earshot("run", "-c", cfg)
    assert out.returncode == 0, out.stderr
    assert "listening on f for alarm\n" in out.stderr  # the labels in force, not all the model's
    assert "listening for alarm; events go to standard output (JSON lines)" in out.stderr
    assert f"configuration: {cfg}" in out.stderr
    assert "next: `" in out.stderr and " tail` prints events from another terminal" in out.stderr


def test_make_install_shows_progress():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "-B", "-C", str(root), "run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "earshot: installing into .venv" in out.stdout and "earshot: starting with" in out.stdout
    install = [line for line in out.stdout.splitlines() if "pip install" in line and " -e ." in line]
    assert install and "--quiet" not in install[0]  # pip's own progress (packages, download bars) is shown


# ---------------------------------------------------------------- item 13: detect --threshold, --labels, --model

def test_detect_threshold_labels_model_options(tmp_path, wav):
    assert "glass_break" in earshot("detect", wav, "--threshold", "glass_break=0.5").stdout
    assert earshot("detect", wav, "--threshold", "glass_break=0.99999").stdout == ""
    assert earshot("detect", wav, "--labels", "alarm,gunshot").stdout == ""
    root = Path(__file__).resolve().parents[1]
    assert "glass_break" in earshot("detect", wav, "--model", root / "models" / "earshot.onnx").stdout
    one_line_error(earshot("detect", wav, "--threshold", "glassbreak=0.5"), 2,
                   f"detect.thresholds: 'glassbreak' is not a label of the model ({MODEL_LABELS})")
    one_line_error(earshot("detect", wav, "--threshold", "glass_break=nan"), 2,
                   "detect.thresholds.glass_break: nan is outside (0, 1)")
    one_line_error(earshot("detect", wav, "--threshold", "0.5"), 2, "--threshold '0.5': expected LABEL=NUMBER")
    one_line_error(earshot("detect", wav, "--model", tmp_path / "none.pt"), 2, f"model.path: {tmp_path}/none.pt: no such file")


# ---------------------------------------------------------------- item 14: mp3

def test_mp3_is_read(tmp_path):
    path = tmp_path / "clip.mp3"
    sf.write(path, glass_clip(), SR, format="MP3")
    out = earshot("detect", path)
    assert out.returncode == 0, out.stderr
    assert "1.0 s, 1 window(s) scored" in out.stderr


# ---------------------------------------------------------------- item 11: SIGHUP keeps MQTT thresholds

def test_reload_keeps_thresholds_set_over_mqtt(tmp_path, mosquitto, wav):
    """A threshold set over MQTT survives `systemctl reload`: afterwards the running detector (metrics),
    control.json and the retained topic all hold the MQTT value, while the file's other changes apply."""
    import paho.mqtt.publish as mqtt_publish

    port, state = free_port(), tmp_path / "state"
    cfg = tmp_path / "earshot.toml"
    base = (f'node = "n"\nstate_dir = "{state}"\n[[source]]\nname = "yard"\nkind = "file"\npath = "{wav}"\nloop = true\n'
            f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\nreconnect_max_s = 1.0\n[zmq]\nenabled = false\n'
            f'[clips]\nenabled = false\n[homeassistant]\nenabled = false\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    cfg.write_text(base)
    proc = subprocess.Popen([EARSHOT, "run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    topic = "earshot/n/yard/glass_break/threshold"

    def threshold(label: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("earshot_threshold{") and f'label="{label}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return None

    try:
        assert wait_until(lambda: retained(mosquitto, topic, 1.0) is not None, 60, 0.5), "no retained threshold"
        mqtt_publish.single(topic + "/set", "0.42", qos=1, hostname=mosquitto.host, port=mosquitto.port)
        assert wait_until(lambda: threshold("glass_break") == 0.42, 20, 0.2)
        cfg.write_text(base + "[detect]\nthresholds = { glass_break = 0.8, alarm = 0.6 }\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: threshold("alarm") == 0.6, 20, 0.2), "the reload did not apply"
        time.sleep(0.5)
        assert threshold("glass_break") == 0.42
        assert retained(mosquitto, topic) == b"0.42"
        saved = json.loads((state / "control.json").read_text())
        assert saved["sources"]["yard"]["thresholds"] == {"glass_break": 0.42}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


# ---------------------------------------------------------------- item 14: plot of a short clip

def test_plot_of_a_short_clip_shows_waveform_thresholds_and_untinted_spectrogram(wav):
    """Under 2.5 s the waveform is drawn; the legend sits above the threshold lines; no span tints the spectrogram."""
    from earshot.plot import analyse, figure

    samples, _ = sf.read(wav, dtype="float32")
    fig = figure(analyse(samples, shipped_model()), title="clip.wav")
    wave, _, mel, score, _ = fig.axes[:5]
    assert wave.get_lines() and np.ptp(wave.get_lines()[0].get_ydata()) > 0.1
    assert not mel.patches and score.patches  # the detection is shaded on the scores, not the spectrogram
    fig.canvas.draw()
    legend = score.get_legend().get_window_extent()
    for line in score.get_lines():
        if line.get_linestyle() == "--":
            y = score.transData.transform((0.5, line.get_ydata()[0]))[1]
            assert y < legend.y0, "the legend covers a threshold line"


# ---------------------------------------------------------------- issue 13 item 4: a device reopening

class _ReopeningCapture:
    """A fake capture (unit level): quiet audio, then the device "reopens" with 20 dB more gain."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.blocks = [rng.normal(0, 0.003, 1600).astype(np.float32) for _ in range(30)]
        self.loud = [rng.normal(0, 0.3, 1600).astype(np.float32) for _ in range(30)]
        self.reopens, self.restarts, self.finished = 0, 0, False

    def read(self, timeout_s: float) -> np.ndarray:
        if not self.blocks and self.loud:
            self.reopens += 1
            self.blocks, self.loud = self.loud, []
        if not self.blocks:
            self.finished = True
            return np.zeros(0, np.float32)
        return self.blocks.pop(0)


@pytest.mark.parametrize("restart", [True, False])
def test_level_starts_again_after_a_device_reopens(restart, monkeypatch):
    """After a reopen the worker restarts the running level, so the new device's audio is not scored
    against the old one's level (with the old level, its features sit 4-5 (ln units, about 20 dB) too high)."""
    import threading

    from earshot.analyzer import StreamAnalyzer
    from earshot.config import DetectConfig, FrontendConfig, SourceConfig
    from earshot.service import Stream, Worker

    if not restart:
        monkeypatch.setattr(Stream, "restarted", lambda self: False)
    loaded = shipped_model()
    hops = []

    class Tap:  # the worker routes each hop to its taps
        wants_audio = False

        def on_hop(self, source, hop):
            hops.append(hop)

    analyzer = StreamAnalyzer(loaded, FrontendConfig(), DetectConfig(), source="m", node="n")
    worker = Worker([Stream(SourceConfig(), _ReopeningCapture(), analyzer)], loaded, lambda e: None, [Tap()],
                    threading.Event())
    worker._listeners()
    while not worker.streams[0].capture.finished:
        worker._step()
    after = [h.mel.mean() for h in hops if h.t_end > 4.5]  # windows well inside the new device's audio
    assert after
    if restart:
        assert abs(np.mean(after)) < 1.0
    else:
        assert np.mean(after) > 3.0


# ---------------------------------------------------------------- item 14: install-service from /tmp

def test_install_service_from_tmp_warns(tmp_path):
    out = earshot("install-service", "--dry-run", "--root", tmp_path / "root", "--exec", "/tmp/earshot/.venv/bin/earshot")
    assert out.returncode == 0, out.stderr
    assert ("warning: /tmp/earshot/.venv/bin/earshot is under /tmp, which the unit replaces with an empty private "
            "folder (PrivateTmp=yes)") in out.stdout


# ---------------------------------------------------------------- item 14: docs that agree with the program

def test_docs_agree_with_the_program():
    root = Path(__file__).resolve().parents[1]
    deploy = (root / "docs" / "deploy.md").read_text()
    trouble = (root / "docs" / "troubleshooting.md").read_text()
    readme = (root / "README.md").read_text()
    mqtt_src = (root / "daemon" / "earshot" / "publish" / "mqtt.py").read_text()
    assert "only read" not in deploy and "mqtt-spool.sqlite3" in deploy and "[clips] enabled = false" in deploy
    assert "queued in memory" not in trouble and "mqtt-spool.sqlite3" in trouble
    # The refusal line troubleshooting quotes is the one the publisher logs.
    assert "MQTT broker refused the connection: not authorized (check username/password)" in trouble
    assert '"MQTT broker refused the connection: %s"' in mqtt_src and '"not authorized": " (check username/password)"' in mqtt_src
    unit = (root / "systemd" / "earshot.service").read_text()
    assert "security earshot.service` -> 1.5" in unit and "exposure of 1.5" in readme
    assert "useradd" not in readme  # one way to install the service: make install-service
    assert "mp3" in readme and "Bad input" in readme and "padded in front" in readme
    shipped = shipped_model()  # the score feed example carries the shipped model's thresholds
    thresholds = json.dumps([shipped.thresholds[label] for label in shipped.labels], separators=(",", ":"))
    assert f'"thresholds":{thresholds}' in readme, thresholds


def test_looped_mp3_file_source_does_not_flood_stderr(tmp_path):
    """A short mp3 looped as fast as possible is decoded once: libmpg123's few lines per decode appear once,
    not over and over (before: 1355 lines in 8 s, after: 13)."""
    path = tmp_path / "clip.mp3"
    sf.write(path, glass_clip(), SR, format="MP3")
    cfg = tmp_path / "mp3.toml"
    cfg.write_text(f'[[source]]\nname = "f"\nkind = "file"\npath = "{path}"\nrealtime = false\nloop = true\n{QUIET}')
    proc = subprocess.Popen([EARSHOT, "run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert sum("libmpg123" in line for line in err.splitlines()) < 40, err[-2000:]
