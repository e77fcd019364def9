"""The MQTT outbox: messages waiting for the broker, in order, bounded, optionally on disk.

A message stays in the spool from `append()` until the broker has acknowledged it (`done()`),
so a daemon that is killed or restarted while the broker is away (or before an acknowledgement
came back) sends it again at the next start. Consumers drop the resulting duplicates by the
event's `id` (delivery is at least once).

On disk the spool is one SQLite database (`<state_dir>/mqtt-spool.sqlite3`, WAL journal): each
append and each acknowledgement is one small transaction, which survives a crash of the process
(`synchronous=NORMAL`: a power cut may lose the last few). Events are rare, so the cost (well
under a millisecond per message) does not matter to the worker thread.

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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SPOOL_FILE = "mqtt-spool.sqlite3"
"""Name of the spool database inside the state directory."""


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

    def __init__(self, path: str | Path | None, max_messages: int, max_bytes: int) -> None:
        """Open (or create) the spool; a disk spool loads what a previous run left, oldest first."""
        self.path = Path(path) if path is not None else None
        self.max_messages = max(1, int(max_messages))
        self.max_bytes = max(1, int(max_bytes))
        self._waiting: collections.deque[Entry] = collections.deque()
        self._bytes = 0
        self._next_seq = 1
        self._db: sqlite3.Connection | None = None
        self._db_failed = False
        self.recovered = 0
        """Messages found on disk at open (left by a previous run)."""
        self.evicted_at_open: list[Entry] = []
        """Messages dropped at open because the bounds are now smaller than what was stored."""
        if self.path is not None:
            self._open_db()

    # ------------------------------------------------------------------ disk

    def _open_db(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The publisher calls us from the worker, its sender and paho's thread, always under its lock.
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL)"
        )
        rows = self._db.execute("SELECT seq, topic, payload, retain, kind FROM spool ORDER BY seq").fetchall()
        for seq, topic, payload, retain, kind in rows:
            self._waiting.append(Entry(int(seq), str(topic), bytes(payload), bool(retain), str(kind)))
            self._bytes += self._waiting[-1].size
            self._next_seq = int(seq) + 1
        self.recovered = len(rows)
        while self._over():
            self.evicted_at_open.append(self._evict())

    def _sql(self, statement: str, args: tuple) -> None:
        """Run one statement; on a disk error keep going in memory (logged once)."""
        if self._db is None or self._db_failed:
            return
        try:
            self._db.execute(statement, args)
        except sqlite3.Error as e:
            self._db_failed = True
            log.error("MQTT spool %s failed (%s): waiting messages are now kept in memory only", self.path, e)

    # ------------------------------------------------------------------ queue

    def _over(self) -> bool:
        return len(self._waiting) > self.max_messages or (self._bytes > self.max_bytes and len(self._waiting) > 1)

    def _evict(self) -> Entry:
        old = self._waiting.popleft()
        self._bytes -= old.size
        if old.durable:
            self._sql("DELETE FROM spool WHERE seq = ?", (old.seq,))
        return old

    def append(self, topic: str, payload: bytes, retain: bool, kind: str, durable: bool = True) -> list[Entry]:
        """Add a message at the end; returns the oldest waiting messages dropped to stay in bounds."""
        entry = Entry(self._next_seq, topic, bytes(payload), retain, kind, durable)
        self._next_seq += 1
        if durable:
            self._sql("INSERT INTO spool (seq, topic, payload, retain, kind) VALUES (?, ?, ?, ?, ?)",
                      (entry.seq, entry.topic, entry.payload, int(entry.retain), entry.kind))
        self._waiting.append(entry)
        self._bytes += entry.size
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
        return self._db is not None and not self._db_failed

    def close(self) -> None:
        """Close the database; what is stored stays for the next run."""
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error as e:
                log.warning("closing the MQTT spool failed: %s", e)
            self._db = None
