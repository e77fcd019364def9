"""Capture sources with real parts: PortAudio through a private PulseAudio, real files, ffmpeg, pipes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from earshot import capture, synth
from earshot.capture import (
    CaptureError,
    DemoCapture,
    FfmpegCapture,
    FileCapture,
    StdinCapture,
    iter_file_blocks,
    make_capture,
)
from earshot.capture import base as capture_base
from earshot.capture import ffmpeg as capture_ffmpeg
from earshot.config import SourceConfig

sys.path.insert(0, str(Path(__file__).parent))
from pulse import PulseServer, PulseUnavailable, pulse_server  # noqa: E402

pytestmark = pytest.mark.timeout(180)

SR = 16000
REPO = Path(__file__).resolve().parents[1]


def drain(cap: capture.Capture, limit_s: float = 30.0, pause_s: float = 0.0) -> np.ndarray:
    """Read until the capture is finished (or `limit_s` passes); return everything read."""
    out = []
    t0 = time.monotonic()
    while not cap.finished and time.monotonic() - t0 < limit_s:
        out.append(cap.read(0.2))
        if pause_s:
            time.sleep(pause_s)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    """The shared daemon stop event (set at teardown)."""
    ev = threading.Event()
    yield ev
    ev.set()


@pytest.fixture
def noise_wav(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 3 s 16 kHz float WAV of noise, and its samples."""
    x = (np.random.default_rng(0).standard_normal(3 * SR) * 0.1).astype(np.float32)
    path = tmp_path / "noise.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    return path, x


def file_cfg(path: Path, **kw: object) -> SourceConfig:
    """A file source config."""
    return replace(SourceConfig(name="f", kind="file", path=str(path), realtime=False), **kw)


# -- file ----------------------------------------------------------------------------


def test_file_fast_mode_is_exact_and_lossless_under_back_pressure(
    tmp_path: Path, stop: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Non-realtime file playback never overruns a slow consumer: output == file, nothing lost."""
    monkeypatch.setattr(capture_base, "RING_S", 0.25)  # a ring far smaller than the file (read in base)
    x = (np.random.default_rng(1).standard_normal(5 * SR) * 0.1).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    cap = FileCapture(file_cfg(path), SR, stop)
    cap.start()
    assert cap.ring.capacity < x.size / 10
    y = drain(cap, pause_s=0.01)
    cap.stop()
    assert cap.finished and cap.error is None
    assert cap.lost_samples == 0 and cap.overruns == 0
    np.testing.assert_array_equal(y, x)


def test_file_realtime_is_paced(noise_wav: tuple[Path, np.ndarray], stop: threading.Event) -> None:
    """realtime=True takes about the file's duration; realtime=False is much faster."""
    path, x = noise_wav
    t0 = time.monotonic()
    cap = FileCapture(file_cfg(path, realtime=True), SR, stop)
    cap.start()
    first_half = []
    while time.monotonic() - t0 < 1.0:
        first_half.append(cap.read(0.1))
    got_after_1s = sum(a.size for a in first_half)
    y = np.concatenate(first_half + [drain(cap)])
    elapsed = time.monotonic() - t0
    cap.stop()
    assert 2.8 <= elapsed < 6.0
    assert 0.6 * SR <= got_after_1s <= 1.3 * SR
    np.testing.assert_array_equal(y, x)

    t0 = time.monotonic()
    fast = FileCapture(file_cfg(path, realtime=False), SR, stop)
    fast.start()
    y = drain(fast)
    fast.stop()
    assert time.monotonic() - t0 < 1.5
    np.testing.assert_array_equal(y, x)


def test_file_is_downmixed_and_resampled(tmp_path: Path, stop: threading.Event) -> None:
    """A 44.1 kHz stereo file comes out as the mono mix resampled exactly like scipy's resample_poly."""
    rng = np.random.default_rng(2)
    st = (rng.standard_normal((44100, 2)) * 0.1).astype(np.float32)
    path = tmp_path / "stereo.flac"
    sf.write(path, st, 44100, subtype="PCM_24")
    decoded, _ = sf.read(path, dtype="float32")
    mono = decoded.mean(axis=1, dtype=np.float32)
    cap = FileCapture(file_cfg(path), SR, stop)
    cap.start()
    assert cap.samplerate == 44100
    y = drain(cap)
    cap.stop()
    ref = resample_poly(mono.astype(np.float64), 160, 441)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_file_loop_restarts(noise_wav: tuple[Path, np.ndarray], stop: threading.Event) -> None:
    """loop=True plays the file again after its end instead of finishing."""
    path, x = noise_wav
    cap = FileCapture(file_cfg(path, loop=True), SR, stop)
    cap.start()
    got = []
    t0 = time.monotonic()
    while sum(a.size for a in got) < 2.5 * x.size and time.monotonic() - t0 < 10:
        got.append(cap.read(0.2))
    cap.stop()
    y = np.concatenate(got)
    assert y.size >= 2.5 * x.size
    np.testing.assert_array_equal(y[x.size : 2 * x.size], x)


def test_file_nan_samples_are_counted_and_zeroed(
    tmp_path: Path, stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """NaN/inf samples reach the worker as 0, are counted, and warned about once."""
    x = np.full(SR, 0.25, dtype=np.float32)
    x[100:150] = np.nan
    x[5000] = np.inf
    x[9000:9010] = -np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, x, SR, subtype="FLOAT")
    cap = FileCapture(file_cfg(path, block_ms=5.0), SR, stop)
    cap.start()
    with caplog.at_level(logging.WARNING, logger="earshot.capture"):
        y = drain(cap)
    cap.stop()
    assert cap.nonfinite_samples == 61
    assert np.isfinite(y).all()
    expected = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    np.testing.assert_array_equal(y, expected)
    assert sum("NaN/inf" in r.getMessage() for r in caplog.records) == 1


def test_unreadable_file_is_one_line_capture_error(tmp_path: Path, stop: threading.Event) -> None:
    """A junk or missing file fails at start() with 'cannot read FILE: reason' on one line."""
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 20)
    for path in (junk, tmp_path / "missing.wav"):
        cap = FileCapture(file_cfg(path), SR, stop)
        with pytest.raises(CaptureError) as err:
            cap.start()
        msg = str(err.value)
        assert msg.startswith(f"cannot read {path}: ") and len(msg) > len(f"cannot read {path}: ")
        if path.name == "missing.wav":
            assert msg == f"cannot read {path}: no such file"
        assert "\n" not in msg
        with pytest.raises(CaptureError, match="cannot read"):
            list(iter_file_blocks(path, SR))


@pytest.fixture
def corrupt_flac(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 5 s FLAC whose second half is garbled (libsndfile loses sync mid-file), and its original samples."""
    x = (np.random.default_rng(0).standard_normal(5 * SR) * 0.1).astype(np.float32)
    path = tmp_path / "bad.flac"
    sf.write(path, x, SR)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + 2000):
        data[i] = (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))
    return path, x


def test_file_corrupt_mid_file_keeps_what_was_read(
    corrupt_flac: tuple[Path, np.ndarray], stop: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """Corruption mid-file: the part before it is delivered, an error is logged, the source finishes."""
    path, x = corrupt_flac
    cap = FileCapture(file_cfg(path), SR, stop)
    cap.start()
    with caplog.at_level(logging.ERROR, logger="earshot.capture"):
        y = drain(cap)
    cap.stop()
    assert cap.finished
    assert SR <= y.size < x.size
    np.testing.assert_allclose(y, x[: y.size], atol=1e-4)  # FLAC is 16-bit
    assert any("corrupt" in r.getMessage() for r in caplog.records)


def test_iter_file_blocks_yields_then_raises_on_corruption(corrupt_flac: tuple[Path, np.ndarray]) -> None:
    """iter_file_blocks yields the readable part and then raises CaptureError naming the file."""
    path, x = corrupt_flac
    got = []
    with pytest.raises(CaptureError, match=f"cannot read {path}: corrupt after"):
        for block in iter_file_blocks(path, SR, block_s=0.5):
            got.append(block)
    y = np.concatenate(got)
    assert SR <= y.size < x.size
    np.testing.assert_allclose(y, x[: y.size], atol=1e-4)


def test_iter_file_blocks_resamples_and_blocks(tmp_path: Path) -> None:
    """Offline reading of a 48 kHz file gives ~block_s blocks whose concatenation is resample_poly of the mix."""
    x = (np.random.default_rng(3).standard_normal((48000 * 2 + 5, 2)) * 0.1).astype(np.float32)
    path = tmp_path / "x48.wav"
    sf.write(path, x, 48000, subtype="FLOAT")
    blocks = list(iter_file_blocks(path, SR, block_s=0.5))
    assert all(b.dtype == np.float32 for b in blocks)
    assert all(abs(b.size - SR // 2) <= 40 for b in blocks[:-2])
    ref = resample_poly(x.mean(axis=1, dtype=np.float32).astype(np.float64), 1, 3)
    np.testing.assert_allclose(np.concatenate(blocks), ref, atol=1e-5)


# -- demo, stdin, factory ------------------------------------------------------------


def test_demo_plays_the_synth_scene(stop: threading.Event) -> None:
    """The demo source delivers synth.scene(seed=0) sample for sample (non-realtime here)."""
    cfg = SourceConfig(name="demo", kind="demo", realtime=False)
    cap = DemoCapture(cfg, SR, stop)
    cap.start()
    got: list[np.ndarray] = []
    while sum(a.size for a in got) < 5 * SR:
        got.append(cap.read(1.0))
    cap.stop()
    audio, _ = synth.scene(SR, DemoCapture.SCENE_S, 0)
    y = np.concatenate(got)
    np.testing.assert_array_equal(y, audio[: y.size])


def test_stdin_pipe_until_eof(stop: threading.Event) -> None:
    """s16le bytes written to a pipe in odd-sized pieces come out as the same samples; EOF finishes the source."""
    rng = np.random.default_rng(4)
    ints = rng.integers(-32768, 32767, size=3 * SR, dtype=np.int16)
    payload = ints.astype("<i2").tobytes()
    r, w = os.pipe()
    reader = os.fdopen(r, "rb", buffering=0)
    cap = StdinCapture(SourceConfig(name="in", kind="stdin"), SR, stop, stream=reader)
    cap.start()

    def feed() -> None:
        with os.fdopen(w, "wb", buffering=0) as f:
            i = 0
            while i < len(payload):
                n = int(rng.integers(1, 5001))
                f.write(payload[i : i + n])
                i += n

    t = threading.Thread(target=feed)
    t.start()
    y = drain(cap)
    t.join(5)
    cap.stop()
    reader.close()
    assert cap.finished
    np.testing.assert_array_equal(y, ints.astype(np.float32) / 32768.0)


def test_stdin_real_process_stdin(tmp_path: Path) -> None:
    """A child process reading its real stdin (sys.stdin.buffer) receives piped samples and finishes at EOF."""
    code = (
        "import threading, numpy as np\n"
        "from earshot.capture import StdinCapture\n"
        "from earshot.config import SourceConfig\n"
        "c = StdinCapture(SourceConfig(name='in', kind='stdin'), 16000, threading.Event()); c.start()\n"
        "out = []\n"
        "while not c.finished: out.append(c.read(0.5))\n"
        "c.stop(); y = np.concatenate(out); print(y.size, round(float(y.sum()), 3))\n"
    )
    ints = np.arange(-8000, 8000, dtype=np.int16)
    res = subprocess.run(
        [sys.executable, "-c", code], input=ints.astype("<i2").tobytes(), capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr.decode()
    n, total = res.stdout.decode().split()
    assert int(n) == ints.size
    assert float(total) == pytest.approx(float((ints.astype(np.float64) / 32768).sum()), abs=1e-3)


def test_make_capture_kinds(stop: threading.Event) -> None:
    """The factory maps each kind to its class and rejects unknown kinds with one line."""
    for kind, cls in capture._KINDS.items():
        assert isinstance(make_capture(SourceConfig(name="s", kind=kind), SR, stop), cls)
    with pytest.raises(CaptureError, match="unknown kind 'radio'"):
        make_capture(SourceConfig(name="s", kind="radio"), SR, stop)


# -- ffmpeg --------------------------------------------------------------------------


def ff_cfg(url: str, **kw: object) -> SourceConfig:
    """An ffmpeg source config."""
    return replace(SourceConfig(name="ff", kind="ffmpeg", url=url, realtime=False), **kw)


def test_ffmpeg_reads_a_file_url(tmp_path: Path, stop: threading.Event) -> None:
    """ffmpeg decodes and resamples a 44.1 kHz file; the samples match, and a clean end finishes the source."""
    t = np.arange(44100 * 2) / 44100
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / "tone.wav"
    sf.write(path, x, 44100)
    cap = FfmpegCapture(ff_cfg(str(path)), SR, stop)
    cap.start()
    y = drain(cap)
    cap.stop()
    assert cap.finished and cap.restarts == 0
    assert abs(y.size - 2 * SR) <= 200
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(y.size) / SR)
    core = slice(1000, y.size - 1000)
    assert np.corrcoef(y[core], ref[core])[0, 1] > 0.99
    assert np.max(np.abs(y[core] - ref[core])) < 0.02


def test_ffmpeg_bad_url_retries_without_crashing(
    tmp_path: Path, stop: threading.Event, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad input is logged with ffmpeg's own error and retried with backoff; stop() is bounded."""
    monkeypatch.setattr(capture_ffmpeg, "BACKOFF_MIN_S", 0.2)  # the name FfmpegCapture reads
    cap = FfmpegCapture(ff_cfg(str(tmp_path / "does-not-exist.wav")), SR, stop)
    with caplog.at_level(logging.WARNING, logger="earshot.capture"):
        cap.start()
        t0 = time.monotonic()
        while cap.restarts < 2 and time.monotonic() - t0 < 20:
            assert cap.read(0.1).size == 0
        assert cap.restarts >= 2
        assert not cap.finished and cap.error is None
        t0 = time.monotonic()
        cap.stop()
    assert time.monotonic() - t0 < 5.0
    assert all(not t.is_alive() for t in cap._threads)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("restarting in" in m and "does-not-exist" in m for m in msgs), msgs


def test_ffmpeg_stop_is_bounded_while_streaming(tmp_path: Path, stop: threading.Event) -> None:
    """Stopping a running ffmpeg source (infinite generator input) kills ffmpeg and returns quickly."""
    cap = FfmpegCapture(ff_cfg("sine=frequency=1000:sample_rate=16000", ffmpeg_args=("-re", "-f", "lavfi")), SR, stop)
    cap.start()
    t0 = time.monotonic()
    got = 0
    while got < SR // 2 and time.monotonic() - t0 < 15:
        got += cap.read(0.2).size
    assert got >= SR // 2
    proc = cap._proc
    t0 = time.monotonic()
    cap.stop()
    assert time.monotonic() - t0 < 5.0
    assert proc is None or proc.poll() is not None


def test_ffmpeg_missing_is_a_capture_error(stop: threading.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ffmpeg on PATH, start() says to install it."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CaptureError, match="ffmpeg is not installed"):
        FfmpegCapture(ff_cfg("x.wav"), SR, stop).start()


# -- microphone through PulseAudio -------------------------------------------------------

_MIC_CHILD = r"""
import json, sys, threading, time, logging
import numpy as np
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
from earshot.capture import CaptureError, MicCapture, has_input_device, list_devices
from earshot.config import SourceConfig
mode, out_path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == "missing":
    try:
        MicCapture(SourceConfig(name="m", device="no-such-mic"), 16000, threading.Event()).start()
    except CaptureError as e:
        print("ERROR", e, flush=True)
    print("LIST", json.dumps(list_devices()), has_input_device(), flush=True)
    sys.exit(0)
cap = MicCapture(SourceConfig(name="m", device="pulse", samplerate=48000), 16000, threading.Event())
cap.start()
print("READY", flush=True)
out = []
t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    out.append(cap.read(0.5))
t = time.monotonic()
cap.stop()
print("STOPPED", round(time.monotonic() - t, 2), cap.reopens, flush=True)
np.save(out_path, np.concatenate(out))
"""


@pytest.fixture
def pulse(tmp_path: Path) -> Iterator[PulseServer]:
    """A private PulseAudio server (skips the test only if PulseAudio cannot start here)."""
    try:
        with pulse_server(tmp_path / "pulse") as server:
            yield server
    except PulseUnavailable as exc:
        pytest.skip(f"PulseAudio cannot start: {exc}")


def run_mic_child(pulse: PulseServer, mode: str, out: Path, seconds: float) -> subprocess.Popen[str]:
    """Start the capture child with the PulseAudio environment (PortAudio enumerates at start-up)."""
    return subprocess.Popen(
        [sys.executable, "-c", _MIC_CHILD, mode, str(out), str(seconds)],
        env=pulse.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )


def wait_for_line(proc: subprocess.Popen[str], prefix: str, lines: list[str], timeout_s: float = 30) -> str:
    """Read the child's output until a line starts with `prefix`."""
    assert proc.stdout is not None
    t0 = time.monotonic()
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith(prefix):
            return line.rstrip()
        assert time.monotonic() - t0 < timeout_s, lines
    raise AssertionError(f"child ended without {prefix!r}: {lines}")


def t3_envelope(y: np.ndarray, sr: int = SR, hop_s: float = 0.05) -> np.ndarray:
    """Per-hop amplitude in the 2.9-3.3 kHz band (the T3 alarm's fundamental)."""
    hop = int(hop_s * sr)
    m = y.shape[0] // hop
    frames = y[: m * hop].reshape(m, hop) * np.hanning(hop)
    spec = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    f = np.fft.rfftfreq(hop, 1 / sr)
    return np.sqrt(spec[:, (f > 2900) & (f < 3300)].sum(axis=1))


def assert_has_t3(y: np.ndarray, played: np.ndarray) -> None:
    """The captured signal contains the played T3 pattern: its 3.1 kHz band envelope matches the
    file's (normalised correlation > 0.9 at some lag) and the beeps stand 30 dB above the gaps."""
    env_cap, env_ref = t3_envelope(y), t3_envelope(played)
    assert env_cap.size > env_ref.size, "captured less than was played"
    a = (env_ref - env_ref.mean()) / env_ref.std()
    best, best_lag = -1.0, 0
    for lag in range(env_cap.size - env_ref.size + 1):
        seg = env_cap[lag : lag + env_ref.size]
        if seg.std() > 0:
            c = float(np.mean(a * (seg - seg.mean()) / seg.std()))
            if c > best:
                best, best_lag = c, lag
    assert best > 0.9, f"T3 pattern not found (best correlation {best:.2f})"
    seg = env_cap[best_lag : best_lag + env_ref.size]
    on, off = seg[env_ref > 0.5 * env_ref.max()], seg[env_ref < 0.01 * env_ref.max()]
    assert np.median(on) > 30 * np.median(off) + 1e-9


def _t3_files(tmp_path: Path, seed: int) -> tuple[np.ndarray, Path, Path]:
    """A 4 s T3 alarm, the WAV to play it from, and where the capture child saves what it heard."""
    played = synth.t3_alarm(SR, 4.0, np.random.default_rng(seed))
    wav = tmp_path / "t3.wav"
    sf.write(wav, played, SR)
    return played, wav, tmp_path / "cap.npy"


@pytest.mark.slow
def test_mic_capture_hears_t3_alarm_through_pulseaudio(pulse: PulseServer, tmp_path: Path) -> None:
    """MicCapture via PortAudio (ALSA 'pulse' device, 48 kHz -> 16 kHz) captures a T3 alarm played
    into the null sink: the 3.1 kHz on/off pattern is in the captured signal."""
    played, wav, out = _t3_files(tmp_path, seed=5)
    child = run_mic_child(pulse, "capture", out, 7.0)
    lines: list[str] = []
    try:
        wait_for_line(child, "READY", lines)
        time.sleep(0.5)
        pulse.play(wav)
        stopped = wait_for_line(child, "STOPPED", lines)
        assert child.wait(30) == 0, lines
    finally:
        child.kill()
    assert float(stopped.split()[1]) < 5.0
    y = np.load(out)
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert_has_t3(y, played)


@pytest.mark.slow
def test_mic_survives_device_vanishing(pulse: PulseServer, tmp_path: Path) -> None:
    """When the audio server dies mid-stream the capture logs, keeps the process alive, reopens the
    device once it is back, and captures sound played after the restart."""
    played, wav, out = _t3_files(tmp_path, seed=6)
    child = run_mic_child(pulse, "capture", out, 14.0)
    lines: list[str] = []
    try:
        wait_for_line(child, "READY", lines)
        time.sleep(1.0)
        pulse.stop()
        wait_for_line(child, "LOG source m: input stream", lines)
        time.sleep(1.0)
        pulse.start()
        wait_for_line(child, "LOG source m: input reopened", lines)
        time.sleep(0.5)
        pulse.play(wav)
        stopped = wait_for_line(child, "STOPPED", lines)
        assert child.wait(30) == 0, lines
    finally:
        child.kill()
    assert int(stopped.split()[2]) >= 1  # reopens
    assert_has_t3(np.load(out), played)


def test_missing_device_is_a_capture_error(pulse: PulseServer, tmp_path: Path) -> None:
    """A device name that matches nothing fails at start with a one-line hint to `earshot devices`;
    list_devices shows the PulseAudio-backed devices."""
    child = run_mic_child(pulse, "missing", tmp_path / "unused.npy", 0)
    lines: list[str] = []
    try:
        err = wait_for_line(child, "ERROR", lines)
        listing = wait_for_line(child, "LIST", lines)
        child.wait(30)
    finally:
        child.kill()
    assert err == "ERROR no input device matches 'no-such-mic': run `earshot devices` to list them"
    assert "pulse" in listing and listing.endswith("True")


def test_missing_device_in_process(stop: threading.Event) -> None:
    """Whatever devices this machine has, a nonexistent device fails start() with a one-line CaptureError."""
    cap = capture.MicCapture(SourceConfig(name="m", device="no-such-mic-xyz"), SR, stop)
    with pytest.raises(CaptureError) as err:
        cap.start()
    assert "\n" not in str(err.value)
    assert "no-such-mic-xyz" in str(err.value) or "no audio input device" in str(err.value)
