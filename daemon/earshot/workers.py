"""Worker processes: the sources spread over several processes, one daemon to the outside.

Why: a Python process runs Python code on one core at a time (the interpreter lock), and with
a few dozen sources the per-hop Python work (reading rings, log-mel, the event state machine)
fills that core. With `[worker] processes` > 1 (or automatic, see `WorkerConfig`) each worker
process runs the captures, analyzers and one batched scorer (`service.Worker`) of its share of
the sources; the daemon's own process keeps everything that faces the outside: the one MQTT
connection, the ZeroMQ socket, the HTTP endpoints, run-time control and the taps that read hops
(metrics, Home Assistant, the score feed). Taps that need the audio itself (`in_worker = True`,
the clip recorder) run inside each worker process instead, on that process's sources.

Messages over one `multiprocessing` pipe per worker (pickled, a few per second):

- worker -> daemon: `("ready", rates)`, `("failed", reason)`, `("batch", events, hops, stats)`,
  `("exit", failed)`; a batch carries the events of one loop, the hops as numpy blocks (only
  while some tap in the daemon wants hops) and, every half second, the capture counters;
- daemon -> worker: `("wants", hops, mel)`, `("enable", source, on)`, `("threshold", source,
  label, value, hysteresis)`, `("rules", source, rules, min_level_dbfs)`, `("finish", source)`,
  `("add", source_config)`, `("remove", source)`, `("stop",)`.

Lifecycle: a worker process that dies or whose pipe breaks stops the daemon with exit code 1
(systemd restarts it), as a dead worker thread does; at shutdown every worker gets `stop`,
finishes its events, writes its pending clips and exits; joins are bounded, then it is killed.
Worker processes ignore SIGINT (a Ctrl-C reaches the whole process group; the daemon relays the
stop) and treat SIGTERM as a stop (systemd signals every process of the unit).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .analyzer import Hop
from .capture import CaptureError
from .events import START, Event
from .workerproc import child_main

if TYPE_CHECKING:
    from .config import Config, SourceConfig
    from .service import Service

_LOGGER = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""Longest wait for a worker process to load the model and open its sources (s)."""
JOIN_S = 8.0
"""Longest wait for a worker process to exit after `stop` (s), clips included; then it is killed."""


# -- daemon side: what the taps see ---------------------------------------------------------------


class _RemoteRing:
    """The counters of a worker process's capture ring, as last reported."""

    def __init__(self) -> None:
        self.total_written = 0
        self.backlog = 0

    def available(self) -> int:
        return self.backlog


class _RemoteCapture:
    """A capture running in a worker process: its counters as last reported (for metrics and health)."""

    def __init__(self, samplerate: int) -> None:
        self.ring = _RemoteRing()
        self.samplerate = samplerate
        self.lost_samples = 0
        self.overruns = 0
        self.status_flags = 0
        self.nonfinite_samples = 0
        self.error: str | None = None
        self.finished = False

    def update(self, stats: dict[str, Any]) -> None:
        self.ring.total_written, self.ring.backlog = stats["captured"], stats["backlog"]
        self.lost_samples, self.overruns = stats["lost"], stats["overruns"]
        self.status_flags, self.nonfinite_samples = stats["flags"], stats["nonfinite"]
        self.error, self.finished = stats["error"], stats["finished"]

    def stop(self) -> None:
        """The worker process stops its own captures."""


class _RemoteDetector:
    """A detector running in a worker process: thresholds mirrored here, changes forwarded."""

    def __init__(self, child: _Child, source: str, rules: dict[str, Any]) -> None:
        self._child, self._source = child, source
        self.thresholds = {label: rule.threshold for label, rule in rules.items()}
        self.wall_offset = time.time()  # wall clock minus stream time, refreshed by every hop
        self.active: set[str] = set()  # labels with an event in progress, from the relayed events

    def to_wall(self, t: float) -> float:
        return self.wall_offset + t

    @property
    def active_labels(self) -> list[str]:
        """Labels with an event in progress (as `Detector.active_labels`, from the events seen here)."""
        return [label for label in self.thresholds if label in self.active]

    def set_threshold(self, label: str, threshold: float, hysteresis: float) -> None:
        if label not in self.thresholds:
            raise KeyError(label)
        self.thresholds[label] = threshold
        self._child.send(("threshold", self._source, label, threshold, hysteresis))

    def set_rules(self, rules: dict[str, Any]) -> None:
        self.thresholds = {label: rule.threshold for label, rule in rules.items()}
        self._child.rules[self._source] = rules
        self._child.send(("rules", self._source, rules, self._child.min_level[self._source]))


class _RemoteAnalyzer:
    """An analyzer running in a worker process."""

    def __init__(self, child: _Child, source: str, rules: dict[str, Any], min_level_dbfs: float) -> None:
        self._child, self._source = child, source
        self.detector = _RemoteDetector(child, source, rules)
        self.seconds_in = 0.0
        child.rules[source], child.min_level[source] = rules, min_level_dbfs

    @property
    def min_level_dbfs(self) -> float:
        return self._child.min_level[self._source]

    @min_level_dbfs.setter
    def min_level_dbfs(self, value: float) -> None:
        self._child.min_level[self._source] = value
        self._child.send(("rules", self._source, self._child.rules[self._source], value))

    def finish(self) -> list[Event]:
        """End events in progress; they come back from the worker process like any other."""
        self._child.send(("finish", self._source))
        return []


@dataclass(eq=False)
class RemoteStream:
    """A source running in a worker process, with the attributes of `service.Stream` that taps use."""

    source: SourceConfig
    capture: _RemoteCapture
    analyzer: _RemoteAnalyzer
    child: _Child
    done: bool = False
    events: int = 0
    hops: int = 0
    lag_s: float = 0.0
    compute_s: float | None = None
    _enabled: bool = field(default=True, repr=False)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.child.send(("enable", self.source.name, bool(value)))


class _Child:
    """One worker process seen from the daemon: the process, its pipe, and its reader thread."""

    def __init__(self, index: int, process: Any, conn: Any) -> None:
        self.index, self.process, self.conn = index, process, conn
        self.lock = threading.Lock()  # sends come from the supervisor, control and reload threads
        self.heartbeat = time.monotonic()
        self.exited = False
        self.failed = False
        self.rules: dict[str, Any] = {}
        self.min_level: dict[str, float] = {}
        self.reader: threading.Thread | None = None

    def send(self, msg: tuple) -> None:
        with self.lock:
            try:
                self.conn.send(msg)
            except (OSError, ValueError, BrokenPipeError):
                pass  # the reader thread notices the dead process and stops the daemon


def process_count(config: Config, cores: int | None = None) -> int:
    """How many worker processes `config` asks for (1 = everything in the daemon's own process)."""
    import os

    n = len(config.active_sources)
    w = config.worker
    if any(s.kind == "stdin" for s in config.active_sources):
        return 1  # the daemon's standard input cannot be read from another process
    if w.processes:
        return max(1, min(w.processes, n))
    if not cores:
        try:
            cores = len(os.sched_getaffinity(0))  # the cores this process may use (cgroups, taskset)
        except (AttributeError, OSError):  # not on Linux, or a seccomp filter refuses it
            cores = os.cpu_count() or 1
    return max(1, min(cores, -(-n // w.streams_per_process)))


class WorkerPool:
    """The daemon side of the worker processes; stands in for `service.Worker` in the Service."""

    def __init__(self, service: Service, groups: list[list[SourceConfig]], model_path: Path) -> None:
        self.service = service
        self.groups = groups
        self.model_path = Path(model_path)
        self.children: list[_Child] = []
        self.streams: list[RemoteStream] = []
        self.failed = False
        self.generation = 0
        self._by_name: dict[str, RemoteStream] = {}
        self._deliver = threading.Lock()  # taps run one hop at a time, as in a worker thread
        self._stopping = False
        self._wants: tuple[bool, bool] | None = None

    # -- what Service uses ------------------------------------------------------------------

    @property
    def heartbeat(self) -> float:
        """The oldest of the worker processes' latest heartbeats (time.monotonic())."""
        return min((c.heartbeat for c in self.children if not c.exited), default=time.monotonic())

    def is_alive(self) -> bool:
        return not self.failed and any(not c.exited for c in self.children) and not all(s.done for s in self.streams)

    def call_soon(self, fn: Any) -> None:
        """Run a run-time change now: it acts on proxies, which forward it to the worker processes."""
        with self._deliver:
            fn()

    def publish_all(self, stream: Any, events: list[Event]) -> None:
        for event in events:
            self._publish(stream, event)

    def replace_streams(self, streams: list[Any]) -> None:  # pragma: no cover - reload uses reload_sources
        raise NotImplementedError

    def start(self) -> None:
        """Start every worker process and wait until each listens; raises CaptureError if one cannot."""
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads and sockets
        config = self.service.config
        specs = [(type(t), t.worker_spec()) for t in self.service.taps if getattr(t, "in_worker", False)]
        level = logging.getLogger().getEffectiveLevel()
        for i, group in enumerate(self.groups):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=child_main, name=f"earshot-worker-{i}", daemon=True,
                               args=(theirs, i, config, [s.name for s in group], str(self.model_path), specs, level))
            proc.start()
            theirs.close()
            self.children.append(_Child(i, proc, ours))
        from .detect import make_rules

        loaded = self.service.loaded
        try:
            for child, group in zip(self.children, self.groups):
                rates = self._await_ready(child)
                for source in group:
                    rules = make_rules(loaded.labels, loaded.thresholds, config.detect)
                    analyzer = _RemoteAnalyzer(child, source.name, rules, config.detect.min_level_dbfs)
                    self.streams.append(RemoteStream(source, _RemoteCapture(rates[source.name]), analyzer, child))
        except BaseException:
            self.stop(1.0)
            raise
        self._by_name = {s.source.name: s for s in self.streams}
        self._update_wants()
        for child in self.children:
            child.reader = threading.Thread(target=self._read_loop, args=(child,), name=f"earshot-relay-{child.index}",
                                            daemon=True)
            child.reader.start()
        _LOGGER.info("%d worker processes: %s", len(self.children),
                     "; ".join(", ".join(s.name for s in g) for g in self.groups))

    def _await_ready(self, child: _Child) -> dict[str, int]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if child.conn.poll(0.2):
                try:
                    msg = child.conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "ready":
                    child.heartbeat = time.monotonic()
                    return msg[1]
                if msg[0] == "failed":
                    raise CaptureError(msg[1])
            elif not child.process.is_alive() or self.service.stop.is_set():
                break
        if self.service.stop.is_set():
            raise CaptureError("stopped while the worker processes were starting")
        raise CaptureError(f"worker process {child.index} did not start (exit code {child.process.exitcode})")

    def _update_wants(self) -> None:
        """Tell the worker processes whether any tap here wants hops and spectrogram columns."""
        taps = [t for t in self.service.taps if not getattr(t, "in_worker", False)]
        hop_taps = [t for t in taps if getattr(t, "wants_hops", True)]
        wants = (bool(hop_taps), any(getattr(t, "wants_mel", True) for t in hop_taps))
        if wants != self._wants:
            self._wants = wants
            for child in self.children:
                child.send(("wants", *wants))
        self._hop_taps = hop_taps
        self._event_taps = taps

    # -- relay (one thread per worker process) -----------------------------------------------

    def _read_loop(self, child: _Child) -> None:
        while True:
            try:
                msg = child.conn.recv()
            except (EOFError, OSError):
                break
            child.heartbeat = time.monotonic()
            if msg[0] == "batch":
                with self._deliver:
                    try:
                        self._batch(*msg[1:])
                    except Exception:  # noqa: BLE001 - a tap bug must not cut off a worker process
                        _LOGGER.exception("delivering a batch from worker process %d failed", child.index)
            elif msg[0] == "exit":
                child.exited = True
                ended = all(s.done for s in self.streams if s.child is child)  # finite sources all over
                child.failed = bool(msg[1]) or not (self._stopping or ended)
                if child.failed:  # its worker thread died (it logged why), or it was stopped alone
                    if not msg[1]:
                        _LOGGER.error("worker process %d stopped on its own; stopping earshot", child.index)
                    self.failed = True
                    self.service.stop.set()
                return
        child.exited = True
        if not self._stopping:
            child.process.join(1.0)
            _LOGGER.error("worker process %d died (exit code %s); stopping earshot", child.index,
                          child.process.exitcode)
            self.failed = True
            self.service.stop.set()

    def _batch(self, events: list[Event], hops: dict[str, Any] | None, stats: dict[str, dict] | None) -> None:
        if stats:
            for name, st in stats.items():
                stream = self._by_name.get(name)
                if stream is not None:
                    stream.capture.update(st)
                    stream.analyzer.seconds_in = st["seconds_in"]
                    stream.done = st["done"]
        self._update_wants()  # subscribers come and go
        if hops:
            mel = hops.get("mel")
            no_mel = np.zeros(0, dtype=np.float32)
            for k, name in enumerate(hops["source"]):
                stream = self._by_name.get(name)
                if stream is None:
                    continue
                t_end = float(hops["t_end"][k])
                stream.hops += 1
                stream.lag_s = float(hops["lag"][k])
                stream.compute_s = float(hops["compute"][k])
                stream.analyzer.detector.wall_offset = float(hops["wall"][k]) - t_end
                hop = Hop(t_end, hops["scores"][k], float(hops["level"][k]), mel[k] if mel is not None else no_mel)
                for tap in self._hop_taps:
                    tap.on_hop(name, hop)
        for event in events:
            self._publish(self._by_name.get(event.source), event)

    def _publish(self, stream: Any, event: Event) -> None:
        for tap in self._event_taps:
            event = tap.on_event(event)
        if stream is not None:
            stream.events += 1
            active = stream.analyzer.detector.active
            if event.type == START:
                active.add(event.label)
            else:
                active.discard(event.label)
        _LOGGER.info("%s %s on %s (score %.2f)", event.type, event.label, event.source, event.score)
        self.service.publisher.publish(event)

    # -- reload -------------------------------------------------------------------------------

    def reload_sources(self, added: list[SourceConfig], gone: list[str], rules: dict[str, Any],
                       min_level_dbfs: float) -> None:
        """Stop the sources `gone`, start `added` on the least busy worker processes (config reload)."""
        for name in gone:
            stream = self._by_name.get(name)
            if stream is not None:
                stream.child.send(("remove", name))
                stream.done = True
        keep = [s for s in self.streams if s.source.name not in gone]
        for source in added:
            load = {c.index: 0 for c in self.children if not c.exited}
            for s in keep:
                if s.child.index in load:
                    load[s.child.index] += 1
            child = self.children[min(load, key=load.__getitem__)]
            analyzer = _RemoteAnalyzer(child, source.name, rules, min_level_dbfs)
            keep.append(RemoteStream(source, _RemoteCapture(self.service.loaded.frontend.sample_rate), analyzer, child))
            child.send(("add", source))
        self.streams[:] = keep
        self._by_name = {s.source.name: s for s in self.streams}
        self.generation += 1

    # -- shutdown -----------------------------------------------------------------------------

    def join(self, timeout_s: float = JOIN_S) -> None:
        """`stop`, given at least JOIN_S: worker processes also write their pending clips."""
        self.stop(max(timeout_s, JOIN_S))

    def stop(self, timeout_s: float = JOIN_S) -> None:
        """Stop every worker process: events finished and relayed, clips written; bounded, then killed."""
        self._stopping = True
        for child in self.children:
            child.send(("stop",))
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            if child.reader is not None:
                child.reader.join(max(0.1, deadline - time.monotonic()))
            child.process.join(max(0.1, deadline - time.monotonic()))
            if child.process.is_alive():
                _LOGGER.warning("worker process %d did not stop within %.0f s; killing it", child.index, timeout_s)
                child.process.kill()
                child.process.join(2.0)
            child.exited = True
            child.conn.close()

    def is_stopped(self) -> bool:
        return all(c.exited for c in self.children)
