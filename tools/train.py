"""Train the earshot detector on mixtures of real recordings.

    python tools/train.py --data ../shared/data --out models/earshot.pt [--minutes 40] [--seed 0]

Segments come from `augment.Mixer.segments` (events mixed into negative backgrounds, run through the
daemon's own frontend), made in a DataLoader worker process while the main process trains. Each
segment holds 16 overlapping 1 s windows, 0.1 s apart, as the daemon scores them; the network
computes each frame once and pools every window from the shared frame outputs (`window_logits`).
The loss is a masked multi-label binary cross-entropy per window (a class is ignored in windows
where it is ambiguous); AdamW with a one-cycle schedule (warm-up, then cosine decay); the checkpoint
holds the exponential moving average of the weights (`update_average`). With `--minutes` the schedule
runs on wall-clock progress, so the run ends on time on any machine; the number of steps actually
taken is recorded in the checkpoint's provenance and `--steps N` alone replays a fixed-length run.
Hard negatives mined from the training negatives replace part of every batch (`--mine`, tools/mining.py);
with `--distill W` the network also learns EfficientAT mn04's AudioSet tags of one window per segment
(tools/distill.py).

The core is `train(make_examples, dims, ...)`, which knows nothing about files: the tests call it with
a synthetic-sound mixer to build the tiny model used by the end-to-end tests.
"""

from __future__ import annotations

import os

# numpy's OpenBLAS would start a thread per core inside every data worker; on a 2-core machine
# those threads fight the training threads. Must be set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from earshot.features import FrontendParams  # noqa: E402
from earshot.model import CnnDims, macs_per_frame  # noqa: E402
from earshot.model.checkpoint import save_checkpoint  # noqa: E402
from earshot.model.cnn import SoundEventCnn, pool_windows  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augment  # noqa: E402
import data  # noqa: E402
import distill  # noqa: E402
import mining  # noqa: E402

log = logging.getLogger("train")

MakeExamples = Callable[[np.random.Generator], list[augment.Example]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    steps: int = 100_000
    """Optimizer steps (the schedule's length unless `max_minutes` ends the run first)."""
    batch_size: int = 128
    """Examples (windows or segments) per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 1e-2
    """AdamW decoupled weight decay."""
    warmup: float = 0.05
    """Fraction of the run spent warming up the learning rate."""
    max_minutes: float | None = None
    """Wall-clock budget (min): the schedule follows max(step/steps, elapsed/budget) and stops at 1."""
    seed: int = 0
    """Seeds the model's initialisation and every worker's example stream."""
    num_workers: int = 1
    """DataLoader worker processes making examples (0 = in the training process)."""
    threads: int = 2
    """torch threads of the training process."""
    device: str = "cpu"
    """Where the network trains ("cpu", "cuda", "cuda:1"); examples are always made on the CPU."""
    shuffle_buffer: int = 512
    """Examples held by each worker to decorrelate consecutive ones."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights that is returned (ramped up as
    min(decay, (1 + step) / (10 + step)), so short runs average over their last steps only)."""
    pos_weight: tuple[float, ...] = field(default_factory=tuple)
    """Per-class weight of positive targets in the loss (empty = 1 for all)."""
    mined_fraction: float = 0.0
    """Share of each batch replaced by mined hard negatives (`mining.HardNegativeMiner`; 0 = no mining)."""
    mine_every: int = 25
    """Steps between two scans of fresh negative audio by the miner."""
    mine_after: float = 0.1
    """Fraction of the run before mining starts: an untrained model's high scores say nothing."""
    progress: bool = True
    """Show a tqdm progress bar."""


class ExampleStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of (window, target, mask) made by `make_examples`.

    Worker w of a run with seed s draws from `np.random.default_rng([s, w])`, so a run is
    reproducible for a fixed seed, worker count and step count.
    """

    def __init__(self, make_examples: MakeExamples, seed: int, shuffle_buffer: int):
        self.make_examples = make_examples
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, wid])
        buf: list[augment.Example] = []
        while True:
            buf.extend(self.make_examples(rng))
            while len(buf) > self.shuffle_buffer:
                i = int(rng.integers(len(buf)))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
            if self.shuffle_buffer == 0:
                while buf:
                    yield buf.pop(0)


def window_logits(model: SoundEventCnn, x: torch.Tensor, chunk_frames: int, hop_frames: int = augment.WINDOW_HOP) -> torch.Tensor:
    """Logits (B, W, C) of the windows of `chunk_frames` ending every `hop_frames` in x (B, T, n_mels), the last at T.

    The frame embeddings are computed once for the whole segment and pooled per window by
    `pool_windows`, as the daemon's batch scorer pools them; the result equals `model(window)` for
    every window (the convolutions are valid in time, so an embedding does not depend on where the
    window starts).
    """
    return pooled_logits(model, model.embed(x), chunk_frames, hop_frames)


def pooled_logits(model: SoundEventCnn, emb: torch.Tensor, chunk_frames: int, hop_frames: int = augment.WINDOW_HOP
                  ) -> torch.Tensor:
    """`window_logits` from the segment's frame embeddings (B, L, D)."""
    logits, att = model.frame_outputs(emb)  # (B, L, C)
    n = chunk_frames - model.dims.receptive_frames + 1  # embeddings per window
    if (logits.shape[1] - n) % hop_frames:
        raise ValueError(f"segment of {emb.shape[1] + model.dims.receptive_frames - 1} frames is not "
                         f"{chunk_frames} + a multiple of {hop_frames}")
    return pool_windows(logits, att, n, hop_frames)


@torch.no_grad()
def update_average(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """averaged <- decay * averaged + (1 - decay) * model, for weights and BatchNorm statistics.

    The average of the weights along the end of the run generalises better than the last step's
    weights and needs no extra forward passes; BatchNorm running statistics are averaged the same
    way, its step counters copied.
    """
    for a, p in zip(averaged.parameters(), model.parameters()):
        a.lerp_(p, 1.0 - decay)
    for a, b in zip(averaged.buffers(), model.buffers()):
        if a.dtype.is_floating_point:
            a.lerp_(b, 1.0 - decay)
        else:
            a.copy_(b)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean binary cross-entropy over the (window, class) pairs with mask 1."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """One-cycle learning rate at `progress` in [0, 1]: linear warm-up, cosine decay to 1 % of peak."""
    if progress < warmup:
        return peak * (0.05 + 0.95 * progress / warmup)
    q = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * q)))


@dataclass
class TrainStats:
    """What a training run did (goes into the checkpoint's provenance)."""

    steps: int = 0
    """Optimizer steps taken."""
    examples: int = 0
    """Labelled windows seen (steps x batch size x windows per example)."""
    wall_s: float = 0.0
    """Wall-clock time of the optimisation (s)."""
    final_loss: float = float("nan")
    """Exponential moving average (0.98) of the training loss at the end."""
    loss_history: list[float] = field(default_factory=list)
    """That average every 100 steps."""
    mined_examples: int = 0
    """Of `examples`, the windows that came from mined hard negatives (the miner counts what it scanned)."""


def train(make_examples: MakeExamples, dims: CnnDims, cfg: TrainConfig = TrainConfig(),
          chunk_frames: int = FrontendParams().chunk_frames,
          miner: mining.HardNegativeMiner | None = None,
          init_state: dict[str, torch.Tensor] | None = None,
          distillation: distill.Distillation | None = None) -> tuple[SoundEventCnn, TrainStats]:
    """Train a `SoundEventCnn` on windows or segments from `make_examples`; returns it in eval mode, with stats.

    With a `miner` and `cfg.mined_fraction` > 0, the averaged model scans fresh negative audio every
    `cfg.mine_every` steps and that share of every batch is replaced by segments it fired on.
    `init_state` (a state dict of the same dims, loaded strictly) starts from trained weights: fine-tuning.
    With a `distillation`, `make_examples` gives `distill.DistillExample`s and the model also learns the
    teacher's tags of one window per segment through the distillation's head (trained here, not returned).
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    # channels_last: oneDNN's convolution backward on these narrow (B, C, F, T) maps is 1.5x faster in
    # this layout on the 2-core CPU (a step of 32 segments: 342 ms vs 514 ms); the same function.
    device = torch.device(cfg.device)
    model = SoundEventCnn(dims)
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
    model = model.to(device, memory_format=torch.channels_last)
    averaged = copy.deepcopy(model).requires_grad_(False).eval()  # only the miner runs it during training
    mine_rng = np.random.default_rng([cfg.seed, 1_000_003])
    n_mined = int(round(cfg.mined_fraction * cfg.batch_size)) if miner is not None else 0

    def averaged_scores(f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(window_logits(averaged, f.to(device), chunk_frames)).cpu()
    params = list(model.parameters())
    if distillation is not None:
        distillation.head.to(device).train()
        params += list(distillation.head.parameters())
    positions = chunk_frames - dims.receptive_frames + 1  # frame embeddings per window
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = ExampleStream(make_examples, cfg.seed, cfg.shuffle_buffer)
    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.num_workers else None,
        pin_memory=device.type == "cuda",
    )
    pos_weight = torch.tensor(cfg.pos_weight, dtype=torch.float32, device=device) if cfg.pos_weight else None
    stats = TrainStats()
    t0 = time.monotonic()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps if cfg.max_minutes is None else 1000, unit="step" if cfg.max_minutes is None else "‰",
                   dynamic_ncols=True, mininterval=2.0)
    ema = None
    model.train()
    it = iter(loader)
    try:
        while stats.steps < cfg.steps:
            elapsed = time.monotonic() - t0
            progress = stats.steps / cfg.steps
            if cfg.max_minutes is not None:
                progress = max(progress, elapsed / (60.0 * cfg.max_minutes))
            if progress >= 1.0:
                break
            lr = lr_at(progress, cfg.lr, cfg.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y, m, *teacher = next(it)  # teacher: (tags, window index) when distilling
            taught = torch.ones(x.shape[0])  # segments that carry the teacher's tags
            if n_mined and progress >= cfg.mine_after:
                if stats.steps % cfg.mine_every == 0:
                    miner.mine(averaged_scores, mine_rng)
                mined = miner.draw(min(n_mined, x.shape[0]), mine_rng)
                if mined is not None:  # the last k segments become mined negatives: every class 0, none ignored
                    k = mined.shape[0]
                    x, y, m = x.clone(), y.clone(), m.clone()
                    x[-k:], y[-k:], m[-k:] = torch.from_numpy(mined), 0.0, 1.0
                    taught[-k:] = 0.0
                    stats.mined_examples += k * y.shape[1]
            x, y, m = (t.to(device, non_blocking=True) for t in (x, y, m))
            emb = model.embed(x)
            loss = masked_bce(pooled_logits(model, emb, chunk_frames), y, m, pos_weight)
            if distillation is not None:
                tags, k = (t.to(device, non_blocking=True) for t in teacher)
                loss = loss + distillation.weight * distill.distill_loss(
                    distillation.head, emb, tags, k, taught.to(device), positions, augment.WINDOW_HOP)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            update_average(averaged, model, min(cfg.ema_decay, (1 + stats.steps) / (10 + stats.steps)))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"training diverged at step {stats.steps} (loss {value})")
            ema = value if ema is None else 0.98 * ema + 0.02 * value
            stats.steps += 1
            stats.examples += y.shape[0] * y.shape[1]
            if stats.steps % 100 == 0:
                stats.loss_history.append(round(ema, 5))
            if bar is not None:
                if cfg.max_minutes is None:
                    bar.update(1)
                else:
                    bar.n = int(1000 * progress)  # progress in per mille of the time budget
                    if stats.steps % 50 == 0:
                        bar.refresh()
                if stats.steps % 20 == 0:
                    bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", step=stats.steps, refresh=False)
    finally:
        if bar is not None:
            bar.close()
        del it  # shuts the workers down
    stats.wall_s = time.monotonic() - t0
    stats.final_loss = float("nan") if ema is None else ema
    averaged = averaged.to("cpu", memory_format=torch.contiguous_format).eval()
    return averaged, stats


# ---------------------------------------------------------------------------
# Command line


def git_commit() -> str:
    """HEAD of the repository this script lives in, with `-dirty` when the tree has changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def parse_dims(text: str | None) -> CnnDims:
    """`CnnDims` from 'channels=16,24,32,48 embed_dim=64' style overrides (default dims if None)."""
    if not text:
        return CnnDims()
    kw: dict = {}
    for item in text.split():
        key, _, value = item.partition("=")
        kw[key] = [int(v) for v in value.split(",")] if "," in value else (float(value) if "." in value else int(value))
    for key in ("channels", "freq_strides", "time_kernels", "dilations"):
        if key in kw and isinstance(kw[key], int):
            kw[key] = [kw[key]]
    # A different depth given by `channels` alone: stride 2, kernel 3 and doubling dilations per layer.
    n = len(kw.get("channels", CnnDims().channels))
    kw.setdefault("freq_strides", [2] * n)
    kw.setdefault("time_kernels", [3] * n)
    kw.setdefault("dilations", [2**i for i in range(n)])
    return CnnDims(**kw)


def parse_frontend(text: str | None) -> FrontendParams:
    """`FrontendParams` from 'level_tau_s=5 n_mels=40' style overrides (default frontend if None)."""
    kw = FrontendParams().to_dict()
    for item in (text or "").split():
        key, _, value = item.partition("=")
        if key not in kw:
            raise ValueError(f"unknown frontend parameter {key!r}")
        number = float(value)
        if isinstance(kw[key], int) and not number.is_integer():
            raise ValueError(f"{key} must be an integer, got {value!r}")
        kw[key] = type(kw[key])(number)
    return FrontendParams.from_dict(kw)


def parse_mix(text: str | None) -> dict[str, float | tuple[float, ...]]:
    """MixConfig overrides from 'p_reverb=0.5 ebr_db=-5,15' (numbers; ranges comma-separated)."""
    types = {f.name: f.type for f in dataclasses.fields(augment.MixConfig)}  # annotations as strings
    out: dict[str, float | tuple[float, ...]] = {}
    for item in (text or "").split():
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"unknown MixConfig field {key!r}")
        numbers = tuple(float(v) for v in value.split(","))
        out[key] = int(numbers[0]) if types[key] == "int" else (numbers if len(numbers) > 1 else numbers[0])
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=str(data.default_data_dir()), help="data folder with index.csv")
    ap.add_argument("--out", default="models/earshot.pt", help="checkpoint to write")
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget for the optimisation (0 = none)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: as many as --minutes allows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=32, help="segments per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--workers", type=int, default=1, help="example-making worker processes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for training (default: 2 minus --workers, at least 1: on a 2-core machine "
                         "oversubscribed OpenMP threads make each step several times slower)")
    ap.add_argument("--windows", type=int, default=SEGMENT_WINDOWS,
                    help=f"windows per training segment, every {augment.WINDOW_HOP} frames")
    ap.add_argument("--dims", default=None, help="CnnDims overrides, e.g. 'channels=16,24,32,48 embed_dim=64'")
    ap.add_argument("--frontend", default=None, help="FrontendParams overrides (stored in the checkpoint), e.g. 'level_tau_s=5'")
    ap.add_argument("--mix", default=None, help="MixConfig overrides (augment.py), e.g. 'p_reverb=0.5 p_channel=0.4'")
    ap.add_argument("--holdout", choices=("sources", "none"), default="sources",
                    help="sources: never train on data.HELDOUT_SOURCES (validation by held-out source); none: train on all sources")
    ap.add_argument("--heldout-sources", default=None,
                    help="comma-separated sources to hold out with --holdout sources (default: data.HELDOUT_SOURCES)")
    ap.add_argument("--device", default="cpu",
                    help="where the network trains: cpu, or cuda on a GPU machine (then give --workers as the "
                         "CPU cores can feed, e.g. 14 of 16: examples are made on the CPU)")
    ap.add_argument("--mine", type=float, default=0.125,
                    help="share of each batch replaced by hard negatives mined where the model fires on fresh "
                         "training negatives (0 = no mining; see tools/mining.py)")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of the distillation loss: the network also learns EfficientAT mn04's 527 AudioSet "
                         "tags of one window per segment (0 = off; see tools/distill.py)")
    ap.add_argument("--pretrained", default=str(data.default_data_dir().parent / "pretrained" / "mn04_as_mAP_432.pt"),
                    help="the teacher's weights for --distill (EfficientAT mn04_as state dict)")
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint's weights (fine-tuning); its network and frontend become the "
                         "run's, --dims and --frontend must not be given")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as exc:  # an unknown name, or a CUDA device this torch cannot use
        print(f"error: --device {args.device}: {str(exc).splitlines()[0]} (use --device cpu)", file=sys.stderr)
        return 2

    if not 0 <= args.mine < 1:  # NaN fails too
        print("error: --mine must be at least 0 and below 1", file=sys.stderr)
        return 2
    if not 0 <= args.distill <= 1000:  # NaN fails too
        print("error: --distill must be between 0 and 1000", file=sys.stderr)
        return 2
    teacher = distill.TagTeacher(args.pretrained) if args.distill > 0 else None
    if teacher is not None:
        try:
            teacher.check()
        except ValueError as exc:
            print(f"error: --pretrained: {exc}", file=sys.stderr)
            return 2
    try:
        frontend = parse_frontend(args.frontend)
    except (TypeError, ValueError) as exc:
        print(f"error: --frontend: {exc}", file=sys.stderr)
        return 2
    try:
        dims = parse_dims(args.dims)
    except (TypeError, ValueError) as exc:
        print(f"error: --dims: {exc}", file=sys.stderr)
        return 2
    init_state = None
    if args.init:
        if args.dims or args.frontend:
            print("error: --init takes the network and frontend of its checkpoint: drop --dims and --frontend",
                  file=sys.stderr)
            return 2
        from earshot.model import CheckpointError
        from earshot.model.checkpoint import load_checkpoint

        try:
            start = load_checkpoint(args.init)
        except CheckpointError as exc:
            print(f"error: --init: {exc}", file=sys.stderr)
            return 2
        if list(start.labels) != list(data.EVENT_LABELS):
            print(f"error: --init: {args.init} has labels {list(start.labels)}, training uses {list(data.EVENT_LABELS)}",
                  file=sys.stderr)
            return 2
        dims, frontend, init_state = start.dims, start.frontend, start.model.state_dict()
    if dims.n_mels != frontend.n_mels:
        print(f"error: the network takes n_mels={dims.n_mels} but the frontend makes {frontend.n_mels}: "
              f"give the same n_mels to --dims and --frontend", file=sys.stderr)
        return 2
    try:
        mix_overrides = parse_mix(args.mix)
    except (TypeError, ValueError) as exc:
        print(f"error: --mix: {exc}", file=sys.stderr)
        return 2
    try:
        clips = data.read_index(args.data)
        if args.holdout == "sources":
            held = data.parse_sources(args.heldout_sources)
            train_clips, val_clips, heldout_clips = data.source_split(clips, heldout_sources=held)
            log.info("held out %d clips of %d sources (never trained on)", len(heldout_clips), len(held))
        else:
            train_clips, val_clips = data.split(clips)
        log.info("index: %d clips, %d train / %d validation (validation groups: %d)", len(clips), len(train_clips),
                 len(val_clips), len({c.group for c in val_clips}))
        t = time.monotonic()
        audio = data.load_all(args.data, train_clips)
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("loaded %.2f h of training audio in %.1f s", sum(len(a) for a in audio) / data.SAMPLE_RATE / 3600,
             time.monotonic() - t)
    labels = data.EVENT_LABELS
    span_s = max(augment.MixConfig().span_s, (args.windows - 1) * augment.WINDOW_HOP * frontend.hop_length / frontend.sample_rate)
    mix_cfg = augment.MixConfig(**{"segment_windows": args.windows, "span_s": span_s, **mix_overrides})
    mixer = augment.real_mixer(list(zip(train_clips, audio)), labels, frontend, mix_cfg)
    cfg = TrainConfig(
        steps=args.steps if args.steps is not None else 10_000_000,
        batch_size=args.batch_size,
        lr=args.lr,
        max_minutes=args.minutes if args.minutes > 0 else None,
        seed=args.seed,
        num_workers=args.workers,
        device=args.device,
        threads=args.threads if args.threads is not None else max(1, 2 - args.workers),
        progress=not args.no_progress,
        mined_fraction=args.mine,
    )
    miner = None
    if args.mine > 0:
        negatives = [(c, x) for c, x in zip(train_clips, audio) if c.label == data.NEGATIVE and len(x) >= frontend.win_length]
        pool = augment.StratifiedPool(negatives, augment.impulsive_weight)
        miner = mining.HardNegativeMiner(pool.draw, frontend, args.windows, level_dbfs=mix_cfg.level_dbfs)
    if cfg.max_minutes is None and args.steps is None:
        print("error: give --steps or a positive --minutes", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in SoundEventCnn(dims).parameters())
    log.info("device %s, torch threads %d, example workers %d", cfg.device, cfg.threads, cfg.num_workers)
    log.info("model %s: %d parameters, %.1f M MAC/s of audio", dims, n_params, macs_per_frame(dims) * 100 / 1e6)
    make_examples: Callable = mixer.segments
    distillation = None
    if teacher is not None:
        make_examples = distill.TeacherSegments(mixer, teacher)
        distillation = distill.Distillation(distill.TagHead(dims.embed_dim), args.distill)
    model, stats = train(make_examples, dims, cfg, frontend.chunk_frames, miner, init_state, distillation)
    log.info("trained %d steps (%d windows) in %.1f min, final loss %.4f", stats.steps, stats.examples, stats.wall_s / 60,
             stats.final_loss)
    if miner is not None:
        log.info("mined %d hard-negative segments from %.2f h of training negatives; %d of the windows trained on came from them",
                 miner.mined, miner.scanned_s / 3600, stats.mined_examples)
    provenance = {
        "git_commit": git_commit(),
        "data_index_sha256": data.index_sha256(args.data),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "steps": stats.steps,
        "examples_seen": stats.examples,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "wall_time_s": round(stats.wall_s, 1),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "final_train_loss": round(stats.final_loss, 5),
        "loss_history_per_100_steps": stats.loss_history,
        "train": {"files": len(train_clips), "groups": len({c.group for c in train_clips}), **data.summarize(train_clips)},
        "validation": {"files": len(val_clips), "groups": len({c.group for c in val_clips}), **data.summarize(val_clips)},
        "split": f"by group, {data.VAL_FRACTION:.0%} of the groups of every (label, source), salt {data.SPLIT_SALT}"
                 + (f"; sources held out whole: {', '.join(data.parse_sources(args.heldout_sources))}" if args.holdout == "sources" else ""),
        "sources": sorted({c.source for c in clips}),
        "mix": dataclasses.asdict(mix_cfg),
        "init": ({"checkpoint": Path(args.init).name,
                  **{k: start.provenance.get(k) for k in ("git_commit", "date", "steps", "command", "init")}}
                 if args.init else None),
        "mining": ({"fraction": cfg.mined_fraction, "every_steps": cfg.mine_every, "after": cfg.mine_after,
                    "scanned_h": round(miner.scanned_s / 3600, 2), "segments": miner.mined,
                    "windows_trained": stats.mined_examples} if miner is not None else None),
        "distillation": ({"teacher": "EfficientAT mn04_as (AudioSet mAP 0.432, MIT licence), frozen",
                          "teacher_weights": Path(args.pretrained).name, "tags": distill.N_TAGS,
                          "windows_per_segment": 1, "weight": args.distill} if teacher is not None else None),
        "parameters": n_params,
        "torch": torch.__version__,
        "device": cfg.device,
    }
    thresholds = {label: 0.5 for label in labels}
    save_checkpoint(args.out, model, labels, frontend, thresholds, provenance)
    log.info("wrote %s (%.1f kB)", args.out, Path(args.out).stat().st_size / 1024)
    return 0


SEGMENT_WINDOWS = augment.MixConfig().segment_windows

if __name__ == "__main__":
    sys.exit(main())
