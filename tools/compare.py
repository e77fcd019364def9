"""Compare checkpoints at matched false alarms, on the same validation streams.

    python tools/compare.py --data ../shared/data --models models/earshot.pt runs/new.pt [--half all|cal|report]

A threshold-free comparison: per model and class, the lowest threshold of `evaluate.THRESHOLD_GRID`
with no false alarm on the half's negatives (the strict operating point a deployment runs at), then
the event F1 at 0 dB and recall at -6 dB there, through the daemon's own detection path
(`evaluate.calibrate` with a target of 0 false alarms per hour). Checkpoints are not modified.
Use it to choose between training runs on the calibration half, so the report half stays unseen.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402
import evaluate  # noqa: E402

log = logging.getLogger("compare")


def matched(loaded, events, negatives, seed: int) -> dict:
    """Per class: lowest threshold with no false alarm on `negatives`, with F1 at 0 dB and recall at -6 dB there."""
    chosen, info, fa_hours = evaluate.calibrate_on(events, negatives, loaded, seed, target=0.0)
    out = {"negative_hours": fa_hours, "classes": {}}
    for label, t in chosen.items():
        row = next(r for r in info["sweep"][label] if r["threshold"] == t)
        out["classes"][label] = {**row, "reached": label not in info["notes"]}
    for key in ("f1_0db", "recall_-6db"):
        out[f"mean_{key}"] = float(np.mean([c[key] for c in out["classes"].values()]))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=str(data.default_data_dir()), help="data folder with index.csv")
    ap.add_argument("--models", nargs="+", required=True, help="checkpoints to compare")
    ap.add_argument("--half", choices=("all", "cal", "report"), default="cal",
                    help="validation groups to use (evaluate.calibration_halves)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stream layout")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from earshot.model import CheckpointError, load_checkpoint

    torch.set_num_threads(1)
    try:
        models = [load_checkpoint(m) for m in args.models]
        _, val = data.split(data.read_index(args.data))
        audio = data.load_all(args.data, val)
    except (CheckpointError, data.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    halves = evaluate.calibration_halves(val)
    results = {}
    for path, loaded in zip(args.models, models):
        events, negatives = evaluate.half_parts(list(zip(val, audio)), halves, None if args.half == "all" else args.half, loaded)
        try:
            results[path] = matched(loaded, events, negatives, args.seed)
        except ValueError as exc:
            print(f"error: the {args.half} validation groups {exc}", file=sys.stderr)
            return 2
        log.info("%s done", path)
    first = next(iter(results.values()))
    print(f"Matched false alarms (no false alarm in {first['negative_hours']:.2f} h of negatives), {args.half} validation groups:\n")
    print("| model | class-mean F1 at 0 dB | class-mean recall at -6 dB | per class: threshold / F1 0 dB / recall -6 dB |")
    print("|---|---:|---:|---|")
    for path, r in results.items():
        per = ", ".join(f"{k} {c['threshold']:.3f} / {c['f1_0db']:.2f} / {c['recall_-6db']:.2f}{'' if c['reached'] else ' (not reached)'}"
                        for k, c in r["classes"].items())
        print(f"| {path} | {r['mean_f1_0db']:.3f} | {r['mean_recall_-6db']:.3f} | {per} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
