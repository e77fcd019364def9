"""ONNX Runtime backend: export a checkpoint's streaming step to .onnx, and score with it without torch.

The exported graph is the *streaming step* (as silero-vad exports its state): inputs are new
frames `frames` (B, n, n_mels) and one cache per conv layer `cache_i` (B, C_i, F_i, ctx_i), the
last ctx_i = (k-1)*dilation input columns of that layer; outputs are per-frame logit | attention
rows `rows` (B, n, 2C) and the updated caches `cache_i_out`. Every frame passes every layer once,
live or offline; `earshot.model.scoring.StepScorer` does the window pooling in numpy. BatchNorm is
folded into the convolutions at export. B and n are dynamic.

Labels, frontend parameters, thresholds, dims and provenance travel in the model's
metadata_props (key `earshot`, JSON), so `load_onnx` needs only onnxruntime and numpy: importing
this module and loading a model never imports torch. Exporting needs torch and the `onnx` package.
Inside the package this module imports `spec` and `scoring`; `cnn` and `checkpoint` (torch) only
inside the export functions.

    earshot export-onnx models/earshot.pt models/earshot.onnx   # export + check
    python -m earshot.model.onnx models/earshot.pt models/earshot.onnx   # the same
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from earshot.features import FrontendParams
from earshot.model.ortsession import cpu_session
from earshot.model.scoring import SingleStepScorer, StepScorer, cache_shapes, step_score_windows
from earshot.model.spec import CheckpointError, CnnDims, one_line, read_model_head, validate_labels

_LOGGER = logging.getLogger(__name__)

ONNX_FORMAT = "earshot-onnx"
ONNX_VERSION = 1
META_KEY = "earshot"
"""metadata_props key holding the JSON description of the model."""
OPSET = 17
EXPORT_TOLERANCE = 1e-4
"""Largest |torch - ONNX| per-frame output accepted by `export_onnx`'s self-check."""
INSTALL_HINT = "pip install 'earshot[onnx]' (onnxruntime)"


def _ort():  # noqa: ANN202 - the module, imported lazily so the extra stays optional
    try:
        import onnxruntime
    except ImportError as exc:
        raise CheckpointError(f"ONNX models need onnxruntime, which is not installed: {INSTALL_HINT}") from exc
    return onnxruntime


# ------------------------------------------------------------------------------------------
# Export (torch + onnx)


def _graph(loaded: Any, confirm: dict[str, Any] | None = None) -> Any:
    """Build the streaming-step ONNX model (onnx.ModelProto) of a torch LoadedModel's network."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from earshot.model.cnn import fold_batchnorm

    model, dims = loaded.model, loaded.dims
    inits: list[Any] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    nodes = []
    with torch.no_grad():
        bn = model.input_norm
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() - bn.running_mean.double() * scale
    n_mels = dims.n_mels
    nodes += [
        helper.make_node("Transpose", ["frames"], ["x_t"], perm=[0, 2, 1]),  # (B, n_mels, n)
        helper.make_node("Unsqueeze", ["x_t", const("axis1", np.array([1], np.int64))], ["x_4d"]),  # (B, 1, n_mels, n)
        helper.make_node("Mul", ["x_4d", const("in_scale", f32(scale).reshape(1, 1, n_mels, 1))], ["x_sc"]),
        helper.make_node("Add", ["x_sc", const("in_shift", f32(shift).reshape(1, 1, n_mels, 1))], ["h0"]),
    ]
    const("t_end", np.array([np.iinfo(np.int64).max], np.int64))
    const("axis3", np.array([3], np.int64))
    h = "h0"
    for i, (block, (c, f, ctx)) in enumerate(zip(model.convs, cache_shapes(dims))):
        conv, cbn = block[0], block[1]
        w, b = fold_batchnorm(conv.weight, cbn)
        fk, k = w.shape[2], w.shape[3]
        cat = f"cat{i}"
        nodes.append(helper.make_node("Concat", [f"cache_{i}", h], [cat], axis=3))  # (B, C, F, ctx + n)
        # The last ctx columns are the next call's context (ctx = 0: an empty slice).
        start = const(f"start{i}", np.array([-ctx if ctx else np.iinfo(np.int64).max], np.int64))
        nodes.append(helper.make_node("Slice", [cat, start, "t_end", "axis3"], [f"cache_{i}_out"]))
        pad = conv.padding[0]
        nodes.append(helper.make_node(
            "Conv", [cat, const(f"w{i}", f32(w)), const(f"b{i}", f32(b))], [f"conv{i}"],
            kernel_shape=[fk, k], strides=[conv.stride[0], 1], pads=[pad, 0, pad, 0], dilations=[1, conv.dilation[1]],
        ))  # valid in time: (B, C', F', n)
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"h{i + 1}"]))
        h = f"h{i + 1}"
    pconv, pbn = model.proj[0], model.proj[1]
    pw, pb = fold_batchnorm(pconv.weight, pbn)
    head_w = torch.cat([model.frame_logits.weight, model.frame_attention.weight])  # (2C, D)
    head_b = torch.cat([model.frame_logits.bias, model.frame_attention.bias])
    nodes += [
        helper.make_node("Reshape", [h, const("flat_shape", np.array([0, dims.flat_dim, -1], np.int64))], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[0, 2, 1]),  # (B, n, C*F)
        helper.make_node("MatMul", ["flat_t", const("proj_w", f32(pw.squeeze(-1)).T)], ["emb_mm"]),
        helper.make_node("Add", ["emb_mm", const("proj_b", f32(pb))], ["emb_pre"]),
        helper.make_node("Relu", ["emb_pre"], ["emb"]),  # (B, n, D)
        helper.make_node("MatMul", ["emb", const("head_w", f32(head_w).T)], ["rows_mm"]),
        helper.make_node("Add", ["rows_mm", const("head_b", f32(head_b))], ["rows"]),  # (B, n, 2C)
    ]
    shapes = cache_shapes(dims)
    inputs = [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", "n", n_mels])]
    inputs += [helper.make_tensor_value_info(f"cache_{i}", TensorProto.FLOAT, ["batch", *s]) for i, s in enumerate(shapes)]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", "n", 2 * dims.n_classes])]
    outputs += [helper.make_tensor_value_info(f"cache_{i}_out", TensorProto.FLOAT, ["batch", *s])
                for i, s in enumerate(shapes)]
    graph = helper.make_graph(nodes, "earshot_streaming_step", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="earshot")
    proto.ir_version = min(proto.ir_version, 9)  # readable by onnxruntime >= 1.17
    proto.doc_string = "earshot streaming step: (frames, layer caches) -> (per-frame logit|attention rows, caches)"
    meta = {
        "format": ONNX_FORMAT,
        "version": ONNX_VERSION,
        "labels": list(loaded.labels),
        "frontend": loaded.frontend.to_dict(),
        "dims": dims.to_dict(),
        "thresholds": dict(loaded.thresholds),
        "provenance": loaded.provenance,
    }
    if confirm is not None:
        meta["confirm"] = confirm
    helper.set_model_props(proto, {META_KEY: json.dumps(meta)})
    onnx.checker.check_model(proto)
    return proto


def export_onnx(loaded: Any, path: str | Path) -> Path:
    """Write `loaded` (a torch `LoadedModel`) as an .onnx streaming-step model; returns the path.

    Checks before replacing the file that ONNX Runtime reproduces the torch per-frame outputs on
    random frames within `EXPORT_TOLERANCE` (raises CheckpointError otherwise).
    """
    path = Path(path)
    check_output_path(path)
    confirm = None
    if getattr(loaded, "confirmer", None) is not None:  # the cascade's second stage, beside it
        from earshot.model.confirm_onnx import export_confirmer

        confirm = export_confirmer(loaded.confirmer, path)
    proto = _graph(loaded, confirm)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        onnx_model = load_onnx(tmp)
        _check_against_torch(loaded, onnx_model)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)  # atomic: a running daemon never sees a half-written file
    return path


def check_output_path(path: Path) -> None:
    """Refuse (one line) an output that is a folder, lacks the .onnx extension or whose folder is missing."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the .onnx file to write")
    if path.suffix.lower() != ".onnx":
        raise CheckpointError(f"{path} must end in .onnx (earshot picks the runtime by the extension)")
    if not path.parent.is_dir():
        raise CheckpointError(f"cannot write {path}: folder {path.parent} does not exist")


def _check_against_torch(loaded: Any, onnx_model: OnnxModel) -> None:
    """Raise CheckpointError if the ONNX step differs from the torch step on random frames."""
    from earshot.model.cnn import FoldedNet

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3 * onnx_model.dims.receptive_frames, onnx_model.dims.n_mels)).astype(np.float32)
    caches = [rng.standard_normal((2, *s)).astype(np.float32) for s in cache_shapes(onnx_model.dims)]
    want, want_c = FoldedNet(loaded.model).step(x, [c.copy() for c in caches])
    got, got_c = onnx_model.step(x, caches)
    err = max(float(np.abs(a - b).max()) for a, b in zip([want, *want_c], [got, *got_c]))
    if err > EXPORT_TOLERANCE:
        raise CheckpointError(f"ONNX export differs from torch by {err:.2e} (> {EXPORT_TOLERANCE:g})")


# ------------------------------------------------------------------------------------------
# Runtime (onnxruntime + numpy only)


@dataclass(frozen=True)
class OnnxModel:
    """An .onnx earshot model loaded in ONNX Runtime; same scoring interface as the torch `LoadedModel`."""

    path: Path
    """The file it was loaded from."""
    dims: CnnDims
    """Architecture of the exported network."""
    labels: tuple[str, ...]
    """Class names, in output order."""
    frontend: FrontendParams
    """Frontend parameters the model was trained with."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Default decision threshold per label (probability in (0, 1))."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Training metadata copied from the checkpoint."""
    session: Any = field(default=None, repr=False, compare=False)
    """The onnxruntime.InferenceSession; its run() is thread-safe, so scorers may share it."""
    confirmer: Any = field(default=None, repr=False, compare=False)
    """The cascade's second stage (earshot.model.confirm_onnx.OnnxConfirmer), when exported with one."""

    @property
    def backend(self) -> str:
        """'onnx'."""
        return "onnx"

    def step(self, x: np.ndarray, caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Streaming step: frames (B, n, n_mels) + layer caches -> rows (B, n, 2C), new caches."""
        feed = {"frames": np.ascontiguousarray(x, dtype=np.float32)}
        for i, c in enumerate(caches):
            feed[f"cache_{i}"] = c
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def streaming_scorer(self, chunk_frames: int, hop_frames: int) -> SingleStepScorer:
        """A live scorer for one stream (StreamingScorer's interface)."""
        return SingleStepScorer(self.step, self.dims, chunk_frames, hop_frames)

    def multi_stream_scorer(self, chunk_frames: int, hop_frames: int, n_streams: int) -> StepScorer:
        """A live scorer for `n_streams` streams sharing one forward pass per push."""
        return StepScorer(self.step, self.dims, chunk_frames, hop_frames, n_streams)

    def score_windows(self, feats: np.ndarray, chunk_frames: int, hop_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Offline scores of every window of feats (T, n_mels): end_frames (N,), scores (N, C)."""
        return step_score_windows(self.step, self.dims, feats, chunk_frames, hop_frames)


def load_onnx(path: str | Path, frontend: FrontendParams | None = None, threads: int = 1) -> OnnxModel:
    """Load and validate an .onnx earshot model with ONNX Runtime on CPU (never imports torch).

    Raises CheckpointError (one line) if onnxruntime is missing, the file is unreadable, its
    metadata is missing or malformed, or (when `frontend` is given) it was exported for
    another frontend.
    """
    path = Path(path)
    head = read_model_head(path, "earshot ONNX model")  # missing, empty, a folder, a WAV, a text...
    if head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"{path} is not an ONNX model (it looks like a torch checkpoint: name it .pt, "
                              "or convert it with earshot export-onnx)")
    ort = _ort()
    try:
        session = cpu_session(ort, str(path), threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Exception subclasses (Fail, InvalidProtobuf, ...)
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path} is not a readable ONNX model (corrupt or truncated?): {detail}") from exc
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    if raw is None:
        raise CheckpointError(f"{path} is not an earshot ONNX model (no '{META_KEY}' metadata); export it with "
                              "earshot export-onnx")
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
            raise ValueError(f"format is not '{ONNX_FORMAT}'")
        if meta.get("version") != ONNX_VERSION:
            raise ValueError(f"version {meta.get('version')!r}; this earshot reads version {ONNX_VERSION}")
        dims = CnnDims.from_dict(meta["dims"])
        saved_frontend = FrontendParams.from_dict(meta["frontend"])
        labels = [str(x) for x in meta["labels"]]
        thresholds = {str(k): v for k, v in dict(meta["thresholds"]).items()}
        provenance = dict(meta.get("provenance", {}))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"bad earshot ONNX model {path}: {one_line(exc)}") from exc
    try:
        validate_labels(labels, thresholds, dims)
    except CheckpointError as exc:
        raise CheckpointError(f"bad earshot ONNX model {path}: {exc}") from exc
    if dims.n_mels != saved_frontend.n_mels:
        raise CheckpointError(
            f"bad earshot ONNX model {path}: model expects n_mels={dims.n_mels}, frontend has {saved_frontend.n_mels}"
        )
    _check_graph(session, dims, path)
    if frontend is not None and frontend != saved_frontend:
        diffs = [
            f"model was trained with {f.name}={getattr(saved_frontend, f.name)!r}, "
            f"runtime uses {f.name}={getattr(frontend, f.name)!r}"
            for f in fields(FrontendParams)
            if getattr(saved_frontend, f.name) != getattr(frontend, f.name)
        ]
        raise CheckpointError(f"{path} does not match the runtime frontend: " + "; ".join(diffs))
    model = OnnxModel(path, dims, tuple(labels), saved_frontend, thresholds, provenance, session)
    _probe(model)
    _LOGGER.debug("loaded %s with onnxruntime %s: labels=%s dims=%s", path, ort.__version__, labels, dims)
    if "confirm" in meta:
        from earshot.model.confirm_onnx import load_confirmer

        model = replace(model, confirmer=load_confirmer(meta["confirm"], path, labels, threads))
    return model


def _io_shapes(dims: CnnDims) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Input and output shapes (None: any size) the metadata's dims imply, in the graph's order."""
    shapes = cache_shapes(dims)
    inputs = {"frames": (None, None, dims.n_mels), **{f"cache_{i}": (None, *s) for i, s in enumerate(shapes)}}
    outputs = {"rows": (None, None, 2 * dims.n_classes),
               **{f"cache_{i}_out": (None, *s) for i, s in enumerate(shapes)}}
    return inputs, outputs


def _fmt(shape: Any) -> str:
    """(batch, n, 64): a shape with its free sizes named."""
    if shape is None:
        return "unknown"
    names = [d if isinstance(d, (int, str)) and d != "" else ("batch", "n")[i] if i < 2 else "?"
             for i, d in enumerate(shape)]
    return "(" + ", ".join(map(str, names)) + ")"


def _check_graph(session: Any, dims: CnnDims, path: Path) -> None:
    """Refuse a graph whose declared inputs or outputs disagree with the metadata (one line).

    The metadata says n_mels, the classes and the layer caches; a graph built for other ones would
    load and then fail (or score garbage) at the first hop, killing the worker.
    """
    want_in, want_out = _io_shapes(dims)
    what = f"n_mels={dims.n_mels}, {dims.n_classes} classes, layer caches {[tuple(s) for s in cache_shapes(dims)]}"
    for kind, args, want in (("input", session.get_inputs(), want_in), ("output", session.get_outputs(), want_out)):
        got = [(a.name, a.shape) for a in args]
        if [n for n, _ in got] != list(want):
            raise CheckpointError(f"bad earshot ONNX model {path}: its graph's {kind}s are {[n for n, _ in got]}, "
                                  f"its metadata ({len(dims.channels)} layers) implies {list(want)}")
        for name, shape in got:
            expect = want[name]
            ok = shape is not None and len(shape) == len(expect) and all(
                e is None or not isinstance(g, int) or g == e for g, e in zip(shape, expect))
            if not ok:
                raise CheckpointError(
                    f"bad earshot ONNX model {path}: {kind} '{name}' has shape {_fmt(shape)} in the graph, "
                    f"{_fmt(expect)} by its metadata ({what})"
                )


def _probe(model: OnnxModel) -> None:
    """Run one step on random frames: it must give the shapes the metadata implies, and finite numbers."""
    dims = model.dims
    rng = np.random.default_rng(0)
    n = dims.receptive_frames
    x = rng.standard_normal((1, n, dims.n_mels)).astype(np.float32)
    caches = [np.zeros((1, *s), np.float32) for s in cache_shapes(dims)]
    try:
        rows, new = model.step(x, caches)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Exception subclasses
        raise CheckpointError(f"bad earshot ONNX model {model.path}: its graph fails on inputs of the shapes its "
                              f"metadata declares: {one_line(exc)}") from exc
    want = [(1, n, 2 * dims.n_classes)] + [(1, *s) for s in cache_shapes(dims)]
    got = [tuple(np.shape(rows))] + [tuple(np.shape(c)) for c in new]
    if got != want:
        raise CheckpointError(f"bad earshot ONNX model {model.path}: its graph returns shapes {got}, "
                              f"its metadata implies {want}")
    if not all(np.isfinite(a).all() for a in (rows, *new)):
        raise CheckpointError(f"bad earshot ONNX model {model.path}: its outputs hold NaN or infinite values "
                              "(damaged weights?)")


def main(argv: list[str] | None = None) -> int:
    """`earshot export-onnx CHECKPOINT.pt OUT.onnx`: export and self-check; exit 1 on error."""
    ap = argparse.ArgumentParser(prog="earshot export-onnx",
                                 description="export an earshot checkpoint to an ONNX streaming-step model")
    ap.add_argument("checkpoint", type=Path, help="the .pt checkpoint")
    ap.add_argument("output", type=Path, help="the .onnx file to write")
    args = ap.parse_args(argv)
    try:
        check_output_path(args.output)  # before loading anything: a typo costs no time
        import onnx  # noqa: F401 - only to give a clear message if the extra is missing

        from earshot.model.checkpoint import load_checkpoint

        out = export_onnx(load_checkpoint(args.checkpoint), args.output)
    except ImportError as exc:
        print(f"earshot: exporting needs torch and onnx ({exc.name} is missing): pip install 'earshot[onnx]'",
              file=sys.stderr)
        return 1
    except CheckpointError as exc:
        print(f"earshot: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB); ONNX Runtime matches torch within {EXPORT_TOLERANCE:g}")
    return 0


__all__ = ["EXPORT_TOLERANCE", "META_KEY", "ONNX_FORMAT", "ONNX_VERSION", "OnnxModel", "export_onnx", "load_onnx", "main"]


if __name__ == "__main__":
    sys.exit(main())

