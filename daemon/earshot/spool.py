"""The MQTT outbox: messages waiting for the broker, in order, bounded, optionally on disk.

A message stays in the spool from `append()` until the broker has acknowledged it (`done()`),
so a daemon that is killed or restarted while the broker is away (or before an acknowledgement
came back) sends it again at the next start. Consumers drop the resulting duplicates by the
event's `id` (delivery is at least once).

On disk the spool is one SQLite database (`<state_dir>/mqtt-spool.sqlite3`, WAL journal, mode
0600 in a 0700 directory): each append and each acknowledgement is one small transaction, which
survives a crash of the process (`synchronous=NORMAL`: a power cut may lose the last few). Events
are rare, so the cost (well under a millisecond per message) does not matter to the worker thread.

A disk that refuses writes (full, read-only, gone) does not stop anything: the spool goes on in
memory, logs it once, and `maintain()` retries the disk with backoff (1 s doubling to
`RETRY_MAX_S`). The first retry that succeeds rewrites the database in one transaction with
exactly the messages not yet acknowledged, so from then on a crash loses nothing again. The same
holds at start: a spool that cannot be opened (a full state directory) starts in memory. Time
spent in memory is counted (`memory_seconds`) for the metrics.

Bounds: at most `max_messages` messages *waiting to be sent* and `max_bytes` of their topics
and payloads. When either would be exceeded the *oldest waiting* message is dropped; the caller
counts and logs it. Messages already handed to the network (at most a small window) are not
counted against the bound: they cannot be taken back.

Not thread-safe: the MQTT publisher calls it under its own lock.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .statedir import create_private_file, ensure_private_dir

log = logging.getLogger(__name__)

SPOOL_FILE = "mqtt-spool.sqlite3"
"""Name of the spool database inside the state directory."""

RETRY_FIRST_S = 1.0
"""First wait before trying the disk again after a failure (s); doubles on each failure."""
RETRY_MAX_S = 10.0
"""Longest wait between two tries of the disk (s): how late, at worst, the spool is back on disk."""


@dataclass(frozen=True)
class Entry:
    """One message in the spool."""

    seq: int
    """Position in the spool (increasing; order of sending)."""
    topic: str
    payload: bytes
    retain: bool
    kind: str
    """`event`, `state` or `status` (only the publisher gives these meaning)."""
    durable: bool = True
    """Written to disk (status messages are not: the next start publishes its own)."""

    @property
    def size(self) -> int:
        """Bytes this entry counts against the byte bound."""
        return len(self.topic) + len(self.payload)


class Spool:
    """A FIFO of messages waiting for the broker, on disk when `path` is given, else in memory.

    `pop()` hands the oldest waiting message over; it stays stored until `done(seq)`. `requeue()`
    puts a handed-over message back at the front (the network refused it for now).
    """

    def __init__(self, path: str | Path | None, max_messages: int, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Open (or create) the spool; a disk spool loads what a previous run left, oldest first.

        Never raises for disk trouble: a spool that cannot be opened starts in memory (logged) and
        `maintain()` keeps trying the disk.
        """
        self.path = Path(path) if path is not None else None
        self.max_messages = max(1, int(max_messages))
        self.max_bytes = max(1, int(max_bytes))
        self._clock = clock
        self._waiting: collections.deque[Entry] = collections.deque()
        self._live: dict[int, Entry] = {}  # durable entries not yet done (waiting or handed over), by seq
        self._bytes = 0
        self._next_seq = 1
        self._db: sqlite3.Connection | None = None
        self._memory_since: float | None = None  # set while the disk refuses us
        self._memory_s = 0.0  # time spent in memory in earlier episodes
        self._retry_s = RETRY_FIRST_S
        self._retry_at = 0.0
        self.memory_episodes = 0
        """Times the spool fell back to memory (including at open)."""
        self.recovered = 0
        """Messages found on disk at open (left by a previous run)."""
        self.evicted_at_open: list[Entry] = []
        """Messages dropped at open because the bounds are now smaller than what was stored."""
        if self.path is not None:
            try:
                rows = self._connect()
            except (OSError, sqlite3.Error) as e:
                self._close_db()
                # Seqs from the clock (µs) stay above what a previous run may have left on the
                # disk we could not read, so both can be merged when the disk comes back.
                self._next_seq = time.time_ns() // 1000
                self._to_memory(f"cannot open it ({e})")
                return
            for row in rows:
                self._push(self._row_entry(row))
                self._next_seq = self._waiting[-1].seq + 1
            self.recovered = len(rows)
            while self._over():
                self.evicted_at_open.append(self._evict())

    # ------------------------------------------------------------------ disk

    def _connect(self) -> list[tuple]:
        """Open the database (0600, in a 0700 directory) and return its rows, oldest first."""
        assert self.path is not None
        ensure_private_dir(self.path.parent)
        # SQLite would create the file 0644 & ~umask; its -wal and -shm files copy this mode.
        create_private_file(self.path)
        # The publisher calls us from the worker, its sender and paho's thread, always under its lock.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL)"
        )
        return self._db.execute("SELECT seq, topic, payload, retain, kind FROM spool ORDER BY seq").fetchall()

    @staticmethod
    def _row_entry(row: tuple) -> Entry:
        seq, topic, payload, retain, kind = row
        return Entry(int(seq), str(topic), bytes(payload), bool(retain), str(kind))

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error as e:
                log.warning("closing the MQTT spool failed: %s", e)
            self._db = None

    def _sql(self, statement: str, args: tuple) -> None:
        """Run one statement; on a disk error go on in memory until `maintain()` gets the disk back."""
        if self._db is None or self._memory_since is not None:
            return
        try:
            self._db.execute(statement, args)
        except sqlite3.Error as e:
            self._to_memory(f"a write failed ({e})")

    def _to_memory(self, why: str) -> None:
        self._memory_since = self._clock()
        self.memory_episodes += 1
        self._retry_s = RETRY_FIRST_S
        self._retry_at = self._memory_since + self._retry_s
        log.error("MQTT spool %s: %s; messages are kept IN MEMORY ONLY (a crash or restart now loses them) "
                  "until the disk accepts writes again, retried every %g s at most; free space in the state "
                  "directory", self.path, why, RETRY_MAX_S)

    def _write_all(self) -> int:
        """Make the database hold exactly the live entries, in one transaction; returns how many."""
        assert self._db is not None
        rows = [(e.seq, e.topic, e.payload, int(e.retain), e.kind) for e in sorted(self._live.values(),
                                                                                   key=lambda e: e.seq)]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM spool")
            self._db.executemany("INSERT INTO spool (seq, topic, payload, retain, kind) VALUES (?, ?, ?, ?, ?)",
                                 rows)
            self._db.execute("COMMIT")
        except sqlite3.Error:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        return len(rows)

    def _merge_previous_run(self, rows: list[tuple]) -> list[Entry]:
        """Put what a previous run left (found only now) in front; returns the messages given up."""
        old = [self._row_entry(r) for r in rows]
        stale = [e for e in old if e.kind == "state"]
        old = [e for e in old if e.kind != "state"]
        if stale:
            # This run has published its own ON/OFF states since; replaying older ones would leave a wrong retained state.
            log.warning("MQTT spool %s: %d retained state(s) left by a previous run are stale now; dropped",
                        self.path, len(stale))
        if old and self._live and max(e.seq for e in old) >= min(self._live):
            first = min(self._live) - len(old)
            old = [replace(e, seq=first + i) for i, e in enumerate(old)]
        if old:
            self._next_seq = max(self._next_seq, old[-1].seq + 1)
            log.warning("MQTT spool %s: %d message(s) left by a previous run are sent now, after newer ones",
                        self.path, len(old))
        for e in reversed(old):
            self._waiting.appendleft(e)
            self._bytes += e.size
            self._live[e.seq] = e
        self.recovered += len(old)
        dropped = list(stale)
        while self._over():
            dropped.append(self._evict())
        return dropped

    def maintain(self, force: bool = False) -> list[Entry]:
        """While in memory: try the disk when the backoff allows (always with `force`).

        Returns the messages given up while merging (stale states of a previous run, or over the
        bounds), for the caller to count. Cheap when the spool is on disk.
        """
        if self._memory_since is None or self.path is None:
            return []
        now = self._clock()
        if not force and now < self._retry_at:
            return []
        dropped: list[Entry] = []
        try:
            if self._db is None:
                try:
                    rows = self._connect()
                except (OSError, sqlite3.Error):
                    self._close_db()
                    raise
                dropped = self._merge_previous_run(rows)
            moved = self._write_all()
        except (OSError, sqlite3.Error) as e:
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            self._retry_at = now + self._retry_s
            log.debug("MQTT spool %s still refused (%s); next try in %g s", self.path, e, self._retry_s)
            return dropped
        spent = now - self._memory_since
        self._memory_s += spent
        self._memory_since = None
        log.warning("MQTT spool %s is on disk again after %.1f s in memory (%.1f s in all); %d message(s) "
                    "moved to disk", self.path, spent, self._memory_s, moved)
        return dropped

    def retry_in(self) -> float | None:
        """Seconds until `maintain()` next tries the disk, or None while on disk (or memory by design)."""
        if self._memory_since is None or self.path is None:
            return None
        return max(0.0, self._retry_at - self._clock())

    # ------------------------------------------------------------------ queue

    def _over(self) -> bool:
        return len(self._waiting) > self.max_messages or (self._bytes > self.max_bytes and len(self._waiting) > 1)

    def _push(self, entry: Entry) -> None:
        self._waiting.append(entry)
        self._bytes += entry.size
        if entry.durable:
            self._live[entry.seq] = entry

    def _evict(self) -> Entry:
        old = self._waiting.popleft()
        self._bytes -= old.size
        if old.durable:
            self._live.pop(old.seq, None)
            self._sql("DELETE FROM spool WHERE seq = ?", (old.seq,))
        return old

    def append(self, topic: str, payload: bytes, retain: bool, kind: str, durable: bool = True) -> list[Entry]:
        """Add a message at the end; returns the oldest waiting messages dropped to stay in bounds."""
        entry = Entry(self._next_seq, topic, bytes(payload), retain, kind, durable)
        self._next_seq += 1
        if durable:
            self._sql("INSERT INTO spool (seq, topic, payload, retain, kind) VALUES (?, ?, ?, ?, ?)",
                      (entry.seq, entry.topic, entry.payload, int(entry.retain), entry.kind))
        self._push(entry)
        dropped = []
        while self._over():
            dropped.append(self._evict())
        return dropped

    def peek(self) -> Entry | None:
        """The oldest waiting message, or None."""
        return self._waiting[0] if self._waiting else None

    def pop(self) -> Entry:
        """Take the oldest waiting message to send it; it stays stored until `done()`."""
        entry = self._waiting.popleft()
        self._bytes -= entry.size
        return entry

    def requeue(self, entry: Entry) -> None:
        """Put a message taken by `pop()` back at the front (it could not be sent now)."""
        self._waiting.appendleft(entry)
        self._bytes += entry.size

    def done(self, entry: Entry) -> None:
        """The broker has the message (or it was given up): forget it for good."""
        if entry.durable:
            self._live.pop(entry.seq, None)
            self._sql("DELETE FROM spool WHERE seq = ?", (entry.seq,))

    def __len__(self) -> int:
        """Messages waiting to be sent (not counting those handed over and not yet acknowledged)."""
        return len(self._waiting)

    @property
    def bytes(self) -> int:
        """Bytes of the waiting messages' topics and payloads."""
        return self._bytes

    @property
    def on_disk(self) -> bool:
        """True while messages are written to disk."""
        return self._db is not None and self._memory_since is None

    @property
    def in_memory(self) -> bool:
        """True while a disk spool is configured but refused: what is spooled now dies with the process."""
        return self.path is not None and self._memory_since is not None

    @property
    def memory_seconds(self) -> float:
        """Seconds a configured disk spool has spent in memory so far (this run)."""
        now = self._clock()
        return self._memory_s + (now - self._memory_since if self._memory_since is not None else 0.0)

    @property
    def unsaved(self) -> int:
        """Messages not yet acknowledged that only memory holds (0 while on disk)."""
        return len(self._live) if self.in_memory else 0

    def close(self) -> None:
        """Try the disk once more if it was refused, then close; what is stored stays for the next run."""
        if self.in_memory:
            self.maintain(force=True)
            if self.in_memory and self._live:
                log.error("MQTT spool %s: %d undelivered message(s) were only in memory and are lost",
                          self.path, len(self._live))
        self._close_db()
