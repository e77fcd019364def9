"""A tiny detector trained in seconds on procedural sounds, for end-to-end tests.

`train_tiny_checkpoint(path)` trains a small `SoundEventCnn` through `tools/train.py`'s core
function on mixtures of `earshot.synth` sounds (T3 alarms, gunshots, glass breaks over synthetic
room tone, sirens as unlabelled distractors) and saves it with `save_checkpoint`. Everything is
seeded, so the same weights come out on every run of the same torch build. The model detects the
synthetic events of `earshot.synth.scene` and stays quiet on `earshot.synth.background`; it knows
nothing about real recordings.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "tools") not in sys.path:
    sys.path.insert(0, str(REPO / "tools"))

import augment  # noqa: E402
import train as train_mod  # noqa: E402

from earshot import synth  # noqa: E402
from earshot.features import FrontendParams  # noqa: E402
from earshot.model import CnnDims  # noqa: E402
from earshot.model.checkpoint import save_checkpoint  # noqa: E402

TINY_DIMS = CnnDims(channels=(8, 8, 12, 16), freq_strides=(2, 2, 2, 2), time_kernels=(3, 3, 3, 3), dilations=(1, 2, 4, 8),
                    embed_dim=24, dropout=0.1)
"""Small enough to train in seconds, big enough to separate the synthetic sounds."""
TINY_STEPS = 400
"""Optimizer steps of the tiny run."""
TINY_BATCH = 48
"""Windows per step of the tiny run."""
BANK_MIXTURES = 1200
"""Mixtures made once and cut into windows; training samples windows from this bank."""
TINY_THRESHOLD = 0.7
"""Decision threshold of every class: synthetic events score above 0.9, room tone below 0.5 (measured
on held-out seeds), so 0.7 leaves a margin on both sides."""
POOL_SEED = 1234
"""Seed of the pre-generated sound pool (distinct from the scene seeds the tests use)."""


class SynthPool:
    """Pre-generated synthetic clips, so each training mixture costs a few ms instead of ~30.

    Synthesis (6 s of shaped noise per background) dominates the cost of a synth mixture; drawing
    from a pool of varied clips, then augmenting (speed, reverb, gain, EBR), keeps the variety.
    """

    def __init__(self, seed: int = POOL_SEED, n_events: int = 40, n_backgrounds: int = 24, sr: int = 16000):
        rng = np.random.default_rng(seed)
        self.events = {
            "alarm": [synth.t3_alarm(sr, rng.uniform(1.5, 4.0), rng) for _ in range(n_events)],
            "gunshot": [synth.gunshot(sr, rng) for _ in range(n_events)],
            "glass_break": [synth.glass_break(sr, rng) for _ in range(n_events)],
        }
        self.backgrounds = [synth.background(sr, 8.0, rng) for _ in range(n_backgrounds)]
        # Sirens are unlabelled in synth scenes; knocks and thuds are the clutter that must not fire.
        self.distractors = [synth.siren(sr, rng.uniform(1.0, 3.0), rng) for _ in range(n_events // 4)]
        self.distractors += [knock(sr, rng) for _ in range(2 * n_events)]

    @staticmethod
    def _picker(items: list[np.ndarray]):
        return lambda rng: items[int(rng.integers(len(items)))]

    def mixer(self, frontend: FrontendParams = FrontendParams()) -> augment.Mixer:
        """A Mixer over the pool with the training recipe's augmentation (milder channel filtering)."""
        cfg = augment.MixConfig(p_channel=0.1, ebr_db=(-3.0, 15.0), p_no_event=0.35, p_distractor=0.7,
                                distractor_ebr_db=(0.0, 20.0))
        return augment.Mixer(
            synth.LABELS,
            {label: self._picker(clips) for label, clips in self.events.items()},
            self._picker(self.backgrounds),
            self._picker(self.distractors),
            frontend,
            cfg,
        )


def knock(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A hard negative for the synthetic world: thuds, knocks, clicks and rustles, alone or in a short series.

    Like the soft clutter in `synth.background` (things put down, switches, paper), but drawn louder
    and more often, since a thud's low boom is what the synthetic gunshot shares with it. Peak 0.9.
    """
    out = np.zeros(int(rng.uniform(0.3, 1.2) * sr))
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(0, 3)
        if kind == 0:  # thud: low resonance plus low-passed noise
            n = int(rng.uniform(0.08, 0.3) * sr)
            t = np.arange(n) / sr
            noise = np.cumsum(rng.standard_normal(n)) * 0.02
            x = np.sin(2 * np.pi * rng.uniform(60.0, 300.0) * t) + rng.uniform(0.1, 0.6) * (noise - noise.mean())
            x *= np.exp(-t / rng.uniform(0.015, 0.08))
        elif kind == 1:  # knock / click: a short noise burst
            n = int(rng.uniform(0.005, 0.05) * sr)
            x = np.diff(rng.standard_normal(n + 1)) * np.exp(-np.arange(n) / (rng.uniform(0.002, 0.01) * sr))
        else:  # rustle
            n = int(rng.uniform(0.2, 0.8) * sr)
            x = np.diff(rng.standard_normal(n + 1)) * np.hanning(n) * 0.5
        i0 = int(rng.integers(0, max(1, len(out) - n)))
        m = min(n, len(out) - i0)
        out[i0 : i0 + m] += x[:m]
    return (0.9 * out / (np.max(np.abs(out)) + 1e-12)).astype(np.float32)


class ExampleBank:
    """Windows made once from `n_mixtures` mixtures; `draw(rng)` returns `k` of them at random.

    Making a mixture costs more than a training step of the tiny model, so the tiny run reuses a
    bank for a few epochs instead of mixing afresh every step.
    """

    def __init__(self, mixer: augment.Mixer, n_mixtures: int, seed: int, k: int = 8):
        rng = np.random.default_rng([seed, 99])
        self.examples = [ex for _ in range(n_mixtures) for ex in mixer.examples(rng)]
        self.k = k

    def draw(self, rng: np.random.Generator) -> list[augment.Example]:
        return [self.examples[int(i)] for i in rng.integers(0, len(self.examples), self.k)]


def train_tiny_checkpoint(path: str | Path, seed: int = 0, steps: int = TINY_STEPS) -> Path:
    """Train the tiny synthetic-sound model and save it to `path`; returns the path.

    Takes about 20-30 s on one idle core. Thresholds are TINY_THRESHOLD; provenance says it is a test model.
    """
    frontend = FrontendParams()
    bank = ExampleBank(SynthPool().mixer(frontend), BANK_MIXTURES, seed)
    # One thread: on a busy 2-core machine a second OpenMP thread makes each step many times slower.
    cfg = train_mod.TrainConfig(
        steps=steps, batch_size=TINY_BATCH, lr=5e-3, seed=seed, num_workers=0, threads=1,
        shuffle_buffer=0, progress=False,
    )
    model, stats = train_mod.train(bank.draw, TINY_DIMS, cfg)
    provenance = {
        "purpose": "test model trained on earshot.synth sounds only; not for real use",
        "seed": seed,
        "steps": stats.steps,
        "examples_seen": stats.examples,
        "final_train_loss": round(stats.final_loss, 5),
    }
    path = Path(path)
    thresholds = {label: TINY_THRESHOLD for label in synth.LABELS}
    save_checkpoint(path, model, list(synth.LABELS), frontend, thresholds, provenance)
    return path
