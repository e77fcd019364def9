"""Pin the shipped model's scores on a fixed generated input: writes tests/golden/shipped_scores.json.

    python tools/update_golden.py [--model models/earshot.pt] [--out tests/golden/shipped_scores.json]

Run it after every retraining (calibration changes only thresholds, not scores). The input is
`earshot.synth.scene(duration_s=GOLDEN_SECONDS, seed=GOLDEN_SEED)`; scores come from
`earshot.offline.score_samples`, the daemon's own batch path, with the level gate off.
tests/test_shipped_model.py regenerates the same input and compares within 1e-4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

GOLDEN_SEED = 2024
"""Seed of the synthetic scene."""
GOLDEN_SECONDS = 12.0
"""Length of the synthetic scene (s)."""
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "golden" / "shipped_scores.json"


def golden_input(sr: int = 16000) -> np.ndarray:
    """The fixed input signal (float32 mono)."""
    from earshot import synth

    audio, _ = synth.scene(sr=sr, duration_s=GOLDEN_SECONDS, seed=GOLDEN_SEED)
    return audio


def compute(model_path: str | Path) -> dict:
    """Scores of the model on the golden input, with what is needed to reproduce them."""
    import torch

    from earshot.model.checkpoint import load_checkpoint
    from earshot.offline import score_samples

    torch.set_num_threads(1)
    loaded = load_checkpoint(model_path)
    times, scores, _ = score_samples(golden_input(loaded.frontend.sample_rate), loaded)
    return {
        "input": f"earshot.synth.scene(duration_s={GOLDEN_SECONDS}, seed={GOLDEN_SEED})",
        "model_sha256": hashlib.sha256(Path(model_path).read_bytes()).hexdigest(),
        "labels": list(loaded.labels),
        "times_s": [round(float(t), 4) for t in times],
        "scores": [[round(float(v), 6) for v in row] for row in scores],
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "earshot.pt"))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    from earshot.model import CheckpointError

    try:
        result = compute(args.model)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {out}: {len(result['times_s'])} hops x {len(result['labels'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
