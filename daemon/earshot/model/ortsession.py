"""One way to open an ONNX Runtime session on the CPU, shared by the streaming model and the confirmer."""

from __future__ import annotations

from typing import Any


def cpu_session(ort: Any, model: bytes | str, threads: int) -> Any:
    """An `InferenceSession` of `model` (a path or the serialized bytes) on `threads` CPU threads.

    Sequential execution with every graph optimization; the intra-op pool must not spin between
    calls: its idle threads would otherwise burn a core between hops. `ort` is the imported
    `onnxruntime` module (callers import it themselves, to report a missing one in their own words).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
