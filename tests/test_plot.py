"""`earshot plot`: the figure shows exactly the hops and detections the daemon's analyzer computes, and
the command writes a readable image."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("matplotlib", reason="plotting is the optional extra earshot[plot]")

from earshot import synth  # noqa: E402
from earshot.config import DetectConfig  # noqa: E402
from earshot.offline import score_samples  # noqa: E402
from earshot.plot import PANEL_TITLES, analyse, figure  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def scene():
    """8 s of generated background with a gunshot (1.2 s) and a glass break (5.4 s)."""
    return synth.scene(duration_s=8.0, seed=0)


def test_figure_has_the_panels_curves_thresholds_and_spans(scene, tiny_model):
    """Five titled panels; one score curve per class equal to the daemon's per-hop scores; one dashed
    threshold line per class at its threshold; one shaded span per detection on the score panel."""
    audio, _truth = scene
    detect = DetectConfig(thresholds={"gunshot": 0.55})
    analysis = analyse(audio, tiny_model, detect)
    fig = figure(analysis, title="scene.wav")
    axes = fig.get_axes()
    assert [ax.get_title(loc="left") for ax in axes] == list(PANEL_TITLES)
    assert "scene.wav" in fig._suptitle.get_text()

    score_ax = axes[3]
    # Legend entries read "label (threshold 0.55)": the curve's name, then its threshold.
    curves = {line.get_label().split(" (")[0]: line for line in score_ax.get_lines()
              if not line.get_label().startswith("_")}
    assert sorted(curves) == sorted(tiny_model.labels)
    times, scores, _levels = score_samples(audio, tiny_model)
    for i, label in enumerate(tiny_model.labels):
        x, y = curves[label].get_data()
        np.testing.assert_allclose(x, times, atol=1e-9)
        gated = np.array([h.scores[i] for h in analysis.hops])
        np.testing.assert_allclose(y, gated, atol=1e-6)
        # Above the level gate, the plotted score is the offline score (nothing is re-computed differently).
        loud = np.array([h.level_dbfs for h in analysis.hops]) >= detect.min_level_dbfs
        np.testing.assert_allclose(y[loud], scores[loud, i], atol=1e-5)
    dashed = sorted(round(float(line.get_ydata()[0]), 4) for line in score_ax.get_lines() if line.get_linestyle() == "--")
    assert dashed == sorted(round(t, 4) for t in analysis.thresholds.values())
    assert analysis.thresholds["gunshot"] == pytest.approx(0.55)

    starts = [e for e in analysis.events if e.type == "start"]
    assert starts, "the tiny model detects the scene's gunshot and glass break"
    spans = [p for p in score_ax.patches]
    assert len(spans) == len(starts)
    det_ax = axes[4]
    assert len(det_ax.patches) == len(starts)
    assert det_ax.get_xlim()[1] == pytest.approx(len(audio) / 16000)


def test_plot_command_writes_a_png(tmp_path, scene, tiny_checkpoint):
    """`earshot plot FILE -o out.png` exits 0, reports the detections, and writes a non-empty PNG of the
    figure's size (12x10 in at the requested dpi) that is not blank."""
    import matplotlib.image as mpimg

    audio, _ = scene
    wav = tmp_path / "scene.wav"
    sf.write(wav, audio, 16000, subtype="PCM_16")
    cfg = tmp_path / "earshot.toml"
    cfg.write_text(f'[model]\npath = "{tiny_checkpoint}"\n')
    out = tmp_path / "out.png"
    result = subprocess.run([sys.executable, "-m", "earshot", "plot", "-c", str(cfg), str(wav), "-o", str(out),
                             "--dpi", "50"], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "detection(s)" in result.stdout
    assert out.stat().st_size > 10_000
    image = mpimg.imread(out)
    assert image.shape[:2] == (500, 600)
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_command_reports_an_unreadable_file(tmp_path, tiny_checkpoint):
    """A missing input is one line on stderr and exit code 1, not a traceback."""
    cfg = tmp_path / "earshot.toml"
    cfg.write_text(f'[model]\npath = "{tiny_checkpoint}"\n')
    result = subprocess.run([sys.executable, "-m", "earshot", "plot", "-c", str(cfg), str(tmp_path / "nope.wav"),
                             "-o", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "nope.wav" in result.stderr
    assert not (tmp_path / "x.png").exists()
