"""Tests for the streaming CNN, its scorers and the checkpoint format (earshot.model)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nets import random_model as _random_model
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from earshot.features import FrontendParams
from earshot.model import CheckpointError, CnnDims, default_model_path, macs_per_frame
from earshot.model.checkpoint import load_checkpoint, save_checkpoint
from earshot.model.cnn import SoundEventCnn, StreamingScorer, score_windows

pytestmark = pytest.mark.timeout(120)

LABELS = ["alarm", "glass_break", "gunshot"]
THRESHOLDS = {"alarm": 0.5, "glass_break": 0.6, "gunshot": 0.4}
CHUNK, HOP = 100, 10
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> SoundEventCnn:
    return _random_model()


def _feats(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def _stream(scorer: StreamingScorer, feats: np.ndarray, sizes: list[int]) -> list[tuple[int, np.ndarray]]:
    out: list[tuple[int, np.ndarray]] = []
    pos = 0
    for n in sizes:
        if pos >= len(feats):
            break
        out += scorer.push(feats[pos : pos + n])
        pos += n
    if pos < len(feats):
        out += scorer.push(feats[pos:])
    return out


# ------------------------------------------------------------------------------------------
# Architecture


def test_dims_receptive_field_matches_probe() -> None:
    """CnnDims.receptive_frames R equals the empirical time receptive field of one embedding."""
    for dims in (CnnDims(), CnnDims(channels=(8, 8), freq_strides=(2, 1), time_kernels=(5, 3), dilations=(1, 3))):
        model = _random_model(dims=dims)
        r = dims.receptive_frames
        t = r + 20
        x = torch.zeros(1, t, dims.n_mels, requires_grad=True)
        emb = model.embed(x)
        assert emb.shape == (1, t - r + 1, dims.embed_dim)
        emb[0, 5].sum().backward()
        touched = torch.nonzero(x.grad[0].abs().sum(dim=1)).flatten()
        assert touched.min().item() == 5 and touched.max().item() == 5 + r - 1
    assert CnnDims().receptive_frames == 63


def test_macs_per_frame_in_budget() -> None:
    """The default network costs 200-300 k multiply-adds per frame (the CPU budget)."""
    macs = macs_per_frame(CnnDims())
    assert 200_000 <= macs <= 300_000
    # Hand count: convs 1*16*9*32 + 16*24*9*16 + 24*32*9*8 + 32*48*9*4 + 48*64*9*2, proj 128*64, heads 2*64*3.
    assert macs == 4608 + 55296 + 55296 + 55296 + 55296 + 8192 + 384


def test_forward_shapes_and_dropout_only_in_training(model: SoundEventCnn) -> None:
    """forward maps (B, T, n_mels) to (B, C); eval is deterministic, training uses dropout."""
    x = torch.from_numpy(_feats(2 * CHUNK).reshape(2, CHUNK, 64))
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        assert torch.equal(model(x), model(x))
        model.train()
        try:
            assert not torch.equal(model(x), model(x))
        finally:
            model.eval()


def test_dims_reject_bad_values() -> None:
    """Inconsistent or unknown dims are rejected with a clear error."""
    with pytest.raises(ValueError, match="same length"):
        CnnDims(channels=(8, 8), freq_strides=(2,), time_kernels=(3, 3), dilations=(1, 2))
    with pytest.raises(ValueError, match="unknown CnnDims"):
        CnnDims.from_dict({**CnnDims().to_dict(), "depth": 3})
    assert CnnDims.from_dict(CnnDims().to_dict()) == CnnDims()


# ------------------------------------------------------------------------------------------
# Streaming == offline == full window


def test_streaming_equals_full_window_network(model: SoundEventCnn) -> None:
    """StreamingScorer scores equal sigmoid(model(window)) on each full window computed directly."""
    feats = _feats(400, seed=1)
    out = _stream(StreamingScorer(model, CHUNK, HOP), feats, [7, 1, 33, 100, 2, 57, 200])
    ends = [e for e, _ in out]
    assert ends == list(range(CHUNK, 401, HOP))
    windows = torch.stack([torch.from_numpy(feats[e - CHUNK : e]) for e in ends])  # (N, CHUNK, 64)
    with torch.no_grad():
        full = torch.sigmoid(model(windows)).numpy()
    got = np.stack([s for _, s in out])
    assert got.std() > 0.01  # the scores vary, so the comparison means something
    np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    hop=st.sampled_from([1, 3, 10, 25]),
    sizes=st.lists(st.one_of(st.integers(1, 4), st.integers(1, 40), st.integers(100, 400)), min_size=1, max_size=40),
)
def test_streaming_equals_score_windows(model: SoundEventCnn, seed: int, hop: int, sizes: list[int]) -> None:
    """Streaming scores (any block sizes, blocks crossing several hops) equal score_windows (1e-5)."""
    feats = _feats(350, seed=seed)
    ends, scores = score_windows(model, feats, CHUNK, hop, segment_frames=64)
    out = _stream(StreamingScorer(model, CHUNK, hop), feats, sizes)
    assert [e for e, _ in out] == ends.tolist()
    assert ends.tolist() == list(range(CHUNK, 351, hop))
    np.testing.assert_allclose(np.stack([s for _, s in out]), scores, atol=1e-5, rtol=0)


def test_score_windows_segments_and_short_input(model: SoundEventCnn) -> None:
    """Segment size does not change score_windows; inputs shorter than a window give no rows."""
    feats = _feats(1000, seed=2)
    e1, s1 = score_windows(model, feats, CHUNK, HOP, segment_frames=50)
    e2, s2 = score_windows(model, feats, CHUNK, HOP, segment_frames=100_000)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(s1, s2, atol=1e-6, rtol=0)
    e, s = score_windows(model, feats[:99], CHUNK, HOP)
    assert e.shape == (0,) and s.shape == (0, 3)


def test_streaming_reset(model: SoundEventCnn) -> None:
    """After reset() the scorer behaves like a fresh one (no context leaks between streams)."""
    a, b = _feats(200, seed=3), _feats(200, seed=4)
    scorer = StreamingScorer(model, CHUNK, HOP)
    scorer.push(a)
    scorer.reset()
    assert scorer.frames_seen == 0
    got = scorer.push(b)
    fresh = StreamingScorer(model, CHUNK, HOP).push(b)
    assert [e for e, _ in got] == [e for e, _ in fresh]
    np.testing.assert_array_equal(np.stack([s for _, s in got]), np.stack([s for _, s in fresh]))


# ------------------------------------------------------------------------------------------
# Checkpoint


def _save(path: Path, model: SoundEventCnn, frontend: FrontendParams = FrontendParams()) -> None:
    save_checkpoint(path, model, LABELS, frontend, THRESHOLDS, {"data": "test", "epochs": 0})


def test_checkpoint_round_trip(model: SoundEventCnn, tmp_path: Path) -> None:
    """save/load keeps labels, thresholds, frontend, provenance, and gives identical scores."""
    path = tmp_path / "m.pt"
    _save(path, model)
    loaded = load_checkpoint(path, frontend=FrontendParams())
    assert loaded.labels == tuple(LABELS)
    assert loaded.thresholds == THRESHOLDS
    assert loaded.frontend == FrontendParams()
    assert loaded.provenance == {"data": "test", "epochs": 0}
    assert loaded.dims == model.dims and not loaded.model.training
    feats = _feats(300, seed=5)
    _, before = score_windows(model, feats, CHUNK, HOP)
    _, after = score_windows(loaded.model, feats, CHUNK, HOP)
    np.testing.assert_array_equal(before, after)


class _Exploit:
    """An object whose unpickling would create a directory (the marker of executed code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.marker),))


def test_refuses_pickle_that_executes_code(model: SoundEventCnn, tmp_path: Path) -> None:
    """A checkpoint whose pickle would run code is refused and the code never runs."""
    marker = tmp_path / "pwned"
    ckpt = {"format": "earshot-checkpoint", "version": 1, "payload": _Exploit(marker)}
    path = tmp_path / "evil.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="refusing to execute code"):
        load_checkpoint(path)
    assert not marker.exists()
    # Sanity: the payload really does execute code when unpickled without restrictions.
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()


def _tamper(src: Path, dst: Path, fn) -> Path:  # noqa: ANN001
    ckpt = torch.load(src, weights_only=True)
    fn(ckpt)
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["state_dict"].pop("frame_logits.bias"), r"missing keys \['frame_logits.bias'\]"),
        (lambda c: c["state_dict"].__setitem__("extra.weight", torch.zeros(1)), r"unexpected keys \['extra.weight'\]"),
        (lambda c: c["state_dict"].__setitem__("frame_logits.bias", torch.zeros(5)), "size mismatch"),
        (lambda c: c.__setitem__("format", "other"), "not an earshot checkpoint"),
        (lambda c: c.__setitem__("version", 2), "version 2"),
        (lambda c: c.pop("thresholds"), "missing keys"),
        (lambda c: c.__setitem__("labels", ["a", "b"]), "2 labels"),
        (lambda c: c["thresholds"].__setitem__("alarm", 1.5), r"\(0, 1\)"),
        (lambda c: c["thresholds"].pop("gunshot"), "missing \\['gunshot'\\]"),
        (lambda c: c["dims"].__setitem__("depth", 4), "unknown CnnDims"),
        (lambda c: c["frontend"].__setitem__("n_melz", 4), "unknown frontend"),
    ],
)
def test_refuses_tampered_checkpoint(model: SoundEventCnn, tmp_path: Path, change, message: str) -> None:  # noqa: ANN001
    """Any malformed checkpoint raises CheckpointError with a message naming the problem."""
    good = tmp_path / "good.pt"
    _save(good, model)
    bad = _tamper(good, tmp_path / "bad.pt", change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad)


def test_optional_sections_round_trip(model: SoundEventCnn, tmp_path: Path) -> None:
    """Named extra sections (e.g. a second-stage network) survive a round trip; a plain file has none.

    A checkpoint without sections does not even carry the key, so earshots that predate it read it.
    """
    plain = tmp_path / "plain.pt"
    _save(plain, model)
    assert "sections" not in torch.load(plain, weights_only=True)
    assert load_checkpoint(plain).sections == {}
    extra = {"confirm": {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "threshold": 0.5, "name": "x"}}
    rich = tmp_path / "rich.pt"
    save_checkpoint(rich, model, LABELS, FrontendParams(), THRESHOLDS, {}, sections=extra)
    got = load_checkpoint(rich).sections
    assert set(got) == {"confirm"} and got["confirm"]["threshold"] == 0.5
    assert torch.equal(got["confirm"]["state_dict"]["w"], extra["confirm"]["state_dict"]["w"])
    bad = _tamper(plain, tmp_path / "bad.pt", lambda c: c.__setitem__("sections", [1, 2]))
    with pytest.raises(CheckpointError, match="'sections' has type list"):
        load_checkpoint(bad)


def test_frontend_mismatch_names_every_parameter(model: SoundEventCnn, tmp_path: Path) -> None:
    """A runtime frontend that differs is refused, naming each differing parameter and both values."""
    path = tmp_path / "m.pt"
    _save(path, model)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, frontend=FrontendParams(n_mels=40, hop_length=320))
    msg = str(err.value)
    assert "checkpoint was trained with n_mels=64, runtime uses n_mels=40" in msg
    assert "hop_length=160" in msg and "hop_length=320" in msg
    assert "win_length" not in msg


def test_refuses_corrupt_truncated_and_missing(model: SoundEventCnn, tmp_path: Path) -> None:
    """Truncated, garbage and missing files each give one CheckpointError, not a traceback of internals."""
    good = tmp_path / "good.pt"
    _save(good, model)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 50)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    for path in (trunc, garbage, plain):
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_checkpoint(path)
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="model file not found: .*nope.pt; set \\[model\\] path"):
        load_checkpoint(missing)


def test_save_rejects_inconsistent_labels(model: SoundEventCnn, tmp_path: Path) -> None:
    """save_checkpoint validates what load_checkpoint would refuse, so bad files are never written."""
    with pytest.raises(CheckpointError, match="thresholds"):
        save_checkpoint(tmp_path / "x.pt", model, LABELS, FrontendParams(), {"alarm": 0.5}, {})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "x.pt", model, LABELS, FrontendParams(), THRESHOLDS, {"x": object()})
    assert not (tmp_path / "x.pt").exists()


def test_default_model_path() -> None:
    """The default path is <repo>/models/earshot.pt in a source checkout (the first candidate)."""
    path = default_model_path()
    assert path.name == "earshot.pt"
    if not (REPO / "models" / "earshot.pt").exists() and not path.exists():
        assert path == REPO / "models" / "earshot.pt"


# ------------------------------------------------------------------------------------------
# Benchmark smoke test


@pytest.mark.timeout(180)
def test_bench_quick_runs_all_contenders(tmp_path: Path) -> None:
    """tools/bench.py --quick runs and reports every contender, the daemon-like memory rows and the
    many-streams section (no timing assertions); the ONNX rows never import torch."""
    import importlib.util
    import json

    has_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench.py"), "--quick", "--streams", "1,3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr
    names = {"earshot", "recompute", "seed-recipe", "yamnet-arch"} | ({"earshot-onnx"} if has_onnx else set())
    for name in names:
        assert name in proc.stdout
    report = json.loads(out.read_text())
    rows = report["contenders"]
    assert {r["name"] for r in rows} == names
    for r in rows:
        assert r["cpu_s_per_audio_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["torch_imported"] == (r["name"] != "earshot-onnx")
    daemons = {r["name"]: r for r in report["daemons"]}
    assert daemons["daemon-torch"]["torch_imported"]
    if has_onnx:
        assert not daemons["daemon-onnx"]["torch_imported"]
    backends = ["torch", "onnx"] if has_onnx else ["torch"]
    assert [(r["backend"], r["streams"]) for r in report["streams"]] == [(b, n) for b in backends for n in (1, 3)]
    for r in report["streams"]:
        assert r["batched_pct_per_stream"] > 0 and r["independent_pct_per_stream"] > 0


def test_scorers_leave_training_mode_alone() -> None:
    """score_windows/StreamingScorer use eval semantics without flipping a training model to eval."""
    model = _random_model(seed=9).train()
    feats = _feats(150, seed=9)
    _, scores = score_windows(model, feats, CHUNK, HOP)
    StreamingScorer(model, CHUNK, HOP)
    assert model.training
    model.eval()
    _, again = score_windows(model, feats, CHUNK, HOP)
    np.testing.assert_array_equal(scores, again)
