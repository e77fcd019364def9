"""The running daemon: one capture per source, one detection worker, shared publishers, one stop event.

Lifecycle rules (so systemd can do its job):
- SIGTERM/SIGINT set the stop event; the worker finishes its hop, publishers flush, joins are bounded.
- A worker that dies from an unexpected error stops everything and the process exits 1, so
  systemd restarts it instead of leaving a daemon that runs but no longer listens.
- The main thread supervises: it pings the systemd watchdog only while the worker has
  completed a loop recently, so a stalled worker gets the service restarted.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from .analyzer import Hop, StreamAnalyzer, frames_many
from .capture import Capture, CaptureError, make_capture
from .config import Config, ConfigError, SourceConfig
from .detect import make_rules
from .events import Event
from .model import ScoringModel as LoadedModel
from .publish import Fanout
from .sdnotify import Notifier
from .workers import WorkerPool, process_count

_LOGGER = logging.getLogger(__name__)

TICK_S = 0.025
"""How often a disabled or ended source is looked at (s); a live one is read when its next hop is
due (see `Worker._step`)."""
MAX_WAIT_S = 0.1
"""Longest sleep of the worker (s), times `hops_per_pass`: run-time calls (a threshold set over
MQTT, a reload) and a stop are seen within it. Waking every TICK_S whatever was due cost a
single-stream daemon 46 wake-ups a second for 10 hops; each one costs more on a small machine than
its Python does."""
MIN_SLEEP_S = 0.002
"""Shortest sleep of the worker (s), so that a source due "now" cannot make it spin."""
BLOCK_SLACK_S = 0.02
"""The worker sleeps at least this much past the moment the next hop's audio is due (s), and one
capture block (`block_ms`) when that is longer: audio arrives in whole blocks, so waking exactly on
time would mostly find the block that completes the hop not yet written, and wake again."""
MAX_HOPS_PER_READ = 10
"""Most hops read from one source per loop (a loop takes well under a hop, so a source that fell
behind still catches up many times faster than real time)."""
STALL_S = 10.0
"""A worker that has not looped for this long has stalled (s): the watchdog is no longer fed."""
JOIN_S = 5.0
"""Longest wait for one thread at shutdown (s)."""
STATS_EVERY_S = 300.0
"""Interval of the periodic health line in the log (s)."""


def handle_signals(stop: threading.Event, reload_requested: threading.Event | None = None) -> None:
    """SIGTERM/SIGINT set `stop`, SIGHUP sets `reload_requested` (main thread only).

    Installed before anything slow starts, so a SIGTERM during start-up is a clean stop too; pass the
    same events to the Service.
    """
    def handle(signum: int, _frame: object) -> None:
        _LOGGER.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    if reload_requested is not None:
        signal.signal(signal.SIGHUP, lambda _s, _f: reload_requested.set())


class Tap(Protocol):
    """Something that watches the streams from the worker thread (clips, metrics, score feeds).

    Called in the worker thread: it must be quick and must not raise (log and count instead).

    Optional attributes (read every loop, so they may be properties that change at run time) say
    what a tap needs, so that nothing is computed per hop that nobody reads; a tap without them
    gets everything:

    - `wants_audio` (default True): call `on_audio` with every block read;
    - `wants_hops` (default True): call `on_hop` for every scored window;
    - `wants_mel` (default True): `Hop.mel` must hold the spectrogram column (else it is empty).
    """

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """New audio of `source` (float32 mono at the model rate)."""

    def on_hop(self, source: str, hop: Hop) -> None:
        """One scored window of `source`."""

    def on_event(self, event: Event) -> Event:
        """An event about to be published; may return a copy with more fields (e.g. a clip)."""


@dataclass(eq=False)
class Stream:
    """One source as the worker sees it (compared by identity)."""

    source: SourceConfig
    capture: Capture
    analyzer: StreamAnalyzer
    done: bool = False
    events: int = 0
    enabled: bool = True
    """False while disabled at run time: audio is still drained (no overrun) but not analysed."""
    restarts_seen: int = 0
    """Device reopenings and stream restarts already seen: after one, the running level starts again."""
    hops: int = 0
    """Windows scored."""
    lag_s: float = 0.0
    """Age of the newest audio of the latest hop when it was scored (s): ring backlog + waiting + compute."""
    read_at: float = 0.0
    """time.monotonic() of the latest read from the capture."""
    backlog_s: float = 0.0
    """Audio left in the capture's ring after the latest read (s)."""
    compute_s: float | None = None
    """Compute behind the latest hop: reading, log-mel and the batched forward pass it was scored in (s)."""

    def restarted(self) -> bool:
        """True once after the capture reopened its device or restarted its stream (another room or gain)."""
        n = getattr(self.capture, "reopens", 0) + getattr(self.capture, "restarts", 0)
        if n == self.restarts_seen:
            return False
        self.restarts_seen = n
        return True


def _due(stream: Stream, hops: int = 1) -> tuple[int | None, float]:
    """How much to read from `stream` now: (samples at the source rate or None for all, seconds until due).

    A source is read when its ring holds the audio that completes the stream's next `hops` windows
    (and whole hops beyond them when it is behind): every read then yields whole hops of frames, so
    all streams that are due share one forward pass, and nothing is computed per capture block.
    (0, wait) means not due yet. Disabled streams and ended sources are drained whole; captures
    without a ring (test doubles) are read on every loop and do their own waiting.
    """
    cap = stream.capture
    ring = getattr(cap, "ring", None)
    if ring is None:
        return None, 0.0
    if not stream.enabled or cap.source_done.is_set():
        return None, TICK_S
    a = stream.analyzer
    p = a.params
    chunk, hop, seen = p.chunk_frames, a.hop_frames, a.frames_out
    end_frame = chunk if seen < chunk else seen + hop - (seen - chunk) % hop  # next window end after `seen`
    end_frame += (hops - 1) * hop
    need = max(1, p.samples_for(end_frame) - a.audio.end)  # at the model rate
    rate, target = cap.samplerate, cap.target_rate
    hop_src = a.hop_samples
    if rate != target:
        need = -(-need * rate // target) + cap._resampler.latency_in_samples
        hop_src = max(1, a.hop_samples * rate // target)
    available = ring.available()
    if available < need:
        return 0, (need - available) / rate
    # A source that fell behind catches up at most MAX_HOPS_PER_READ hops per loop: a batch of
    # seconds of frames for many streams would take hundreds of MB in the runtime (which keeps
    # its peak), and the other sources would wait for it.
    return need + min(MAX_HOPS_PER_READ - 1, (available - need) // hop_src) * hop_src, 0.0


class Worker(threading.Thread):
    """The detection thread: reads every source, scores their hops, publishes their events.

    One thread for a set of sources keeps the footprint flat as microphones are added, and
    their hops share one batched forward pass per loop (`multi_stream_scorer`). Per hop it does
    only what a tap asks for (see `Tap`).
    """

    def __init__(self, streams: list[Stream], loaded: LoadedModel, publish: Callable[[Event], None],
                 taps: list[Tap], stop: threading.Event, name: str = "earshot-worker", hops_per_pass: int = 1):
        super().__init__(name=name, daemon=True)
        self.streams, self.publish, self.taps, self.stop = streams, publish, taps, stop
        self.hops_per_pass = hops_per_pass
        """Hops of a source that must be due before it is read (`WorkerConfig.hops_per_pass`)."""
        self.max_wait_s = MAX_WAIT_S * hops_per_pass
        first = streams[0].analyzer
        self.scorer = loaded.multi_stream_scorer(first.params.chunk_frames, first.hop_frames, len(streams))
        self.n_mels = first.params.n_mels
        self.no_frames = np.zeros((0, self.n_mels), dtype=np.float32)
        self.heartbeat = time.monotonic()
        self.failed = False
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.audio_taps: list[Tap] = []
        self.hop_taps: list[Tap] = []
        self.mel_wanted = True
        self.generation = 0
        """Bumped whenever the list of streams changes (Service.stream's cache)."""
        self.on_step: Callable[[], None] | None = None
        """Called after every loop (a worker process sends what the loop produced)."""
        self.log_events = True
        self._step_started = time.perf_counter()
        for stream in streams:
            self._adopt(stream)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the worker thread between two reads (for run-time changes from other threads)."""
        self.calls.put(fn)

    def replace_streams(self, streams: list[Stream]) -> None:
        """Swap in a new list of streams (worker thread only); streams that stay keep their scorer state."""
        self.scorer.rearrange([self.streams.index(s) if s in self.streams else None for s in streams])
        for stream in self.streams:
            if stream not in streams and not stream.done:
                stream.done = True
                self._emit(stream, stream.analyzer.finish())
        for stream in streams:
            self._adopt(stream)
        self.streams[:] = streams
        self.generation += 1

    def _adopt(self, stream: Stream) -> None:
        """Route the stream's hops through this worker (lag, hop counter, the taps that want hops)."""
        name, analyzer = stream.source.name, stream.analyzer
        analyzer.mel_wanted = self.mel_wanted

        def on_hop(hop: Hop) -> None:
            stream.hops += 1
            stream.compute_s = time.perf_counter() - self._step_started
            # The newest sample read arrived at read_at with backlog_s more behind it in the ring;
            # the hop's end is older by the audio read after it.
            stream.lag_s = (time.monotonic() - stream.read_at + stream.backlog_s
                            + max(0.0, analyzer.seconds_in - hop.t_end))
            for tap in self.hop_taps:
                tap.on_hop(name, hop)

        analyzer.on_hop = on_hop

    def _listeners(self) -> None:
        """Which taps want audio, hops and spectrogram columns now (they may change their minds)."""
        self.audio_taps = [t for t in self.taps if getattr(t, "wants_audio", True)]
        self.hop_taps = [t for t in self.taps if getattr(t, "wants_hops", True)]
        mel = any(getattr(t, "wants_mel", True) for t in self.hop_taps)
        if mel != self.mel_wanted:
            self.mel_wanted = mel
            for stream in self.streams:
                stream.analyzer.mel_wanted = mel

    def run(self) -> None:
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - a worker death is fatal, logged with its traceback
            _LOGGER.exception("the detection worker died; stopping earshot")
            self.failed = True
            self.stop.set()

    def _loop(self) -> None:
        while not self.stop.is_set():
            while not self.calls.empty():
                self.calls.get_nowait()()
            if all(s.done for s in self.streams):
                return
            self._listeners()
            wait = self._step()
            self.heartbeat = time.monotonic()
            if self.on_step is not None:
                self.on_step()
            if wait > 0:
                # A plain sleep: an Event wait with a timeout allocates a lock each time, and this
                # runs ten or more times a second; a stop is still seen within max_wait_s + a pass.
                time.sleep(wait)
        for stream in self.streams:
            if not stream.done:
                self._emit(stream, stream.analyzer.finish())

    def _step(self) -> float:
        """Read every source that is due and score all their new frames in one batched pass.

        Returns how long to sleep before the next look (s).
        """
        self._step_started = time.perf_counter()
        frames = [self.no_frames] * len(self.streams)
        fed: list[int] = []
        blocks: list[np.ndarray] = []
        wait = self.max_wait_s
        now = time.monotonic()
        for i, stream in enumerate(self.streams):
            if stream.done:
                continue
            n, due_in = _due(stream, self.hops_per_pass)
            if not n:  # not due, or read whole (no ring, disabled, ended)
                wait = min(wait, due_in)
            if n == 0:
                continue
            cap = stream.capture
            samples = cap.read(0.0) if n is None else cap.read(0.0, n)
            if samples.size:
                stream.read_at = now
                ring = getattr(cap, "ring", None)
                stream.backlog_s = ring.available() / cap.samplerate if ring is not None else 0.0
                if not stream.enabled:
                    continue  # drained so the ring cannot overrun, but not analysed
                for tap in self.audio_taps:
                    tap.on_audio(stream.source.name, samples)
                if stream.restarted():
                    stream.analyzer.features.restart_level()  # no scoring against the old device's level
                blocks.append(samples)
                fed.append(i)
            elif cap.finished:
                stream.done = True
                _LOGGER.info("source %r ended after %.1f s of audio", stream.source.name,
                             stream.analyzer.seconds_in)
                self._emit(stream, stream.analyzer.finish())
        if fed:
            # One log-mel pass for every stream read in this loop, then one forward pass.
            for i, f in zip(fed, frames_many([self.streams[i].analyzer for i in fed], blocks)):
                frames[i] = f
            results = self.scorer.push(frames)
            for i in fed:
                self._emit(self.streams[i], self.streams[i].analyzer.scored(results[i]))
        for i in fed:
            wait = min(wait, _due(self.streams[i], self.hops_per_pass)[1])  # just read: when its next pass is due
        if wait <= 0:
            return 0.0  # a capture without a ring (its read waits), or a source behind: look again at once
        # Audio arrives in whole capture blocks, so a hop is complete once the block holding its
        # end is written, up to one block after it is due: waking earlier finds nothing new.
        # Sources due within that slack of each other share one pass.
        slack = max([BLOCK_SLACK_S] + [s.source.block_s for s in self.streams if not s.done])
        return max(MIN_SLEEP_S, min(self.max_wait_s, wait + slack))

    def publish_all(self, stream: Stream, events: list[Event]) -> None:
        """Pass events through the taps and publish them (worker thread only)."""
        self._emit(stream, events)

    def _emit(self, stream: Stream, events: list[Event]) -> None:
        for event in events:
            for tap in self.taps:
                event = tap.on_event(event)
            stream.events += 1
            if self.log_events:
                _LOGGER.info("%s %s on %s (score %.2f)", event.type, event.label, event.source, event.score)
            self.publish(event)


class Service:
    """Runs the configured sources until stopped or until every finite source has ended."""

    def __init__(self, config: Config, loaded: LoadedModel, publisher: Fanout,
                 notifier: Notifier | None = None, taps: list[Tap] | None = None,
                 reload_config: Callable[[], Config] | None = None, stop: threading.Event | None = None,
                 reload_requested: threading.Event | None = None, model_path: Path | None = None):
        """`model_path`: the file `loaded` came from; worker processes load it again. Without it
        (a model built in memory) every source runs in this process, whatever `[worker]` says."""
        self.config, self.loaded, self.publisher = config, loaded, publisher
        self.model_path = model_path
        self.reload_config = reload_config
        self.reload_requested = reload_requested or threading.Event()
        self.notifier = notifier or Notifier()
        self.taps = list(taps or [])
        self.stop = stop or threading.Event()
        self.streams: list[Stream] = []
        self._by_name: dict[str, Stream] = {}
        self._by_name_generation: tuple[int, int] = (-1, -1)
        self.worker: Worker | WorkerPool | None = None

    def stream(self, name: str) -> Stream | None:
        """The running stream of the source called `name` (looked up anew: a reload may replace it)."""
        # Taps call this per hop: a dict look-up, rebuilt only when the list of streams changed.
        generation = (getattr(self.worker, "generation", 0), len(self.streams))
        if generation != self._by_name_generation:
            self._by_name = {}
            for s in self.streams:
                self._by_name.setdefault(s.source.name, s)
            self._by_name_generation = generation
        return self._by_name.get(name)

    def start(self) -> None:
        """Open every source and start the worker; raises CaptureError if a source cannot open."""
        processes = process_count(self.config) if self.model_path is not None else 1
        if processes > 1:
            self._start_processes(processes)
            return
        sr = self.loaded.frontend.sample_rate
        try:
            for source in self.config.active_sources:
                capture = make_capture(source, sr, self.stop)
                capture.start()
                self.streams.append(Stream(source, capture, self._analyzer(source)))
        except BaseException:
            for stream in self.streams:
                stream.capture.stop()
            raise
        self.worker = Worker(self.streams, self.loaded, self.publisher.publish, self.taps, self.stop,
                             hops_per_pass=self.config.worker.hops_per_pass)
        self.worker.start()
        names = ", ".join(s.source.name for s in self.streams)
        labels = [label for label in self.loaded.labels if label in (self.config.detect.labels or self.loaded.labels)]
        _LOGGER.info("listening on %s for %s", names, ", ".join(labels))
        self.notifier.ready(f"listening on {names}")

    def _start_processes(self, processes: int) -> None:
        """Spread the sources over worker processes (round robin) and wait until all listen."""
        sources = list(self.config.active_sources)
        groups = [sources[i::processes] for i in range(processes)]
        assert self.model_path is not None
        pool = WorkerPool(self, groups, self.model_path)
        self.worker = pool
        pool.start()
        self.streams = pool.streams  # the same list: reloads change it in place
        names = ", ".join(s.source.name for s in self.streams)
        _LOGGER.info("listening on %s for %s", names, ", ".join(self.loaded.labels))
        self.notifier.ready(f"listening on {names}")

    def _analyzer(self, source: SourceConfig, config: Config | None = None) -> StreamAnalyzer:
        """A stream's analyzer; the worker that adopts it routes its hops (`Worker._adopt`)."""
        config = config or self.config
        return StreamAnalyzer(self.loaded, config.frontend, config.detect, source=source.name, node=config.node)

    def supervise(self) -> int:
        """Watch the worker until stop; returns the process exit code."""
        assert self.worker is not None, "start() first"
        ping_s = min(5.0, self.notifier.watchdog_s / 3) if self.notifier.watchdog_s else 1.0
        next_stats = time.monotonic() + STATS_EVERY_S
        while not self.stop.wait(ping_s):
            if not self.worker.is_alive():
                break  # it failed, or every source was finite and has ended
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            now = time.monotonic()
            if now - self.worker.heartbeat > STALL_S:
                _LOGGER.error("the detection worker has stalled for %.0f s; not feeding the watchdog",
                              now - self.worker.heartbeat)
            else:
                self.notifier.watchdog()
            if now >= next_stats:
                next_stats = now + STATS_EVERY_S
                self.log_health()
        return self.shutdown()

    def reload(self) -> None:
        """Apply a changed configuration file without stopping unchanged sources (SIGHUP).

        Detection settings apply to every stream at its next hop; added sources start, removed or
        changed ones stop (only they lose audio); changes to the model or publishers need a restart.
        An invalid file is reported and ignored.
        """
        assert self.reload_config is not None and self.worker is not None
        self.notifier.notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
        try:
            new = self.reload_config()
        except ConfigError as e:
            _LOGGER.error("reload ignored: %s", e)
            self.notifier.ready("reload ignored: invalid configuration")
            return
        for section in ("model", "frontend", "mqtt", "zmq", "stdout", "node", "metrics", "web", "worker"):
            if getattr(new, section) != getattr(self.config, section):
                _LOGGER.warning("reload: [%s] changed; restart earshot to apply it", section)
        old_sources = {s.name: s for s in self.config.active_sources}
        new_sources = {s.name: s for s in new.active_sources}
        keep = {n for n in old_sources if new_sources.get(n) == old_sources[n]}
        rules = make_rules(self.loaded.labels, self.loaded.thresholds, new.detect)
        if isinstance(self.worker, WorkerPool):
            self._reload_processes(new, keep, rules)
            return
        added: list[Stream] = []
        for name, source in new_sources.items():
            if name in keep:
                continue
            try:
                capture = make_capture(source, self.loaded.frontend.sample_rate, self.stop)
                capture.start()
            except CaptureError as e:
                _LOGGER.error("reload: source %r not started: %s", name, e)
                continue
            added.append(Stream(source, capture, self._analyzer(source, new)))
        gone = [s for s in self.streams if s.source.name not in keep]

        def apply() -> None:  # in the worker thread, between two reads
            self.worker.replace_streams([s for s in self.streams if s not in gone] + added)
            for stream in self.streams:
                stream.analyzer.detector.set_rules(rules)
                stream.analyzer.min_level_dbfs = new.detect.min_level_dbfs
            for tap in self.taps:  # run-time settings (MQTT thresholds) go back on top of the file's
                on_reload = getattr(tap, "on_reload", None)
                if on_reload is not None:
                    on_reload(new)

        self.worker.call_soon(apply)
        for stream in gone:
            stream.capture.stop()
        self.config = replace(new, model=self.config.model, frontend=self.config.frontend, mqtt=self.config.mqtt,
                              zmq=self.config.zmq, stdout=self.config.stdout, node=self.config.node,
                              metrics=self.config.metrics, web=self.config.web, worker=self.config.worker)
        _LOGGER.info("configuration reloaded: %d source(s) kept, %d started, %d stopped",
                     len(keep), len(added), len(gone))
        self.notifier.ready(f"listening on {', '.join(s.name for s in self.config.active_sources)}")

    def _reload_processes(self, new: Config, keep: set[str], rules: dict) -> None:
        """`reload` with worker processes: the proxies forward the changes to them."""
        assert isinstance(self.worker, WorkerPool)
        added = [s for s in new.active_sources if s.name not in keep]
        gone = [s.source.name for s in self.streams if s.source.name not in keep]
        self.worker.reload_sources(added, gone, rules, new.detect.min_level_dbfs)
        for stream in self.streams:
            if stream.source.name in keep:
                stream.analyzer.detector.set_rules(rules)
                stream.analyzer.min_level_dbfs = new.detect.min_level_dbfs

        def apply() -> None:  # serialised with the hops and events relayed from the worker processes
            for tap in self.taps:  # run-time settings (MQTT thresholds) go back on top of the file's
                on_reload = getattr(tap, "on_reload", None)
                if on_reload is not None:
                    on_reload(new)

        self.worker.call_soon(apply)
        self.config = replace(new, model=self.config.model, frontend=self.config.frontend, mqtt=self.config.mqtt,
                              zmq=self.config.zmq, stdout=self.config.stdout, node=self.config.node,
                              metrics=self.config.metrics, web=self.config.web, worker=self.config.worker)
        _LOGGER.info("configuration reloaded: %d source(s) kept, %d started, %d stopped",
                     len(keep), len(added), len(gone))
        self.notifier.ready(f"listening on {', '.join(s.name for s in self.config.active_sources)}")

    def shutdown(self) -> int:
        """Stop the worker and captures (bounded), flush publishers; returns the exit code."""
        self.notifier.stopping()
        self.stop.set()
        if self.worker is not None:
            self.worker.join(JOIN_S)
            if self.worker.is_alive():
                _LOGGER.warning("the detection worker did not stop within %.0f s", JOIN_S)
        for stream in self.streams:
            stream.capture.stop()
        self.publisher.close(timeout_s=3.0)
        self.log_health()
        return 1 if self.worker is not None and self.worker.failed else 0

    def log_health(self) -> None:
        """One log line per source with its counters, and one per publisher."""
        for s in self.streams:
            c = s.capture
            _LOGGER.info(
                "source %s: %.0f s audio, %d events, %d samples lost, %d status flags, %d non-finite samples",
                s.source.name, s.analyzer.seconds_in, s.events, c.lost_samples, c.status_flags, c.nonfinite_samples,
            )
        for name, stats in self.publisher.stats().items():
            _LOGGER.info("publisher %s: %s", name, ", ".join(f"{k}={v}" for k, v in stats.items()))
