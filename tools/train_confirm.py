"""Train the second stage of the cascade: a head on the pretrained mn04 tagger that confirms candidates.

    python tools/train_confirm.py --data ../shared/data --pretrained ../shared/pretrained/mn04_as_mAP_432.pt \\
        --stage1 runs/s1_ho.pt --out runs/cascade.pt [--windows 30000] [--seed 0]

The streaming CNN (stage 1) scores every hop; where a class crosses a low trigger, the confirmer
scores the last second of audio with EfficientAT's AudioSet tagger mn04 (frozen) and a small head
trained here on its embedding and its 527 tag logits. What the head learns from:

- mixtures of training events into training backgrounds (tools/augment.py's Mixer: EBR -10..+15 dB,
  speed, reverb, channel filters, Opus round trips, distractors), windows taken just after an
  event's onset (when stage 1 triggers) and anywhere else, labelled per class as stage 1 is;
- hard negatives mined from long streams of training negatives at their recorded levels: every
  window where stage 1 crosses the trigger (what the confirmer actually sees in the field), with
  extra weight, and impulsive look-alikes (hammering, slams, fireworks, ...) weighted again.

Only sources outside data.HELDOUT_SOURCES are used, so tools/evaluate.py's held-out-source figures
are about recordings neither stage has heard. Embeddings are cached in --cache (git-ignored runs/).

With --finetune-blocks K the tagger's last K inverted-residual blocks and its last 1x1 conv are
fine-tuned with the head (the issue's item 2a); the cache then holds the frozen trunk's activations
where those blocks begin, so each epoch runs only the tail, and --finetune-lr 0 trains the frozen
baseline on the very same windows.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augment  # noqa: E402
import data  # noqa: E402

log = logging.getLogger("train_confirm")

MINED_WEIGHT = 3.0
"""Loss weight of a negative window mined where stage 1 fired on a long negative stream."""
IMPULSIVE_WEIGHT = 2.0
"""Extra factor for mined windows of impulsive look-alikes (augment.is_hard_negative kinds)."""


def load_tagger(pretrained: str):
    """EfficientAT's mn04 with the published weights at `pretrained`, loaded strictly (weights only);
    ValueError in one line when the file is missing or holds anything else."""
    import pickle

    import torch

    from earshot.model.mn import MobileNetTagger

    tagger = MobileNetTagger()
    try:
        tagger.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True), strict=True)
    except (OSError, RuntimeError, TypeError, AttributeError, EOFError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{pretrained}: not EfficientAT's mn04_as weights ({' '.join(str(exc).split())[:200]})") from exc
    return tagger


def tail_start(tagger, blocks: int) -> int:
    """Index in `tagger.features` where the fine-tuned tail of `blocks` inverted-residual blocks (and
    the last 1x1 conv after them) begins; len(features) for none."""
    n_blocks = len(tagger.features) - 2  # the stem first, the last 1x1 conv last
    if not 0 <= blocks <= n_blocks:
        raise ValueError(f"--finetune-blocks must be 0..{n_blocks}")
    return len(tagger.features) if blocks == 0 else len(tagger.features) - 1 - blocks


def trunk_module(tagger, start: int):
    """The frozen part of the tagger as one module: mel -> (logits, embedding), the whole tagger, or
    mel -> the activation where the fine-tuned tail begins."""
    import torch

    if start >= len(tagger.features):
        return tagger
    return torch.nn.Sequential(*list(tagger.features)[:start])


class TaggerEmbedder:
    """mn04 (frozen) over 1 s windows, batched: [embedding | 527 logits] per window, or with `tail_blocks`
    the activation (float16) where the last `tail_blocks` blocks begin."""

    def __init__(self, pretrained: str, threads: int = 1, tail_blocks: int = 0):
        import torch

        from earshot.model.mnfeatures import MnFeatures

        torch.set_num_threads(threads)
        self.net = load_tagger(pretrained).eval()
        self.start = tail_start(self.net, tail_blocks)
        self.trunk = trunk_module(self.net, self.start).eval()
        self.features = MnFeatures()
        self._ort = None
        try:  # ONNX Runtime runs mn04's depthwise convolutions about 3x faster than torch on a CPU
            import io

            import onnxruntime as ort

            buf = io.BytesIO()
            names = ["logits", "embedding"] if self.trunk is self.net else ["activation"]
            torch.onnx.export(self.trunk, (torch.zeros(1, 1, 128, 100),), buf, input_names=["mel"],
                              output_names=names, dynamic_axes={"mel": {0: "batch", 3: "frames"}},
                              opset_version=17, dynamo=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            self._ort = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        except ImportError:
            log.info("onnxruntime not installed: embedding with torch (slower)")

    def __call__(self, windows: list[np.ndarray]) -> np.ndarray:
        import torch

        mel = self.features.batch(np.stack(windows))
        if self._ort is not None:
            outs = self._ort.run(None, {"mel": mel})
        else:
            with torch.inference_mode():
                out = self.trunk(torch.from_numpy(mel))
            outs = [t.numpy() for t in out] if isinstance(out, tuple) else [out.numpy()]
        if self.trunk is not self.net:
            return outs[0].astype(np.float16)
        logits, emb = outs
        return np.concatenate([emb, logits], axis=1).astype(np.float32)


def window_audio(mix: np.ndarray, end_frame: int, p) -> np.ndarray:
    """The 1 s of samples a stage-1 window ending at `end_frame` covers (what the confirmer scores)."""
    end = p.samples_for(end_frame)
    n = int(round(p.chunk_s * p.sample_rate))
    seg = mix[max(0, end - n): end]
    return np.pad(seg, (n - len(seg), 0)) if len(seg) < n else seg


def mixture_windows(mixer: augment.Mixer, rng: np.random.Generator, n: int, p_opus: float
                    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """`n` labelled windows from mixtures: (audio windows, targets (n, C), masks (n, C))."""
    p = mixer.p
    chunk = p.chunk_frames
    wins, ys, ms = [], [], []
    while len(wins) < n:
        mix, placed, end0 = mixer.mixture(rng)
        total = (len(mix) - p.win_length) // p.hop_length + 1
        ends = list(end0 + rng.integers(0, int(mixer.cfg.span_s * 100) + 1, size=2))
        pos = [ev for ev in placed if ev.cls >= 0]
        if pos:  # the windows stage 1 triggers on: 0.05-0.6 s after the onset
            ev = pos[int(rng.integers(len(pos)))]
            ends.append(ev.hop0 + int(np.flatnonzero(ev.active)[0]) + int(rng.integers(5, 61)))
        for e in ends:
            e = int(np.clip(e, chunk, total))
            y, m = mixer.label_window(placed, e)
            w = window_audio(mix, e, p)
            if rng.random() < p_opus:
                w = augment.opus_round_trip(w, p.sample_rate)
            wins.append(w)
            ys.append(y)
            ms.append(m)
    return wins[:n], np.stack(ys[:n]), np.stack(ms[:n])


def mined_windows(items, stage1, rng: np.random.Generator, trigger: float, limit: int, share: float = 1.0
                  ) -> tuple[list[np.ndarray], list[str]]:
    """Windows where stage 1 reaches `trigger` on long streams of training negatives at recorded levels
    (a random `share` of the negative clips, to bound the time spent scanning)."""
    import evaluate

    from earshot.config import DetectConfig
    from earshot.offline import detect_samples

    if share < 1.0:
        keep = rng.random(len(items)) < share
        items = [it for it, k in zip(items, keep) if k]
    streams, spans = evaluate.fa_streams(items, seed=int(rng.integers(1 << 30)))
    p = stage1.frontend
    n = int(round(p.chunk_s * p.sample_rate))
    found: list[tuple[np.ndarray, str]] = []
    for x, sp in zip(streams, spans):
        hops: list = []
        detect_samples(x, stage1, DetectConfig(), hops=hops)
        for h in hops:
            if float(np.max(h.scores)) >= trigger:
                end = int(round(h.t_end * p.sample_rate))
                kind = next((c.kind for a, b, c in sp if a <= h.t_end - 0.5 < b), "")
                found.append((x[max(0, end - n): end], kind))
    log.info("mined %d windows where stage 1 reached %.2f on %.2f h of training negatives", len(found), trigger,
             sum(len(x) for x in streams) / p.sample_rate / 3600)
    if len(found) > limit:
        found = [found[i] for i in rng.choice(len(found), limit, replace=False)]
    return [np.pad(w, (n - len(w), 0)) for w, _ in found], [k for _, k in found]


def build_cache(args, stage1) -> dict[str, np.ndarray]:
    """Embeddings and labels of every training window (mixtures, then mined negatives)."""
    clips = data.read_index(args.data)
    train_clips, _, _ = data.source_split(clips, heldout_sources=data.parse_sources(args.heldout_sources))
    t = time.monotonic()
    audio = data.load_all(args.data, train_clips)
    log.info("loaded %d training clips (%.2f h) in %.0f s", len(train_clips),
             sum(len(a) for a in audio) / data.SAMPLE_RATE / 3600, time.monotonic() - t)
    items = list(zip(train_clips, audio))
    rng = np.random.default_rng(args.seed)
    mixer = augment.real_mixer(items, data.EVENT_LABELS, stage1.frontend, augment.MixConfig())
    embed = TaggerEmbedder(args.pretrained, args.threads, args.finetune_blocks)
    out: dict[str, list] = {"x": [], "y": [], "m": [], "w": [], "tail_blocks": [np.array([args.finetune_blocks])]}
    t = time.monotonic()
    done = 0
    while done < args.windows:
        wins, y, m = mixture_windows(mixer, rng, min(256, args.windows - done), args.p_opus)
        out["x"].append(embed(wins))
        out["y"].append(y)
        out["m"].append(m)
        out["w"].append(np.ones(len(wins), dtype=np.float32))
        done += len(wins)
        if done % 2048 < 256:
            log.info("mixture windows: %d / %d (%.1f ms each)", done, args.windows, 1000 * (time.monotonic() - t) / done)
    negatives = [(c, x) for c, x in items if c.label == data.NEGATIVE]
    wins, kinds = mined_windows(negatives, stage1, rng, args.trigger, args.mined, args.mine_share)
    for i in range(0, len(wins), 256):
        out["x"].append(embed(wins[i: i + 256]))
    n_lab = len(data.EVENT_LABELS)
    out["y"].append(np.zeros((len(wins), n_lab), dtype=np.float32))
    out["m"].append(np.ones((len(wins), n_lab), dtype=np.float32))
    out["w"].append(np.array([MINED_WEIGHT * (IMPULSIVE_WEIGHT if augment.is_hard_negative(k) else 1.0) for k in kinds],
                             dtype=np.float32))
    return {k: np.concatenate(v) for k, v in out.items()}


def _update(opt, sched, logits, y, m, w) -> float:
    """One optimizer step on the weighted, masked binary cross-entropy of a batch; returns its loss.

    No positive-class weight: calibrated thresholds set the operating point, and boosting positives
    would only inflate scores."""
    import torch

    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    loss = (loss * m * w[:, None]).sum() / (m * w[:, None]).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


class TaggerTail:
    """The tagger from a cached activation on: its last blocks (trainable, batch-norm statistics kept
    as AudioSet set them) and its frozen classifier -> [embedding | 527 logits]."""

    def __init__(self, tagger, start: int):
        self.tagger = tagger
        self.blocks = list(tagger.features)[start:]
        for p in tagger.parameters():
            p.requires_grad_(False)
        self.params = [p for b in self.blocks for p in b.parameters()]
        for p in self.params:
            p.requires_grad_(True)

    def eval(self) -> None:
        self.tagger.eval()  # also batch norm: a few thousand windows would only pull its statistics astray

    def __call__(self, a):
        import torch

        for b in self.blocks:
            a = b(a)
        return torch.cat([a.mean(dim=(2, 3)), self.tagger.classifier(a)], dim=1)


def tail_outputs(tail: TaggerTail, acts: np.ndarray):
    """[embedding | logits] of every cached activation, without gradients, in batches."""
    import torch

    with torch.no_grad():
        return torch.cat([tail(torch.from_numpy(acts[i: i + 512].astype(np.float32))) for i in range(0, len(acts), 512)])


def finetune(cache: dict[str, np.ndarray], tagger, blocks: int, seed: int, epochs: int, hidden: int, lr: float,
             weight_decay: float = 1e-3):
    """The tagger's last `blocks` blocks and a confirm head on cached trunk activations (item 2a);
    with `lr` 0 the tagger stays frozen (the baseline on the same windows). Returns (head, summary);
    the tagger is changed in place."""
    import torch

    from earshot.model.confirm import ConfirmHead

    torch.manual_seed(seed)
    tail = TaggerTail(tagger, tail_start(tagger, blocks))
    tail.eval()
    acts = cache["x"]
    y, m, w = (torch.from_numpy(cache[k]) for k in ("y", "m", "w"))
    x0 = tail_outputs(tail, acts)
    head = ConfirmHead(x0.shape[1], hidden, y.shape[1])
    head.set_normalization(x0.mean(0), x0.std(0) + 1e-3)
    groups = [{"params": head.parameters(), "lr": 2e-3}]
    if lr > 0:
        groups.append({"params": tail.params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    n = len(acts)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=epochs * (n // 128 + 1))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t = time.monotonic()
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 128):
            b = perm[i: i + 128]
            xb = tail(torch.from_numpy(acts[b.numpy()].astype(np.float32))) if lr > 0 else x0[b]
            losses.append(_update(opt, sched, head(xb), y[b], m[b], w[b]))
        log.info("epoch %d / %d: loss %.4f (%.0f s)", epoch + 1, epochs, float(np.mean(losses[-100:])),
                 time.monotonic() - t)
    head.eval()
    for p in tagger.parameters():
        p.requires_grad_(False)
    return head, {"windows": n, "epochs": epochs, "final_loss": float(np.mean(losses[-50:])),
                  "finetuned_blocks": blocks, "finetune_lr": lr,
                  "positives_per_class": (y * m).sum(0).tolist(), "mined_negatives": int((w > 1.5).sum())}


def train_head(cache: dict[str, np.ndarray], seed: int, epochs: int, hidden: int, weight_decay: float = 1e-3):
    """The confirm head on cached tagger outputs; returns (head, training summary)."""
    import torch

    from earshot.model.confirm import ConfirmHead

    torch.manual_seed(seed)
    x = torch.from_numpy(cache["x"])
    y, m, w = (torch.from_numpy(cache[k]) for k in ("y", "m", "w"))
    head = ConfirmHead(x.shape[1], hidden, y.shape[1])
    head.set_normalization(x.mean(0), x.std(0) + 1e-3)
    pos = (y * m).sum(0)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=weight_decay)
    n = len(x)
    steps = epochs * (n // 256 + 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 256):
            b = perm[i: i + 256]
            xb = x[b] + 0.05 * torch.randn(len(b), x.shape[1], generator=gen) * head.scale  # feature noise
            losses.append(_update(opt, sched, head(xb), y[b], m[b], w[b]))
    head.eval()
    return head, {"windows": n, "epochs": epochs, "final_loss": float(np.mean(losses[-50:])),
                  "positives_per_class": pos.tolist(), "mined_negatives": int((w > 1.5).sum())}


def attach_confirmer(stage1_path: str, out_path: str, confirmer, provenance: dict[str, Any]) -> None:
    """Write stage 1's checkpoint again with `confirmer` as its confirm section."""
    from earshot.model.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(stage1_path)
    confirmer.provenance = provenance
    prov = dict(loaded.provenance)
    prov["confirm"] = provenance
    save_checkpoint(out_path, loaded.model, list(loaded.labels), loaded.frontend, dict(loaded.thresholds), prov,
                    confirm=confirmer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(data.default_data_dir()))
    ap.add_argument("--pretrained", default=str(data.default_data_dir().parent / "pretrained" / "mn04_as_mAP_432.pt"))
    ap.add_argument("--stage1", default="models/earshot.pt", help="streaming CNN checkpoint (stage 1)")
    ap.add_argument("--mine-with", default=None, help="checkpoint used to mine hard negatives (default: --stage1)")
    ap.add_argument("--out", required=True, help="cascade checkpoint to write")
    ap.add_argument("--cache", default=None, help="embedding cache (.npz): reused when it exists")
    ap.add_argument("--windows", type=int, default=30000, help="mixture windows")
    ap.add_argument("--mined", type=int, default=15000, help="at most this many mined negative windows")
    ap.add_argument("--trigger", type=float, default=0.1, help="stage-1 score that asks the confirmer")
    ap.add_argument("--p-opus", type=float, default=0.3, help="share of windows round-tripped through Opus")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=0, help="hidden units of the head (0: linear)")
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--reuse-hops", type=int, default=5, help="hops a confirmation stands while its class stays triggered")
    ap.add_argument("--heldout-sources", default=None,
                    help="comma-separated sources never trained on (default: data.HELDOUT_SOURCES)")
    ap.add_argument("--finetune-blocks", type=int, default=0,
                    help="fine-tune the tagger's last K inverted-residual blocks and last conv with the head (0: frozen)")
    ap.add_argument("--finetune-lr", type=float, default=3e-4,
                    help="peak learning rate of the fine-tuned blocks (0: keep them frozen, same cache)")
    ap.add_argument("--confirm-labels", default=None,
                    help="comma-separated classes the confirmer decides (default: all); stage 1 alone decides the others")
    ap.add_argument("--mine-share", type=float, default=1.0, help="share of the training negatives scanned for hard ones")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from earshot.model.checkpoint import load_checkpoint
    from earshot.model.confirm import Confirmer

    stage1 = load_checkpoint(args.stage1)
    if args.cache and Path(args.cache).is_file():
        cache = dict(np.load(args.cache))
        log.info("reusing %s: %d windows", args.cache, len(cache["x"]))
        if int(cache.get("tail_blocks", np.array([0]))[0]) != args.finetune_blocks:
            raise SystemExit(f"{args.cache} was built for another --finetune-blocks; give a new --cache")
    else:
        miner = load_checkpoint(args.mine_with) if args.mine_with else stage1
        cache = build_cache(args, miner)
        if args.cache:
            Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, **cache)
    tagger = load_tagger(args.pretrained)
    if args.finetune_blocks:
        head, summary = finetune(cache, tagger, args.finetune_blocks, args.seed, args.epochs, args.hidden,
                                 args.finetune_lr, args.weight_decay)
    else:
        head, summary = train_head(cache, args.seed, args.epochs, args.hidden, args.weight_decay)
    log.info("head trained: %s", summary)
    confirmed = [c.strip() for c in (args.confirm_labels or ",".join(stage1.labels)).split(",") if c.strip()]
    if not set(confirmed) <= set(stage1.labels):
        raise SystemExit(f"--confirm-labels: {confirmed} are not all among {list(stage1.labels)}")
    confirmer = Confirmer(tagger, head, list(stage1.labels), {label: args.trigger for label in confirmed},
                          reuse_hops=args.reuse_hops)
    prov = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": args.seed,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
            "pretrained": "EfficientAT mn04_as (AudioSet, mAP 0.432), MIT licence, "
                          + (f"last {args.finetune_blocks} blocks fine-tuned" if args.finetune_blocks and args.finetune_lr > 0
                             else "frozen"),
            "heldout_sources": list(data.parse_sources(args.heldout_sources)), **summary}
    attach_confirmer(args.stage1, args.out, confirmer, prov)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
