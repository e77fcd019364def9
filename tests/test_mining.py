"""Hard-negative mining during training (tools/mining.py) and the impulsive weighting of negatives."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

import augment  # noqa: E402
import data  # noqa: E402
import mining  # noqa: E402
import train  # noqa: E402

from earshot.features import FrontendParams  # noqa: E402
from earshot.model import CnnDims  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SR = 16000
P = FrontendParams()


def _quiet_with_clicks(click_s: list[float], seconds: float = 40.0) -> np.ndarray:
    rng = np.random.default_rng(3)
    x = (0.01 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    for t in click_s:
        i = int(t * SR)
        x[i : i + 400] += (0.8 * rng.standard_normal(400)).astype(np.float32)
    return x


def _loud_frames_scorer(f: torch.Tensor) -> torch.Tensor:
    """Window scores (1, W, 1) = how far the loudest frame of each window stands above the stretch's median."""
    level = f.mean(dim=2)[0]  # (T,)
    excess = (level - level.median()).clamp_min(0)
    n = (f.shape[1] - P.chunk_frames) // augment.WINDOW_HOP + 1
    ends = P.chunk_frames + augment.WINDOW_HOP * torch.arange(n)
    peak = torch.stack([excess[e - P.chunk_frames : e].max() for e in ends])
    return (peak / (peak.max() + 1e-6))[None, :, None]


def test_miner_keeps_the_segments_around_what_fires_and_nothing_on_a_quiet_stream():
    """The stored segments hold the frames that scored high (a loud click), never overlap, respect
    `per_stretch` and the capacity; a stretch that scores under `min_score` everywhere adds nothing."""
    rec = _quiet_with_clicks([10.0, 25.0])
    miner = mining.HardNegativeMiner(lambda rng: rec, P, segment_windows=4, stretch_s=30.0, min_score=0.5,
                                     per_stretch=3, capacity=5, level_dbfs=(-20.0, -20.0))
    rng = np.random.default_rng(0)
    added = miner.mine(_loud_frames_scorer, rng)
    assert 1 <= added <= 3 and len(miner.store) == added and miner.scanned_s == 30.0
    seg_frames = P.chunk_frames + 3 * augment.WINDOW_HOP
    for seg in miner.store:
        assert seg.shape == (seg_frames, P.n_mels) and seg.dtype == np.float32
        level = seg.mean(axis=1)
        assert level.max() - np.median(level) > 3.0  # the click is inside every kept segment
    for _ in range(4):
        miner.mine(_loud_frames_scorer, rng)
    assert len(miner.store) == 5  # bounded, oldest pushed out
    batch = miner.draw(7, rng)
    assert batch.shape == (7, seg_frames, P.n_mels)

    silent = mining.HardNegativeMiner(lambda rng: rec, P, segment_windows=4, min_score=0.5)
    assert silent.mine(lambda f: _loud_frames_scorer(f) * 0.0, rng) == 0
    assert silent.draw(4, rng) is None


def test_training_with_a_miner_replaces_part_of_each_batch_by_mined_negatives():
    """train() with a miner: after `mine_after`, mined segments enter the batches and are counted."""
    mixer = augment.synth_mixer(cfg=augment.MixConfig(segment_windows=4, span_s=0.3))
    rec = _quiet_with_clicks([3.0, 7.0], seconds=12.0)
    miner = mining.HardNegativeMiner(lambda rng: rec, P, segment_windows=4, stretch_s=10.0, min_score=0.0)
    cfg = train.TrainConfig(steps=6, batch_size=4, num_workers=0, threads=1, progress=False, shuffle_buffer=0,
                            mined_fraction=0.5, mine_every=2, mine_after=0.3)
    _, stats = train.train(mixer.segments, CnnDims(channels=(4, 4, 4), freq_strides=(2, 2, 2), time_kernels=(3, 3, 3),
                                                   dilations=(1, 2, 4), embed_dim=8), cfg, P.chunk_frames, miner)
    assert stats.steps == 6
    assert miner.mined > 0 and miner.scanned_s > 0
    assert stats.mined_examples == 4 * 2 * 4  # steps 2..5, two of four segments, four windows each


def test_impulsive_negatives_are_weighted_up():
    clip = lambda kind: data.Clip(path="x", label="negative", kind=kind, source="s", group="g", duration_s=1.0)  # noqa: E731
    assert augment.impulsive_weight(clip("jackhammer")) == augment.IMPULSIVE_WEIGHT > 1
    assert augment.impulsive_weight(clip("door_window_slam")) == augment.IMPULSIVE_WEIGHT
    assert augment.impulsive_weight(clip("speech")) == 1.0


def test_fine_tuning_starts_from_the_given_checkpoint(tmp_path):
    """train.py --init: the run starts from the checkpoint's weights (zero steps give them back) and
    records where it started; --dims with --init is refused in one line."""
    from test_train import _write_folder

    from earshot.model.checkpoint import load_checkpoint

    folder = _write_folder(tmp_path / "data", groups_per_label=4, files_per_group=1)
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    common = ["--data", str(folder), "--minutes", "0", "--workers", "0", "--batch-size", "4", "--no-progress"]
    assert train.main([*common, "--out", str(first), "--steps", "2", "--dims", "channels=4,4,4 embed_dim=8"]) == 0
    assert train.main([*common, "--out", str(second), "--steps", "1", "--init", str(first), "--mine", "0.5"]) == 0
    a, b = load_checkpoint(first), load_checkpoint(second)
    assert b.dims == a.dims and b.provenance["init"]["checkpoint"] == "a.pt" and b.provenance["init"]["steps"] == 2
    moved = [float((pa - pb).detach().abs().max()) for pa, pb in zip(a.model.parameters(), b.model.parameters())]
    assert 0 < max(moved) < 0.5  # one small step from a's weights, not a fresh initialisation
    assert train.main([*common, "--out", str(second), "--steps", "1", "--init", str(first), "--dims", "channels=4"]) == 2
    assert train.main([*common, "--out", str(second), "--steps", "1", "--mine", "-0.1"]) == 2
