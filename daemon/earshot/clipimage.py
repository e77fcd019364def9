"""A clip's log-mel spectrogram as a PNG with the detection marked, for the web page's events view.

Rendered on the server once per clip with numpy and zlib (no matplotlib needed) and cached beside
the clip as `<id>.png`; clip retention deletes it with the clip. Low frequencies at the bottom,
2 pixels per mel band, 1 pixel per 10 ms frame; the detection is a bright bar along the top
edge and two vertical lines at its onset and end (to the right edge while it lasts).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .features import FrontendParams, log_mel

_ANCHORS = np.array([  # a viridis-like ramp: dark blue -> teal -> yellow
    (68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float32)
MARK_RGB = (255, 64, 64)
"""Colour of the detection marks."""
ROW_PX = 2
"""Pixels per mel band."""


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG (8-bit RGB, no filtering)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # each row starts with filter type 0
    raw[:, 1:] = rgb.reshape(h, 3 * w)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (..., 3)."""
    pos = np.clip(x, 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_ANCHORS) - 2)
    frac = (pos - i)[..., None]
    return (_ANCHORS[i] * (1 - frac) + _ANCHORS[i + 1] * frac).astype(np.uint8)


def spectrogram_png(samples: np.ndarray, p: FrontendParams, mark_s: tuple[float, float | None] | None) -> bytes:
    """The PNG of `samples` (float mono at p.sample_rate); `mark_s` = (onset, end or None) in clip seconds."""
    mel = log_mel(np.asarray(samples, dtype=np.float32), p)  # (T, n_mels)
    if mel.shape[0] == 0:
        mel = np.zeros((1, p.n_mels), dtype=np.float32)
    lo, hi = np.percentile(mel, 5), np.percentile(mel, 99.7)
    norm = (mel - lo) / max(float(hi - lo), 1e-6)
    rgb = colormap(norm.T[::-1])  # (n_mels, T, 3), low bands at the bottom
    rgb = np.repeat(rgb, ROW_PX, axis=0)
    if mark_s is not None:
        t = rgb.shape[1]
        a = int(round(mark_s[0] / p.frame_s))
        b = t - 1 if mark_s[1] is None else int(round(mark_s[1] / p.frame_s))
        a, b = max(0, min(a, t - 1)), max(0, min(b, t - 1))
        rgb[:6, a:b + 1] = MARK_RGB
        for x in {a, b}:
            rgb[:, max(0, x - 1):x + 1] = MARK_RGB
    return png_bytes(rgb)
