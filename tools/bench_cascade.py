"""Cost of the detector per live stream: stage 1 (streaming CNN) every hop, plus the confirmer at its trigger rate.

    python tools/bench_cascade.py --model models/earshot.pt [--eval models/eval.json] [--seconds 60]

Measured in this process on one thread (thread CPU time, immune to other load on the machine):

- stage 1: a StreamAnalyzer without the confirmer over `--seconds` of synthetic audio in 0.1 s
  blocks, as the daemon feeds it: CPU seconds per audio second = share of one core per stream;
- the confirmer: CPU per call (features of the last second + mn04 + head), median of `--calls`;
- the trigger rate: confirmer calls per hour on the held-out-source negative streams, read from
  `--eval` (tools/evaluate.py --json; `confirmer_calls_per_hour_on_negatives` of the source split),
  or counted here on the synthetic audio when no evaluation is given.

Cascade cost = stage 1 + calls/hour x CPU per call / 3600, in % of one core, with the ratio to
stage 1 alone (the baseline, measured in the same run).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def thread_cpu() -> float:
    return time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)


def stage1_share(loaded, audio: np.ndarray) -> float:
    """CPU seconds per audio second of the live path (features, CNN, level gate, detector) without confirmer."""
    from earshot.analyzer import StreamAnalyzer
    from earshot.config import DetectConfig, FrontendConfig

    plain = replace(loaded, confirmer=None)
    an = StreamAnalyzer(plain, FrontendConfig(chunk_size=plain.frontend.chunk_s), DetectConfig(), source="b", node="b")
    block = plain.frontend.sample_rate // 10
    an.push(audio[:block])  # first call builds the scorer
    t = thread_cpu()
    for i in range(block, len(audio), block):
        an.push(audio[i:i + block])
    return (thread_cpu() - t) / ((len(audio) - block) / plain.frontend.sample_rate)


def confirm_call_s(confirmer, calls: int) -> float:
    """Median thread CPU seconds of one confirmation of 1 s of audio."""
    rng = np.random.default_rng(0)
    window = (rng.standard_normal(int(confirmer.window_s * 16000)) * 0.05).astype(np.float32)
    confirmer.score(window)
    times = []
    for _ in range(calls):
        t = thread_cpu()
        confirmer.score(window)
        times.append(thread_cpu() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/earshot.pt")
    ap.add_argument("--eval", default=None, help="evaluate.py JSON with the held-out trigger rate")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from earshot import synth
    from earshot.model import CheckpointError
    from earshot.model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    try:
        loaded = load_checkpoint(args.model)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    audio, _ = synth.scene(16000, args.seconds, np.random.default_rng(1))
    audio = audio.astype(np.float32)
    s1 = stage1_share(loaded, audio)
    out = {"model": args.model, "stage1_core_share": s1, "cascade": loaded.confirmer is not None}
    if loaded.confirmer is not None:
        per_call = confirm_call_s(loaded.confirmer, args.calls)
        rate, rate_from = None, None
        if args.eval:
            res = json.loads(Path(args.eval).read_text())
            for r in res.get("results", []):
                if r.get("split") == "source" and Path(r["model"]).name == Path(args.model).name:
                    rate, rate_from = r.get("confirmer_calls_per_hour_on_negatives"), f"{args.eval} (held-out negatives)"
        if rate is None:
            from earshot.offline import detect_samples

            c0 = loaded.confirmer.calls
            detect_samples(audio, loaded)
            rate, rate_from = (loaded.confirmer.calls - c0) / (args.seconds / 3600), "the synthetic scene"
        total = s1 + rate * per_call / 3600
        out.update({"confirm_call_cpu_ms": 1000 * per_call, "confirm_calls_per_hour": rate, "rate_from": rate_from,
                    "cascade_core_share": total, "ratio_to_stage1": total / s1})
    print(f"stage 1 (streaming CNN, whole live path): {100 * s1:.3f} % of one core per stream")
    if loaded.confirmer is not None:
        print(f"confirmer: {out['confirm_call_cpu_ms']:.1f} ms CPU per call, {out['confirm_calls_per_hour']:.0f} calls/h "
              f"(from {out['rate_from']})")
        print(f"cascade: {100 * out['cascade_core_share']:.3f} % of one core per stream "
              f"({out['ratio_to_stage1']:.2f} x stage 1 alone)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
