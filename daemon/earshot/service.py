"""The running daemon: one capture + worker per source, shared publishers, one stop event.

Lifecycle rules (so systemd can do its job):
- SIGTERM/SIGINT set the stop event; workers finish their hop, publishers flush, joins are bounded.
- A worker that dies from an unexpected error stops everything and the process exits 1, so
  systemd restarts it instead of leaving a daemon that runs but no longer listens.
- The main thread supervises: it pings the systemd watchdog only while every worker has
  completed a loop recently, so a stalled worker gets the service restarted.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from .analyzer import Hop, StreamAnalyzer
from .capture import Capture, make_capture
from .config import Config, SourceConfig
from .model import LoadedModel
from .publish import Fanout
from .sdnotify import Notifier

_LOGGER = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.5
"""How long a worker waits for audio before looping (s); bounds its reaction to stop."""
STALL_S = 10.0
"""A worker that has not looped for this long is stalled (s): the watchdog is no longer fed."""
JOIN_S = 5.0
"""Longest wait for one thread at shutdown (s)."""
STATS_EVERY_S = 300.0
"""Interval of the periodic health line in the log (s)."""


class SourceWorker(threading.Thread):
    """Reads one source's audio, runs detection per hop and publishes the events."""

    def __init__(self, source: SourceConfig, capture: Capture, analyzer: StreamAnalyzer, publish: Callable,
                 stop: threading.Event):
        super().__init__(name=f"worker-{source.name}", daemon=True)
        self.source, self.capture, self.analyzer = source, capture, analyzer
        self.publish, self.stop = publish, stop
        self.heartbeat = time.monotonic()
        self.failed = False
        self.events = 0
        self.hops = 0

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - any worker death is fatal, logged with its traceback
            _LOGGER.exception("worker for source %r died; stopping earshot", self.source.name)
            self.failed = True
            self.stop.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            samples = self.capture.read(READ_TIMEOUT_S)
            self.heartbeat = time.monotonic()
            if samples.size:
                self._emit(self.analyzer.push(samples))
            elif self.capture.finished:
                _LOGGER.info("source %r finished after %.1f s of audio", self.source.name, self.analyzer.seconds_in)
                break
        self._emit(self.analyzer.finish())

    def _emit(self, events: list) -> None:
        for event in events:
            self.events += 1
            _LOGGER.info("%s %s on %s (score %.2f)", event.type, event.label, event.source, event.score)
            self.publish(event)


class Service:
    """Runs the configured sources until stopped or until every finite source has ended."""

    def __init__(self, config: Config, loaded: LoadedModel, publisher: Fanout,
                 notifier: Notifier | None = None, on_hop: Callable[[str, Hop], None] | None = None):
        self.config, self.loaded, self.publisher = config, loaded, publisher
        self.notifier = notifier or Notifier()
        self.on_hop = on_hop
        self.stop = threading.Event()
        self.workers: list[SourceWorker] = []

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the service cleanly (main thread only)."""
        def handle(signum: int, _frame: object) -> None:
            _LOGGER.info("received %s, stopping", signal.Signals(signum).name)
            self.stop.set()
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def start(self) -> None:
        """Open every source and start its worker; raises CaptureError if a source cannot open."""
        sr = self.loaded.frontend.sample_rate
        opened: list[Capture] = []
        try:
            for source in self.config.active_sources:
                capture = make_capture(source, sr, self.stop)
                capture.start()
                opened.append(capture)
                self.workers.append(SourceWorker(source, capture, self._analyzer(source, capture),
                                                 self.publisher.publish, self.stop))
        except BaseException:
            for capture in opened:
                capture.stop()
            raise
        for worker in self.workers:
            worker.start()
        names = ", ".join(w.source.name for w in self.workers)
        _LOGGER.info("listening on %s for %s", names, ", ".join(self.loaded.labels))
        self.notifier.ready(f"listening on {names}")

    def _analyzer(self, source: SourceConfig, capture: Capture) -> StreamAnalyzer:
        holder: list[StreamAnalyzer] = []
        on_hop = None if self.on_hop is None else (lambda hop: self.on_hop(source.name, hop))
        # Live audio: the newest sample is "now", so a stream time maps to now minus the audio since.
        analyzer = StreamAnalyzer(
            self.loaded, self.config.frontend, self.config.detect, source=source.name, node=self.config.node,
            to_wall=lambda t: time.time() - (holder[0].seconds_in - t), on_hop=on_hop,
        )
        holder.append(analyzer)
        return analyzer

    def supervise(self) -> int:
        """Watch the workers until stop; returns the process exit code."""
        ping_s = min(5.0, self.notifier.watchdog_s / 3) if self.notifier.watchdog_s else 1.0
        next_stats = time.monotonic() + STATS_EVERY_S
        while not self.stop.wait(ping_s):
            if any(w.failed for w in self.workers):
                break
            if all(not w.is_alive() for w in self.workers):
                break  # every source was finite and has ended
            now = time.monotonic()
            stalled = [w.source.name for w in self.workers if w.is_alive() and now - w.heartbeat > STALL_S]
            if stalled:
                _LOGGER.error("worker for %s has stalled; not feeding the watchdog", ", ".join(stalled))
            else:
                self.notifier.watchdog()
            if now >= next_stats:
                next_stats = now + STATS_EVERY_S
                self.log_health()
        return self.shutdown()

    def shutdown(self) -> int:
        """Stop workers and captures (bounded), flush publishers; returns the exit code."""
        self.notifier.stopping()
        self.stop.set()
        for worker in self.workers:
            worker.join(JOIN_S)
            if worker.is_alive():
                _LOGGER.warning("worker for %r did not stop within %.0f s", worker.source.name, JOIN_S)
        for worker in self.workers:
            worker.capture.stop()
        self.publisher.close(timeout_s=3.0)
        self.log_health()
        failed = [w.source.name for w in self.workers if w.failed]
        return 1 if failed else 0

    def log_health(self) -> None:
        """One log line per source with its counters, and one for the publishers."""
        for w in self.workers:
            c = w.capture
            _LOGGER.info(
                "source %s: %.0f s audio, %d events, %d samples lost, %d status flags, %d non-finite samples",
                w.source.name, w.analyzer.seconds_in, w.events, c.lost_samples, c.status_flags, c.nonfinite_samples,
            )
        for name, stats in self.publisher.stats().items():
            _LOGGER.info("publisher %s: %s", name, ", ".join(f"{k}={v}" for k, v in stats.items()))
