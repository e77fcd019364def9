"""SampleRing: exact small cases and a real producer thread racing the consumer."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earshot.ring import SampleRing

pytestmark = pytest.mark.timeout(120)


def ramp(a: int, b: int) -> np.ndarray:
    """Samples a..b-1 as float32 (exact for values below 2**24)."""
    return np.arange(a, b, dtype=np.float32)


def test_empty_ring_reads_nothing() -> None:
    """A fresh ring has nothing to read, full space and zero counters."""
    r = SampleRing(8)
    assert r.available() == 0
    assert r.space() == 8
    out = r.read()
    assert out.dtype == np.float32 and out.shape == (0,)
    assert (r.total_written, r.lost_samples, r.overruns) == (0, 0, 0)
    assert r.wait(0.01) is False


def test_partial_write_and_read_in_order() -> None:
    """Samples come out oldest first, `max_n` limits a read, and counters track it."""
    r = SampleRing(8)
    r.write(ramp(0, 5))
    assert r.available() == 5 and r.space() == 3
    np.testing.assert_array_equal(r.read(2), ramp(0, 2))
    np.testing.assert_array_equal(r.read(), ramp(2, 5))
    assert r.available() == 0 and r.space() == 8 and r.total_written == 5


def test_wrap_around() -> None:
    """A write crossing the end of the array wraps to the start without reordering."""
    r = SampleRing(8)
    r.write(ramp(0, 6))
    np.testing.assert_array_equal(r.read(), ramp(0, 6))
    r.write(ramp(6, 13))  # positions 6,7 then 0..4
    np.testing.assert_array_equal(r.read(), ramp(6, 13))
    assert r.lost_samples == 0


def test_read_returns_a_copy() -> None:
    """Data returned by read is not a view: later writes cannot change it."""
    r = SampleRing(4)
    r.write(ramp(0, 4))
    out = r.read()
    r.write(ramp(100, 104))
    np.testing.assert_array_equal(out, ramp(0, 4))


def test_oversize_write_keeps_newest() -> None:
    """A write longer than the capacity keeps the newest `capacity` samples; the rest count as lost."""
    r = SampleRing(4)
    r.write(ramp(0, 10))
    assert r.total_written == 10
    np.testing.assert_array_equal(r.read(), ramp(6, 10))
    assert r.lost_samples == 6 and r.overruns == 1


def test_overrun_skips_to_oldest_valid_and_counts() -> None:
    """When the producer laps the reader, the reader resumes at the oldest valid sample and counts the gap."""
    r = SampleRing(8)
    r.write(ramp(0, 3))
    np.testing.assert_array_equal(r.read(1), ramp(0, 1))
    r.write(ramp(3, 15))  # 14 unread samples into 8 slots: 1..6 are gone
    assert r.available() == 8 and r.space() == 0
    np.testing.assert_array_equal(r.read(), ramp(7, 15))
    assert r.lost_samples == 6 and r.overruns == 1
    assert 1 + 8 + r.lost_samples == r.total_written


def test_strided_column_write() -> None:
    """Writing one column of a 2-D block (a strided view, as in the PortAudio callback) stores that column."""
    r = SampleRing(16)
    block = np.arange(12, dtype=np.float32).reshape(6, 2)
    r.write(block[:, 1])
    np.testing.assert_array_equal(r.read(), block[:, 1])


def test_clear_discards_unread() -> None:
    """clear() drops unread samples (counted separately, not as lost) and later writes read normally."""
    r = SampleRing(8)
    r.write(ramp(0, 5))
    r.clear()
    assert r.available() == 0 and r.read().size == 0
    assert r.cleared_samples == 5 and r.lost_samples == 0
    r.write(ramp(5, 7))
    np.testing.assert_array_equal(r.read(), ramp(5, 7))


def test_wait_wakes_on_write_from_other_thread() -> None:
    """wait() returns True soon after another thread writes, well before its timeout."""
    r = SampleRing(8)
    threading.Timer(0.05, lambda: r.write(ramp(0, 1))).start()
    t0 = time.monotonic()
    assert r.wait(5.0) is True
    assert time.monotonic() - t0 < 2.0


def test_invalid_capacity() -> None:
    """A ring needs room for at least one sample."""
    with pytest.raises(ValueError):
        SampleRing(0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(1, 300),
    blocks=st.lists(st.integers(0, 400), min_size=1, max_size=60),
    max_reads=st.lists(st.one_of(st.none(), st.integers(1, 500)), min_size=1, max_size=10),
    seed=st.integers(0, 2**16),
)
def test_concurrent_reads_are_contiguous_and_accounted(
    capacity: int, blocks: list[int], max_reads: list[int | None], seed: int
) -> None:
    """With a real producer thread, every read is an in-order, gap-free piece of the ramp,
    pieces only skip forward (by exactly the samples counted lost), and read + lost == written."""
    r = SampleRing(capacity)
    rng = np.random.default_rng(seed)
    total = sum(blocks)
    done = threading.Event()

    def produce() -> None:
        pos = 0
        for n in blocks:
            r.write(ramp(pos, pos + n))
            pos += n
            if rng.random() < 0.3:
                time.sleep(0.0001)  # vary interleavings: sometimes let the reader catch up
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    expected_next = 0
    lost_seen = 0  # lost count when the previous non-empty read was checked
    n_read = 0
    i = 0
    while True:
        finished = done.is_set()
        out = r.read(max_reads[i % len(max_reads)])
        i += 1
        if out.size:
            assert out.dtype == np.float32
            # contiguous and in order within the read
            np.testing.assert_array_equal(out, ramp(int(out[0]), int(out[0]) + out.size))
            # any jump forward equals the samples this read counted as lost
            assert int(out[0]) == expected_next + (r.lost_samples - lost_seen)
            expected_next = int(out[-1]) + 1
            lost_seen = r.lost_samples
            n_read += out.size
        if finished and r.available() == 0:
            break
    t.join(10)
    assert r.total_written == total
    assert n_read + r.lost_samples == total
    assert expected_next + (r.lost_samples - lost_seen) == total
