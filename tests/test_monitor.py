"""`earshot monitor`: the frame renderer, the score-feed parser, and the real program in a real
terminal (tmux), once on a generated recording with the tiny model and once attached to a ZeroMQ
PUB socket that sends score and event messages in the daemon's format."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq

from brokers import free_port, wait_until
from earshot import synth
from earshot.events import Event, iso_utc, new_event_id
from earshot.monitor import SCORES_SCHEMA, MonitorState, ScoreMessage, render

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["alarm", "glass_break", "gunshot"]


def _event(kind: str, label: str, source: str = "yard", onset: float = 3.0, score: float = 0.91) -> Event:
    now = time.time()
    return Event(kind, new_event_id(), label, source, "testnode", onset, None if kind == "start" else onset + 0.5,
                 iso_utc(now), None if kind == "start" else iso_utc(now + 0.5), score)


def _state() -> MonitorState:
    st = MonitorState(LABELS, [0.5, 0.6, 0.7], title="test", gate_dbfs=-75.0)
    rng = np.random.default_rng(0)
    for i in range(30):
        st.update_hop(0.1 * (i + 10), -20.0, np.array([0.8, 0.1, 0.0], dtype=np.float32), rng.random(64))
    return st


def test_render_shows_level_scores_thresholds_and_events():
    """A frame carries the level in dBFS, one row per class with its score and threshold, the active
    class flagged after a start event (and unflagged after its end), and the event lines."""
    st = _state()
    st.add_event(_event("start", "alarm"))
    lines = render(st, 100, 40, color=False)
    text = "\n".join(lines)
    assert re.search(r"level\s+-20\.0 dBFS", text)
    rows = {label: next(line for line in lines if line.startswith(label + " ")) for label in LABELS}
    assert "0.80" in rows["alarm"] and "0.50" in rows["alarm"] and "ACTIVE" in rows["alarm"]
    assert "0.60" in rows["glass_break"] and "ACTIVE" not in rows["glass_break"]
    assert "START  alarm" in text
    # The bar is filled in proportion to the score: 0.8 fills about 4x what 0.2 would.
    full = rows["alarm"].count("█")
    assert full > 3 * rows["glass_break"].count("█") > 0
    st.add_event(_event("end", "alarm"))
    assert "ACTIVE" not in "\n".join(render(st, 100, 40, color=False))


@pytest.mark.parametrize("cols,rows", [(60, 12), (80, 24), (160, 50)])
def test_render_fits_the_terminal(cols, rows):
    """No frame is taller than the terminal, nor wider once colour codes are stripped."""
    st = _state()
    for i in range(30):
        st.add_event(_event("start" if i % 2 == 0 else "end", LABELS[i % 3]))
    for color in (False, True):
        lines = render(st, cols, rows, color=color)
        assert len(lines) <= rows
        plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines]
        assert max(len(line) for line in plain) <= cols


def test_spectrogram_shows_loud_bands_darker():
    """The spectrogram puts high mel bands on top: energy only in the top bands shades the top rows."""
    st = MonitorState(LABELS, [0.5] * 3)
    for _ in range(20):
        mel = np.zeros(64, dtype=np.float32)
        mel[48:] = 10.0
        st.update_hop(1.0, -20.0, np.zeros(3), mel)
    lines = render(st, 80, 40, color=False)
    spec = [line for line in lines if "▕" in line and not any(line.startswith(x) for x in ["level", *LABELS])]
    assert spec[0].count("█") >= 20 and spec[-1].count("█") == 0


def test_score_message_round_trip_and_rejects_others():
    """A message in the daemon's `earshot.scores/1` format parses; another schema or mismatched lengths do not."""
    msg = {"schema": SCORES_SCHEMA, "node": "n", "source": "s", "t_end": 1.5, "time": time.time(), "level_dbfs": -30.0,
           "labels": LABELS, "scores": [0.1, 0.2, 0.3], "thresholds": [0.5, 0.5, 0.5], "mel": [0.0] * 64}
    parsed = ScoreMessage.from_json(json.dumps(msg))
    assert parsed.labels == tuple(LABELS) and parsed.scores[2] == pytest.approx(0.3) and parsed.mel.shape == (64,)
    unreported = ScoreMessage.from_json(json.dumps({**msg, "thresholds": [0.5, None, 0.5]}))
    assert np.isnan(unreported.thresholds[1])  # a label the daemon does not report has a null threshold
    with pytest.raises(ValueError):
        ScoreMessage.from_json(json.dumps({**msg, "schema": "earshot.event/1"}))
    with pytest.raises(ValueError):
        ScoreMessage.from_json(json.dumps({**msg, "scores": [0.1]}))


# -- in a real terminal -----------------------------------------------------------------------


@pytest.fixture
def tmux():
    """A private tmux server; yields a function that starts a command and returns a pane reader."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt install tmux)")
    sock = f"earshot-test-{uuid.uuid4().hex[:8]}"

    def start(command: str) -> Callable[[], str]:
        subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "110", "-y", "40",
                        f"cd {ROOT} && {command}; sleep 60"], check=True, timeout=10)

        def capture() -> str:
            out = subprocess.run(["tmux", "-L", sock, "capture-pane", "-p"], capture_output=True, text=True, timeout=10)
            return out.stdout
        return capture

    yield start
    subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=10)


def test_monitor_on_a_file_in_tmux(tmp_path, tiny_checkpoint, tmux):
    """Run on a generated recording with the configured model, the terminal shows the level meter, a row
    per class with its threshold, and a START line for the scene's first sound."""
    audio, truth = next((a, t) for a, t in (synth.scene(duration_s=5.0, seed=seed) for seed in range(20))
                        if t and t[0][0] < 2.5)
    label = truth[0][2]
    wav = tmp_path / "scene.wav"
    sf.write(wav, audio, 16000, subtype="PCM_16")
    cfg = tmp_path / "earshot.toml"
    cfg.write_text(f'[model]\npath = "{tiny_checkpoint}"\n')
    capture = tmux(f"{sys.executable} -m earshot monitor -c {cfg} --file {wav}")
    assert wait_until(lambda: f"START  {label}" in capture(), timeout_s=60, poll_s=0.5), capture()
    screen = capture()
    assert re.search(r"level\s+-?\d+\.\d dBFS", screen), screen
    for label in LABELS:
        assert re.search(rf"^{label}\s+\d\.\d\d ▕.*▏ 0\.\d\d", screen, re.M), screen
    assert "mel spectrogram" in screen and "Traceback" not in screen
    assert wait_until(lambda: "end of input" in capture(), timeout_s=30, poll_s=0.5), capture()


def test_monitor_attached_to_a_zmq_score_feed_in_tmux(tmux):
    """Attached to a PUB socket sending `scores.<source>` and `event.<source>.<label>` messages, the terminal
    shows the node/source, each class's score and threshold from the feed, and the event."""
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()
    start_event = _event("start", "glass_break", source="yard", onset=4.2, score=0.88)

    def send() -> None:
        t = 0.0
        while not stop.is_set():
            t += 0.1
            mel = (np.sin(np.arange(64) / 5 + t) * 3).tolist()
            msg = {"schema": SCORES_SCHEMA, "node": "testnode", "source": "yard", "t_end": t, "time": time.time(),
                   "level_dbfs": -31.5, "labels": LABELS, "scores": [0.12, 0.83, 0.05],
                   "thresholds": [0.55, 0.65, 0.75], "mel": mel, "gate_dbfs": -62.0}
            pub.send_multipart([b"scores.yard", json.dumps(msg).encode()])
            # Another source on the same feed must not be mixed into the view of "yard".
            pub.send_multipart([b"scores.porch", json.dumps({**msg, "source": "porch", "scores": [1, 1, 1]}).encode()])
            pub.send_multipart([b"event.yard.glass_break", start_event.to_json().encode()])
            time.sleep(0.1)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        capture = tmux(f"{sys.executable} -m earshot monitor --zmq tcp://127.0.0.1:{port} --source yard")
        assert wait_until(lambda: "START  glass_break" in capture(), timeout_s=30, poll_s=0.3), capture()
        screen = capture()
        assert "testnode/yard" in screen
        assert re.search(r"level\s+-31\.5 dBFS", screen), screen
        assert "| gate -62" in screen, screen  # the daemon's level gate, from the feed
        assert re.search(r"^glass_break\s+0\.83 ▕.*▏ 0\.65\s+● ACTIVE", screen, re.M), screen
        assert re.search(r"^alarm\s+0\.12 ▕.*▏ 0\.55", screen, re.M), screen
        assert re.search(r"^gunshot\s+0\.05 ▕.*▏ 0\.75", screen, re.M), screen
    finally:
        stop.set()
        sender.join(2)
        pub.close(linger=0)
        ctx.term()
