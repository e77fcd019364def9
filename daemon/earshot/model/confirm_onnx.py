"""The cascade's confirmer for ONNX Runtime: exported beside the stage-1 .onnx, loaded without torch.

`earshot export-onnx model.pt model.onnx` writes the confirmer (mn04 + head, log-mel in, class
probabilities out) to `model.confirm.onnx` and records its file name, SHA-256, labels, triggers,
window and reuse in the stage-1 file's metadata. `load_onnx` then loads both, so the ONNX runtime
runs the same cascade as torch (a test compares their scores); a missing, altered or mismatched
confirmer file is refused in one line rather than silently running stage 1 alone, whose calibrated
thresholds would be wrong.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cascade import trigger_array, triggers_problem
from .mnfeatures import MnFeatures
from .ortsession import cpu_session
from .spec import CheckpointError

EXPORT_TOLERANCE = 1e-3
"""Largest probability difference between ONNX Runtime and torch accepted at export."""


def confirm_path(stage1: Path) -> Path:
    """Where the confirmer of `stage1` (.onnx) lives: `<stem>.confirm.onnx` beside it."""
    return stage1.with_name(stage1.stem + ".confirm.onnx")


def export_confirmer(confirmer: Any, stage1_path: Path) -> dict[str, Any]:
    """Write `confirmer` as ONNX beside `stage1_path`, check it against torch; return its metadata entry."""
    import torch

    class _Probs(torch.nn.Module):
        def __init__(self, c: Any):
            super().__init__()
            self.tagger, self.head = c.tagger, c.head

        def forward(self, mel: torch.Tensor) -> torch.Tensor:
            logits, emb = self.tagger(mel)
            return torch.sigmoid(self.head(torch.cat([emb, logits], dim=1)))

    net = _Probs(confirmer).eval()
    mel = torch.from_numpy(confirmer.features(np.zeros(16000, dtype=np.float32))[None, None])
    buf = io.BytesIO()
    torch.onnx.export(net, (mel,), buf, input_names=["mel"], output_names=["probs"],
                      dynamic_axes={"mel": {0: "batch", 3: "frames"}, "probs": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    data = buf.getvalue()
    path = confirm_path(stage1_path)
    entry = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "labels": list(confirmer.labels),
             "triggers": dict(confirmer.triggers), "window_s": confirmer.window_s, "reuse_hops": confirmer.reuse_hops,
             "n_mels": int(mel.shape[2])}
    onnx_c = _session(data, 1)
    x = (np.random.default_rng(0).standard_normal(16000) * 0.05).astype(np.float32)
    got = onnx_c.run(None, {"mel": confirmer.features(x)[None, None]})[0][0]
    err = float(np.abs(got - confirmer.score(x)).max())
    if err > EXPORT_TOLERANCE:
        raise CheckpointError(f"ONNX export of the confirmer differs from torch by {err:.2e}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return entry


def _session(model: bytes | str, threads: int) -> Any:
    import onnxruntime as ort

    return cpu_session(ort, model, threads)


@dataclass
class OnnxConfirmer:
    """Same interface as earshot.model.confirm.Confirmer, on ONNX Runtime and numpy."""

    session: Any
    labels: list[str]
    triggers: dict[str, float]
    window_s: float
    reuse_hops: int
    features: MnFeatures = field(default_factory=MnFeatures)

    def __post_init__(self) -> None:
        self.trigger_array = trigger_array(self.triggers, self.labels)
        self.calls = 0

    def score(self, window: np.ndarray) -> np.ndarray:
        probs = self.session.run(None, {"mel": self.features(window)[None, None]})[0][0]
        self.calls += 1
        return np.nan_to_num(np.asarray(probs, dtype=np.float32), nan=0.0)


def load_confirmer(entry: Any, stage1_path: Path, labels: list[str], threads: int = 1) -> OnnxConfirmer:
    """The confirmer named by a stage-1 file's metadata; CheckpointError (one line) if anything disagrees."""
    bad = f"bad earshot ONNX model {stage1_path}: confirm"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad} metadata is not an object")
    try:
        name, digest = str(entry["file"]), str(entry["sha256"])
        triggers = {str(k): float(v) for k, v in dict(entry["triggers"]).items()}
        window_s, reuse = float(entry["window_s"]), int(entry["reuse_hops"])
        n_mels = int(entry["n_mels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{bad} metadata: {exc}") from exc
    if Path(name).name != name:
        raise CheckpointError(f"{bad} file {name!r} must be a plain file name beside the model")
    if list(entry.get("labels", [])) != list(labels) or triggers_problem(triggers, list(labels)):
        raise CheckpointError(f"{bad} labels or triggers do not match the model's labels {labels}")
    if not (0.2 <= window_s <= 10.0 and 1 <= reuse <= 100):
        raise CheckpointError(f"{bad} window_s {window_s} or reuse_hops {reuse} out of range")
    path = stage1_path.with_name(name)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{bad} file {path} cannot be read ({exc.strerror}); export again with "
                              "earshot export-onnx") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{bad} file {path} is not the one exported with this model (SHA-256 differs)")
    try:
        session = _session(data, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Exception subclasses
        raise CheckpointError(f"{bad} file {path} is not a readable ONNX model: {' '.join(str(exc).split())[:200]}") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if ([i.name for i in inputs] != ["mel"] or inputs[0].shape[1:3] != [1, n_mels]
            or len(outputs) != 1 or outputs[0].shape[-1] != len(labels)):
        raise CheckpointError(f"{bad} graph takes {[(i.name, i.shape) for i in inputs]} and gives "
                              f"{[o.shape for o in outputs]}, not mel (batch, 1, {n_mels}, frames) -> {len(labels)} classes")
    return OnnxConfirmer(session, list(labels), triggers, window_s, reuse)
