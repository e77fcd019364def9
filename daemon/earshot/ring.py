"""Lock-free single-producer/single-consumer ring of float32 samples (capture -> worker).

The capture side (often a PortAudio callback thread, where nothing may block) writes
into a preallocated numpy array; the worker thread reads from it. No lock is shared:
the two sides communicate only through integer attributes whose stores are atomic
under the GIL, published in an order that lets the reader detect every overwrite.
"""

from __future__ import annotations

import threading

import numpy as np


class SampleRing:
    """A fixed-capacity SPSC ring of float32 samples with overrun accounting.

    Thread contract:

    * Exactly one producer thread calls `write` (and may call `space` for
      back-pressure). Exactly one consumer thread calls `read`, `wait` and `clear`.
      `available`, `space` and the counters may be read from any thread.
    * The producer never blocks and never waits for the consumer: when the consumer
      falls behind by more than `capacity` samples, the oldest samples are
      overwritten. The consumer notices, skips to the oldest sample still valid,
      and counts the skipped samples in `lost_samples` and the event in `overruns`.
    * Publication order: the producer first announces how far it is about to write
      (`_reserved`), then copies the samples, then publishes `total_written`. The
      reader only copies samples below `total_written`, and after copying re-checks
      `_reserved` to drop anything the producer may have overwritten during the copy
      (counted as lost, never returned torn). A Python int attribute store is
      atomic under the GIL, so neither side sees a half-updated counter.
    * `write` calls `threading.Event.set` to wake a consumer blocked in `wait`. That
      takes the event's internal lock for a few instructions and never waits for the
      consumer (the consumer holds that lock only momentarily), which is acceptable
      inside an audio callback; everything else on the producer side is lock-free.

    Invariant: once the consumer has drained the ring,
    ``samples returned by read + lost_samples == total_written`` (minus anything
    discarded on purpose by `clear`, counted in `cleared_samples`).
    """

    def __init__(self, capacity: int) -> None:
        """Allocate a ring holding at most `capacity` samples (> 0)."""
        if capacity <= 0:
            raise ValueError(f"ring capacity must be > 0, got {capacity}")
        self.capacity = int(capacity)
        """Number of samples the ring holds before the producer overwrites unread data."""
        self._buf = np.zeros(self.capacity, dtype=np.float32)
        self.total_written = 0
        """Samples ever written (producer-owned, published after the data copy)."""
        self._reserved = 0
        """Absolute index the producer is writing up to (published before the data copy)."""
        self._read_pos = 0
        self.lost_samples = 0
        """Samples overwritten before the consumer could read them (consumer-owned)."""
        self.overruns = 0
        """Times the consumer found that the producer had lapped it (consumer-owned)."""
        self.cleared_samples = 0
        """Unread samples discarded by `clear` (consumer-owned)."""
        self._data_ready = threading.Event()

    # -- producer side ---------------------------------------------------------------

    def write(self, x: np.ndarray) -> None:
        """Append samples (producer only). Never blocks; overwrites unread data if full.

        A write longer than `capacity` keeps only its newest `capacity` samples; the
        older ones count as written and will show up as lost on the reader side.
        """
        data = np.asarray(x, dtype=np.float32)
        if data.ndim != 1:
            data = data.reshape(-1)
        # A strided 1-D view (one column of a PortAudio block) is copied straight into
        # the ring below, without an intermediate array.
        n = data.shape[0]
        if n == 0:
            return
        cap = self.capacity
        start = self.total_written
        end = start + n
        if n > cap:
            data = data[n - cap :]
        first = end - data.shape[0]  # absolute index of data[0]
        # Announce the region before touching it, so a concurrent reader can tell
        # which of the samples it copied might be torn.
        self._reserved = end
        pos = first % cap
        m = data.shape[0]
        head = min(m, cap - pos)
        self._buf[pos : pos + head] = data[:head]
        if head < m:
            self._buf[: m - head] = data[head:]
        self.total_written = end  # publish only after the copy
        # Setting an Event takes its lock; skip it while it is still set (a consumer that polls
        # never clears it). Safe: `wait` clears, then re-checks `available`, which sees this
        # write because total_written was published before this check.
        if not self._data_ready.is_set():
            self._data_ready.set()

    def notify(self) -> None:
        """Wake a consumer blocked in `wait` without writing (e.g. the source just ended)."""
        self._data_ready.set()

    def space(self) -> int:
        """Samples that can be written now without overwriting unread data."""
        return max(0, self.capacity - (self.total_written - self._read_pos))

    # -- consumer side ---------------------------------------------------------------

    def available(self) -> int:
        """Unread samples the next `read` can return (at most `capacity`)."""
        return max(0, min(self.capacity, self.total_written - self._read_pos))

    def read(self, max_n: int | None = None) -> np.ndarray:
        """Return up to `max_n` unread samples (all if None) as a new array, oldest first.

        Consumer only. Samples the producer overwrote before or during the copy are
        skipped and counted in `lost_samples`/`overruns`; they are never returned.
        """
        cap = self.capacity
        written = self.total_written
        reserved = self._reserved  # read after total_written, so reserved >= written
        start = self._read_pos
        oldest_valid = reserved - cap
        if start < oldest_valid:
            self.lost_samples += oldest_valid - start
            self.overruns += 1
            start = oldest_valid
        n = written - start
        if max_n is not None:
            n = min(n, max(0, int(max_n)))
        if n <= 0:
            self._read_pos = start
            return np.zeros(0, dtype=np.float32)
        pos = start % cap
        head = min(n, cap - pos)
        out = np.empty(n, dtype=np.float32)
        out[:head] = self._buf[pos : pos + head]
        if head < n:
            out[head:] = self._buf[: n - head]
        # The producer may have lapped us while we copied: anything below the new
        # oldest-valid index can contain samples from a later write.
        torn = (self._reserved - cap) - start
        if torn > 0:
            torn = min(torn, n)
            self.lost_samples += torn
            self.overruns += 1
            out = out[torn:]
        self._read_pos = start + n
        return out

    def wait(self, timeout_s: float | None) -> bool:
        """Block until data is available or `timeout_s` passes; return whether data is available."""
        if self.available() > 0:
            return True
        # Clear, then re-check: a write landing between the first check and the clear
        # would otherwise leave us sleeping on data that is already there.
        self._data_ready.clear()
        if self.available() > 0:
            return True
        self._data_ready.wait(timeout_s)
        return self.available() > 0

    def clear(self) -> None:
        """Discard all unread samples (consumer only); counted in `cleared_samples`, not as lost."""
        written = self.total_written
        self.cleared_samples += max(0, written - self._read_pos)
        self._read_pos = written
