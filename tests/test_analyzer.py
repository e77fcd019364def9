"""The live analyzer and the file analyzer produce the same hops and events for any block size."""

import numpy as np
import pytest
import torch

from earshot.analyzer import BatchAnalyzer, StreamAnalyzer, level_dbfs
from earshot.config import DetectConfig, FrontendConfig
from earshot.features import FrontendParams
from earshot.model import CnnDims
from earshot.model.checkpoint import LoadedModel
from earshot.model.cnn import SoundEventCnn
from earshot.synth import scene

pytestmark = pytest.mark.timeout(120)
LABELS = ("alarm", "glass_break", "gunshot")


@pytest.fixture(scope="module")
def random_model() -> LoadedModel:
    torch.manual_seed(0)
    dims = CnnDims(channels=(4, 8, 8, 8, 8), embed_dim=16)
    model = SoundEventCnn(dims).eval()
    return LoadedModel(model, dims, LABELS, FrontendParams(), {k: 0.5 for k in LABELS}, {})


def _run(cls, loaded, audio, blocks, detect):
    hops = []
    analyzer = cls(loaded, FrontendConfig(), detect, source="s", node="n", to_wall=lambda t: t, on_hop=hops.append)
    events, i = [], 0
    for size in blocks:
        events += analyzer.push(audio[i:i + size])
        i += size
    events += analyzer.push(audio[i:])
    events += analyzer.finish()
    return hops, events


def _strip(events):
    return [(e.type, e.label, e.onset, e.offset, e.score) for e in events]


def test_stream_equals_batch(random_model):
    """Hop times, scores, levels and events match between 20 ms live blocks and 7 s file blocks."""
    audio, _ = scene(duration_s=12.0, seed=3)
    # Random weights score near 0.5: a threshold in the middle of their range makes events happen.
    t = float(np.median(_run(BatchAnalyzer, random_model, audio, [], DetectConfig())[0][5].scores))
    detect = DetectConfig(thresholds={k: t for k in LABELS}, confirm_hops=1, min_level_dbfs=-60)
    live_hops, live_events = _run(StreamAnalyzer, random_model, audio, [320] * 600, detect)
    file_hops, file_events = _run(BatchAnalyzer, random_model, audio, [7 * 16000] * 2, detect)
    frames = 1 + (len(audio) - 400) // 160
    # Windows every 10 frames from frame 100, plus one ending at the last frame for the partial hop.
    assert len(live_hops) == len(file_hops) == 1 + (frames - 100) // 10 + (1 if (frames - 100) % 10 else 0)
    assert live_hops[-1].t_end == pytest.approx(((frames - 1) * 160 + 400) / 16000)
    assert [h.t_end for h in live_hops] == pytest.approx([h.t_end for h in file_hops])
    np.testing.assert_allclose(np.stack([h.scores for h in live_hops]), np.stack([h.scores for h in file_hops]),
                               atol=1e-5)
    assert [h.level_dbfs for h in live_hops] == pytest.approx([h.level_dbfs for h in file_hops], abs=1e-4)
    assert _strip(live_events) == _strip(file_events)
    assert len(live_events) >= 2


def test_odd_block_sizes(random_model):
    """Blocks of 1 sample, a prime size and several seconds give the stream the same hops."""
    audio, _ = scene(duration_s=4.0, seed=1)
    ref, _ = _run(StreamAnalyzer, random_model, audio, [16000], DetectConfig())
    rng = np.random.default_rng(0)
    blocks = [1] * 50 + [997] * 20 + list(rng.integers(1, 5000, size=10))
    got, _ = _run(StreamAnalyzer, random_model, audio, blocks, DetectConfig())
    assert [h.t_end for h in got] == pytest.approx([h.t_end for h in ref])
    np.testing.assert_allclose(np.stack([h.scores for h in got]), np.stack([h.scores for h in ref]), atol=1e-5)


def test_first_hop_and_timing(random_model):
    """The first window ends after chunk_size (plus the frame tail); hops are chunk_hop apart."""
    hops, _ = _run(StreamAnalyzer, random_model, np.zeros(3 * 16000, np.float32), [16000] * 3, DetectConfig())
    assert hops[0].t_end == pytest.approx((99 * 160 + 400) / 16000)
    assert np.diff([h.t_end for h in hops[:-1]]) == pytest.approx(0.1)
    assert hops[-1].t_end == pytest.approx((297 * 160 + 400) / 16000)  # the last partial hop, scored by `finish`


def test_silence_is_gated(random_model):
    """Digital silence scores zero and reports the silence floor, so it cannot raise an event."""
    hops, events = _run(StreamAnalyzer, random_model, np.zeros(2 * 16000, np.float32), [], DetectConfig())
    assert all(not h.scores.any() for h in hops) and events == []
    assert hops[0].level_dbfs == -120.0
    assert level_dbfs(np.full(100, 0.5, np.float32)) == pytest.approx(-6.02, abs=0.01)


def test_non_finite_samples_do_not_poison(random_model):
    """NaN/inf samples (a broken file or driver) count as silence: scores stay finite, before and after."""
    audio, _ = scene(duration_s=4.0, seed=2)
    bad = audio.copy()
    bad[20000:20100] = np.nan
    bad[30000] = np.inf
    for cls in (StreamAnalyzer, BatchAnalyzer):
        hops, _ = _run(cls, random_model, bad, [1600] * 40, DetectConfig())
        assert np.isfinite(np.stack([h.scores for h in hops])).all()
        assert all(np.isfinite(h.level_dbfs) for h in hops)
