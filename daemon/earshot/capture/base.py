"""Capture stage core: the `Capture` base class every source builds on, its errors and shared helpers.

A `Capture`'s producer writes float32 mono samples at the source's own rate into a
`SampleRing`; `Capture.read` (worker thread) drains it, replaces non-finite samples and
resamples to the model rate. Also here: real-time pacing (`_Pacer`) and the s16le
decoder shared by the byte-stream sources.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..resample import StreamingResampler
from ..ring import SampleRing

if TYPE_CHECKING:  # only for annotations: capture works with any object with these attributes
    from ..config import SourceConfig

_LOGGER = logging.getLogger(__name__)

RING_S = 10.0
"""Seconds of audio (at the source rate) the ring holds before the worker loses samples."""
JOIN_TIMEOUT_S = 3.0
"""Longest `stop()` waits for each producer thread."""
BACKOFF_MIN_S = 1.0
"""First retry delay after a live source failed (s); doubles on every failure."""
BACKOFF_MAX_S = 30.0
"""Longest retry delay (s)."""
REPORT_EVERY_S = 10.0
"""Least time between two warnings about status flags or lost samples of one source (s)."""


class CaptureError(Exception):
    """A source cannot start because of something the user must fix; `str()` is one line saying what."""


class _Flag(threading.Event):
    """A `threading.Event` that is also truthy when set, so `if cap.finished:` reads naturally."""

    def __bool__(self) -> bool:
        return self.is_set()


class Capture:
    """One audio source: a producer filling `ring`, and `read()` for the worker thread.

    Lifecycle: `start()` (raises `CaptureError` on user errors), then the worker calls
    `read(timeout_s)` in a loop until `finished` (finite sources) or the daemon stops,
    then `stop()` (bounded joins). `stop` may also be requested through the shared
    `stop` event passed at construction.
    """

    def __init__(self, cfg: SourceConfig, target_rate: int, stop: threading.Event) -> None:
        """Prepare (but do not start) a source described by `cfg`, delivering `target_rate` Hz."""
        self.cfg = cfg
        """The source's configuration."""
        self.target_rate = int(target_rate)
        """Rate of the samples returned by `read` (Hz)."""
        self.samplerate: int = self.target_rate
        """Rate of the samples in `ring` (Hz); known after `start()`."""
        self.ring = SampleRing(max(1, int(RING_S * self.target_rate)))
        """Producer -> worker buffer (replaced in `start()` once the source rate is known)."""
        self.finished = _Flag()
        """Set (and truthy) once a finite source has ended and `read` has returned all of it."""
        self.source_done = threading.Event()
        """Set by the producer when a finite source has no more samples (some may still be in the ring)."""
        self.error: str | None = None
        """Why the source failed for good, or None."""
        self.status_flags = 0
        """Blocks the driver flagged (input overflow and the like); written by the producer only."""
        self.nonfinite_samples = 0
        """NaN/inf samples replaced by 0 in `read`."""
        self._stop = stop
        self._halt = threading.Event()  # this source only: set by stop()
        self._threads: list[threading.Thread] = []
        self._resampler = StreamingResampler(self.target_rate, self.target_rate)
        self._reported_flags = 0
        self._reported_lost = 0
        self._last_report = 0.0

    @property
    def name(self) -> str:
        """The source's configured name (used in events and logs)."""
        return str(self.cfg.name)

    @property
    def lost_samples(self) -> int:
        """Samples the producer overwrote before the worker read them (at the source rate)."""
        return self.ring.lost_samples

    @property
    def overruns(self) -> int:
        """Times the worker found the producer had lapped it."""
        return self.ring.overruns

    def _stopping(self) -> bool:
        """Whether this source or the whole daemon was asked to stop."""
        return self._halt.is_set() or self._stop.is_set()

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; return True when stopping."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # Short slices so that a stop is noticed within 0.1 s; a plain sleep rather than an
            # Event wait because paced sources sleep 50 times a second each, and an Event wait
            # with a timeout allocates a lock every time.
            time.sleep(min(0.1, left))
        return self._stopping()

    def _setup_rate(self, rate: int) -> None:
        """Size the ring and the resampler for a source delivering `rate` Hz."""
        self.samplerate = int(rate)
        self.ring = SampleRing(max(1, int(RING_S * self.samplerate)))
        self._resampler = StreamingResampler(self.samplerate, self.target_rate)

    def _spawn(self, target: Callable[[], None], what: str) -> None:
        """Start a daemon producer thread that marks the source failed if it crashes."""

        def run() -> None:
            try:
                target()
            except Exception as exc:  # a producer bug must not pass silently: record it for the worker
                _LOGGER.exception("source %s: %s thread crashed", self.name, what)
                self.error = f"{what} thread crashed: {exc}"
                self.source_done.set()
                self.ring.notify()

        t = threading.Thread(target=run, name=f"earshot-{self.name}-{what}", daemon=True)
        self._threads.append(t)
        t.start()

    def start(self) -> None:
        """Open the source and start producing; raises `CaptureError` on user errors."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop producing and join the producer threads (bounded)."""
        self._halt.set()
        self.ring.notify()
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)
            if t.is_alive():
                _LOGGER.warning("source %s: thread %s did not stop within %.1f s", self.name, t.name, JOIN_TIMEOUT_S)
        self._threads = [t for t in self._threads if t.is_alive()]

    def read(self, timeout_s: float, max_n: int | None = None) -> np.ndarray:
        """Worker side: wait up to `timeout_s` for audio; return float32 mono at `target_rate` (maybe empty).

        `max_n` caps the samples taken from the ring (at the source rate), so the worker can take
        exactly the audio that completes a hop and leave the rest for the next one.
        """
        done = self.source_done.is_set()  # checked before draining: every write precedes it
        if not done and self.ring.available() == 0 and timeout_s > 0:
            self.ring.wait(timeout_s)
            done = self.source_done.is_set()
        x = self.ring.read(max_n)
        if x.size:
            bad = ~np.isfinite(x)
            if bad.any():
                count = int(np.count_nonzero(bad))
                if self.nonfinite_samples == 0:
                    _LOGGER.warning("source %s: replacing NaN/inf samples with 0 (%d so far)", self.name, count)
                self.nonfinite_samples += count
                x[bad] = 0.0
        y = self._resampler.process(x)
        if done and self.ring.available() == 0 and not self.finished.is_set():
            tail = self._resampler.flush()
            if tail.size:
                y = np.concatenate((y, tail))
            self.finished.set()
        self._report()
        return y

    def _report(self) -> None:
        """Log (rate-limited) driver status flags and lost samples accumulated since the last report."""
        flags, lost = self.status_flags, self.ring.lost_samples
        if flags == self._reported_flags and lost == self._reported_lost:
            return
        now = time.monotonic()
        if now - self._last_report < REPORT_EVERY_S:
            return
        if flags > self._reported_flags:
            _LOGGER.warning(
                "source %s: the audio driver flagged %d more blocks (input overflow?), %d in total",
                self.name,
                flags - self._reported_flags,
                flags,
            )
        if lost > self._reported_lost:
            _LOGGER.warning(
                "source %s: %d samples (%.2f s) lost because processing fell behind",
                self.name,
                lost - self._reported_lost,
                (lost - self._reported_lost) / self.samplerate,
            )
        self._reported_flags, self._reported_lost, self._last_report = flags, lost, now

    # -- helpers for thread-driven sources --------------------------------------------

    def _emit(self, block: np.ndarray, pace: _Pacer | None) -> bool:
        """Write a block paced at real time (`pace`) or with back-pressure; False when stopping."""
        if pace is not None:
            if self._sleep(pace.delay_for(block.shape[0])):
                return False
            self.ring.write(block)
            return True
        # Back-pressure: never overrun the worker, wait for room instead.
        need = min(block.shape[0], self.ring.capacity)
        while self.ring.space() < need:
            if self._stopping():
                return False
            self._halt.wait(0.005)
        self.ring.write(block)
        return not self._stopping()


class _Pacer:
    """Real-time pacing: a block of n samples is released when it would have been recorded."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.emitted = 0

    def delay_for(self, n: int) -> float:
        """Seconds to wait before releasing the next `n` samples (resyncs after a long stall)."""
        self.emitted += n
        delay = self.t0 + self.emitted / self.rate - time.monotonic()
        if delay < -1.0:  # e.g. the machine was suspended: do not burst to catch up
            self.t0 = time.monotonic() - self.emitted / self.rate
            delay = 0.0
        return delay


# -- shared by the byte-stream sources (ffmpeg, stdin) ----------------------------------


class _S16Decoder:
    """Turns a byte stream of s16le samples into float32, carrying an odd trailing byte."""

    def __init__(self) -> None:
        self._rest = b""

    def decode(self, chunk: bytes) -> np.ndarray:
        """Decode as many whole samples as `chunk` (plus any carried byte) holds."""
        data = self._rest + chunk
        whole = len(data) - (len(data) % 2)
        self._rest = data[whole:]
        return np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0
