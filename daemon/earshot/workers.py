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
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .analyzer import Hop
from .capture import CaptureError
from .events import Event

if TYPE_CHECKING:
    from .config import Config, SourceConfig
    from .service import Service

_LOGGER = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0
"""Longest wait for a worker process to load the model and open its sources (s)."""
STATS_EVERY_S = 0.5
"""Interval of the capture counters sent by each worker process (s); also its heartbeat."""
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

    def to_wall(self, t: float) -> float:
        return self.wall_offset + t

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
    if w.processes:
        return max(1, min(w.processes, n))
    cores = cores or len(os.sched_getaffinity(0))
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
            proc = ctx.Process(target=_child_main, name=f"earshot-worker-{i}", daemon=True,
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


# -- worker process side ---------------------------------------------------------------------------


class _Relay:
    """The tap (and publish function) of a worker process: gathers a loop's events and hops, sends them."""

    wants_audio = False

    def __init__(self, conn: Any, streams: list[Any]) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.streams = streams
        self.wants_hops = True
        self.wants_mel = False
        self._events: list[Event] = []
        self._hops: list[tuple] = []
        self._next_stats = 0.0
        self._by_name: dict[str, Any] = {}

    def publish(self, event: Event) -> None:
        self._events.append(event)

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Not called (wants_audio is False)."""

    def on_hop(self, source: str, hop: Hop) -> None:
        stream = self._by_name.get(source)
        if stream is None or stream.source.name != source:
            self._by_name = {s.source.name: s for s in self.streams}
            stream = self._by_name.get(source)
        lag = stream.lag_s if stream is not None else 0.0
        wall = stream.analyzer.detector.to_wall(hop.t_end) if stream is not None else time.time()
        compute = stream.compute_s if stream is not None and stream.compute_s is not None else 0.0
        self._hops.append((source, hop.t_end, hop.scores, hop.level_dbfs, lag, wall, compute, hop.mel))

    def on_event(self, event: Event) -> Event:
        return event

    def flush(self, force_stats: bool = False) -> None:
        """Send what this loop produced (worker thread), with the counters every STATS_EVERY_S."""
        now = time.monotonic()
        stats = None
        if force_stats or now >= self._next_stats:
            self._next_stats = now + STATS_EVERY_S
            stats = {s.source.name: _stats(s) for s in list(self.streams)}
        if not (self._events or self._hops or stats):
            return
        hops = None
        if self._hops:
            cols = list(zip(*self._hops))
            hops = {"source": list(cols[0]), "t_end": np.array(cols[1]), "scores": np.stack(cols[2]),
                    "level": np.array(cols[3]), "lag": np.array(cols[4]), "wall": np.array(cols[5]),
                    "compute": np.array(cols[6])}
            if self.wants_mel:
                mels = cols[7]
                if all(len(m) == len(mels[0]) and len(m) for m in mels):
                    hops["mel"] = np.stack(mels)
        msg = ("batch", self._events, hops, stats)
        self._events, self._hops = [], []
        with self.lock:
            self.conn.send(msg)


def _stats(s: Any) -> dict[str, Any]:
    c = s.capture
    ring = c.ring
    return {"captured": ring.total_written, "backlog": ring.available(), "lost": c.lost_samples,
            "overruns": c.overruns, "flags": c.status_flags, "nonfinite": c.nonfinite_samples, "error": c.error,
            "finished": bool(c.finished), "seconds_in": s.analyzer.seconds_in, "done": s.done}


def _child_main(conn: Any, index: int, config: Config, names: list[str], model_path: str,
                tap_specs: list[tuple[type, tuple]], log_level: int) -> None:
    """Entry point of a worker process."""
    fmt = f"%(levelname)s %(name)s[worker {index}]: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=log_level, format=fmt, stream=sys.stderr, force=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon relays a Ctrl-C as "stop"
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come through the daemon
    try:
        code = _child_run(conn, index, config, names, model_path, tap_specs, stop)
    except Exception as exc:  # noqa: BLE001 - reported to the daemon, which stops with exit code 1
        _LOGGER.exception("worker process %d failed", index)
        try:
            conn.send(("failed", f"worker process {index}: {exc}"))
        except OSError:
            pass
        code = 1
    sys.exit(code)


def _child_run(conn: Any, index: int, config: Config, names: list[str], model_path: str,
               tap_specs: list[tuple[type, tuple]], stop: threading.Event) -> int:
    from .analyzer import StreamAnalyzer
    from .backend import load_model
    from .capture import make_capture
    from .service import JOIN_S as THREAD_JOIN_S
    from .service import Stream, Worker

    loaded = load_model(Path(model_path), threads=config.model.threads)
    sr = loaded.frontend.sample_rate

    def open_stream(source: SourceConfig) -> Stream:
        capture = make_capture(source, sr, stop)
        capture.start()
        analyzer = StreamAnalyzer(loaded, config.frontend, config.detect, source=source.name, node=config.node)
        return Stream(source, capture, analyzer)

    streams: list[Stream] = []
    try:
        for source in config.active_sources:
            if source.name in names:
                streams.append(open_stream(source))
    except CaptureError as e:
        for s in streams:
            s.capture.stop()
        conn.send(("failed", str(e)))
        return 1
    taps: list[Any] = [cls(*spec) for cls, spec in tap_specs]
    relay = _Relay(conn, streams)
    worker = Worker(streams, loaded, relay.publish, [*taps, relay], stop, name=f"earshot-worker-{index}")
    worker.on_step = relay.flush
    worker.log_events = False  # the daemon logs them as it publishes them
    conn.send(("ready", {s.source.name: s.capture.samplerate for s in streams}))
    worker.start()

    def by_name(name: str) -> Stream | None:
        return next((s for s in worker.streams if s.source.name == name), None)

    def handle(msg: tuple) -> None:  # in the worker thread (call_soon)
        kind = msg[0]
        if kind == "wants":
            relay.wants_hops, relay.wants_mel = msg[1], msg[2]
            return
        if kind == "add":
            try:
                stream = open_stream(msg[1])
            except CaptureError as e:
                _LOGGER.error("reload: source %r not started: %s", msg[1].name, e)
                return
            worker.replace_streams([*worker.streams, stream])
            return
        stream = by_name(msg[1])
        if stream is None:
            return
        if kind == "enable":
            if stream.enabled and not msg[2]:
                worker.publish_all(stream, stream.analyzer.finish())
            stream.enabled = msg[2]
        elif kind == "threshold":
            stream.analyzer.detector.set_threshold(msg[2], msg[3], msg[4])
        elif kind == "rules":
            stream.analyzer.detector.set_rules(msg[2])
            stream.analyzer.min_level_dbfs = msg[3]
        elif kind == "finish":
            worker.publish_all(stream, stream.analyzer.finish())
        elif kind == "remove":
            worker.replace_streams([s for s in worker.streams if s is not stream])
            stream.capture.stop()

    while not stop.is_set() and worker.is_alive():
        try:
            if not conn.poll(0.25):
                continue  # the heartbeat comes from the worker thread (relay.flush): a stall shows
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the daemon is gone
        if msg[0] == "stop":
            break
        worker.call_soon(lambda m=msg: handle(m))
    stop.set()
    worker.join(THREAD_JOIN_S)
    for s in streams:
        s.capture.stop()
    for t in taps:
        close = getattr(t, "close", None)
        if close is not None:
            close(3.0)  # within the daemon's JOIN_S for this process
    relay.flush(force_stats=True)  # the events that finishing produced
    conn.send(("exit", worker.failed))
    return 1 if worker.failed else 0
