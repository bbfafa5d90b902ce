"""A sweep's results: its points, the in-process baselines, and what is derived from them alone.

Written by `vitserve.perf.harness` (which measures) and read by `vitserve.perf.report` (which writes the
files); neither imports the other for these types.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from vitserve.contract import Precision, backbone_model_name, parse_backbone_model_name
from vitserve.errors import ClientError
from vitserve.exporter.hostinfo import cpu_summary
from vitserve.perf.baseline import BaselineResult
from vitserve.perf.measure import Generator


@dataclass
class PointResult:
    """One measured point. Latencies are client-side microseconds; `server_*_us` are per-request averages
    from Triton's statistics over the point; `images_per_s` = `requests_per_s` * `batch_size`."""

    model: str
    generator: str
    concurrency: int
    batch_size: int
    window_s: float | None = None
    requests: int | None = None
    failures: int | None = None
    requests_per_s: float | None = None
    images_per_s: float | None = None
    p50_us: float | None = None
    p90_us: float | None = None
    p95_us: float | None = None
    p99_us: float | None = None
    server_requests: int | None = None
    server_queue_us: float | None = None
    server_compute_input_us: float | None = None
    server_compute_infer_us: float | None = None
    server_compute_output_us: float | None = None
    server_avg_batch: float | None = None
    server_steps: dict[str, dict[str, float | None]] = field(default_factory=dict)
    gpu_util_pct: float | None = None
    gpu_mem_used_mib: float | None = None
    efficiency: float | None = None
    wall_s: float | None = None
    error: str | None = None
    error_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.requests)

    def check_percentiles(self) -> None:
        """p50 <= p90 <= p95 <= p99, or ClientError naming the point (a measurement we cannot trust)."""
        values = [self.p50_us, self.p90_us, self.p95_us, self.p99_us]
        if any(v is None or math.isnan(v) for v in values):
            return
        if any(a > b for a, b in itertools.pairwise(values)):
            raise ClientError(
                f"{self.generator} reported non-monotonic percentiles p50/p90/p95/p99 = {values} us "
                f"for {self.model} at concurrency {self.concurrency}, batch {self.batch_size}"
            )


@dataclass
class SweepResult:
    """All points of a sweep plus what is needed to read and reproduce them."""

    url: str
    models: list[str]
    concurrencies: list[int]
    batch_sizes: list[int]
    generator: str
    duration_s: float
    warmup_s: float
    max_total_s: float
    planned_points: int
    points: list[PointResult] = field(default_factory=list)
    baselines: list[BaselineResult] = field(default_factory=list)
    baseline_files: dict[str, str] = field(default_factory=dict)  # model -> the ONNX file it runs
    baseline_settings: dict[str, str] = field(default_factory=dict)  # ONNX file -> onnxruntime settings
    truncated: bool = False
    note: str | None = None
    elapsed_s: float = 0.0
    started_at: str = ""
    command: str | None = None
    images: str | None = None
    out_dir: str | None = None
    host_cpu: str = field(default_factory=cpu_summary)
    files: dict[str, str] = field(default_factory=dict)

    def baseline_for(self, model: str, batch_size: int) -> BaselineResult | None:
        """The in-process baseline of the ONNX file `model` runs, at `batch_size` (None: not measured)."""
        onnx = self.baseline_files.get(model)
        return next((b for b in self.baselines if b.onnx == onnx and b.batch_size == batch_size), None)

    @property
    def failed_points(self) -> list[PointResult]:
        return [p for p in self.points if not p.ok]

    def to_dict(self) -> dict:
        return asdict(self)


def precision_speedups(result: SweepResult) -> list[dict]:
    """Each non-FP32 backbone model of the sweep against its FP32 sibling (same name and kind), when both
    were swept: in-process images/s ratio per batch size (generator "in-process"), and served images/s
    ratio per batch size, concurrency and generator. Only points that both succeeded are compared."""
    rows = []
    points = {(p.model, p.generator, p.batch_size, p.concurrency): p for p in result.points if p.ok}
    for model in result.models:
        variant = parse_backbone_model_name(model)
        if variant is None or variant[1] is Precision.FP32:
            continue
        fp32 = backbone_model_name(variant[0], Precision.FP32, variant[2])
        if fp32 not in result.models:
            continue
        for b in result.batch_sizes:
            mine, ref = result.baseline_for(model, b), result.baseline_for(fp32, b)
            if mine is not None and ref is not None and mine.ok and ref.ok:
                rows.append({"model": model, "fp32": fp32, "generator": "in-process", "batch_size": b,
                             "concurrency": None, "speedup": mine.images_per_s / ref.images_per_s})  # fmt: skip
            for c in result.concurrencies:
                for gen in Generator(result.generator).generators():
                    p, q = points.get((model, gen, b, c)), points.get((fp32, gen, b, c))
                    if p is not None and q is not None:
                        rows.append({"model": model, "fp32": fp32, "generator": gen, "batch_size": b,
                                     "concurrency": c, "speedup": p.images_per_s / q.images_per_s})  # fmt: skip
    return rows
