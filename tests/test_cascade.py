"""The cascade: EfficientAT's MobileNetV3 in earshot's code, its features, the confirmer and its checkpoint section.

No pretrained weights are needed (the suite runs without ../shared): a randomly initialised tagger has
the published mn04's exact parameter names and shapes, which is what strict loading checks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

import data  # noqa: E402
import evaluate  # noqa: E402
from train_confirm import attach_confirmer  # noqa: E402

from earshot.model import CheckpointError  # noqa: E402
from earshot.model.cascade import CascadeState  # noqa: E402
from earshot.model.checkpoint import load_checkpoint  # noqa: E402
from earshot.model.confirm import ConfirmError, ConfirmHead, Confirmer, from_dict  # noqa: E402
from earshot.model.mn import MobileNetTagger, macs_per_second  # noqa: E402
from earshot.model.mnfeatures import MnFeatures, kaldi_mel_banks  # noqa: E402
from earshot.offline import detect_samples  # noqa: E402

LABELS = ["alarm", "glass_break", "gunshot"]
PRETRAINED = ROOT.parent / "shared" / "pretrained" / "mn04_as_mAP_432.pt"


def _confirmer(seed: int = 0, trigger: float = 0.1) -> Confirmer:
    torch.manual_seed(seed)
    tagger = MobileNetTagger()
    head = ConfirmHead(tagger.embed_dim + 527, 32, len(LABELS))
    return Confirmer(tagger, head, list(LABELS), {label: trigger for label in LABELS})


def test_tagger_has_mn04s_published_size_and_loads_its_own_state_strictly():
    net = MobileNetTagger()
    assert sum(p.numel() for p in net.parameters()) == 983_599  # EfficientAT mn04_as: 0.98 M parameters
    again = MobileNetTagger()
    again.load_state_dict(net.state_dict(), strict=True)
    assert 10e6 < macs_per_second() < 16e6  # ~13 M multiply-adds per second of audio


@pytest.mark.skipif(not PRETRAINED.is_file(), reason="needs ../shared/pretrained (not part of the project)")
def test_published_mn04_weights_load_strictly_and_tag_a_siren():
    from earshot import synth

    net = MobileNetTagger()
    net.load_state_dict(torch.load(PRETRAINED, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    x = synth.siren(16000, 3.0, np.random.default_rng(0)).astype(np.float32)
    with torch.inference_mode():
        logits, _ = net(torch.from_numpy(MnFeatures()(x)[None, None]))
    siren_like = {316, 317, 318, 319, 388, 389, 390, 391, 392, 393, 394, 395, 396, 397}  # sirens, alarms, beeps
    top = set(torch.topk(logits[0], 10).indices.tolist())
    assert top & siren_like, top


def test_features_equal_efficientat_preprocessing_through_torch_stft():
    fe = MnFeatures()
    x = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    mel = fe(x)
    x32 = torch.tensor(fe.upsample(x), dtype=torch.float64)
    pre = torch.nn.functional.conv1d(x32[None, None], torch.tensor([[[-0.97, 1.0]]], dtype=torch.float64))[0, 0]
    spec = torch.stft(pre, 1024, hop_length=320, win_length=800, center=True, return_complex=True,
                      window=torch.hann_window(800, periodic=False, dtype=torch.float64))
    ref = (np.log(kaldi_mel_banks().astype(np.float64) @ (spec.abs() ** 2).numpy() + 1e-5) + 4.5) / 5
    assert mel.shape == ref.shape == (128, 100)  # 1 s at 32 kHz, one sample less after pre-emphasis
    np.testing.assert_allclose(mel, ref, atol=1e-3)


def test_mel_banks_cover_0_to_15_khz_with_the_nyquist_column_empty():
    banks = kaldi_mel_banks()
    assert banks.shape == (128, 513)
    assert (banks[:, -1] == 0).all()
    assert (banks.sum(axis=1) > 0).all()
    assert banks[:, int(15000 / 31.25) + 1:].sum() == 0  # nothing above fmax


def test_confirmer_round_trips_through_its_checkpoint_section():
    c = _confirmer()
    again = from_dict(c.to_dict(), LABELS)
    x = np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.05
    np.testing.assert_allclose(c.score(x), again.score(x), atol=1e-6)
    assert again.triggers == c.triggers


@pytest.mark.parametrize("spoil, message", [
    (lambda d: d["tagger"].__setitem__("features.0.0.weight", torch.full((8, 1, 3, 3), float("nan"))), "NaN"),
    (lambda d: d.__setitem__("labels", ["a", "b", "c"]), "labels"),
    (lambda d: d.__setitem__("triggers", {"alarm": 1.5, "glass_break": 0.1, "gunshot": 0.1}), "triggers"),
    (lambda d: d.__setitem__("triggers", {"siren": 0.1}), "triggers"),
    (lambda d: d.__setitem__("triggers", {}), "triggers"),
    (lambda d: d["head"].pop("net.0.weight"), "confirm section"),
    (lambda d: d.__setitem__("tagger_dims", {"width": 0.4, "n_mels": 128, "n_classes": 10**9, "head_hidden": 1280}),
     "implausible"),
])
def test_a_bad_confirm_section_is_one_clear_error(spoil, message):
    d = _confirmer().to_dict()
    spoil(d)
    with pytest.raises(ConfirmError, match=message) as info:
        from_dict(d, LABELS)
    assert "\n" not in str(info.value)


def test_a_class_without_a_trigger_is_never_confirmed(tiny_checkpoint, tmp_path):
    """A confirmer for alarms and glass breaks only: the gunshot score is stage 1's even where it is
    high, the others are the confirmer's; the subset survives a save and a strict load."""
    from earshot.model import CascadeState

    c = _confirmer(trigger=0.05)
    c.set_triggers({"alarm": 0.05, "glass_break": 0.05})
    pt = tmp_path / "subset.pt"
    attach_confirmer(str(tiny_checkpoint), str(pt), c, {})
    again = load_checkpoint(pt).confirmer
    assert again.triggers == {"alarm": 0.05, "glass_break": 0.05}
    state = CascadeState(again)
    window = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    stage1 = np.array([0.9, 0.9, 0.9], dtype=np.float32)
    out = state.apply(stage1, lambda: window)
    np.testing.assert_allclose(out[:2], again.score(window)[:2], atol=1e-6)
    assert out[2] == np.float32(0.9)
    with pytest.raises(ValueError, match="triggers"):
        again.set_triggers({"gunshot": 1.0})
    from earshot.model import load_model
    from earshot.model.onnx import export_onnx

    export_onnx(load_checkpoint(pt), tmp_path / "subset.onnx")
    onnx_confirmer = load_model(tmp_path / "subset.onnx").confirmer
    assert onnx_confirmer.triggers == again.triggers and np.isinf(onnx_confirmer.trigger_array[2])


class _CountingConfirmer:
    labels = LABELS
    reuse_hops = 2

    def __init__(self):
        self.trigger_array = np.array([0.2, 0.2, 0.2], dtype=np.float32)
        self.windows = 0

    def score(self, window):
        self.windows += 1
        return np.array([0.9, 0.8, 0.7], dtype=np.float32)


def test_cascade_replaces_only_triggered_classes_and_reuses_a_confirmation_for_reuse_hops():
    c = _CountingConfirmer()
    state = CascadeState(c)
    quiet = np.array([0.05, 0.1, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(state.apply(quiet, lambda: None), quiet)
    assert c.windows == 0  # below every trigger: the confirmer never runs
    hot = np.array([0.5, 0.1, 0.0], dtype=np.float32)
    np.testing.assert_allclose(state.apply(hot, lambda: None), [0.9, 0.1, 0.0])
    state.apply(hot, lambda: None)  # within reuse_hops: no new call
    assert c.windows == 1
    state.apply(hot, lambda: None)
    assert c.windows == 2
    state.apply(quiet, lambda: None)  # dropping below the trigger forgets the confirmation
    state.apply(hot, lambda: None)
    assert c.windows == 3


def test_a_cascade_checkpoint_loads_strictly_and_runs_in_the_detection_path(tiny_checkpoint, tmp_path):
    from earshot import synth

    out = tmp_path / "cascade.pt"
    attach_confirmer(str(tiny_checkpoint), str(out), _confirmer(trigger=0.05), {"test": True})
    loaded = load_checkpoint(out)
    assert loaded.confirmer is not None and loaded.provenance["confirm"] == {"test": True}
    scene, _ = synth.scene(16000, 12.0, np.random.default_rng(5))
    hops: list = []
    detect_samples(scene.astype(np.float32), loaded, hops=hops)
    assert loaded.confirmer.calls > 0
    plain: list = []
    detect_samples(scene.astype(np.float32), load_checkpoint(tiny_checkpoint), hops=plain)
    s1 = np.stack([h.scores for h in plain])
    s2 = np.stack([h.scores for h in hops])
    below = s1 < 0.05
    np.testing.assert_allclose(s2[below], s1[below])  # untriggered classes keep stage 1's score
    assert not np.allclose(s2[~below], s1[~below])


def test_a_checkpoint_with_a_spoiled_confirm_section_is_refused_in_one_line(tiny_checkpoint, tmp_path):
    out = tmp_path / "cascade.pt"
    attach_confirmer(str(tiny_checkpoint), str(out), _confirmer(), {})
    ckpt = torch.load(out, weights_only=True)
    ckpt["confirm"]["head"]["net.0.weight"][0, 0] = float("inf")
    torch.save(ckpt, out)
    with pytest.raises(CheckpointError, match="NaN or infinite") as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value)


def test_source_split_keeps_heldout_sources_out_of_training():
    clips = [data.Clip(f"a{i}.flac", lab, "", src, f"{src}-{lab}-{i}", 1.0)
             for i in range(6) for lab in ("gunshot", "negative")
             for src in ("caitlinnguyen0/ESC-50", "RosameliaCarioni/gunshot_detection")]
    train, gval, heldout = data.source_split(clips)
    assert {c.source for c in heldout} == {"caitlinnguyen0/ESC-50"}
    assert {c.source for c in train + gval} == {"RosameliaCarioni/gunshot_detection"}
    assert gval and train


def test_alerted_counts_a_detection_within_a_second_of_the_event():
    refs = [evaluate.RefEvent("alarm", 10.0, 14.0, 0), evaluate.RefEvent("alarm", 30.0, 31.0, 0),
            evaluate.RefEvent("gunshot", 5.0, 5.2, 1)]
    est = [evaluate.EstEvent("alarm", 13.5, 0), evaluate.EstEvent("alarm", 32.5, 0),
           evaluate.EstEvent("glass_break", 5.1, 1)]
    got = evaluate.alerted(refs, est, ["alarm", "gunshot"])
    assert got == {"alarm": 0.5, "gunshot": 0.0}


def test_heldout_calibration_uses_no_heldout_events():
    clips = [data.Clip(f"n{i}", "negative", "", "s", f"n{i}", 1.0) for i in range(9)]
    clips += [data.Clip(f"e{i}", "gunshot", "", "s", f"e{i}", 1.0) for i in range(4)]
    halves = evaluate.source_halves(clips)
    assert {halves[f"e{i}"] for i in range(4)} == {"report"}
    assert sorted(halves[f"n{i}"] for i in range(9)).count("cal") == 3


def test_train_confirm_cli_trains_a_head_and_writes_a_loadable_cascade(tiny_checkpoint, tmp_path):
    """tools/train_confirm.py end to end on generated recordings, with a randomly initialised tagger
    standing in for the pretrained weights: mixtures, mined negatives, cache, head, cascade checkpoint."""
    import train_confirm
    from test_train import _write_folder

    folder = _write_folder(tmp_path / "data")
    weights = tmp_path / "tagger.pt"
    torch.save(MobileNetTagger().state_dict(), weights)
    out, cache = tmp_path / "cascade.pt", tmp_path / "cache.npz"
    rc = train_confirm.main(["--data", str(folder), "--pretrained", str(weights), "--stage1", str(tiny_checkpoint),
                             "--out", str(out), "--cache", str(cache), "--windows", "48", "--mined", "16",
                             "--epochs", "2", "--trigger", "0.05", "--heldout-sources", ""])
    assert rc == 0
    cached = np.load(cache)
    assert cached["x"].shape[1] == 384 + 527 and len(cached["x"]) >= 48
    assert cached["y"].sum(axis=0).min() > 0  # every class has positive windows
    loaded = load_checkpoint(out)
    assert loaded.confirmer is not None
    assert loaded.confirmer.triggers == {label: 0.05 for label in LABELS}
    assert loaded.provenance["confirm"]["windows"] == len(cached["x"])


def test_train_confirm_finetunes_the_taggers_last_blocks(tiny_checkpoint, tmp_path):
    """--finetune-blocks 2: the cache holds the trunk's activations, only the last two blocks and the last
    conv change (the stem, earlier blocks and classifier keep the pretrained weights), and the cascade
    written loads strictly with them."""
    import train_confirm
    from test_train import _write_folder

    folder = _write_folder(tmp_path / "data")
    weights = tmp_path / "tagger.pt"
    torch.manual_seed(0)
    torch.save(MobileNetTagger().state_dict(), weights)
    out, cache = tmp_path / "cascade.pt", tmp_path / "cache.npz"
    args = ["--data", str(folder), "--pretrained", str(weights), "--stage1", str(tiny_checkpoint), "--out", str(out),
            "--cache", str(cache), "--windows", "48", "--mined", "16", "--epochs", "2", "--trigger", "0.05",
            "--heldout-sources", "", "--finetune-blocks", "2", "--finetune-lr", "1e-2"]
    assert train_confirm.main(args) == 0
    cached = np.load(cache)
    assert cached["x"].ndim == 4 and cached["x"].dtype == np.float16  # (N, C, H, W) where block 14 begins
    before = torch.load(weights, weights_only=True)
    after = load_checkpoint(out).confirmer.tagger.state_dict()
    changed = {k.split(".")[1] for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])
               and k.startswith("features.")}
    assert changed == {"14", "15", "16"}
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("classifier."))
    with pytest.raises(SystemExit, match="another --finetune-blocks"):
        train_confirm.main(args[:-4] + ["--finetune-blocks", "1"])


def test_onnx_export_carries_the_confirmer_and_scores_as_torch_does(tiny_checkpoint, tmp_path):
    """export-onnx writes <stem>.confirm.onnx beside the model; load_onnx runs the same cascade without torch;
    a missing or altered confirmer file is one clear error, never a silent stage-1-only detector."""
    from earshot import synth
    from earshot.model import load_model
    from earshot.model.onnx import export_onnx

    pt, onx = tmp_path / "cascade.pt", tmp_path / "cascade.onnx"
    attach_confirmer(str(tiny_checkpoint), str(pt), _confirmer(trigger=0.05), {})
    torch_model = load_checkpoint(pt)
    export_onnx(torch_model, onx)
    side = tmp_path / "cascade.confirm.onnx"
    assert side.is_file()
    onnx_model = load_model(onx)
    assert onnx_model.confirmer is not None and onnx_model.confirmer.triggers == torch_model.confirmer.triggers
    scene, _ = synth.scene(16000, 10.0, np.random.default_rng(3))
    a, b = [], []
    detect_samples(scene.astype(np.float32), torch_model, hops=a)
    detect_samples(scene.astype(np.float32), onnx_model, hops=b)
    assert onnx_model.confirmer.calls > 0
    np.testing.assert_allclose(np.stack([h.scores for h in a]), np.stack([h.scores for h in b]), atol=2e-3)
    side.write_bytes(side.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        load_model(onx)
    assert "\n" not in str(info.value)
    side.unlink()
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(onx)


def test_calibration_picks_the_lowest_trigger_within_the_confirmer_budget(tiny_checkpoint, tmp_path):
    """choose_trigger counts confirmer calls per hour from stage 1's hops alone, for every candidate trigger;
    the chosen one is the lowest within the budget, and a lower trigger never calls less."""
    from earshot import synth

    out = tmp_path / "cascade.pt"
    attach_confirmer(str(tiny_checkpoint), str(out), _confirmer(), {})
    loaded = load_checkpoint(out)
    rng = np.random.default_rng(4)
    negs = [(data.Clip(f"n{i}", "negative", "", "s", f"n{i}", 6.0), synth.scene(16000, 6.0, rng)[0].astype(np.float32))
            for i in range(6)]
    _, rates = evaluate.choose_trigger([negs], loaded, 0, 1e9)
    values = [rates[t] for t in evaluate.TRIGGER_GRID]
    assert values == sorted(values, reverse=True) and values[0] > 0
    budget = (values[0] + values[-1]) / 2
    trig, _ = evaluate.choose_trigger([negs], loaded, 0, budget)
    assert rates[trig] <= budget
    lower = [t for t in evaluate.TRIGGER_GRID if t < trig]
    assert all(rates[t] > budget for t in lower)
    assert loaded.confirmer.calls == 0  # counting never runs the confirmer
