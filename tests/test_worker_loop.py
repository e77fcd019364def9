"""The worker's loop: a source is read once per hop and scored exactly as offline scoring does, and
per-hop work is done only for the taps that ask for it (hops, spectrogram columns)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from earshot.config import Config, SourceConfig
from earshot.features import FrontendParams, features
from earshot.offline import score_samples
from earshot.model import CnnDims
from earshot.model.checkpoint import LoadedModel
from earshot.model.cnn import SoundEventCnn
from earshot.service import Service

pytestmark = pytest.mark.timeout(120)
LABELS = ("alarm", "glass_break", "gunshot")


class NullPublisher:
    def publish(self, event):
        pass

    def stats(self):
        return {}

    def close(self, timeout_s=2.0):
        pass


class Recorder:
    """A tap that records what it is given; what it wants is set per test."""

    def __init__(self, wants_hops: bool, wants_mel: bool) -> None:
        self.wants_hops, self.wants_mel, self.wants_audio = wants_hops, wants_mel, False
        self.hops: list = []

    def on_audio(self, source, samples):
        raise AssertionError("wants_audio is False")

    def on_hop(self, source, hop):
        self.hops.append(hop)

    def on_event(self, event):
        return event


@pytest.fixture
def loaded():
    torch.manual_seed(0)
    dims = CnnDims(channels=(4, 4, 4, 4, 4), embed_dim=8)
    return LoadedModel(SoundEventCnn(dims).eval(), dims, LABELS, FrontendParams(), {k: 0.99 for k in LABELS}, {})


def _run(tmp_path, loaded, taps, seconds=3.05):
    audio = (np.random.default_rng(3).standard_normal(int(seconds * 16000)) * 0.05).astype(np.float32)
    wav = tmp_path / "noise.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")
    config = Config(sources=(SourceConfig(name="f", kind="file", path=str(wav), realtime=False),))
    svc = Service(config, loaded, NullPublisher(), taps=taps)
    svc.start()
    assert svc.supervise() == 0
    return audio, svc


def test_hops_equal_offline_scores_and_mel_only_when_wanted(tmp_path, loaded):
    """Every window end 1.0, 1.1, ... (and the end of the file) is scored once, with the offline scores;
    a tap that wants no spectrogram columns alone gets empty ones, and the hop lag and compute time are
    recorded."""
    plain = Recorder(wants_hops=True, wants_mel=False)
    audio, svc = _run(tmp_path, loaded, [plain])
    p = loaded.frontend
    ends, _ = loaded.score_windows(features(audio, p), p.chunk_frames, 10)
    times, scores, _ = score_samples(audio, loaded)  # the same, and the window that ends with the file
    assert len(times) == len(ends) + 1
    assert [round(h.t_end, 3) for h in plain.hops[:-1]] == [round(float(e) * p.frame_s + 0.015, 3) for e in ends]
    np.testing.assert_allclose([h.t_end for h in plain.hops], times, atol=1e-6)
    np.testing.assert_allclose(np.stack([h.scores for h in plain.hops]), scores, atol=1e-5)
    assert all(h.mel.size == 0 for h in plain.hops)
    stream = svc.streams[0]
    assert stream.hops == len(times) and stream.compute_s is not None and stream.lag_s >= 0

    wants = Recorder(wants_hops=True, wants_mel=True)
    _run(tmp_path, loaded, [Recorder(wants_hops=True, wants_mel=False), wants])
    assert len(wants.hops) == len(times) and all(h.mel.shape == (p.n_mels,) for h in wants.hops)


def test_taps_that_want_no_hops_are_not_called(tmp_path, loaded):
    """A tap whose wants_hops is False gets no on_hop call at all."""
    quiet = Recorder(wants_hops=False, wants_mel=False)
    _run(tmp_path, loaded, [quiet])
    assert quiet.hops == []


def test_push_many_equals_push_per_stream():
    """The worker's batched log-mel (one FFT for all streams) gives each stream the frames its own
    StreamingFeatures gives, block after block, whatever the block sizes (tails and level state)."""
    from earshot.features import StreamingFeatures, push_many

    p = FrontendParams()
    rng = np.random.default_rng(5)
    audio = [(rng.standard_normal(48000) * 0.1 * (i + 1)).astype(np.float32) for i in range(5)]
    single = [StreamingFeatures(p) for _ in audio]
    many = [StreamingFeatures(p) for _ in audio]
    pos = [0] * len(audio)
    for step in range(12):
        sizes = [int(rng.integers(0, 5000)) if step else 100 for _ in audio]  # 100: no frame yet
        blocks = [a[q:q + n] for a, q, n in zip(audio, pos, sizes)]
        pos = [q + n for q, n in zip(pos, sizes)]
        want = [f.push(b) for f, b in zip(single, blocks)]
        got = push_many(many, blocks)
        for w, g in zip(want, got):
            assert g.shape == w.shape and g.dtype == np.float32
            np.testing.assert_allclose(g, w, atol=1e-5)
    assert [f.frames_out for f in many] == [f.frames_out for f in single]


@pytest.mark.parametrize("n_sources", [1, 3])
def test_worker_wakes_about_once_per_hop_not_per_tick(tmp_path, loaded, n_sources):
    """A live source at real time: the worker sleeps until the next hop is due instead of looking
    every TICK_S (46 looks a second for 10 hops before). Three sources started together share their
    passes. Every hop is still scored."""
    from earshot.service import MAX_WAIT_S

    audio = (np.random.default_rng(4).standard_normal(16000 * 4) * 0.05).astype(np.float32)
    wav = tmp_path / "live.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")
    sources = tuple(SourceConfig(name=f"s{i}", kind="file", path=str(wav), realtime=True) for i in range(n_sources))
    svc = Service(Config(sources=sources), loaded, NullPublisher(), taps=[Recorder(wants_hops=False, wants_mel=False)])
    svc.start()
    steps = 0

    def count() -> None:
        nonlocal steps
        steps += 1

    svc.worker.on_step = count
    assert svc.supervise() == 0
    hops = sum(s.hops for s in svc.streams)
    assert hops >= n_sources * 30  # 4 s of audio, hops every 0.1 s from 1 s on, and the last one
    # At most two looks per hop period (the one that reads and, now and then, one that finds the
    # capture block not yet written), plus a look per MAX_WAIT_S while nothing is due.
    assert steps <= 2 * (hops / n_sources) + 4 / MAX_WAIT_S, (steps, hops)


def test_hops_per_pass_scores_two_hops_per_wake_with_the_same_scores(tmp_path, loaded):
    """[worker] hops_per_pass = 2: a live source is read when two hops are due and both are scored in
    one pass (about half the passes of one hop each), with the scores offline scoring gives."""
    from earshot.config import WorkerConfig

    audio = (np.random.default_rng(4).standard_normal(16000 * 4) * 0.05).astype(np.float32)
    wav = tmp_path / "live.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")
    config = Config(sources=(SourceConfig(name="s", kind="file", path=str(wav), realtime=True),),
                    worker=WorkerConfig(hops_per_pass=2))
    rec = Recorder(wants_hops=True, wants_mel=False)
    svc = Service(config, loaded, NullPublisher(), taps=[rec])
    svc.start()
    passes, pass_of_hop = 0, []

    def count() -> None:
        nonlocal passes
        passes += 1

    svc.worker.on_step = count
    rec.on_hop = lambda source, hop: (rec.hops.append(hop), pass_of_hop.append(passes))
    assert svc.supervise() == 0
    times, scores, _ = score_samples(audio, loaded)
    np.testing.assert_allclose([h.t_end for h in rec.hops], times, atol=1e-6)
    np.testing.assert_allclose(np.stack([h.scores for h in rec.hops]), scores, atol=1e-5)
    assert len(set(pass_of_hop)) <= 0.6 * len(rec.hops), (len(set(pass_of_hop)), len(rec.hops))
