"""EfficientAT's input features (fixed by the pretrained weights), in numpy: no torch needed.

32 kHz audio (earshot's 16 kHz upsampled 2x), pre-emphasis 0.97, STFT n_fft 1024 / window 800
(symmetric Hann, centred in the frame as torch.stft pads it) / hop 320, power, 128 Kaldi-style mel
bands 0-15 kHz (torchaudio's get_mel_banks without VTLN), log(mel + 1e-5), then (x + 4.5) / 5.
A test checks these against torch.stft.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MnFrontend:
    """EfficientAT's input features (fixed by the pretrained weights)."""

    sample_rate: int = 32000
    n_fft: int = 1024
    win_length: int = 800
    hop_length: int = 320
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float = 15000.0
    preemphasis: float = 0.97


def _kaldi_mel(f: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + f / 700.0)


def kaldi_mel_banks(p: MnFrontend = MnFrontend()) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Kaldi mel scale (torchaudio's get_mel_banks,
    no VTLN warp), with the Nyquist bin's column zero as EfficientAT pads it."""
    n_bins = p.n_fft // 2
    lo, hi = _kaldi_mel(np.float64(p.fmin)), _kaldi_mel(np.float64(p.fmax))
    delta = (hi - lo) / (p.n_mels + 1)
    b = np.arange(p.n_mels, dtype=np.float64)[:, None]
    left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    mel = _kaldi_mel(p.sample_rate / p.n_fft * np.arange(n_bins, dtype=np.float64))[None, :]
    banks = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
    return np.pad(banks, ((0, 0), (0, 1))).astype(np.float32)


class MnFeatures:
    """16 kHz audio -> EfficientAT log-mel (n_mels, T) float32, in numpy (no torch needed)."""

    def __init__(self, p: MnFrontend = MnFrontend(), input_rate: int = 16000):
        if p.sample_rate % input_rate:
            raise ValueError(f"input rate {input_rate} Hz does not divide {p.sample_rate} Hz")
        self.p = p
        self.up = p.sample_rate // input_rate
        self.banks = kaldi_mel_banks(p)
        # Symmetric Hann (torch.hann_window(periodic=False)) centred in the n_fft frame, as torch.stft pads it.
        win = np.hanning(p.win_length).astype(np.float64)
        pad = (p.n_fft - p.win_length) // 2
        self.window = np.pad(win, (pad, p.n_fft - p.win_length - pad))

    def upsample(self, x: np.ndarray) -> np.ndarray:
        from scipy.signal import resample_poly

        return x if self.up == 1 else resample_poly(x, self.up, 1).astype(np.float32)

    def __call__(self, x16: np.ndarray) -> np.ndarray:
        p = self.p
        x = self.upsample(np.asarray(x16, dtype=np.float32)).astype(np.float64)
        x = x[1:] - p.preemphasis * x[:-1]  # conv1d with [-0.97, 1], no padding: one sample shorter
        half = p.n_fft // 2
        x = np.pad(x, (half, half), mode="reflect")
        n = 1 + (len(x) - p.n_fft) // p.hop_length
        idx = np.arange(p.n_fft)[None, :] + p.hop_length * np.arange(n)[:, None]
        spec = np.fft.rfft(x[idx] * self.window, axis=1)
        power = spec.real**2 + spec.imag**2
        mel = self.banks.astype(np.float64) @ power.T
        return ((np.log(mel + 1e-5) + 4.5) / 5.0).astype(np.float32)

    def batch(self, windows: np.ndarray) -> np.ndarray:
        """(B, samples) 16 kHz windows of one length -> (B, 1, n_mels, T)."""
        return np.stack([self(w) for w in windows])[:, None]
