"""Many streams, one worker: MultiStreamScorer equals independent StreamingScorers (earshot.model.cnn/scoring)."""

from __future__ import annotations

import numpy as np
import pytest
from nets import random_model as _random_model
import torch

from earshot.model.scoring import StepScorer, pool_scores
from earshot.features import FrontendParams
from earshot.model import CnnDims
from earshot.model.checkpoint import LoadedModel
from earshot.model.cnn import FoldedNet, MultiStreamScorer, SoundEventCnn, StreamingScorer, score_windows

pytestmark = pytest.mark.timeout(60)

CHUNK, HOP = 100, 10
LABELS = ("alarm", "glass_break", "gunshot")


SMALL = CnnDims(channels=(8, 12, 16, 16, 16), embed_dim=24)


@pytest.fixture(scope="module")
def model() -> SoundEventCnn:
    return _random_model(dims=SMALL)


def _assert_same(got: list[tuple[int, np.ndarray]], want: list[tuple[int, np.ndarray]]) -> None:
    assert [e for e, _ in got] == [e for e, _ in want]
    if want:
        np.testing.assert_allclose(np.stack([s for _, s in got]), np.stack([s for _, s in want]), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multistream_equals_independent_scorers(model: SoundEventCnn, seed: int) -> None:
    """Per stream, the batched scorer returns exactly the windows (ends) and scores (1e-5) of its own
    StreamingScorer, for random block sizes per stream, empty blocks and streams starting late."""
    rng = np.random.default_rng(seed)
    n_streams, total = 6, 420
    feats = [rng.standard_normal((total, 64)).astype(np.float32) for _ in range(n_streams)]
    multi = MultiStreamScorer(model, CHUNK, HOP, n_streams)
    singles = [StreamingScorer(model, CHUNK, HOP) for _ in range(n_streams)]
    got: list[list] = [[] for _ in range(n_streams)]
    want: list[list] = [[] for _ in range(n_streams)]
    pos = [0] * n_streams
    tick = 0
    while min(pos) < total:
        blocks = []
        for i in range(n_streams):
            # Stream i stays silent for its first i ticks; sizes mix shared (10) and odd ones.
            n = 0 if tick < i else int(rng.choice([0, 1, 7, 10, 10, 10, 10, 33, 120]))
            blocks.append(feats[i][pos[i]: pos[i] + n])
            pos[i] += len(blocks[-1])
        for i, res in enumerate(multi.push(blocks)):
            got[i] += res
            want[i] += singles[i].push(blocks[i])
        tick += 1
    for i in range(n_streams):
        assert len(want[i]) == 1 + (total - CHUNK) // HOP
        _assert_same(got[i], want[i])
    assert list(multi.frames_seen) == [total] * n_streams


def test_reset_one_stream(model: SoundEventCnn) -> None:
    """reset(i) makes stream i behave like a fresh scorer and leaves the other streams untouched."""
    rng = np.random.default_rng(5)
    a, b, c = (rng.standard_normal((150, 64)).astype(np.float32) for _ in range(3))
    multi = MultiStreamScorer(model, CHUNK, HOP, 2)
    multi.push([a, a])
    multi.reset(0)
    got = multi.push([b, c])
    _assert_same(got[0], StreamingScorer(model, CHUNK, HOP).push(b))
    ref = StreamingScorer(model, CHUNK, HOP)
    ref.push(a)
    _assert_same(got[1], ref.push(c))
    assert multi.frames_seen[0] == 150 and multi.frames_seen[1] == 300


def test_one_step_call_per_block_size(model: SoundEventCnn) -> None:
    """Streams pushing the same number of frames share one batched forward pass (the whole point)."""
    net = FoldedNet(model)
    calls: list[tuple[int, int]] = []

    def step(x, caches):  # noqa: ANN001, ANN202 - the real step, recording its batch shape
        calls.append((x.shape[0], x.shape[1]))
        return net.step(x, caches)

    scorer = StepScorer(step, model.dims, CHUNK, HOP, 5)
    z = np.zeros((0, 64), np.float32)
    blocks = [np.ones((10, 64), np.float32)] * 3 + [np.ones((4, 64), np.float32), z]
    scorer.push(blocks)
    assert sorted(calls) == [(1, 4), (3, 10)]


def test_offline_matches_multistream(model: SoundEventCnn) -> None:
    """The multi-stream live path and score_windows give the same scores for the same audio."""
    feats = np.random.default_rng(9).standard_normal((333, 64)).astype(np.float32)
    ends, scores = score_windows(model, feats, CHUNK, HOP)
    out = MultiStreamScorer(model, CHUNK, HOP, 1).push([feats])[0]
    assert [e for e, _ in out] == list(ends)
    np.testing.assert_allclose(np.stack([s for _, s in out]), scores, atol=1e-5)


def test_loaded_model_interface(model: SoundEventCnn) -> None:
    """LoadedModel offers the backend-neutral scorers, equal to the module-level ones."""
    loaded = LoadedModel(model, model.dims, LABELS, FrontendParams(), {k: 0.5 for k in LABELS}, {})
    feats = np.random.default_rng(3).standard_normal((250, 64)).astype(np.float32)
    assert loaded.backend == "torch"
    ends, scores = loaded.score_windows(feats, CHUNK, HOP)
    _assert_same(loaded.streaming_scorer(CHUNK, HOP).push(feats), list(zip(ends, scores)))
    _assert_same(loaded.multi_stream_scorer(CHUNK, HOP, 2).push([feats, feats[:0]])[0], list(zip(ends, scores)))


def test_bad_input(model: SoundEventCnn) -> None:
    """A wrong number of blocks, a wrong frame shape or zero streams is a clear ValueError."""
    multi = MultiStreamScorer(model, CHUNK, HOP, 2)
    with pytest.raises(ValueError, match="expected 2 frame blocks"):
        multi.push([np.zeros((3, 64), np.float32)])
    with pytest.raises(ValueError, match="stream 1"):
        multi.push([np.zeros((3, 64), np.float32), np.zeros((3, 40), np.float32)])
    with pytest.raises(ValueError, match="n_streams"):
        MultiStreamScorer(model, CHUNK, HOP, 0)


def test_pool_scores_matches_torch() -> None:
    """numpy attention pooling equals the model's torch pooling, including large attention logits."""
    from earshot.model.cnn import attention_pool

    rows = np.random.default_rng(2).standard_normal((4, 70, 6)).astype(np.float32) * 30
    want = torch.sigmoid(attention_pool(torch.from_numpy(rows[..., :3]), torch.from_numpy(rows[..., 3:]))).numpy()
    np.testing.assert_allclose(pool_scores(rows, 3), want, atol=1e-6)


def test_backend_modules_do_not_import_torch() -> None:
    """earshot.model (spec, scoring, onnx) and earshot.analyzer import without torch (ONNX-only daemons)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, earshot.model, earshot.model.scoring, earshot.model.spec, earshot.model.onnx, earshot.analyzer; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "daemon"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
