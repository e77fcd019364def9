"""The shipped model (models/earshot.pt): small enough, loadable by the daemon, and pinned by a golden test.

The golden test catches any change to the weights, the frontend or the scoring path that moves the
shipped model's scores: regenerate with `python tools/update_golden.py` only when the change is
intended (after retraining).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

import update_golden  # noqa: E402

from earshot.features import FrontendParams  # noqa: E402
from earshot.model.checkpoint import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.timeout(60)

MODEL = ROOT / "models" / "earshot.pt"
GOLDEN = ROOT / "tests" / "golden" / "shipped_scores.json"
MAX_BYTES = 5 * 1024 * 1024


ONNX = ROOT / "models" / "earshot.onnx"


@pytest.fixture(scope="module")
def shipped():
    assert MODEL.is_file(), f"{MODEL.relative_to(ROOT)} is missing: the daemon's default model ships with it"
    return load_checkpoint(MODEL, frontend=FrontendParams())


def test_shipped_model_is_small(shipped):
    """The package ships the weights: they must stay under 5 MB."""
    assert MODEL.stat().st_size < MAX_BYTES


def test_shipped_model_matches_the_runtime_and_says_where_it_came_from(shipped):
    """The daemon's default frontend loads it, the labels are the documented three, thresholds are
    calibrated probabilities, and the provenance records the data, commit and command."""
    assert shipped.labels == ("alarm", "glass_break", "gunshot")
    assert all(0.0 < t < 1.0 for t in shipped.thresholds.values())
    for key in ("git_commit", "data_index_sha256", "command", "seed", "steps", "examples_seen"):
        assert key in shipped.provenance, key


def test_shipped_model_scores_match_golden(shipped):
    """Scores on a fixed synthetic scene equal the pinned ones within 1e-4."""
    assert GOLDEN.is_file(), f"missing {GOLDEN.relative_to(ROOT)}: run python tools/update_golden.py"
    golden = json.loads(GOLDEN.read_text())
    assert golden["labels"] == list(shipped.labels)
    now = update_golden.compute(MODEL)
    assert now["times_s"] == golden["times_s"]
    diff = np.abs(np.array(now["scores"]) - np.array(golden["scores"]))
    assert diff.max() <= 1e-4, (
        f"shipped model scores moved by up to {diff.max():.2e}; if the model was retrained on purpose, "
        "run python tools/update_golden.py"
    )


def test_shipped_onnx_export_is_the_same_model(shipped):
    """models/earshot.onnx (for running without torch) is an export of models/earshot.pt: same labels,
    thresholds and frontend, and the same scores within 1e-4 on the golden input. Re-export with
    `earshot export-onnx models/earshot.pt models/earshot.onnx` after retraining."""
    pytest.importorskip("onnxruntime", reason="the ONNX backend is the optional 'onnx' extra")
    from earshot.model import load_model
    from earshot.offline import score_samples

    onnx = load_model(ONNX, frontend=FrontendParams())
    assert onnx.backend == "onnx"
    assert (onnx.labels, onnx.thresholds, onnx.frontend) == (shipped.labels, shipped.thresholds, shipped.frontend)
    audio = update_golden.golden_input(shipped.frontend.sample_rate)
    t_pt, s_pt, _ = score_samples(audio, shipped)
    t_onnx, s_onnx, _ = score_samples(audio, onnx)
    assert np.array_equal(t_pt, t_onnx)
    np.testing.assert_allclose(s_onnx, s_pt, atol=1e-4)
