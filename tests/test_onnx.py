"""ONNX Runtime backend: exported from the same checkpoint, equal scores, loads without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nets import random_model as _random_model

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install onnxruntime onnx)")
pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install onnxruntime onnx)")

from earshot.analyzer import StreamAnalyzer  # noqa: E402
from earshot.config import DetectConfig, FrontendConfig  # noqa: E402
from earshot.features import FrontendParams, features  # noqa: E402
from earshot.model import CheckpointError, load_model  # noqa: E402
from earshot.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from earshot.model.onnx import META_KEY, OnnxModel, export_onnx, load_onnx, main  # noqa: E402
from earshot.synth import scene  # noqa: E402

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
LABELS = ["alarm", "glass_break", "gunshot"]
THRESHOLDS = {"alarm": 0.5, "glass_break": 0.6, "gunshot": 0.4}
CHUNK, HOP = 100, 10


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint with random weights and its ONNX export."""
    d = tmp_path_factory.mktemp("onnx")
    pt = d / "m.pt"
    save_checkpoint(pt, _random_model(), LABELS, FrontendParams(), THRESHOLDS, {"name": "random", "seed": 0})
    onnx_path = export_onnx(load_checkpoint(pt), d / "m.onnx")
    return pt, onnx_path


def _feats(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def test_offline_scores_equal_torch(files) -> None:
    """score_windows through ONNX Runtime equals the torch backend (same ends, scores within 1e-4)."""
    torch_m, onnx_m = load_model(files[0]), load_model(files[1])
    assert (torch_m.backend, onnx_m.backend) == ("torch", "onnx")
    feats = _feats(5000)  # longer than one 4096-frame segment: caches carried across segments
    e1, s1 = torch_m.score_windows(feats, CHUNK, HOP)
    e2, s2 = onnx_m.score_windows(feats, CHUNK, HOP)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_allclose(s2, s1, atol=1e-4)
    assert s1.std() > 0.05  # the scores vary, so equality means something


@pytest.mark.parametrize("sizes", [[10] * 40, [1, 7, 33, 100, 2, 57, 200, 3]])
def test_streaming_scores_equal_torch(files, sizes) -> None:
    """The ONNX streaming scorer emits the same windows as torch's StreamingScorer, scores within 1e-4."""
    torch_m, onnx_m = load_checkpoint(files[0]), load_onnx(files[1])
    feats = _feats(sum(sizes), seed=1)
    a, b = onnx_m.streaming_scorer(CHUNK, HOP), torch_m.streaming_scorer(CHUNK, HOP)
    got, want, pos = [], [], 0
    for n in sizes:
        got += a.push(feats[pos: pos + n])
        want += b.push(feats[pos: pos + n])
        pos += n
    assert [e for e, _ in got] == [e for e, _ in want] and len(want) >= 20
    np.testing.assert_allclose(np.stack([s for _, s in got]), np.stack([s for _, s in want]), atol=1e-4)


def test_multistream_onnx_equals_torch_singles(files) -> None:
    """ONNX multi-stream scoring (batched) equals one torch StreamingScorer per stream."""
    torch_m, onnx_m = load_checkpoint(files[0]), load_onnx(files[1])
    rng = np.random.default_rng(4)
    feats = [_feats(300, seed=10 + i) for i in range(4)]
    multi = onnx_m.multi_stream_scorer(CHUNK, HOP, 4)
    singles = [torch_m.streaming_scorer(CHUNK, HOP) for _ in range(4)]
    got, want, pos = [[] for _ in feats], [[] for _ in feats], [0] * 4
    while min(pos) < 300:
        blocks = []
        for i in range(4):
            n = int(rng.choice([0, 10, 10, 10, 3, 25]))
            blocks.append(feats[i][pos[i]: pos[i] + n])
            pos[i] += len(blocks[-1])
        for i, res in enumerate(multi.push(blocks)):
            got[i] += res
            want[i] += singles[i].push(blocks[i])
    for g, w in zip(got, want):
        assert [e for e, _ in g] == [e for e, _ in w]
        np.testing.assert_allclose(np.stack([s for _, s in g]), np.stack([s for _, s in w]), atol=1e-4)


def test_metadata_round_trip(files) -> None:
    """Labels, thresholds, frontend, dims and provenance come back from the .onnx file alone."""
    ref, m = load_checkpoint(files[0]), load_onnx(files[1], frontend=FrontendParams())
    assert isinstance(m, OnnxModel)
    assert (m.labels, m.thresholds, m.frontend, m.dims, m.provenance) == (
        ref.labels, ref.thresholds, ref.frontend, ref.dims, ref.provenance)


def test_onnx_load_does_not_import_torch(files) -> None:
    """Loading an .onnx model and running the live analyzer on it never imports torch (the RSS saving)."""
    code = (
        "import sys, numpy as np\n"
        "from earshot.model import load_model\n"
        "from earshot.analyzer import StreamAnalyzer\n"
        "from earshot.config import DetectConfig, FrontendConfig\n"
        f"m = load_model({str(files[1])!r})\n"
        "a = StreamAnalyzer(m, FrontendConfig(), DetectConfig(), source='s', node='n', to_wall=lambda t: t)\n"
        "a.push(np.zeros(32000, np.float32)); assert a.frames_out > 100\n"
        "print('torch' in sys.modules, m.backend)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "daemon"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "onnx"]


def test_live_analyzer_events_equal_torch(files) -> None:
    """StreamAnalyzer on the ONNX model gives the same hops and events as on the torch model."""
    audio, _ = scene(duration_s=10.0, seed=2)
    torch_m, onnx_m = load_model(files[0]), load_model(files[1])
    med = float(np.median(torch_m.score_windows(features(audio, FrontendParams()), CHUNK, HOP)[1]))
    detect = DetectConfig(thresholds={k: med for k in LABELS}, confirm_hops=1, min_level_dbfs=-60)

    def run(m):  # noqa: ANN001, ANN202
        hops: list = []
        a = StreamAnalyzer(m, FrontendConfig(), detect, source="s", node="n", to_wall=lambda t: t,
                           on_hop=hops.append)
        events = [e for i in range(0, len(audio), 1600) for e in a.push(audio[i: i + 1600])] + a.finish()
        return np.stack([h.scores for h in hops]), [(e.type, e.label, e.onset, e.offset) for e in events]

    (s1, e1), (s2, e2) = run(torch_m), run(onnx_m)
    np.testing.assert_allclose(s2, s1, atol=1e-4)
    assert e1 == e2 and len(e1) >= 2


def test_bad_onnx_files(files, tmp_path) -> None:
    """Corrupt files, foreign ONNX models and frontend mismatches fail with one clear CheckpointError."""
    import onnx

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(files[1].read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_model(bad)
    proto = onnx.load(str(files[1]))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    with pytest.raises(CheckpointError, match="not an earshot ONNX model"):
        load_model(foreign)
    proto = onnx.load(str(files[1]))
    meta = json.loads(proto.metadata_props[0].value)
    meta["thresholds"] = {"alarm": 0.5}
    onnx.helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    wrong = tmp_path / "wrong.onnx"
    onnx.save(proto, str(wrong))
    with pytest.raises(CheckpointError, match="thresholds must cover exactly the labels"):
        load_model(wrong)
    with pytest.raises(CheckpointError, match="n_mels=64, runtime uses n_mels=40"):
        load_model(files[1], frontend=FrontendParams(n_mels=40))
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.onnx")


def test_export_cli(files, tmp_path, capsys) -> None:
    """`earshot export-onnx in.pt out.onnx` (its main) exports a loadable model; a bad input exits 1."""
    out = tmp_path / "cli.onnx"
    assert main([str(files[0]), str(out)]) == 0
    assert load_onnx(out).labels == tuple(LABELS)
    assert main([str(tmp_path / "nope.pt"), str(tmp_path / "x.onnx")]) == 1
    assert "model file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
