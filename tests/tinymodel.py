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
from earshot.model import CnnDims, save_checkpoint  # noqa: E402

TINY_DIMS = CnnDims(channels=(8, 12, 16, 16), embed_dim=32, dropout=0.1)
"""Small enough to train in seconds, big enough to separate the synthetic sounds."""
TINY_STEPS = 500
"""Optimizer steps of the tiny run."""
TINY_BATCH = 64
"""Windows per step of the tiny run."""
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
        self.distractors = [synth.siren(sr, rng.uniform(1.0, 3.0), rng) for _ in range(n_events // 4)]

    @staticmethod
    def _picker(items: list[np.ndarray]):
        return lambda rng: items[int(rng.integers(len(items)))]

    def mixer(self, frontend: FrontendParams = FrontendParams()) -> augment.Mixer:
        """A Mixer over the pool with the training recipe's augmentation (milder channel filtering)."""
        cfg = augment.MixConfig(p_channel=0.1, ebr_db=(-3.0, 15.0), p_no_event=0.35)
        return augment.Mixer(
            synth.LABELS,
            {label: self._picker(clips) for label, clips in self.events.items()},
            self._picker(self.backgrounds),
            self._picker(self.distractors),
            frontend,
            cfg,
        )


def train_tiny_checkpoint(path: str | Path, seed: int = 0, steps: int = TINY_STEPS) -> Path:
    """Train the tiny synthetic-sound model and save it to `path`; returns the path.

    Takes ~20-40 s on two cores. Thresholds are 0.5; provenance says it is a test model.
    """
    frontend = FrontendParams()
    mixer = SynthPool().mixer(frontend)
    cfg = train_mod.TrainConfig(
        steps=steps, batch_size=TINY_BATCH, lr=5e-3, seed=seed, num_workers=0, threads=2,
        shuffle_buffer=64, progress=False,
    )
    model, stats = train_mod.train(mixer.examples, TINY_DIMS, cfg)
    provenance = {
        "purpose": "test model trained on earshot.synth sounds only; not for real use",
        "seed": seed,
        "steps": stats.steps,
        "examples_seen": stats.examples,
        "final_train_loss": round(stats.final_loss, 5),
    }
    path = Path(path)
    save_checkpoint(path, model, list(synth.LABELS), frontend, {label: 0.5 for label in synth.LABELS}, provenance)
    return path
