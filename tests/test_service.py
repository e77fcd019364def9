"""Service lifecycle: readiness and watchdog over a real notify socket, a dead worker is fatal,
finite sources end the run, run-time calls execute in the worker thread."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch

from earshot.config import Config, SourceConfig
from earshot.features import FrontendParams
from earshot.model import CnnDims
from earshot.model.checkpoint import LoadedModel
from earshot.model.cnn import SoundEventCnn
from earshot.sdnotify import Notifier
from earshot import service as service_mod
from earshot.service import Service

from brokers import wait_until

pytestmark = pytest.mark.timeout(60)
LABELS = ("alarm", "glass_break", "gunshot")


class FakeCapture:
    """Stands in for a sound card: returns blocks of noise, or misbehaves on demand."""

    def __init__(self, blocks: int | None = None, fail_after: int | None = None, stall: threading.Event | None = None):
        self.blocks, self.fail_after, self.stall = blocks, fail_after, stall
        self.reads = 0
        self.finished = False
        self.lost_samples = self.status_flags = self.nonfinite_samples = 0
        self.stopped = False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True

    def read(self, timeout_s: float) -> np.ndarray:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise RuntimeError("simulated bug in the pipeline")
        if self.stall is not None and self.reads > 3:
            self.stall.wait()
        if self.blocks is not None and self.reads > self.blocks:
            self.finished = True
            return np.zeros(0, np.float32)
        time.sleep(0.005)
        return np.random.default_rng(self.reads).normal(0, 0.01, 1600).astype(np.float32)


class NullPublisher:
    def __init__(self):
        self.events = []
        self.closed = False

    def publish(self, event):
        self.events.append(event)

    def stats(self):
        return {}

    def close(self, timeout_s=2.0):
        self.closed = True


@pytest.fixture
def loaded():
    torch.manual_seed(0)
    dims = CnnDims(channels=(4, 4, 4, 4, 4), embed_dim=8)
    return LoadedModel(SoundEventCnn(dims).eval(), dims, LABELS, FrontendParams(), {k: 0.99 for k in LABELS}, {})


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    messages: list[str] = []
    done = threading.Event()

    def pump():
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    yield Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "600000"}), messages
    done.set()
    t.join(1)
    sock.close()


def _service(monkeypatch, loaded, captures, notifier=None):
    it = iter(captures)
    monkeypatch.setattr(service_mod, "make_capture", lambda cfg, sr, stop: next(it))
    config = Config(sources=tuple(SourceConfig(name=f"s{i}", kind="demo") for i in range(len(captures))))
    return Service(config, loaded, NullPublisher(), notifier)


def test_ready_and_watchdog_then_clean_end(monkeypatch, loaded, notify_socket):
    """READY=1 once listening, WATCHDOG=1 while the worker loops, exit 0 when finite sources end."""
    notifier, messages = notify_socket
    svc = _service(monkeypatch, loaded, [FakeCapture(blocks=150), FakeCapture(blocks=100)], notifier)
    svc.start()
    code = svc.supervise()
    assert code == 0
    assert messages[0].startswith("READY=1")
    deadline = time.monotonic() + 2
    while "STOPPING=1" not in messages and time.monotonic() < deadline:
        time.sleep(0.02)  # the datagram reader runs in its own thread
    assert "WATCHDOG=1" in messages and messages[-1] == "STOPPING=1"
    assert all(s.capture.stopped for s in svc.streams) and svc.publisher.closed
    assert all(s.analyzer.seconds_in == pytest.approx(n * 0.1) for s, n in zip(svc.streams, (150, 100)))


def test_dead_worker_is_fatal(monkeypatch, loaded):
    """An unexpected exception in the worker stops the service with exit code 1 (systemd restarts it)."""
    svc = _service(monkeypatch, loaded, [FakeCapture(fail_after=5)])
    svc.start()
    started = time.monotonic()
    assert svc.supervise() == 1
    assert time.monotonic() - started < 10
    assert svc.worker.failed and svc.stop.is_set()


def test_stalled_worker_starves_watchdog(monkeypatch, loaded, notify_socket):
    """A worker stuck inside a read stops the watchdog pings, so systemd would restart the service."""
    notifier, messages = notify_socket
    monkeypatch.setattr(service_mod, "STALL_S", 0.5)
    release = threading.Event()
    svc = _service(monkeypatch, loaded, [FakeCapture(stall=release)], notifier)
    svc.start()
    time.sleep(1.5)
    pings_while_stalled = messages.count("WATCHDOG=1")
    time.sleep(1.0)
    assert messages.count("WATCHDOG=1") == pings_while_stalled
    release.set()
    svc.stop.set()
    assert svc.supervise() == 0


def test_call_soon_runs_in_worker(monkeypatch, loaded):
    """Run-time changes are applied in the worker thread, and a disabled stream is not analysed."""
    svc = _service(monkeypatch, loaded, [FakeCapture(blocks=300)])
    svc.start()
    seen = []
    svc.worker.call_soon(lambda: seen.append(threading.current_thread().name))
    svc.worker.call_soon(lambda: setattr(svc.streams[0], "enabled", False))
    time.sleep(0.5)
    before = svc.streams[0].analyzer.seconds_in
    time.sleep(0.5)
    assert svc.streams[0].analyzer.seconds_in == before
    assert seen == ["earshot-worker"]
    svc.stop.set()
    assert svc.supervise() == 0


def test_reload_keeps_unchanged_sources(monkeypatch, loaded):
    """A reload adds and removes sources and applies new thresholds, while an unchanged source keeps
    its capture and analyzer (no audio lost); an invalid file is ignored."""
    from earshot.config import ConfigError, DetectConfig

    captures = [FakeCapture(), FakeCapture(), FakeCapture()]
    svc = _service(monkeypatch, loaded, captures[:1])
    svc.start()
    it = iter(captures[1:])
    monkeypatch.setattr(service_mod, "make_capture", lambda cfg, sr, stop: next(it))
    kept = svc.streams[0]
    time.sleep(0.3)
    new = Config(sources=(SourceConfig(name="s0", kind="demo"), SourceConfig(name="extra", kind="demo")),
                 detect=DetectConfig(thresholds={"alarm": 0.42}))
    svc.reload_config = lambda: new
    svc.reload()
    # Applied by the worker between two reads: wait for it rather than a fixed time (a loaded CI machine).
    assert wait_until(lambda: [s.source.name for s in svc.streams] == ["s0", "extra"], timeout_s=5)
    assert svc.streams[0] is kept and kept.analyzer.seconds_in > 0.5
    assert all(s.analyzer.detector.thresholds["alarm"] == 0.42 for s in svc.streams)

    def bad():
        raise ConfigError(["detect.hold_s: must be 0 or more"])

    svc.reload_config = bad
    svc.reload()  # logged and ignored
    assert [s.source.name for s in svc.streams] == ["s0", "extra"]
    svc.reload_config = lambda: Config(sources=(SourceConfig(name="extra", kind="demo"),))
    svc.reload()
    assert wait_until(lambda: [s.source.name for s in svc.streams] == ["extra"] and captures[0].stopped, timeout_s=5)
    svc.stop.set()
    assert svc.supervise() == 0
