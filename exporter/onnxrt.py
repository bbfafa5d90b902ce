"""onnxruntime sessions on the CPU, set up the way vitserve evaluates and serves ONNX models."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def cpu_session(path: str | Path, threads: int | None = None, optimization: str = "all"):
    """An onnxruntime CPU session. `optimization` is all | extended | basic | disabled.

    AutoCast FP16 models must use `extended` or lower: with ORT_ENABLE_ALL, onnxruntime 1.24's CPU
    provider has killed the process opening them (see ENVIRONMENT.md).
    """
    import onnxruntime as ort

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(session, pixel_values: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Run `pixel_values` (N,3,H,W) through the session in chunks; outputs by name."""
    names = [o.name for o in session.get_outputs()]
    inp = session.get_inputs()[0].name
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(pixel_values), batch_size):
        outs = session.run(names, {inp: np.ascontiguousarray(pixel_values[i : i + batch_size], np.float32)})
        for n, o in zip(names, outs, strict=True):
            chunks[n].append(o)
    return {n: np.concatenate(c) for n, c in chunks.items()}
