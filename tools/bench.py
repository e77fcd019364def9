#!/usr/bin/env python3
"""CPU benchmark: earshot's streaming path against recompute-per-hop and common recipes.

Usage: python tools/bench.py [--seconds 60] [--streams 1,10,100] [--json out.json] [--quick]

Every contender runs in its own subprocess (peak RSS is per process), on one thread, with
random untrained weights (compute cost does not depend on the weights), over the same
synthetic audio. For each it measures:

- offline: CPU seconds per audio second (time.process_time) and real-time factor
  (wall seconds per audio second) for a whole file;
- live: audio fed in 0.1 s blocks as the daemon does; per-block processing time (wall
  median and p99, and thread-CPU p99, which is immune to preemption on a busy host) and
  the CPU share of one core for one live-rate stream (live CPU / audio duration);
- peak RSS of the process (VmHWM in /proc/self/status) after the live run, and after the
  offline run as well.

Contenders:
  earshot      StreamingFeatures + StreamingScorer (live); features + score_windows (offline)
  earshot-onnx the same network exported to ONNX (earshot.model.onnx), run by ONNX Runtime;
               this process never imports torch
  recompute    same network, but log-mel of the last 1 s and the full-window forward every hop
  seed-recipe  1 s log-mel every hop + naive 3-conv CNN (32/64/128, 2x2 max-pool, softmax)
  yamnet-arch  MobileNetV1 (YAMNet layout, 521 outputs) on 0.975 s non-overlapping patches
               of 96 x 64 log-mel (as Frigate's audio detector feeds YAMNet)

Memory (daemon-like process, one stream): imports what `earshot run` imports for the worker
(analyzer, detector, capture, MQTT/ZeroMQ publishers), loads the model file with
`earshot.model.load_model` (.pt -> torch, .onnx -> ONNX Runtime), runs a StreamAnalyzer over
the audio in 0.1 s blocks; peak RSS, and whether torch was imported.

Many streams (--streams 1,10,100): N live-rate streams, each pushing 0.1 s of audio per tick
(a StreamingFeatures per stream), scored either by one MultiStreamScorer call per tick (all
streams batched, as one worker does) or by N independent StreamingScorers; CPU per stream in
% of one core and the wall p99 of one tick (all N streams), for the torch and ONNX backends.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

CONTENDERS = ("earshot", "earshot-onnx", "recompute", "seed-recipe", "yamnet-arch")
DAEMONS = ("daemon-torch", "daemon-onnx")
LABELS = ("alarm", "glass_break", "gunshot")
SR = 16000
BLOCK = 1600  # samples per live block: the daemon's 0.1 s hop
_STREAM_ARGS: list[str] = []  # --stream-seconds passed on to workers (set by main)


def _peak_rss_mb() -> float:
    """Peak RSS of this process (MB): VmHWM, which starts afresh at exec.

    ru_maxrss is not used: on Linux a child inherits its parent's high-water mark through
    fork + exec, so a driver that imported torch would inflate every worker's figure.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    from earshot.model import CnnDims
    from earshot.model.cnn import SoundEventCnn, StreamingScorer, score_windows

    p = FrontendParams()
    model = SoundEventCnn(CnnDims()).eval()

    def offline(audio):  # noqa: ANN001, ANN202
        return score_windows(model, features(audio, p), p.chunk_frames, 10)

    def make_live() -> Callable:
        sf, scorer = StreamingFeatures(p), StreamingScorer(model, p.chunk_frames, 10)
        return lambda block: scorer.push(sf.push(block))

    return offline, make_live


def _earshot_onnx() -> tuple[Callable, Callable]:
    """The same network through ONNX Runtime (the file the driver exported); no torch import."""
    from earshot.model import load_model
    from earshot.features import FrontendParams, StreamingFeatures, features

    p = FrontendParams()
    model = load_model(Path(os.environ["EARSHOT_BENCH_MODELS"]) / "bench.onnx", threads=1)

    def offline(audio):  # noqa: ANN001, ANN202
        return model.score_windows(features(audio, p), p.chunk_frames, 10)

    def make_live() -> Callable:
        sf, scorer = StreamingFeatures(p), model.streaming_scorer(p.chunk_frames, 10)
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
    from earshot.model import CnnDims
    from earshot.model.cnn import SoundEventCnn

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


_FACTORIES = {"earshot": _earshot, "earshot-onnx": _earshot_onnx, "recompute": _recompute, "seed-recipe": _seed_recipe, "yamnet-arch": _yamnet}


# ------------------------------------------------------------------------------------------
# Worker (one contender per process) and driver


def _worker(name: str, seconds: float) -> dict[str, Any]:
    """Measure one contender in this process; returns its figures."""
    import numpy as np

    if name != "earshot-onnx":  # the ONNX contender's RSS must not include torch
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
    rss_live = _peak_rss_mb()

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
        "peak_rss_offline_mb": _peak_rss_mb(),
    }
    result["torch_imported"] = "torch" in sys.modules
    if name == "earshot":
        from earshot.model import CnnDims, macs_per_frame

        result["macs_per_frame"] = macs_per_frame(CnnDims())
    return result


def _idle_rss() -> dict[str, Any]:
    """Peak RSS of a process that only imports torch, numpy and earshot (the floor for all)."""
    import torch  # noqa: F401

    import earshot.features  # noqa: F401
    import earshot.model.cnn  # noqa: F401

    return {"name": "idle", "peak_rss_mb": _peak_rss_mb()}


def _daemon_rss(name: str, seconds: float) -> dict[str, Any]:
    """Peak RSS of a daemon-like process with one live stream on the torch or the ONNX backend."""
    import numpy as np

    import earshot.capture  # noqa: F401 - what the daemon imports besides the model
    import earshot.publish  # noqa: F401
    from earshot.analyzer import StreamAnalyzer
    from earshot.model import load_model
    from earshot.config import DetectConfig, FrontendConfig

    suffix = ".onnx" if name == "daemon-onnx" else ".pt"
    model = load_model(Path(os.environ["EARSHOT_BENCH_MODELS"]) / f"bench{suffix}", threads=1)
    analyzer = StreamAnalyzer(model, FrontendConfig(), DetectConfig(), source="bench", node="bench", to_wall=float)
    # A 5 s clip played in a loop: generating all the audio at once would put the generator's
    # float64 temporaries (tens of MB for 60 s) into the peak RSS of what should be the daemon.
    clip = _synthetic_audio(5.0)
    n_blocks = int(seconds * SR) // BLOCK
    hop_cpu = []
    c0 = time.process_time()
    for k in range(n_blocks):
        i = (k * BLOCK) % (len(clip) - BLOCK + 1)
        tc = time.thread_time()
        analyzer.push(clip[i : i + BLOCK])
        hop_cpu.append(time.thread_time() - tc)
    cpu = time.process_time() - c0
    return {
        "name": name,
        "backend": model.backend,
        "torch_imported": "torch" in sys.modules,
        "peak_rss_mb": _peak_rss_mb(),
        "live_cpu_share_pct": 100.0 * cpu / (len(hop_cpu) * BLOCK / SR),
        "hop_cpu_ms_p99": float(np.percentile(hop_cpu, 99) * 1e3),
    }


def _streams(backend: str, n: int, seconds: float) -> dict[str, Any]:
    """N live-rate streams: one batched MultiStreamScorer call per tick vs N independent scorers."""
    import numpy as np

    from earshot.model import load_model
    from earshot.features import FrontendParams, StreamingFeatures

    p = FrontendParams()
    suffix = ".onnx" if backend == "onnx" else ".pt"
    model = load_model(Path(os.environ["EARSHOT_BENCH_MODELS"]) / f"bench{suffix}", threads=1)
    base = _synthetic_audio(seconds + 2.5 + n * 0.37)  # 2 s of warm-up ticks first
    offsets = [int(i * 0.37 * SR) for i in range(n)]  # every stream hears different audio
    ticks = int(seconds * SR) // BLOCK
    out: dict[str, Any] = {"name": f"{backend} x{n}", "backend": backend, "streams": n, "seconds": seconds}
    for mode in ("batched", "independent", "frontend-only"):
        fronts = [StreamingFeatures(p) for _ in range(n)]
        multi = model.multi_stream_scorer(p.chunk_frames, 10, n)
        singles = [model.streaming_scorer(p.chunk_frames, 10) for _ in range(n)]
        for k in range(-20, ticks):  # 20 warm-up ticks (2 s), not timed
            if k == 0:
                c0, tick_wall = time.process_time(), []
            t = time.perf_counter()
            blocks = [base[o + (k + 20) * BLOCK : o + (k + 21) * BLOCK] for o in offsets]
            frames = [f.push(b) for f, b in zip(fronts, blocks)]
            if mode == "batched":
                multi.push(frames)
            elif mode == "independent":
                for s, f in zip(singles, frames):
                    s.push(f)
            if k >= 0:
                tick_wall.append(time.perf_counter() - t)
        cpu = time.process_time() - c0
        out[f"{mode}_pct_per_stream"] = 100.0 * cpu / (n * ticks * BLOCK / SR)
        out[f"{mode}_tick_ms_p99"] = float(np.percentile(tick_wall, 99) * 1e3)
    return out


def _export_models(directory: Path) -> bool:
    """Write bench.pt (random weights, default dims) and, if the onnx extra is installed, bench.onnx."""
    import torch

    from earshot.features import FrontendParams
    from earshot.model import CnnDims
    from earshot.model.checkpoint import load_checkpoint, save_checkpoint
    from earshot.model.cnn import SoundEventCnn

    torch.manual_seed(0)
    thresholds = {k: 0.5 for k in LABELS}
    save_checkpoint(directory / "bench.pt", SoundEventCnn(CnnDims()).eval(), LABELS, FrontendParams(), thresholds,
                    {"name": "bench (random weights)"})
    try:
        from earshot.model.onnx import export_onnx

        export_onnx(load_checkpoint(directory / "bench.pt"), directory / "bench.onnx")
    except ImportError as exc:
        print(f"(ONNX rows skipped: {exc.name} is not installed; pip install onnxruntime onnx)", file=sys.stderr)
        return False
    return True


def _run_worker(name: str, seconds: float) -> dict[str, Any]:
    """Run one contender in a fresh subprocess and parse its JSON line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    daemon_dir = str(Path(__file__).resolve().parents[1] / "daemon")
    env["PYTHONPATH"] = daemon_dir + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, "--seconds", str(seconds)] + _STREAM_ARGS,
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


def _memory_table(rows: list[dict[str, Any]]) -> str:
    """Daemon-like peak RSS per backend."""
    lines = [f"{'process':<14} {'backend':>8} {'torch loaded':>13} {'peak RSS MB':>12} {'live CPU % core':>16}"]
    for r in rows:
        lines.append(f"{r['name']:<14} {r['backend']:>8} {str(r['torch_imported']):>13} {r['peak_rss_mb']:>12.0f} "
                     f"{r['live_cpu_share_pct']:>16.3f}")
    return "\n".join(lines)


def _streams_table(rows: list[dict[str, Any]]) -> str:
    """CPU per stream, batched vs independent, per backend and stream count."""
    lines = [f"{'streams':<12} {'batched %/stream':>17} {'independent %/stream':>21} {'frontend %/stream':>18} "
             f"{'tick p99 ms (batched)':>22}"]
    for r in rows:
        lines.append(f"{r['name']:<12} {r['batched_pct_per_stream']:>17.3f} {r['independent_pct_per_stream']:>21.3f} "
                     f"{r['frontend-only_pct_per_stream']:>18.3f} {r['batched_tick_ms_p99']:>22.2f}")
    lines.append("(% of one core per live stream, frontend included; one tick = 0.1 s of audio for every stream)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; run every contender (driver) or one (worker)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="synthetic audio length (s), default 60")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--quick", action="store_true", help="5 s of audio: a smoke test, figures are noisy")
    ap.add_argument("--streams", default="1,10,100",
                    help="stream counts of the many-streams section, comma-separated ('' to skip); default 1,10,100")
    ap.add_argument("--stream-seconds", type=float, default=10.0,
                    help="audio per stream in the many-streams section (s), default 10")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    seconds = 5.0 if args.quick else args.seconds
    stream_seconds = 2.0 if args.quick else args.stream_seconds
    if seconds < 3.0:
        ap.error("--seconds must be at least 3 (the warm-up uses 2.5 s)")
    try:
        counts = [int(x) for x in args.streams.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--streams must be comma-separated integers, got {args.streams!r}")
    if any(c < 1 for c in counts):
        ap.error("--streams counts must be positive")
    if args.worker:
        if args.worker == "idle":
            result = _idle_rss()
        elif args.worker == "export":
            result = {"onnx": _export_models(Path(os.environ["EARSHOT_BENCH_MODELS"]))}
        elif args.worker in DAEMONS:
            result = _daemon_rss(args.worker, seconds)
        elif args.worker.startswith("streams:"):
            _, backend, n = args.worker.split(":")
            result = _streams(backend, int(n), stream_seconds)
        else:
            result = _worker(args.worker, seconds)
        print(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="earshot-bench-") as tmp:
        os.environ["EARSHOT_BENCH_MODELS"] = tmp
        _STREAM_ARGS[:] = ["--stream-seconds", str(stream_seconds)]
        has_onnx = _run_worker("export", seconds)["onnx"]
        backends = ("torch", "onnx") if has_onnx else ("torch",)
        idle = _run_worker("idle", seconds)
        rows = [_run_worker(name, seconds) for name in CONTENDERS if has_onnx or name != "earshot-onnx"]
        daemons = [_run_worker(name, seconds) for name in DAEMONS if has_onnx or name != "daemon-onnx"]
        streams = [_run_worker(f"streams:{b}:{n}", seconds) for b in backends for n in counts]
    print(f"earshot bench: {seconds:g} s synthetic audio, 1 thread, 0.1 s live blocks, random weights")
    print(_table(rows, idle))
    print()
    print("memory: daemon-like process (analyzer, capture, publishers imported; model loaded from file), one stream")
    print(_memory_table(daemons))
    if streams:
        print()
        print(f"many streams, one worker: {stream_seconds:g} s of live-rate audio per stream")
        print(_streams_table(streams))
    print(f"(bench took {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "idle": idle, "contenders": rows, "daemons": daemons,
                                         "streams": streams}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
