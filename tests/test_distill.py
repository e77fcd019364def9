"""Distillation of the AudioSet tagger into the streaming CNN while it trains (tools/distill.py)."""

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
import distill  # noqa: E402
import mining  # noqa: E402
import train  # noqa: E402
from train_confirm import window_audio  # noqa: E402

from earshot.features import FrontendParams  # noqa: E402
from earshot.model import CnnDims  # noqa: E402

pytestmark = pytest.mark.timeout(120)

P = FrontendParams()
TINY = CnnDims(channels=(4, 4, 4), freq_strides=(2, 2, 2), time_kernels=(3, 3, 3), dilations=(1, 2, 4), embed_dim=8)


def _level_teacher(calls: list[np.ndarray]):
    """A stand-in teacher: tag 0 is the window's RMS, tag 1 always 0.9, the rest 0; remembers its windows."""
    def teacher(window: np.ndarray) -> np.ndarray:
        calls.append(window.copy())
        tags = np.zeros(distill.N_TAGS, dtype=np.float32)
        tags[0] = min(1.0, float(np.sqrt(np.mean(window.astype(np.float64) ** 2))) * 10)
        tags[1] = 0.9
        return tags
    return teacher


def test_window_embeddings_average_the_positions_of_the_chosen_window():
    emb = torch.arange(2 * 30 * 3, dtype=torch.float32).view(2, 30, 3)
    k = torch.tensor([0, 2])
    got = distill.window_embeddings(emb, k, positions=5, hop=10)
    assert torch.allclose(got[0], emb[0, 0:5].mean(0))
    assert torch.allclose(got[1], emb[1, 20:25].mean(0))


def test_teacher_segments_tag_the_audio_of_the_window_they_name():
    """Each example is the mixer's segment plus the teacher's tags of the 1 s of audio under window k."""
    mixer = augment.synth_mixer(cfg=augment.MixConfig(segment_windows=4, span_s=0.3))
    calls: list[np.ndarray] = []
    make = distill.TeacherSegments(mixer, _level_teacher(calls))
    for seed in range(4):
        [(x, y, m, tags, k)] = make(np.random.default_rng(seed))
        rng = np.random.default_rng(seed)  # the same mixture again, by hand
        mix, placed, end0 = mixer.mixture(rng)
        (x2, y2, _), ends = mixer.segment_of(mix, placed, end0, rng)
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert 0 <= int(k) < 4 and tags.shape == (distill.N_TAGS,) and tags.dtype == np.float32
        assert np.array_equal(calls[-1], window_audio(mix, int(ends[int(k)]), P))
        assert len(calls[-1]) == P.sample_rate  # one second


def test_training_with_a_teacher_fits_the_tag_head_and_skips_mined_segments():
    """train() with a Distillation: the head learns the teacher's tags (its loss falls on fresh
    segments); mined negatives, which carry no tags, weigh nothing in that loss."""
    mixer = augment.synth_mixer(cfg=augment.MixConfig(segment_windows=4, span_s=0.3))
    make = distill.TeacherSegments(mixer, _level_teacher([]))
    rec = np.random.default_rng(1).standard_normal(12 * P.sample_rate).astype(np.float32) * 0.05
    miner = mining.HardNegativeMiner(lambda rng: rec, P, segment_windows=4, stretch_s=10.0, min_score=0.0)
    head = distill.TagHead(TINY.embed_dim)
    positions = P.chunk_frames - TINY.receptive_frames + 1

    def tag_loss(model) -> float:
        batch = [make(np.random.default_rng(100 + i))[0] for i in range(8)]
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        tags = torch.from_numpy(np.stack([b[3] for b in batch]))
        k = torch.tensor([int(b[4]) for b in batch])
        with torch.no_grad():
            return float(distill.distill_loss(head.eval(), model.eval().embed(x), tags, k, torch.ones(8), positions,
                                              augment.WINDOW_HOP))

    torch.manual_seed(0)
    before = tag_loss(train.SoundEventCnn(TINY))
    cfg = train.TrainConfig(steps=40, batch_size=4, lr=1e-2, num_workers=0, threads=1, progress=False,
                            shuffle_buffer=0, mined_fraction=0.5, mine_every=5, mine_after=0.5)
    model, stats = train.train(make, TINY, cfg, P.chunk_frames, miner, distillation=distill.Distillation(head, 10.0))
    assert stats.steps == 40 and stats.mined_examples > 0
    assert tag_loss(model) < 0.75 * before

    emb = torch.randn(3, positions + 3 * augment.WINDOW_HOP, TINY.embed_dim)
    tags = torch.rand(3, distill.N_TAGS)
    k = torch.tensor([0, 1, 3])
    only_first = distill.distill_loss(head, emb[:1], tags[:1], k[:1], torch.ones(1), positions, augment.WINDOW_HOP)
    masked = distill.distill_loss(head, emb, tags, k, torch.tensor([1.0, 0.0, 0.0]), positions, augment.WINDOW_HOP)
    assert torch.allclose(only_first, masked)


def test_train_cli_refuses_a_bad_teacher_or_weight_in_one_line(tmp_path, capsys):
    """--distill needs mn04's weights: a missing or foreign file, or a weight out of range, is one line
    and exit status 2 before any data loads."""
    foreign = tmp_path / "foreign.pt"
    torch.save({"w": torch.zeros(3)}, foreign)
    for extra, needle in ((["--distill", "nan"], "--distill must be"), (["--distill", "-1"], "--distill must be"),
                          (["--distill", "5", "--pretrained", str(tmp_path / "missing.pt")], "--pretrained"),
                          (["--distill", "5", "--pretrained", str(foreign)], "not EfficientAT's mn04_as weights")):
        rc = train.main(["--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "m.pt"), "--steps", "1", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
