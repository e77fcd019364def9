#!/usr/bin/env python3
"""CPU benchmark: earshot's streaming path against recompute-per-hop and common recipes.

Usage: python tools/bench.py [--seconds 60] [--json out.json] [--quick]

Every contender runs in its own subprocess (peak RSS is per process), on one thread, with
random untrained weights (compute cost does not depend on the weights), over the same
synthetic audio. For each it measures:

- offline: CPU seconds per audio second (time.process_time) and real-time factor
  (wall seconds per audio second) for a whole file;
- live: audio fed in 0.1 s blocks as the daemon does; per-block processing time (wall
  median and p99, and thread-CPU p99, which is immune to preemption on a busy host) and
  the CPU share of one core for one live-rate stream (live CPU / audio duration);
- peak RSS of the process (resource.getrusage(RUSAGE_SELF).ru_maxrss) after the live run,
  and after the offline run as well.

Contenders:
  earshot      StreamingFeatures + StreamingScorer (live); features + score_windows (offline)
  recompute    same network, but log-mel of the last 1 s and the full-window forward every hop
  seed-recipe  1 s log-mel every hop + naive 3-conv CNN (32/64/128, 2x2 max-pool, softmax)
  yamnet-arch  MobileNetV1 (YAMNet layout, 521 outputs) on 0.975 s non-overlapping patches
               of 96 x 64 log-mel (as Frigate's audio detector feeds YAMNet)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

CONTENDERS = ("earshot", "recompute", "seed-recipe", "yamnet-arch")
SR = 16000
BLOCK = 1600  # samples per live block: the daemon's 0.1 s hop


def _synthetic_audio(seconds: float):  # noqa: ANN202 (numpy imported lazily in workers)
    """Deterministic test audio: pink-ish noise, a few tones and clicks, float32 in [-1, 1]."""
    import numpy as np

    rng = np.random.default_rng(1234)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    noise = np.cumsum(rng.standard_normal(n)) * 0.001
    noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
    x = 0.05 * rng.standard_normal(n) + noise + 0.1 * np.sin(2 * np.pi * 3000 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)
    clicks = rng.integers(0, n, size=max(1, int(seconds)))
    x[clicks] += 0.8
    return np.clip(x, -1, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Baseline networks (random weights)


def _seed_recipe_cnn(n_classes: int = 3):  # noqa: ANN202
    """The common tutorial CNN: 3x [conv3x3 + ReLU + 2x2 max-pool] (32/64/128), global pool, linear."""
    from torch import nn

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(1, 32),
        block(32, 64),
        block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, n_classes),
        nn.Softmax(dim=1),
    ).eval()


def _yamnet_arch(n_classes: int = 521):  # noqa: ANN202
    """MobileNetV1 as laid out in YAMNet: conv 3x3/2 (32), 13 depthwise-separable layers, 521 sigmoid."""
    from torch import nn

    def conv_bn(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def sep(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    layers = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    mods = [conv_bn(1, 32, 2)]
    cin = 32
    for cout, stride in layers:
        mods.append(sep(cin, cout, stride))
        cin = cout
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, n_classes), nn.Sigmoid()]
    return nn.Sequential(*mods).eval()


# ------------------------------------------------------------------------------------------
# Contenders: each returns (offline(audio), make_live() -> push(block))


def _earshot() -> tuple[Callable, Callable]:
    from earshot.features import FrontendParams, StreamingFeatures, features
    from earshot.model import CnnDims, SoundEventCnn, StreamingScorer, score_windows

    p = FrontendParams()
    model = SoundEventCnn(CnnDims()).eval()

    def offline(audio):  # noqa: ANN001, ANN202
        return score_windows(model, features(audio, p), p.chunk_frames, 10)

    def make_live() -> Callable:
        sf, scorer = StreamingFeatures(p), StreamingScorer(model, p.chunk_frames, 10)
        return lambda block: scorer.push(sf.push(block))

    return offline, make_live


def _window_recompute(net_fn: Callable, frontend: Any) -> tuple[Callable, Callable]:
    """Shared shape of the recompute contenders: full 1 s log-mel + full forward every hop."""
    import numpy as np
    import torch

    win = frontend.win_length + (frontend.chunk_frames - 1) * frontend.hop_length  # samples for 100 frames

    def offline(audio):  # noqa: ANN001, ANN202
        ends = range(win, len(audio) + 1, BLOCK)
        out = []
        with torch.inference_mode():
            batch = []
            for e in ends:
                batch.append(net_fn.prep(audio[e - win : e]))
                if len(batch) == 64:
                    out.append(net_fn(torch.stack(batch)))
                    batch = []
            if batch:
                out.append(net_fn(torch.stack(batch)))
        return out

    def make_live() -> Callable:
        ring = np.zeros(win, dtype=np.float32)
        seen = [0]

        def push(block):  # noqa: ANN001, ANN202
            ring[: -len(block)] = ring[len(block) :]
            ring[-len(block) :] = block
            seen[0] += len(block)
            if seen[0] < win:
                return None
            with torch.inference_mode():
                return net_fn(net_fn.prep(ring).unsqueeze(0))

        return push

    return offline, make_live


class _Net:
    """A callable network with a `prep(samples) -> features tensor` for one window."""

    def __init__(self, module: Any, prep: Callable) -> None:
        self.module, self.prep = module, prep

    def __call__(self, x):  # noqa: ANN001, ANN204
        return self.module(x)


def _recompute() -> tuple[Callable, Callable]:
    import torch

    from earshot.features import FrontendParams, features
    from earshot.model import CnnDims, SoundEventCnn

    p = FrontendParams()
    model = SoundEventCnn(CnnDims()).eval()
    net = _Net(lambda x: torch.sigmoid(model(x)), lambda s: torch.from_numpy(features(s, p)))  # (100, 64)
    return _window_recompute(net, p)


def _seed_recipe() -> tuple[Callable, Callable]:
    import torch

    from earshot.features import FrontendParams, log_mel

    p = FrontendParams()
    cnn = _seed_recipe_cnn()
    net = _Net(cnn, lambda s: torch.from_numpy(log_mel(s, p).T.copy()).unsqueeze(0))  # (1, 64, 100)
    return _window_recompute(net, p)


def _yamnet() -> tuple[Callable, Callable]:
    import numpy as np
    import torch

    from earshot.features import FrontendParams, log_mel

    # YAMNet frontend: 25 ms / 10 ms, 64 mel 125-7500 Hz, log(mel + 0.001); 15600 samples -> 96 frames.
    p = FrontendParams(f_min=125.0, f_max=7500.0, log_floor=0.001)
    patch = 15600
    net = _yamnet_arch()

    def prep(s):  # noqa: ANN001, ANN202
        return torch.from_numpy(log_mel(s, p)[:96]).unsqueeze(0)  # (1, 96, 64)

    def offline(audio):  # noqa: ANN001, ANN202
        with torch.inference_mode():
            xs = [prep(audio[i : i + patch]) for i in range(0, len(audio) - patch + 1, patch)]
            return [net(torch.stack(xs[i : i + 16])) for i in range(0, len(xs), 16)]

    def make_live() -> Callable:
        buf = [np.zeros(0, dtype=np.float32)]

        def push(block):  # noqa: ANN001, ANN202
            b = np.concatenate((buf[0], block))
            out = None
            while len(b) >= patch:  # non-overlapping 0.975 s patches, as Frigate feeds YAMNet
                with torch.inference_mode():
                    out = net(prep(b[:patch]).unsqueeze(0))
                b = b[patch:]
            buf[0] = b
            return out

        return push

    return offline, make_live


_FACTORIES = {"earshot": _earshot, "recompute": _recompute, "seed-recipe": _seed_recipe, "yamnet-arch": _yamnet}


# ------------------------------------------------------------------------------------------
# Worker (one contender per process) and driver


def _worker(name: str, seconds: float) -> dict[str, Any]:
    """Measure one contender in this process; returns its figures."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    audio = _synthetic_audio(seconds)
    offline, make_live = _FACTORIES[name]()

    warm = audio[: int(2.5 * SR)]  # warm-up: allocator, kernels, caches
    offline(warm)
    push = make_live()
    for i in range(0, len(warm) - BLOCK + 1, BLOCK):
        push(warm[i : i + BLOCK])

    # Live first, so the peak RSS read after it is the live path's (offline batches are bigger).
    push = make_live()
    hop_wall, hop_cpu = [], []
    c0 = time.process_time()
    for i in range(0, len(audio) - BLOCK + 1, BLOCK):
        t, tc = time.perf_counter(), time.thread_time()
        push(audio[i : i + BLOCK])
        hop_cpu.append(time.thread_time() - tc)
        hop_wall.append(time.perf_counter() - t)
    live_cpu = time.process_time() - c0
    live_s = len(hop_wall) * BLOCK / SR
    rss_live = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    c0, w0 = time.process_time(), time.perf_counter()
    offline(audio)
    off_cpu, off_wall = time.process_time() - c0, time.perf_counter() - w0

    result: dict[str, Any] = {
        "name": name,
        "audio_s": seconds,
        "cpu_s_per_audio_s": off_cpu / seconds,
        "offline_rtf": off_wall / seconds,
        "hop_ms_median": float(np.median(hop_wall) * 1e3),
        "hop_ms_p99": float(np.percentile(hop_wall, 99) * 1e3),
        "hop_cpu_ms_p99": float(np.percentile(hop_cpu, 99) * 1e3),
        "live_cpu_share_pct": 100.0 * live_cpu / live_s,
        "peak_rss_mb": rss_live,
        "peak_rss_offline_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if name == "earshot":
        from earshot.model import CnnDims, macs_per_frame

        result["macs_per_frame"] = macs_per_frame(CnnDims())
    return result


def _idle_rss() -> dict[str, Any]:
    """Peak RSS of a process that only imports torch, numpy and earshot (the floor for all)."""
    import torch  # noqa: F401

    import earshot.features  # noqa: F401
    import earshot.model  # noqa: F401

    return {"name": "idle", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _run_worker(name: str, seconds: float) -> dict[str, Any]:
    """Run one contender in a fresh subprocess and parse its JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    daemon_dir = str(Path(__file__).resolve().parents[1] / "daemon")
    env["PYTHONPATH"] = daemon_dir + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench worker {name} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]], idle: dict[str, Any]) -> str:
    """Absolute figures and ratios against earshot (same run)."""
    ref = next(r for r in rows if r["name"] == "earshot")
    cols = [
        ("cpu_s_per_audio_s", "offline CPU s/s", "{:.5f}"),
        ("offline_rtf", "offline RTF", "{:.5f}"),
        ("hop_ms_median", "hop median ms", "{:.3f}"),
        ("hop_ms_p99", "hop p99 ms", "{:.3f}"),
        ("hop_cpu_ms_p99", "hop p99 CPU ms", "{:.3f}"),
        ("live_cpu_share_pct", "live CPU % core", "{:.3f}"),
        ("peak_rss_mb", "live peak RSS MB", "{:.0f}"),
        ("peak_rss_offline_mb", "+offline RSS MB", "{:.0f}"),
    ]
    lines = [f"{'contender':<12} " + " ".join(f"{h:>17}" for _, h, _ in cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r[key]
            ratio = "" if r is ref or ref[key] <= 0 else f" ({v / ref[key]:.1f}x)"
            cells.append(f"{fmt.format(v) + ratio:>17}")
        lines.append(f"{r['name']:<12} " + " ".join(cells))
    lines.append("hop = one 0.1 s block on the live path (wall time; p99 wall includes preemption on a busy host)")
    lines.append(f"(ratios vs earshot; idle process with torch+earshot imported: {idle['peak_rss_mb']:.0f} MB peak RSS)")
    if "macs_per_frame" in ref:
        lines.append(f"earshot network: {ref['macs_per_frame']} multiply-adds per 10 ms frame")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run every contender (driver) or one (worker)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="synthetic audio length (s), default 60")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--quick", action="store_true", help="5 s of audio: a smoke test, figures are noisy")
    ap.add_argument("--worker", choices=CONTENDERS + ("idle",), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    seconds = 5.0 if args.quick else args.seconds
    if seconds < 3.0:
        ap.error("--seconds must be at least 3 (the warm-up uses 2.5 s)")
    if args.worker:
        result = _idle_rss() if args.worker == "idle" else _worker(args.worker, seconds)
        print(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    idle = _run_worker("idle", seconds)
    rows = [_run_worker(name, seconds) for name in CONTENDERS]
    print(f"earshot bench: {seconds:g} s synthetic audio, 1 thread, 0.1 s live blocks, random weights")
    print(_table(rows, idle))
    print(f"(bench took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "idle": idle, "contenders": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
