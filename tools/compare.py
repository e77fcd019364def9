"""Compare checkpoints at matched false alarms, on the same validation streams.

    python tools/compare.py --data ../shared/data --models models/earshot.pt runs/new.pt [--half all|cal|report]

A threshold-free comparison: per model and class, the lowest threshold of `evaluate.THRESHOLD_GRID`
with no false alarm on the half's negatives (the strict operating point a deployment runs at), then
the event F1 at 0 dB and recall at -6 dB there, through the daemon's own detection path
(`evaluate.calibrate` with a target of 0 false alarms per hour). Checkpoints are not modified.
Use it to choose between training runs on the calibration half, so the report half stays unseen. The
streams come from the group validation of the training sources (`data.source_split`): the held-out
sources are never looked at here.

The zero-false-alarm point of a class is set by the single highest-scoring negative of the half
(0.2 h of audio), so one odd clip can move it a lot: two runs of the same recipe differed by 0.07
in class-mean F1 there and by 0.01 one false alarm further on. `--budgets K` therefore also reports
the operating points that allow 1..K false alarms on the half (per class the lowest threshold with
at most k), and their mean over k = 0..K, the figure to choose runs by.
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


def matched(loaded, events, negatives, seed: int, budgets: int = 0) -> dict:
    """Per class: lowest threshold with no false alarm on `negatives`, with F1 at 0 dB and recall at -6 dB there.

    With `budgets` K > 0, also the class means at the lowest thresholds with at most k = 1..K false
    alarms (`by_budget`, k = 0 first) and their mean over k = 0..K (`budget_mean_*`).
    """
    chosen, info, fa_hours = evaluate.calibrate_on(events, negatives, loaded, seed, target=0.0)
    out = {"negative_hours": fa_hours, "classes": {}}
    for label, t in chosen.items():
        row = next(r for r in info["sweep"][label] if r["threshold"] == t)
        out["classes"][label] = {**row, "reached": label not in info["notes"]}
    for key in ("f1_0db", "recall_-6db"):
        out[f"mean_{key}"] = float(np.mean([c[key] for c in out["classes"].values()]))
    out["by_budget"] = [budget_point(info["sweep"], fa_hours, k) for k in range(budgets + 1)]
    for key in ("f1_0db", "recall_-6db"):
        out[f"budget_mean_{key}"] = float(np.mean([b[f"mean_{key}"] for b in out["by_budget"]]))
    return out


def budget_point(sweep: dict[str, list[dict]], fa_hours: float, k: int) -> dict:
    """Class means of F1 at 0 dB and recall at -6 dB at, per class, the lowest threshold with at most k
    false alarms in `fa_hours` of negatives (`evaluate.pick_threshold`, as calibration picks them)."""
    # (k + 0.5) / hours: a rate between k and k + 1 false alarms, safe from rounding of the stored rates.
    picks = {label: evaluate.pick_threshold(rows, (k + 0.5) / fa_hours)[0] for label, rows in sweep.items()}
    return {"false_alarms": k, "thresholds": {label: r["threshold"] for label, r in picks.items()},
            **{f"mean_{key}": float(np.mean([r[key] for r in picks.values()])) for key in ("f1_0db", "recall_-6db")}}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=str(data.default_data_dir()), help="data folder with index.csv")
    ap.add_argument("--models", nargs="+", required=True, help="checkpoints to compare")
    ap.add_argument("--half", choices=("all", "cal", "report"), default="cal",
                    help="validation groups to use (evaluate.calibration_halves)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stream layout")
    ap.add_argument("--budgets", type=int, default=3,
                    help="also report the operating points with at most 1..K false alarms on the half, and the mean")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from earshot.model import CheckpointError
    from earshot.model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    try:
        models = [load_checkpoint(m) for m in args.models]
        # The group validation of the training sources only: the held-out sources stay unseen by any
        # choice made here, so `evaluate.py --split source` still measures something no run was picked on.
        _, val, _ = data.source_split(data.read_index(args.data))
        audio = data.load_all(args.data, val)
    except (CheckpointError, data.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    halves = evaluate.calibration_halves(val)
    items, half = list(zip(val, audio)), None if args.half == "all" else args.half
    results = {}
    for path, loaded in zip(args.models, models):
        events, negatives = evaluate.half_parts(items, halves, half, loaded)
        try:
            results[path] = matched(loaded, events, negatives, args.seed, max(0, args.budgets))
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
    if args.budgets > 0:
        ks = range(args.budgets + 1)
        print(f"\nAt most k false alarms on the half (per class the lowest threshold with <= k), class-mean F1 at 0 dB / "
              f"recall at -6 dB:\n")
        print("| model | " + " | ".join(f"k={k}" for k in ks) + f" | mean over k=0..{args.budgets} |")
        print("|---|" + "---:|" * (len(ks) + 1))
        for path, r in results.items():
            cells = " | ".join(f"{b['mean_f1_0db']:.3f} / {b['mean_recall_-6db']:.3f}" for b in r["by_budget"])
            print(f"| {path} | {cells} | {r['budget_mean_f1_0db']:.3f} / {r['budget_mean_recall_-6db']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
