"""In-process baseline: a served model's own ONNX file run directly with onnxruntime's CPU provider (or, for
a vitserve CPU model serving an OpenVINO flavour, OpenVINO: `flavour`).

Each served model is measured against the file it runs itself (`NAME_{precision}_cpu/1/model.onnx`; for
an ensemble, its backbone step's), at the same batch size and intra-op thread count, so that served images/s
divided by these images/s is the serving efficiency: what Triton, gRPC, batching and (for the ensemble)
decoding cost on top of the network itself. Comparing precisions (INT8 against FP32) is another number, the
precision speed-up, reported on its own (`vitserve.perf.sweep_result.precision_speedups`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitserve.contract import (
    CPU_BACKBONE_PARAM,
    OPTIMIZATION_LEVELS,
    ContractError,
    CpuBackboneParams,
)
from vitserve.errors import ConfigError, missing_extra
from vitserve.exporter import onnxrt

# Names another model's config may use for its onnxruntime settings, as parameters of their own or inside a
# JSON-valued parameter (Triton's onnxruntime backend: `intra_op_thread_count`). A vitserve CPU model's
# are its typed `onnx_cpu` parameters (contract.CpuBackboneParams).
THREAD_KEYS = ("intra_op_num_threads", "intra_op_thread_count")
OPTIMIZATION_KEYS = ("optimization", "graph_optimization_level")

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


@dataclass
class BaselineResult:
    """Images per second of one onnxruntime session at one batch size; latencies in microseconds."""

    onnx: str
    batch_size: int
    threads: int | None
    optimization: str
    provider: str
    runs: int
    seconds: float
    images_per_s: float
    p50_us: float
    p99_us: float
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    error: str | None = None  # why it could not be measured (the numbers are then NaN)

    @property
    def ok(self) -> bool:
        return self.error is None and self.runs > 0

    @classmethod
    def failed(cls, onnx, batch_size: int, error: str, threads=None, optimization: str = "all"):
        """A baseline that could not be measured, and why (kept, so that the report shows the failure)."""
        nan = float("nan")
        return cls(
            str(onnx), batch_size, threads, optimization, "CPUExecutionProvider", 0, 0.0, nan, nan, nan,
            error=error,
        )  # fmt: skip


def ort_settings_from_config(config: dict) -> dict[str, int | str]:
    """The onnxruntime settings (`threads`, `optimization`) a Triton model config (as JSON) sets, if any.
    A vitserve CPU model's threads "auto" are decided where it loads: no `threads` then."""
    if CPU_BACKBONE_PARAM in (config.get("parameters") or {}):
        try:
            params = CpuBackboneParams.from_model_config(config)
        except ContractError as e:
            raise ConfigError(f"{e} (rebuild the repository with `make engines`)") from None
        found: dict[str, int | str] = {"optimization": params.optimization}
        if isinstance(params.cpu_threads, int):
            found["threads"] = params.cpu_threads
        return found
    found = {}
    for key, value in (config.get("parameters", {}) or {}).items():
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        candidates = {key: text}
        try:
            inner = json.loads(text)
        except ValueError:
            inner = None
        if isinstance(inner, dict):
            candidates.update(inner)
        for k, v in candidates.items():
            if k in THREAD_KEYS and v not in (None, "", 0, "0", "auto"):  # auto: decided where it loads
                try:
                    found.setdefault("threads", int(v))
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"model config parameter {k}={v!r} is not an integer") from e
            elif k in OPTIMIZATION_KEYS and str(v).lower() in OPTIMIZATION_LEVELS:
                found.setdefault("optimization", str(v).lower())
    return found


def run_baseline(
    onnx_path: str | Path,
    batch_size: int,
    *,
    threads: int | None = None,
    optimization: str = "all",
    duration_s: float = 5.0,
    warmup_runs: int = 3,
    shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    flavour: str | None = None,
) -> BaselineResult:
    """Run `onnx_path` with onnxruntime (CPU provider) on random inputs of `batch_size` for `duration_s`.

    `threads` sets `intra_op_num_threads` (None: onnxruntime's default, one per core) and `optimization`
    the graph optimization level (all, extended, basic, disabled), as the served model sets them. The first dimension
    of every input is the batch; other variable dimensions come from `shapes` (name -> dims without batch).
    """
    try:
        import onnxruntime  # noqa: F401  (the install hint when it is missing)
    except ImportError as e:
        raise missing_extra("onnxruntime", "export") from e
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"baseline ONNX file {str(onnx_path)!r} does not exist")
    if batch_size < 1 or duration_s <= 0:
        raise ConfigError(
            f"baseline needs batch_size >= 1 and duration_s > 0, got {batch_size}, {duration_s}"
        )
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    try:
        session = onnxrt.cpu_session(onnx_path, threads=threads, optimization=optimization)
    except Exception as e:  # onnxruntime raises its own untyped errors for a bad file
        raise ConfigError(f"onnxruntime could not load {str(onnx_path)!r}: {e}") from e
    inputs, provider, run = session.get_inputs(), "CPUExecutionProvider", session.run
    if flavour is not None and flavour.startswith("openvino"):  # the served model's engine (onnx_cpu.py)
        from vitserve.exporter.triton_models.onnx_cpu import OPENVINO_PRECISION, OpenVinoSession, usable_cores

        ov = OpenVinoSession(str(onnx_path), threads or usable_cores(), OPENVINO_PRECISION[flavour])
        names = [o.name for o in session.get_outputs()]
        del session
        provider, run = f"OpenVINO CPU ({flavour})", lambda _, feed: ov.run(names, feed)
    shapes = shapes or {}
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in inputs:
        dims = list(inp.shape)
        rest = shapes.get(inp.name, dims[1:])
        if any(not isinstance(d, int) or d < 0 for d in rest):
            raise ConfigError(
                f"input {inp.name!r} of {onnx_path.name} has variable dims {dims}; give them in shapes"
            )
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ConfigError(f"input {inp.name!r} of {onnx_path.name} has type {inp.type}, not supported")
        feeds[inp.name] = rng.random([batch_size, *rest]).astype(dtype)
    for _ in range(warmup_runs):
        run(None, feeds)
    latencies = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < duration_s or not latencies:
        run(None, feeds)
        latencies.append(time.perf_counter() - now)
    seconds = time.perf_counter() - start
    lat_us = np.asarray(latencies) * 1e6
    p50, p99 = np.percentile(lat_us, [50, 99])
    return BaselineResult(
        onnx=str(onnx_path),
        batch_size=batch_size,
        threads=threads,
        optimization=optimization,
        provider=provider,
        runs=len(latencies),
        seconds=seconds,
        images_per_s=len(latencies) * batch_size / seconds,
        p50_us=float(p50),
        p99_us=float(p99),
        input_shapes={k: list(v.shape) for k, v in feeds.items()},
    )
