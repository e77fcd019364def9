"""Bad model files get one clear line from the real CLI, never a traceback, and never run.

Each file is what a user ends up pointing `[model] path` (or `earshot export-onnx`) at by
mistake, or a damaged or tampered model: a recording, a text file, an empty file, a checkpoint
with absurd dims or NaN weights, an .onnx whose metadata disagrees with its graph. Each is run
through `earshot check-config` (which loads the model, so it refuses first), and a few through
`earshot detect` and `earshot export-onnx`, checking the exit code and the one line on stderr.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from nets import random_model

from earshot.detect import Detector, make_rules
from earshot.config import DetectConfig
from earshot.features import FrontendParams
from earshot.model import CheckpointError, CnnDims, load_model
from earshot.model.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["alarm", "glass_break", "gunshot"]
THRESHOLDS = {"alarm": 0.5, "glass_break": 0.6, "gunshot": 0.4}


def _earshot(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"))
    return subprocess.run([sys.executable, "-m", "earshot", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def _one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Assert exit `code` and exactly one stderr line starting 'earshot: ' holding every needle."""
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, result.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("earshot: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _config(tmp_path: Path, model: Path) -> Path:
    cfg = tmp_path / f"{model.name}.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n\n[[source]]\nname = "demo"\nkind = "demo"\n')
    return cfg


@pytest.fixture(scope="module")
def good_pt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.pt"
    save_checkpoint(path, random_model(), LABELS, FrontendParams(), THRESHOLDS, {"name": "random"})
    return path


@pytest.fixture(scope="module")
def wav(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "quiet.wav"
    sf.write(path, np.zeros(32000, np.float32), 16000)
    return path


def _tampered(good: Path, dst: Path, fn) -> Path:  # noqa: ANN001
    ckpt = torch.load(good, weights_only=True)
    fn(ckpt)
    torch.save(ckpt, dst)
    return dst


def _nan_weight(c: dict) -> None:
    c["state_dict"]["frame_logits.weight"][0, 0] = float("nan")


def _inf_weight(c: dict) -> None:
    c["state_dict"]["convs.2.0.weight"][0, 0, 0, 0] = float("inf")


def _negative_variance(c: dict) -> None:
    c["state_dict"]["input_norm.running_var"][3] = -1.0


def _huge_dims(c: dict) -> None:
    c["dims"]["channels"] = [16, 24, 32, 48, 1 << 30]


def _huge_model(c: dict) -> None:  # every value within its own bound, the whole far too big
    c["dims"].update(channels=[1024] * 5, embed_dim=4096, freq_strides=[1] * 5, n_mels=512)
    c["frontend"]["n_mels"] = 512


def _bad_pt_files(d: Path, good: Path, wav: Path) -> list[tuple[Path, tuple[str, ...]]]:
    """(file, pieces of the expected message) for every bad .pt case."""
    text = d / "notes.pt"
    text.write_text("[model]\npath = 'models/earshot.pt'\n")
    empty = d / "empty.pt"
    empty.write_bytes(b"")
    wav_pt = d / "recording.pt"
    wav_pt.write_bytes(wav.read_bytes())
    data = good.read_bytes()
    trunc = d / "truncated.pt"
    trunc.write_bytes(data[: len(data) // 2])
    return [
        (wav, ("is not an earshot checkpoint (it looks like a WAV file)",)),
        (wav_pt, ("is not an earshot checkpoint (it looks like a WAV file)",)),
        (text, ("is not an earshot checkpoint (it looks like a text file)",)),
        (empty, ("is empty",)),
        (trunc, ("is not a readable earshot checkpoint",)),
        (d, ("is a directory",)),
        (_tampered(good, d / "nan.pt", _nan_weight), ("frame_logits.weight", "NaN or infinite")),
        (_tampered(good, d / "inf.pt", _inf_weight), ("convs.2.0.weight", "NaN or infinite")),
        (_tampered(good, d / "negvar.pt", _negative_variance), ("input_norm.running_var", "negative")),
        (_tampered(good, d / "huge.pt", _huge_dims), ("CnnDims.channels", "at most")),
        (_tampered(good, d / "huge_model.pt", _huge_model), ("parameters", "at most")),
    ]


def test_bad_checkpoints_in_process(tmp_path, good_pt, wav) -> None:
    """load_model refuses each with one line naming the file (fast: no subprocess)."""
    for path, needles in _bad_pt_files(tmp_path, good_pt, wav):
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg, msg
        assert not msg.rstrip().endswith(":"), msg
        for needle in needles:
            assert needle in msg, (needle, msg)


def test_check_config_refuses_each_bad_checkpoint(tmp_path, good_pt, wav) -> None:
    """`earshot check-config` loads the model: each bad file is one line and exit 1, as `run` would give."""
    for path, needles in _bad_pt_files(tmp_path, good_pt, wav):
        _one_line(_earshot("check-config", str(_config(tmp_path, path))), 1, str(path), *needles)
    ok = _earshot("check-config", str(_config(tmp_path, good_pt)))
    assert ok.returncode == 0, ok.stderr
    assert "alarm, glass_break, gunshot" in ok.stdout


def test_detect_and_run_refuse_a_wav_as_model(tmp_path, wav) -> None:
    cfg = _config(tmp_path, wav)
    _one_line(_earshot("detect", "-c", str(cfg), str(wav)), 1, "is not an earshot checkpoint (it looks like a WAV file)")
    _one_line(_earshot("run", "-c", str(cfg)), 1, "is not an earshot checkpoint (it looks like a WAV file)")


def test_detect_refuses_nan_weights(tmp_path, good_pt, wav) -> None:
    """A checkpoint with NaN weights used to load and emit events with score 0.0."""
    nan = _tampered(good_pt, tmp_path / "nan.pt", _nan_weight)
    result = _earshot("detect", "-c", str(_config(tmp_path, nan)), str(wav))
    _one_line(result, 1, "NaN or infinite")
    assert result.stdout == ""


def test_nan_scores_never_pass_a_threshold() -> None:
    """Whatever a model outputs, a NaN score is below every threshold: no event starts, none is held open."""
    cfg = DetectConfig()
    det = Detector(LABELS, make_rules(LABELS, THRESHOLDS, cfg), source="s", node="n", hop_s=0.1, chunk_s=1.0,
                   to_wall=lambda t: t)
    events = []
    for k in range(50):
        events += det.update(1.0 + 0.1 * k, np.full(3, np.nan, np.float32))
    assert events == []
    # An event in progress ends when scores turn NaN (they are no evidence the sound goes on).
    for k in range(50, 60):
        events += det.update(1.0 + 0.1 * k, np.array([0.99, 0.0, 0.0], np.float32))
    assert [e.type for e in events] == ["start"]
    for k in range(60, 120):
        events += det.update(1.0 + 0.1 * k, np.full(3, np.nan, np.float32))
    assert [e.type for e in events] == ["start", "end"]
    assert all(math.isfinite(e.score) for e in events)


def test_export_onnx_refuses_bad_inputs_and_outputs(tmp_path, good_pt, wav) -> None:
    """`earshot export-onnx` on a wav, a text or an empty file, or into a missing folder: one line, exit 1, no file."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out.onnx"
    cases = {p.name: n for p, n in _bad_pt_files(tmp_path, good_pt, wav)}
    for name in ("quiet.wav", "notes.pt", "empty.pt", "nan.pt"):
        src = wav if name == "quiet.wav" else tmp_path / name
        _one_line(_earshot("export-onnx", str(src), str(out)), 1, str(src), *cases[name])
        assert not out.exists()
    missing = tmp_path / "no" / "such" / "folder" / "m.onnx"
    _one_line(_earshot("export-onnx", str(good_pt), str(missing)), 1, "folder", "does not exist")
    assert not (tmp_path / "no").exists()
    _one_line(_earshot("export-onnx", str(good_pt), str(tmp_path)), 1, "is a directory")
    _one_line(_earshot("export-onnx", str(good_pt), str(tmp_path / "m.pt")), 1, "must end in .onnx")
    assert not (tmp_path / "m.pt").exists()
    ok = _earshot("export-onnx", str(good_pt), str(out))
    assert ok.returncode == 0, ok.stderr
    assert load_model(out).labels == tuple(LABELS)


# ------------------------------------------------------------------------------------------
# ONNX files whose metadata disagrees with their graph (issue 15 item 9)


def _rewrite_meta(src: Path, dst: Path, fn) -> Path:  # noqa: ANN001
    import onnx

    from earshot.model.onnx import META_KEY

    proto = onnx.load(str(src))
    for prop in proto.metadata_props:
        if prop.key == META_KEY:
            meta = json.loads(prop.value)
            fn(meta)
            prop.value = json.dumps(meta)
    onnx.save(proto, str(dst))
    return dst


def _nan_initializer(src: Path, dst: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    for init in proto.graph.initializer:
        if init.name == "head_w":
            w = numpy_helper.to_array(init).copy()
            w[0, 0] = np.nan
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(dst))
    return dst


def _hidden_mismatch(src: Path, dst: Path) -> Path:
    """n_mels=40 by the metadata, the graph's declared sizes erased: ONNX Runtime's shape inference shows 64."""
    import onnx

    tmp = _rewrite_meta(src, dst, _n_mels_40)
    proto = onnx.load(str(tmp))
    for value in (*proto.graph.input, *proto.graph.output):
        for k, dim in enumerate(value.type.tensor_type.shape.dim):
            dim.ClearField("dim_value")
            dim.dim_param = f"{value.name}_{k}"
    onnx.save(proto, str(dst))
    return dst


def _n_mels_40(m: dict) -> None:
    m["dims"]["n_mels"] = 40
    m["frontend"]["n_mels"] = 40


def _four_classes(m: dict) -> None:
    m["dims"]["n_classes"] = 4
    m["labels"].append("dog")
    m["thresholds"]["dog"] = 0.5


def _wider_layer(m: dict) -> None:
    m["dims"]["channels"][1] = 20  # cache_2 is (B, 20, ...) by the metadata, (B, 24, ...) in the graph


def _longer_context(m: dict) -> None:
    m["dims"]["dilations"][4] = 32  # cache_4 keeps 64 columns by the metadata, 32 in the graph


@pytest.fixture(scope="module")
def good_onnx(good_pt, tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from earshot.model.onnx import export_onnx

    return export_onnx(load_checkpoint(good_pt), tmp_path_factory.mktemp("onnx") / "good.onnx")


def _bad_onnx_files(d: Path, good: Path, wav: Path, good_pt: Path) -> list[tuple[Path, tuple[str, ...]]]:
    wav_onnx = d / "recording.onnx"
    wav_onnx.write_bytes(wav.read_bytes())
    empty = d / "empty.onnx"
    empty.write_bytes(b"")
    pt_onnx = d / "checkpoint.onnx"
    pt_onnx.write_bytes(good_pt.read_bytes())
    return [
        (_rewrite_meta(good, d / "mels.onnx", _n_mels_40), ("input 'frames'", "n_mels=40")),
        (_rewrite_meta(good, d / "classes.onnx", _four_classes), ("output 'rows'", "4 classes")),
        (_rewrite_meta(good, d / "wider.onnx", _wider_layer), ("'cache_2'", "(batch, 24, 16, 8)", "(batch, 20, 16, 8)")),
        (_rewrite_meta(good, d / "context.onnx", _longer_context), ("'cache_4'", "(batch, 48, 4, 32)",
                                                                    "(batch, 48, 4, 64)")),
        (_hidden_mismatch(good, d / "hidden.onnx"), ("output 'cache_0_out'", "(batch, 1, 40, 2)")),
        (_nan_initializer(good, d / "nan.onnx"), ("NaN or infinite",)),
        (wav_onnx, ("is not an earshot ONNX model (it looks like a WAV file)",)),
        (empty, ("is empty",)),
        (pt_onnx, ("looks like a torch checkpoint",)),
    ]


def test_bad_onnx_files_in_process(tmp_path, good_onnx, good_pt, wav) -> None:
    for path, needles in _bad_onnx_files(tmp_path, good_onnx, wav, good_pt):
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg, msg
        for needle in needles:
            assert needle in msg, (needle, msg)


def test_check_config_refuses_each_bad_onnx(tmp_path, good_onnx, good_pt, wav) -> None:
    """Each used to load and then kill the worker at the first hop; now check-config refuses it, one line."""
    for path, needles in _bad_onnx_files(tmp_path, good_onnx, wav, good_pt):
        _one_line(_earshot("check-config", str(_config(tmp_path, path))), 1, str(path), *needles)
    ok = _earshot("check-config", str(_config(tmp_path, good_onnx)))
    assert ok.returncode == 0, ok.stderr


def test_detect_refuses_an_onnx_graph_that_disagrees(tmp_path, good_onnx, wav) -> None:
    bad = _rewrite_meta(good_onnx, tmp_path / "mels.onnx", _n_mels_40)
    result = _earshot("detect", "-c", str(_config(tmp_path, bad)), str(wav))
    _one_line(result, 1, "input 'frames'")
    assert result.stdout == ""


def test_dims_bounds_are_checked_before_building(good_pt) -> None:
    """CnnDims refuses absurd sizes itself (so no loader allocates them); the shipped sizes pass."""
    with pytest.raises(ValueError, match="CnnDims.n_mels must be at most"):
        CnnDims(n_mels=100_000)
    with pytest.raises(ValueError, match="parameters"):
        CnnDims(channels=(1024,) * 5, freq_strides=(1,) * 5, n_mels=512, embed_dim=4096)
    assert load_checkpoint(good_pt).dims == CnnDims()
