"""The MQTT spool on the real filesystem: order, bounds (messages and bytes, oldest dropped), and
what survives closing and reopening (a daemon restart)."""

from __future__ import annotations

import sqlite3
import time

import pytest

from earshot.spool import SPOOL_FILE, Spool

pytestmark = pytest.mark.timeout(30)


def test_order_and_acknowledgement_survive_reopen(tmp_path):
    """Messages come out in order; only acknowledged ones (`done`) are gone after a reopen, and the
    rest (including ones handed over but never acknowledged) come back first, in order."""
    path = tmp_path / SPOOL_FILE
    s = Spool(path, max_messages=100, max_bytes=10**6)
    for i in range(5):
        s.append(f"t/{i}", f"p{i}".encode(), retain=i % 2 == 0, kind="event")
    s.append("status", b"offline", True, "status", durable=False)
    first, second = s.pop(), s.pop()
    assert (first.topic, second.topic) == ("t/0", "t/1") and first.retain and not second.retain
    s.done(first)  # acknowledged; `second` was handed over but never acknowledged
    s.close()
    again = Spool(path, max_messages=100, max_bytes=10**6)
    assert again.recovered == 4 and len(again) == 4
    out = [again.pop() for _ in range(4)]
    assert [(e.topic, e.payload, e.retain, e.kind) for e in out] == \
        [(f"t/{i}", f"p{i}".encode(), i % 2 == 0, "event") for i in range(1, 5)]
    assert again.append("t/new", b"x", False, "event") == [] and again.pop().seq > out[-1].seq
    again.close()


def test_bounds_drop_the_oldest(tmp_path):
    """Beyond max_messages or max_bytes the oldest waiting messages are dropped and returned (for
    counting); a reopen with smaller bounds drops the excess at once."""
    s = Spool(tmp_path / SPOOL_FILE, max_messages=3, max_bytes=10**6)
    dropped = [d.topic for i in range(5) for d in s.append(f"m{i}", b"x" * 10, False, "event")]
    assert dropped == ["m0", "m1"] and [e.topic for e in list(s._waiting)] == ["m2", "m3", "m4"]
    s.close()
    small = Spool(tmp_path / SPOOL_FILE, max_messages=10, max_bytes=30)
    assert [e.topic for e in small.evicted_at_open] == ["m2"] and small.bytes == 24
    assert [d.topic for d in small.append("m5", b"y" * 10, False, "event")] == ["m3"]
    small.close()
    mem = Spool(None, max_messages=2, max_bytes=10**6)
    assert [d.topic for i in range(3) for d in mem.append(f"k{i}", b"", False, "state")] == ["k0"]
    assert not mem.on_disk


def test_spool_cost_and_size(tmp_path):
    """10 000 event-sized messages (the default bound) fit, cost well under a millisecond each to
    append, and come back after reopening."""
    s = Spool(tmp_path / SPOOL_FILE, max_messages=10_000, max_bytes=20_000_000)
    payload = b"{" + b"x" * 300 + b"}"
    t0 = time.perf_counter()
    for i in range(10_000):
        s.append("earshot/node/mic0/event", payload, False, "event")
    per_append_ms = (time.perf_counter() - t0) / 10_000 * 1000
    s.close()
    size_mb = sum(f.stat().st_size for f in tmp_path.iterdir()) / 1e6
    print(f"spool: {per_append_ms:.3f} ms per append, {size_mb:.1f} MB on disk for 10000 x 325 B")
    assert per_append_ms < 1.0
    assert len(Spool(tmp_path / SPOOL_FILE, max_messages=10_000, max_bytes=20_000_000)) == 10_000
