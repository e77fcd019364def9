"""Streaming polyphase resampling of a capture stream to the model's sample rate.

`StreamingResampler` uses exactly the filter and alignment of
`scipy.signal.resample_poly` (Kaiser-windowed sinc, zero-phase), computed block by
block: every output sample is emitted as soon as the input it depends on has
arrived, so the concatenated output of any block split equals `resample_poly` of
the whole signal (the last few samples come out of `flush`). Only the filter's
span of input history (a few dozen samples) is kept between blocks.
"""

from __future__ import annotations

from math import gcd

import numpy as np

SUPPORTED_RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000)
"""Input rates tested against a 16 kHz output (others work if the ratio is reasonable)."""

_KAISER_BETA = 5.0  # resample_poly's default window ("kaiser", 5.0)


class StreamingResampler:
    """Stateful rational-ratio resampler; `process` blocks, then `flush` at the end.

    Output latency is the filter's half length (10 * max(up, down) upsampled samples,
    under 1 ms of input for the supported rates) plus the block size. Equal rates are
    an identity that returns the input without copying. Not thread-safe: one thread
    calls `process`/`flush`/`reset`.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        """Prepare a resampler from `in_rate` Hz to `out_rate` Hz (positive integers)."""
        if int(in_rate) != in_rate or int(out_rate) != out_rate or in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive integers, got {in_rate} -> {out_rate}")
        self.in_rate = int(in_rate)
        """Input sample rate (Hz)."""
        self.out_rate = int(out_rate)
        """Output sample rate (Hz)."""
        g = gcd(self.in_rate, self.out_rate)
        self.up = self.out_rate // g
        """Interpolation factor of the reduced ratio."""
        self.down = self.in_rate // g
        """Decimation factor of the reduced ratio."""
        self.identity = self.up == self.down
        """True when the rates are equal and `process` passes samples through."""
        if self.identity:
            self._h = np.ones(1)
            self._pre_remove = 0
        else:
            # scipy.signal only here: importing it costs about 1 s and 30 MB, which a daemon whose
            # sources all run at the model rate need not pay.
            from scipy.signal import firwin

            # Same design and alignment as scipy.signal.resample_poly.
            max_rate = max(self.up, self.down)
            half_len = 10 * max_rate
            h = firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", _KAISER_BETA)) * self.up
            n_pre_pad = self.down - half_len % self.down
            self._h = np.concatenate((np.zeros(n_pre_pad), h))
            self._pre_remove = (half_len + n_pre_pad) // self.down
        self.reset()

    def reset(self) -> None:
        """Forget all history, as if no sample had been processed."""
        self._buf = np.zeros(0, dtype=np.float64)
        self._buf_start = 0  # absolute input index of _buf[0]; always a multiple of `down`
        self._n_in = 0  # input samples seen
        self._k_next = 0  # next output index to emit

    @property
    def latency_in_samples(self) -> int:
        """Input samples that must arrive after an instant before its output sample is emitted."""
        if self.identity:
            return 0
        return -(-self._pre_remove * self.down // self.up)

    def _outputs(self, k_end: int) -> np.ndarray:
        """Compute outputs [_k_next, k_end) from the buffered input (zeros beyond it)."""
        k0, up, down, r = self._k_next, self.up, self.down, self._pre_remove
        if k_end <= k0:
            return np.zeros(0, dtype=np.float32)
        # Output k reads inputs n with 0 <= (k + r)*down - n*up < len(h).
        n_hi = (k_end - 1 + r) * down // up
        seg = self._buf[: max(0, n_hi + 1 - self._buf_start)]
        # _buf_start is a multiple of `down`, so the slice stays phase-aligned:
        # upfirdn's output index i corresponds to absolute output i + buf_start*up/down - r.
        offset = self._buf_start * up // down
        from scipy.signal import upfirdn  # imported by __init__ already: a dict look-up

        y = upfirdn(self._h, seg, up, down)
        lo, hi = k0 + r - offset, k_end + r - offset
        out = y[lo:hi]
        if out.shape[0] < hi - lo:  # only at flush: the filter tail past the data
            out = np.concatenate((out, np.zeros(hi - lo - out.shape[0])))
        return out.astype(np.float32)

    def _trim(self) -> None:
        """Drop input history that no future output needs (keeping `down` alignment)."""
        first_needed = ((self._k_next + self._pre_remove) * self.down - len(self._h)) // self.up + 1
        first_needed = max(0, first_needed)
        cut = (first_needed // self.down) * self.down - self._buf_start
        if cut > 0:
            self._buf = self._buf[cut:]
            self._buf_start += cut

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed a block of input samples; return the float32 output samples now computable."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1:
            x = x.reshape(-1)
        if self.identity:
            return x
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        self._buf = np.concatenate((self._buf, x.astype(np.float64)))
        self._n_in += x.shape[0]
        # Output k is complete once the last input it reads, floor((k+r)*down/up), has arrived.
        k_end = (self._n_in * self.up - 1) // self.down - self._pre_remove + 1
        out = self._outputs(k_end)
        self._k_next = max(self._k_next, k_end)
        self._trim()
        return out

    def flush(self) -> np.ndarray:
        """Return the remaining outputs as if the input ended here (zero padded), then reset."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        n_out = -(-self._n_in * self.up // self.down)  # ceil, as resample_poly
        out = self._outputs(n_out)
        self.reset()
        return out
