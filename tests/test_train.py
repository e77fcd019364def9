"""Training pipeline: split by group, active regions, window labels, event metrics, CLI smoke runs.

Everything here runs on generated audio (earshot.synth) written to a temporary data folder laid out
like the real one, so the suite never needs /work/shared.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

import augment  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402

from earshot import synth  # noqa: E402
from earshot.features import FrontendParams  # noqa: E402
from earshot.model import CnnDims  # noqa: E402
from earshot.model.checkpoint import load_checkpoint  # noqa: E402
from earshot.model.cnn import SoundEventCnn  # noqa: E402
from earshot.offline import detect_samples  # noqa: E402

pytestmark = pytest.mark.timeout(240)

SR = 16000


# ---------------------------------------------------------------------------
# A small data folder laid out like the real one


def _write_folder(root: Path, groups_per_label: int = 5, files_per_group: int = 2) -> Path:
    """index.csv + FLAC files of synthetic sounds; two sources per label, several files per group."""
    rng = np.random.default_rng(7)
    makers = {
        "alarm": lambda: synth.t3_alarm(SR, 2.5, rng),
        "gunshot": lambda: synth.gunshot(SR, rng),
        "glass_break": lambda: synth.glass_break(SR, rng),
        "negative": lambda: synth.background(SR, 4.0, rng),
    }
    rows = []
    for label, make in makers.items():
        for g in range(groups_per_label):
            source = f"src{g % 2}/{label}"
            group = f"{label}-g{g}"
            for f in range(files_per_group):
                x = make()
                if label != "negative":  # an isolated event with some background, as the real clips
                    x = np.concatenate([np.zeros(SR // 4, np.float32), x, np.zeros(SR // 4, np.float32)])
                    x = x + synth.background(SR, len(x) / SR, rng)[: len(x)] * 0.1
                rel = f"audio/{label}/{group}_{f}.flac"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / rel, np.clip(x, -1, 1), SR, subtype="PCM_16")
                rows.append({"path": rel, "label": label, "kind": "synth", "source": source, "group": group,
                             "freesound_id": "", "duration_s": f"{len(x) / SR:.3f}", "license": "generated"})
    with (root / "index.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------------
# Split


def test_split_keeps_groups_whole_and_covers_every_label_and_source(data_folder):
    """No group has files in both train and validation (near-copies would inflate validation), every
    label and every (label, source) with two or more groups is in validation, and the split is
    deterministic."""
    clips = data.read_index(data_folder)
    tr, va = data.split(clips)
    assert {c.group for c in tr}.isdisjoint({c.group for c in va})
    assert len(tr) + len(va) == len(clips)
    for label in (*data.EVENT_LABELS, data.NEGATIVE):
        assert any(c.label == label for c in va), label
        assert any(c.label == label for c in tr), label
        for source in {c.source for c in clips if c.label == label}:
            assert any(c.label == label and c.source == source for c in va), (label, source)
    assert data.split(data.read_index(data_folder)) == (tr, va)


def test_split_is_stable_when_unrelated_groups_are_added(data_folder):
    """A group's side depends only on its own name and its stratum, not on file order: shuffling the
    index gives the same validation groups."""
    clips = data.read_index(data_folder)
    shuffled = [clips[i] for i in np.random.default_rng(0).permutation(len(clips))]
    assert data.validation_groups(shuffled) == data.validation_groups(clips)


def test_read_index_errors_are_one_line(tmp_path):
    """A missing index or column is a DataError naming the problem, not a traceback from csv."""
    with pytest.raises(data.DataError, match="no index.csv"):
        data.read_index(tmp_path)
    (tmp_path / "index.csv").write_text("path,label\nx.flac,alarm\n")
    with pytest.raises(data.DataError, match="missing column"):
        data.read_index(tmp_path)


# ---------------------------------------------------------------------------
# Active regions and window labels


def test_active_region_finds_the_burst_in_a_quiet_clip():
    """The energy envelope locates an event inside a weakly labelled clip to within ~50 ms."""
    rng = np.random.default_rng(0)
    x = 0.001 * rng.standard_normal(3 * SR).astype(np.float32)
    x[int(1.2 * SR) : int(1.5 * SR)] += 0.5 * rng.standard_normal(int(0.3 * SR)).astype(np.float32)
    start, end = data.active_region(x)
    assert abs(start - 1.2) <= 0.05 and abs(end - 1.5) <= 0.05


def test_active_region_of_a_steady_sound_is_the_whole_clip():
    """A sound with no quiet part (a siren recorded close up) is active from start to end."""
    t = np.arange(2 * SR) / SR
    x = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    assert data.active_region(x) == (0.0, 2.0)


def _mixer() -> augment.Mixer:
    return augment.synth_mixer()


def test_window_labels_follow_overlap_rules():
    """Positive once >= 100 ms of the event is in the window; a 30 ms sliver of a leaving event is a
    negative (clean offsets); a sliver that has only just entered is ignored (mask 0)."""
    m = _mixer()
    chunk = m.p.chunk_frames
    active = np.ones(50, dtype=bool)  # a 0.5 s event
    ev = augment._Placed(cls=2, hop0=1000, active=active)
    # Window ends 15 hops after the onset: 150 ms inside -> positive.
    y, k = m.label_window([ev], 1015)
    assert y.tolist() == [0, 0, 1] and k.tolist() == [1, 1, 1]
    # Window ends 3 hops after the onset: 30 ms of a sound still coming -> ignored for that class.
    y, k = m.label_window([ev], 1003)
    assert y[2] == 0 and k[2] == 0 and k[0] == 1
    # Window starts 47 hops into the event: 30 ms left of a sound that is leaving -> negative.
    y, k = m.label_window([ev], 1047 + chunk)
    assert y[2] == 0 and k[2] == 1
    # Event long gone -> negative; distractors never label anything.
    y, k = m.label_window([ev, augment._Placed(-1, 2000, active)], 2000 + chunk)
    assert y.tolist() == [0, 0, 0] and k.tolist() == [1, 1, 1]
    # A 40 ms event entirely inside is positive (half of a short event suffices).
    short = augment._Placed(cls=0, hop0=1000, active=np.ones(4, dtype=bool))
    y, _ = m.label_window([short], 1050)
    assert y[0] == 1


def test_mixer_examples_have_window_shape_and_some_of_every_class():
    """Examples are (chunk_frames, n_mels) float32 windows with 0/1 targets; a few dozen mixtures
    contain positives of every class and pure negatives."""
    m = _mixer()
    rng = np.random.default_rng(3)
    ex = [e for _ in range(40) for e in m.examples(rng)]
    p = FrontendParams()
    assert all(x.shape == (p.chunk_frames, p.n_mels) and x.dtype == np.float32 for x, _, _ in ex)
    assert all(y.shape == (1, 3) and k.shape == (1, 3) for _, y, k in ex)
    y = np.stack([e[1][0] for e in ex])
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert (y.sum(axis=0) > 0).all()
    assert (y.sum(axis=1) == 0).sum() > len(ex) // 4
    assert all(np.isfinite(x).all() for x, _, _ in ex)


def test_segments_label_every_window_of_the_span():
    """A segment holds `segment_windows` windows every WINDOW_HOP frames; its targets are exactly the
    per-window labels of those window ends, and a few dozen segments cover every class."""
    m = _mixer()
    p, w = FrontendParams(), m.cfg.segment_windows
    rng = np.random.default_rng(4)
    segs = [e for _ in range(30) for e in m.segments(rng)]
    assert all(x.shape == (p.chunk_frames + (w - 1) * augment.WINDOW_HOP, p.n_mels) and x.dtype == np.float32
               for x, _, _ in segs)
    assert all(y.shape == (w, 3) and k.shape == (w, 3) for _, y, k in segs)
    y = np.concatenate([s[1] for s in segs])
    assert (y.sum(axis=0) > 0).all() and (y.sum(axis=1) == 0).any()
    # Within one segment an event enters or leaves: targets change along the windows somewhere.
    assert any((s[1][1:] != s[1][:-1]).any() for s in segs)


def test_window_logits_of_a_segment_equal_the_model_on_each_window():
    """Training pools each window of a segment from shared frame embeddings; in eval mode that is the
    same as running the model on every window cut out separately (what the daemon scores)."""
    torch.manual_seed(0)
    model = SoundEventCnn(CnnDims(channels=(4, 6, 8, 8, 8), embed_dim=12)).eval()
    chunk, hop, w = 100, augment.WINDOW_HOP, 6
    x = torch.randn(2, chunk + (w - 1) * hop, 64)
    with torch.no_grad():
        got = train.window_logits(model, x, chunk, hop)
        want = torch.stack([model(x[:, i * hop : i * hop + chunk]) for i in range(w)], dim=1)
    assert got.shape == (2, w, 3)
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError):
        train.window_logits(model, x[:, :-3], chunk, hop)


def test_weight_average_moves_towards_the_model_and_copies_counters():
    """update_average: averaged <- d * averaged + (1 - d) * model for weights and BatchNorm statistics;
    integer counters are copied."""
    torch.manual_seed(0)
    dims = CnnDims(channels=(4, 4), freq_strides=(2, 2), time_kernels=(3, 3), dilations=(1, 2), embed_dim=8)
    model, averaged = SoundEventCnn(dims), SoundEventCnn(dims)
    with torch.no_grad():
        model.input_norm.running_mean.fill_(1.0)
        model.input_norm.num_batches_tracked.fill_(7)
    before = [p.detach().clone() for p in averaged.parameters()]
    train.update_average(averaged, model, 0.75)
    for a, b, m in zip(averaged.parameters(), before, model.parameters()):
        assert torch.allclose(a, 0.75 * b + 0.25 * m)
    assert torch.allclose(averaged.input_norm.running_mean, torch.full((64,), 0.25))
    assert int(averaged.input_norm.num_batches_tracked) == 7


def test_mix_overrides_parse_and_reject_unknown_fields():
    """--mix 'p_reverb=0.5 ebr_db=-5,15' gives MixConfig overrides; an unknown name is an error."""
    assert train.parse_mix("p_reverb=0.5 ebr_db=-5,15 segment_windows=8") == {
        "p_reverb": 0.5, "ebr_db": (-5.0, 15.0), "segment_windows": 8}
    assert augment.MixConfig(**train.parse_mix("p_reverb=0.5")).p_reverb == 0.5
    with pytest.raises(ValueError, match="p_revreb"):
        train.parse_mix("p_revreb=0.5")


def test_frontend_overrides_parse_and_reject_unknown_fields():
    """--frontend 'level_tau_s=5 n_mels=40' gives FrontendParams with those fields; an unknown name is an error."""
    p = train.parse_frontend("level_tau_s=5 n_mels=40")
    assert (p.level_tau_s, p.n_mels, p.sample_rate) == (5.0, 40, 16000)
    assert isinstance(p.n_mels, int)
    assert train.parse_frontend(None) == FrontendParams()
    with pytest.raises(ValueError, match="n_mles"):
        train.parse_frontend("n_mles=40")
    with pytest.raises(ValueError, match="n_mels must be an integer"):
        train.parse_frontend("n_mels=40.5")


def test_mixer_is_deterministic_for_a_seed():
    """The same seed gives the same windows (training runs are reproducible)."""
    a = _mixer().examples(np.random.default_rng(5))
    b = _mixer().examples(np.random.default_rng(5))
    assert all(np.array_equal(x1, x2) and np.array_equal(y1, y2) for (x1, y1, _), (x2, y2, _) in zip(a, b))


# ---------------------------------------------------------------------------
# DCASE event-based metrics


def test_match_onsets_respects_collar_and_is_one_to_one():
    """Each reference matches at most one estimate, only within the 0.5 s collar."""
    assert evaluate.match_onsets([1.0], [1.4]) == [(0, 0)]
    assert evaluate.match_onsets([1.0], [1.6]) == []
    assert len(evaluate.match_onsets([1.0], [0.9, 1.1])) == 1
    assert evaluate.match_onsets([], [1.0]) == [] and evaluate.match_onsets([1.0], []) == []


def test_match_onsets_is_maximal_not_greedy():
    """refs 1.0, 1.6 and estimates 1.3, 1.9: greedy-by-distance could pair 1.6-1.3 (0.3) and leave 1.9
    unmatched to 1.0; the optimal matching pairs both (1.0-1.3 and 1.6-1.9)."""
    pairs = evaluate.match_onsets([1.0, 1.6], [1.3, 1.9])
    assert sorted(pairs) == [(0, 0), (1, 1)]


def test_event_based_metrics_on_a_hand_made_case():
    """Two gunshots (one found, one missed), one glass break found, one alarm inserted, a gunshot
    found in the wrong stream counts as an insertion: per-class P/R/F1/ER as computed by hand."""
    R, E = evaluate.RefEvent, evaluate.EstEvent
    ref = [R("gunshot", 1.0, 1.5, 0), R("gunshot", 5.0, 5.5, 0), R("glass_break", 3.0, 3.8, 1)]
    est = [E("gunshot", 1.2, 0), E("gunshot", 5.1, 1), E("glass_break", 2.7, 1), E("alarm", 4.0, 0)]
    counts, hit = evaluate.event_based(ref, est, ["alarm", "glass_break", "gunshot"])
    g = counts["gunshot"].metrics()
    assert (g["tp"], g["insertions"], g["deletions"]) == (1, 1, 1)
    assert g["precision"] == 0.5 and g["recall"] == 0.5 and g["f1"] == 0.5 and g["error_rate"] == 1.0
    gb = counts["glass_break"].metrics()
    assert gb["f1"] == 1.0 and gb["error_rate"] == 0.0
    a = counts["alarm"].metrics()
    assert a["n_ref"] == 0 and a["insertions"] == 1 and np.isnan(a["recall"])
    assert hit == {0, 2}
    s = evaluate.summary(counts)  # classes without references do not enter the average
    assert s["f1_macro"] == pytest.approx(0.75) and s["error_rate_macro"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# The tiny model and the command-line programs


def test_lr_schedule_warms_up_then_decays():
    """One-cycle: rises during warm-up to the peak, then decays monotonically to 1 % of it."""
    lrs = [train.lr_at(p, 1.0, 0.1) for p in np.linspace(0, 1, 101)]
    peak = int(np.argmax(lrs))
    assert 8 <= peak <= 12 and lrs[0] < 0.1
    assert all(a >= b - 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
    assert lrs[-1] == pytest.approx(0.01)


def test_tiny_model_detects_synthetic_events_and_stays_quiet_on_background(tiny_checkpoint):
    """The model the end-to-end tests rely on: on synth scenes (seeds unseen in training) it finds at
    least 90 % of the events within the 0.5 s collar with the right label, and it raises no alarm on
    two minutes of synthetic room tone."""
    loaded = load_checkpoint(tiny_checkpoint)
    labels = list(loaded.labels)
    refs, ests = [], []
    for k, seed in enumerate((101, 102)):
        audio, ann = synth.scene(duration_s=40.0, seed=seed)
        refs += [evaluate.RefEvent(label, on, off, k) for on, off, label in ann]
        ests += [evaluate.EstEvent(e.label, e.onset, k) for e in detect_samples(audio, loaded) if e.type == "start"]
    counts, _ = evaluate.event_based(refs, ests, labels)
    tp = sum(c.tp for c in counts.values())
    assert tp >= 0.9 * len(refs), {k: c.metrics() for k, c in counts.items()}
    bg = synth.background(SR, 120.0, np.random.default_rng(11))
    starts = [e for e in detect_samples(bg, loaded) if e.type == "start"]
    assert starts == []


def test_train_cli_writes_a_loadable_checkpoint_with_provenance(data_folder, tmp_path):
    """tools/train.py end to end on a generated data folder: a checkpoint that load_checkpoint
    accepts, thresholds 0.5, and provenance naming the data index, seed, steps and split."""
    out = tmp_path / "m.pt"
    rc = train.main(["--data", str(data_folder), "--out", str(out), "--steps", "3", "--minutes", "0",
                     "--workers", "0", "--batch-size", "8", "--no-progress", "--dims", "channels=4,4,4 embed_dim=8"])
    assert rc == 0
    loaded = load_checkpoint(out)
    prov = loaded.provenance
    assert prov["steps"] == 3 and prov["examples_seen"] == 3 * 8 * 16 and prov["seed"] == 0
    assert prov["data_index_sha256"] == data.index_sha256(data_folder)
    assert prov["validation"]["groups"] > 0 and prov["train"]["groups"] > 0
    assert loaded.thresholds == {"alarm": 0.5, "glass_break": 0.5, "gunshot": 0.5}


def test_train_cli_reports_a_bad_data_folder_in_one_line(tmp_path, capsys):
    """A folder without index.csv exits with status 2 and one 'error:' line."""
    assert train.main(["--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_train_cli_reports_bad_overrides_in_one_line(tmp_path, capsys):
    """Unknown or inconsistent --frontend / --dims / --mix overrides exit with status 2 and one 'error:'
    line, before any data is read (the folder here has none)."""
    for args, start in ((["--frontend", "n_mles=40"], "error: --frontend:"),
                        (["--frontend", "n_mels=40"], "error: the network takes n_mels=64"),
                        (["--mix", "p_revreb=1"], "error: --mix:")):
        assert train.main(["--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--steps", "1", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(start), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_train_cli_refuses_a_device_it_cannot_use_in_one_line(data_folder, tmp_path, capsys):
    """--device cuda on a CPU-only torch (or a nonsense name) exits with status 2 and one 'error:' line."""
    for device in ("cuda", "gpu0"):
        rc = train.main(["--data", str(data_folder), "--out", str(tmp_path / "m.pt"), "--steps", "1", "--minutes", "0",
                         "--no-progress", "--device", device])
        assert rc == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --device {device}:"), err
        assert not (tmp_path / "m.pt").exists()


def test_evaluate_cli_calibrates_and_reports(data_folder, tiny_checkpoint, tmp_path):
    """tools/evaluate.py on a generated folder with the tiny model: writes JSON with per-EBR metrics
    and false alarms, and --calibrate re-saves the checkpoint with thresholds from the grid."""
    model = tmp_path / "m.pt"
    shutil.copy(tiny_checkpoint, model)
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--data", str(data_folder), "--model", str(model), "--calibrate", "--json", str(out),
                        "--split", "group", "--heldout-sources", ""])
    assert rc == 0
    import json

    result = json.loads(out.read_text())["results"][0]
    assert set(result["mixtures"]["per_ebr"]) == {"-6", "+0", "+6"}
    assert result["reported_on"].startswith("report half")
    th = load_checkpoint(model).thresholds
    assert all(t in evaluate.THRESHOLD_GRID for t in th.values())
    assert th == result["thresholds"]
    assert load_checkpoint(model).provenance["calibration"]["thresholds"] == th


def test_evaluate_by_heldout_source_calibrates_on_negatives_and_reports_both_splits(data_folder, tiny_checkpoint,
                                                                                    tmp_path, capsys):
    """--split both: a held-out source is never trained on (train.py) and evaluated whole; thresholds come from
    negatives only (a third of the held-out negatives and the group-validation ones); one summary table
    has a row per model and split."""
    import json

    model = tmp_path / "m.pt"
    shutil.copy(tiny_checkpoint, model)
    out = tmp_path / "eval.json"
    rc = evaluate.main(["--data", str(data_folder), "--model", str(model), "--calibrate", "--json", str(out),
                        "--heldout-sources", "src1/gunshot,src1/negative,src1/alarm,src1/glass_break"])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert [r["split"] for r in results] == ["source", "group"]
    src = results[0]
    assert src["calibration"]["method"].startswith("lowest threshold with FA/h <= target on both")
    assert src["reported_on"].startswith("held-out sources")
    assert set(src["mixtures"]["alerted_by_ebr"]) == {"-6", "+0", "+6"}
    assert src["false_alarms"]["hours"] > 0
    curve = src["operating_curve"]
    for label in src["thresholds"]:  # every threshold of the sweep, and summary points within their limits
        assert [r["threshold"] for r in curve["sweep"][label]] == list(evaluate.CURVE_GRID)
        for limit, best in curve["best_within_fa_per_hour"].items():
            assert best[label] is None or best[label]["fa_per_hour"] <= float(limit)
    table = capsys.readouterr().out
    assert "| m.pt | source |" in table and "| m.pt | group |" in table
    assert load_checkpoint(model).thresholds == src["thresholds"]


def test_evaluate_without_heldout_sources_in_the_index_is_one_line(data_folder, tiny_checkpoint, capsys):
    assert evaluate.main(["--data", str(data_folder), "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "held-out sources" in err[0]


def test_compare_cli_reports_matched_false_alarm_operating_points_without_touching_models(data_folder, tiny_checkpoint,
                                                                                      tmp_path, capsys):
    """tools/compare.py: per model and class the lowest grid threshold with no false alarm on the half's
    negatives (checked by replaying the detector there), its F1 at 0 dB, and a table row per model;
    the checkpoints are not rewritten."""
    import json

    import compare

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    shutil.copy(tiny_checkpoint, a)
    shutil.copy(tiny_checkpoint, b)
    before = a.read_bytes()
    out = tmp_path / "cmp.json"
    assert compare.main(["--data", str(data_folder), "--models", str(a), str(b), "--half", "all", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {str(a), str(b)} and result[str(a)] == result[str(b)]
    r = result[str(a)]
    assert r["negative_hours"] > 0 and set(r["classes"]) == {"alarm", "glass_break", "gunshot"}
    for c in r["classes"].values():
        assert c["threshold"] in evaluate.THRESHOLD_GRID and 0.0 <= c["f1_0db"] <= 1.0
        assert not c["reached"] or c["fa_per_hour"] == 0.0
    assert r["mean_f1_0db"] == pytest.approx(np.mean([c["f1_0db"] for c in r["classes"].values()]))
    # False-alarm budgets (default 0..3): k = 0 is the zero-false-alarm point above; allowing more false
    # alarms never raises a threshold; the headline mean is over all budgets.
    budgets = r["by_budget"]
    assert [b["false_alarms"] for b in budgets] == [0, 1, 2, 3]
    assert budgets[0]["thresholds"] == {k: c["threshold"] for k, c in r["classes"].items()}
    assert budgets[0]["mean_f1_0db"] == pytest.approx(r["mean_f1_0db"])
    for lo, hi in zip(budgets, budgets[1:]):
        assert all(hi["thresholds"][k] <= lo["thresholds"][k] for k in lo["thresholds"])
    assert r["budget_mean_f1_0db"] == pytest.approx(np.mean([b["mean_f1_0db"] for b in budgets]))
    table = capsys.readouterr().out
    assert f"| {a} |" in table and f"| {b} |" in table and "mean over k=0..3" in table
    assert a.read_bytes() == before


def test_calibration_halves_give_both_halves_every_label(data_folder):
    """Calibration and report halves are disjoint, cover all validation groups, and each holds events
    of every class and negatives (a half without negatives could not measure false alarms)."""
    _, val = data.split(data.read_index(data_folder))
    halves = evaluate.calibration_halves(val)
    assert set(halves) == {c.group for c in val}
    for half in ("cal", "report"):
        labels = {c.label for c in val if halves[c.group] == half}
        assert labels == {*data.EVENT_LABELS, data.NEGATIVE}, half
