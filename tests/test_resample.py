"""StreamingResampler: block-size independence, agreement with scipy, identity and cost."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.signal import resample_poly

from earshot.resample import SUPPORTED_RATES, StreamingResampler

pytestmark = pytest.mark.timeout(60)

OUT_RATE = 16000


def run_blocks(r: StreamingResampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Feed x through r in blocks of the given sizes (cycled), then flush."""
    out, i, k = [], 0, 0
    while i < x.shape[0]:
        n = sizes[k % len(sizes)]
        out.append(r.process(x[i : i + n]))
        i += n
        k += 1
    out.append(r.flush())
    return np.concatenate(out)


def make_signal(rate: int, seconds: float = 0.7, seed: int = 0) -> np.ndarray:
    """Noise plus a tone below 8 kHz, float32."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds) + 17  # not a multiple of any block size
    t = np.arange(n) / rate
    return (0.3 * rng.standard_normal(n) + 0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)




@pytest.mark.parametrize("rate", [r for r in SUPPORTED_RATES if r != OUT_RATE])
def test_blocks_equal_one_shot_and_resample_poly(rate: int) -> None:
    """Any block split gives the one-shot output (1e-5), which equals scipy's resample_poly of the whole signal."""
    x = make_signal(rate)
    one_shot = run_blocks(StreamingResampler(rate, OUT_RATE), x, [x.shape[0]])
    rng = np.random.default_rng(rate)
    sizes = [int(s) for s in rng.integers(1, 2000, size=50)] + [1, 2, 3]
    blocked = run_blocks(StreamingResampler(rate, OUT_RATE), x, sizes)
    assert blocked.dtype == np.float32
    assert blocked.shape == one_shot.shape
    np.testing.assert_allclose(blocked, one_shot, atol=1e-5)
    r = StreamingResampler(rate, OUT_RATE)
    ref = resample_poly(x.astype(np.float64), r.up, r.down)
    assert one_shot.shape == ref.shape
    np.testing.assert_allclose(one_shot, ref, atol=1e-5)


def test_output_timing_is_not_shifted() -> None:
    """A click at input time t comes out at output time t (zero-phase filter, no added delay in the stream)."""
    rate = 44100
    x = np.zeros(rate, dtype=np.float32)
    x[rate // 2] = 1.0
    y = run_blocks(StreamingResampler(rate, OUT_RATE), x, [441])
    assert abs(int(np.argmax(y)) - OUT_RATE // 2) <= 1


def test_latency_is_small_and_all_output_arrives() -> None:
    """Output lags the input by at most latency + 1 samples per block, and flush completes ceil(n*up/down)."""
    for rate in SUPPORTED_RATES:
        r = StreamingResampler(rate, OUT_RATE)
        assert r.latency_in_samples <= 0.0015 * rate + 1  # about 1 ms
        x = make_signal(rate, 0.2)
        got = 0
        fed = 0
        for i in range(0, x.shape[0], 320):
            fed += x[i : i + 320].shape[0]
            got += r.process(x[i : i + 320]).shape[0]
            expected = fed * OUT_RATE / rate
            assert expected - got <= (r.latency_in_samples + 1) * OUT_RATE / rate + 1
        got += r.flush().shape[0]
        assert got == -(-x.shape[0] * OUT_RATE // rate)


def test_identity_is_passthrough() -> None:
    """Equal rates return the very same float32 array (no copy) and flush nothing."""
    r = StreamingResampler(16000, 16000)
    x = np.arange(10, dtype=np.float32)
    assert r.identity
    assert r.process(x) is x
    assert r.flush().size == 0


def test_reset_starts_over() -> None:
    """After flush (or reset) the resampler behaves like a new one."""
    x = make_signal(48000, 0.1)
    r = StreamingResampler(48000, OUT_RATE)
    a = run_blocks(r, x, [480])
    b = run_blocks(r, x, [480])
    np.testing.assert_array_equal(a, b)


def test_invalid_rates() -> None:
    """Zero, negative or fractional rates are rejected."""
    for bad in [(0, 16000), (16000, -1), (44100.5, 16000)]:
        with pytest.raises(ValueError):
            StreamingResampler(*bad)  # type: ignore[arg-type]


def test_cheap_enough_for_real_time() -> None:
    """Resampling 44.1 kHz in 20 ms blocks costs far less than real time (< 5 % of one core)."""
    rate = 44100
    x = make_signal(rate, 3.0)
    r = StreamingResampler(rate, OUT_RATE)
    block = rate // 50
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], block):
        r.process(x[i : i + block])
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.05 * 3.0, f"{elapsed:.3f} s of CPU for 3 s of audio"
