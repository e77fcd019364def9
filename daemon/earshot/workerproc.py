"""The worker process side of `earshot.workers`: runs a share of the sources, reports to the daemon.

A worker process (spawned by `workers.WorkerPool`) opens its sources, loads the model, runs one
`service.Worker` thread over them with the taps that need the audio (the clip recorder) and a
`_Relay` tap that sends each loop's events and hops to the daemon in one pickled message, and
reads the daemon's commands in its main thread. See `earshot.workers` for the messages.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .analyzer import Hop
from .capture import CaptureError
from .events import Event

if TYPE_CHECKING:
    from .config import Config, SourceConfig

_LOGGER = logging.getLogger(__name__)

STATS_EVERY_S = 0.5
"""Interval of the capture counters sent by each worker process (s); also its heartbeat."""


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


def child_main(conn: Any, index: int, config: Config, names: list[str], model_path: str,
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
    from .model import load_model
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
    worker = Worker(streams, loaded, relay.publish, [*taps, relay], stop, name=f"earshot-worker-{index}",
                    hops_per_pass=config.worker.hops_per_pass)
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
