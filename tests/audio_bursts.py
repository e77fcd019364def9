"""Test audio: background with a gunshot or glass break every `every_s` seconds (a dense event stream)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from earshot import synth


def burst_wav(path: Path, duration_s: float = 20.0, every_s: float = 1.2, seed: int = 0, sr: int = 16000) -> Path:
    """Write the WAV; the tiny model finds about one detection per burst (start and end events)."""
    rng = np.random.default_rng(seed)
    audio = synth.background(sr, duration_s, rng) * 0.5
    t, i = 1.2, 0
    while t < duration_s - 1.0:
        s = synth.gunshot(sr, rng) if i % 2 == 0 else synth.glass_break(sr, rng)
        a = int(t * sr)
        audio[a:a + len(s)] += s[: len(audio) - a]
        t += every_s
        i += 1
    sf.write(path, np.clip(audio, -1, 1).astype(np.float32), sr, subtype="PCM_16")
    return path


def silence_wav(path: Path, duration_s: float, sr: int = 16000) -> Path:
    """Write `duration_s` seconds of digital silence."""
    sf.write(path, np.zeros(int(duration_s * sr), dtype=np.float32), sr, subtype="PCM_16")
    return path
