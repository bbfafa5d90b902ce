"""A served model at one (concurrency, batch size) -> client throughput and latency, and what the server saw.

The one measuring primitive of `vitserve perf` (harness.py) and `vitserve tune` (tune/measurer.py):
`warmup_s` of closed-loop load at the point's concurrency (the built-in generator), a snapshot of Triton's
statistics for the model and each step of an ensemble, `duration_s` of measured load by perf_analyzer or
the built-in generator (the GPU sampled meanwhile where there is one), a second snapshot. With `stretch`
(a slow or shared host) the measured window is lengthened to ten warm-up request latencies, and tried once
more, three times longer, when perf_analyzer recorded no valid request in it.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vitserve.errors import ClientError
from vitserve.perf import server_stats
from vitserve.perf.inputs import ModelSpec, connect
from vitserve.perf.loadgen import run_load
from vitserve.perf.perf_analyzer import run_perf_analyzer

STRETCH_LATENCIES = 10  # with `stretch`, a window holds at least this many warm-up request latencies


class Generator(enum.StrEnum):
    """Which load generator measures a point."""

    PERF_ANALYZER = "perf_analyzer"
    BUILTIN = "builtin"
    BOTH = "both"

    def generators(self) -> list[str]:
        if self is Generator.BOTH:
            return [Generator.PERF_ANALYZER.value, Generator.BUILTIN.value]
        return [self.value]


@dataclass
class Measurement:
    """One point as measured. Latencies are client-side microseconds (`percentiles_us`: 50, 90, 95, 99);
    `server` holds Triton's per-request averages over the window for the model, then each ensemble step."""

    generator: str
    concurrency: int
    batch_size: int
    duration_s: float  # the measured window asked for (longer than given where `stretch` lengthened it)
    requests: int | None = None
    failures: int | None = None
    window_s: float | None = None
    requests_per_s: float | None = None
    images_per_s: float | None = None
    percentiles_us: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the built-in generator's first failure messages
    server: dict[str, server_stats.ServerBreakdown] = field(default_factory=dict)
    gpu_util_pct: float | None = None
    gpu_mem_used_mib: float | None = None

    def server_row(self, model: str) -> dict[str, float | None]:
        """`model`'s server breakdown as a plain row (requests, queue and compute phases in us, avg batch)."""
        d = self.server[model]
        return {"requests": d.requests, "queue_us": d.queue_us, "compute_input_us": d.compute_input_us,
                "compute_infer_us": d.compute_infer_us, "compute_output_us": d.compute_output_us,
                "avg_batch": d.avg_batch}  # fmt: skip


def measure_point(
    url: str,
    spec: ModelSpec,
    *,
    generator: str | Generator,
    concurrency: int,
    batch_size: int,
    duration_s: float,
    warmup_s: float,
    payloads,
    csv_path: str | Path | None = None,
    input_data: str | Path | None = None,
    shapes: dict[str, list[int]] | None = None,
    shared_memory: str = "none",
    stretch: bool = False,
    client=None,
) -> Measurement:
    """Measure `spec` at `url` (gRPC) at one point; see the module docstring. `payloads` (perf.inputs
    .make_payloads) feed the warm-up and the built-in generator; perf_analyzer sends random tensors, or
    `input_data` (its JSON, for BYTES inputs), and writes its CSV to `csv_path`. `client`: a tritonclient
    gRPC client to read statistics with (default: one opened and closed here). Errors of the generators
    (ClientError, ConfigError) and of the statistics API (ServerError) are raised."""
    generator = Generator(generator).value
    if generator == Generator.PERF_ANALYZER.value and csv_path is None:
        raise ValueError("perf_analyzer needs csv_path")  # a bug of the caller, not a user error
    m = Measurement(generator, concurrency, batch_size, duration_s)
    if warmup_s > 0:
        warm = run_load(url, spec, payloads, concurrency=concurrency, duration_s=warmup_s, warmup_s=0)
        if stretch:
            p50 = warm.percentiles_us()[50]
            slowest = 2 * warmup_s if math.isnan(p50) else p50 / 1e6  # none finished: slower still
            m.duration_s = max(duration_s, STRETCH_LATENCIES * slowest)
    own = client is None
    client = connect(url) if own else client
    try:
        watched = [spec.name, *server_stats.ensemble_steps(spec.config)]
        before = {name: server_stats.snapshot(client, name) for name in watched}
        with server_stats.GpuSampler() as gpu:
            if generator == Generator.PERF_ANALYZER.value:
                _perf_analyzer(m, url, spec, csv_path, input_data, shapes, shared_memory, stretch)
            else:
                res = run_load(
                    url, spec, payloads, concurrency=concurrency, duration_s=m.duration_s, warmup_s=0
                )
                m.window_s, m.requests, m.failures = res.window_s, res.requests, res.failures
                m.requests_per_s, m.images_per_s = res.requests_per_s, res.images_per_s
                m.percentiles_us = res.percentiles_us()
                m.errors = res.errors
        after = {name: server_stats.snapshot(client, name) for name in watched}
    finally:
        if own:
            client.close()
    m.server = {name: server_stats.delta(before[name], after[name]) for name in watched}
    m.gpu_util_pct, m.gpu_mem_used_mib = gpu.util_pct, gpu.mem_used_mib
    return m


def _perf_analyzer(m: Measurement, url, spec, csv_path, input_data, shapes, shared_memory, stretch) -> None:
    def run():
        return run_perf_analyzer(
            url, spec, concurrency=m.concurrency, batch_size=m.batch_size, duration_s=m.duration_s,
            csv_path=csv_path, shapes=shapes, input_data=input_data, shared_memory=shared_memory,
        )  # fmt: skip

    try:
        pa = run()
    except ClientError as e:
        if not stretch or "No valid requests recorded" not in str(e):
            raise
        m.duration_s *= 3  # the host slowed down after the warm-up: once more, with longer windows
        pa = run()
    row = pa.row
    found = re.search(r"Request count:\s*(\d+)", pa.stdout)
    m.requests = int(found.group(1)) if found else None
    m.failures = 0  # perf_analyzer stops at the first failure; getting here means none
    m.images_per_s = row["images_per_s"]
    m.requests_per_s = row["images_per_s"] / m.batch_size
    if m.requests and m.requests_per_s:
        m.window_s = m.requests / m.requests_per_s
    m.percentiles_us = {p: row[f"p{p}_us"] for p in (50, 90, 95, 99)}
