"""Sweep served models over concurrency x batch size with perf_analyzer and/or the built-in generator.

    result = run_sweep("localhost:8001", ["vitb32", "vitb32_fp32_cpu", "vitb32_cpu-int8_cpu"], [1, 2, 4],
                       [1, 8], generator="both", duration_s=5, max_total_s=600, out_dir="perf/results/run1",
                       images="tests/data/images", repository="model_repository")

Each point is measured the same way whichever generator runs it: `warmup_s` of closed-loop load at the
point's concurrency, a snapshot of Triton's statistics, `duration_s` of measured load, a second snapshot.
The sweep is bounded in points (models x batch sizes x concurrencies x generators) and in time: once
`max_total_s` has passed no new point starts, the finished ones are kept and the result says so.

Two ratios, never mixed: a point's `efficiency` is its images/s over the in-process images/s of the ONNX
file that same model runs (serving overhead; each model has its own baseline), and the precision speed-up
(`precision_speedups`) is an INT8/FP16 model's images/s over its FP32 sibling's, served and in-process.
A point or baseline that fails is kept with its error, and reported as a failure.
"""

from __future__ import annotations

import datetime as _dt
import enum
import itertools
import logging
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitserve.errors import ClientError, ConfigError, ServerError, VitServeError
from vitserve.exporter.hostinfo import cpu_summary
from vitserve.perf import server_stats
from vitserve.perf.baseline import BaselineResult, ort_settings_from_config, run_baseline
from vitserve.perf.inputs import (
    ModelSpec,
    connect,
    describe_model,
    list_images,
    make_payloads,
    write_input_data,
)
from vitserve.perf.loadgen import run_load
from vitserve.perf.perf_analyzer import run_perf_analyzer

log = logging.getLogger(__name__)


class Generator(enum.StrEnum):
    """Which load generator measures each point."""

    PERF_ANALYZER = "perf_analyzer"
    BUILTIN = "builtin"
    BOTH = "both"

    def generators(self) -> list[str]:
        if self is Generator.BOTH:
            return [Generator.PERF_ANALYZER.value, Generator.BUILTIN.value]
        return [self.value]


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


def _positive_ints(values, what: str) -> list[int]:
    if isinstance(values, int | str):
        values = [values]
    out = []
    for v in values:
        try:
            n = int(v)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{what} must be positive integers, got {v!r}") from e
        if n < 1:
            raise ConfigError(f"{what} must be positive integers, got {v!r}")
        out.append(n)
    if not out:
        raise ConfigError(f"{what}: give at least one value")
    return out


_VARIANT = re.compile(
    r"^(?P<base>.+)_(?P<precision>cpu-int8|fp32|fp16|int8)_(?P<kind>cpu|onnxruntime|tensorrt)$"
)


def variant_of(model: str) -> tuple[str, str, str] | None:
    """(name, precision, kind) of a vitserve backbone model `NAME_{precision}_{kind}`, else None."""
    m = _VARIANT.match(model)
    return (m["base"], m["precision"], m["kind"]) if m else None


def precision_speedups(result: SweepResult) -> list[dict]:
    """Each non-FP32 backbone model of the sweep against its FP32 sibling (same name and kind), when both
    were swept: in-process images/s ratio per batch size (generator "in-process"), and served images/s
    ratio per batch size, concurrency and generator. Only points that both succeeded are compared."""
    rows = []
    points = {(p.model, p.generator, p.batch_size, p.concurrency): p for p in result.points if p.ok}
    for model in result.models:
        variant = variant_of(model)
        if variant is None or variant[1] == "fp32":
            continue
        fp32 = f"{variant[0]}_fp32_{variant[2]}"
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


def _baseline_files(
    specs: list[ModelSpec], onnx: str | Path | dict[str, str | Path] | None, repository: str | Path | None
) -> dict[str, Path]:
    """Which ONNX file each swept model runs: from `repository` (`REPO/NAME/1/model.onnx`, for an ensemble
    its first step that has one), then `onnx`, a {model: file} mapping or one file, which belongs to the
    models whose folder holds it (the backbone and the ensembles that route to it)."""
    files: dict[str, Path] = {}
    names = [s.name for s in specs]
    if repository is not None:
        repo = Path(repository)
        if not repo.is_dir():
            raise ConfigError(f"repository {str(repo)!r} is not a folder (the Triton model repository)")
        for spec in specs:
            for name in (spec.name, *server_stats.ensemble_steps(spec.config)):
                if (repo / name / "1" / "model.onnx").is_file():
                    files[spec.name] = repo / name / "1" / "model.onnx"
                    break
    if isinstance(onnx, dict):
        for model, path in onnx.items():
            if model not in names:
                raise ConfigError(f"baseline for {model!r}: it is not a swept model ({', '.join(names)})")
            files[model] = Path(path)
    elif onnx is not None:
        path = Path(onnx)
        owner = path.resolve().parent.parent.name
        owners = [s.name for s in specs if owner in (s.name, *server_stats.ensemble_steps(s.config))]
        if not owners:
            raise ConfigError(
                f"--onnx {path}: no swept model runs it (its folder is {owner!r}; swept: {', '.join(names)}); "
                "give it as MODEL=PATH, or --repository DIR to find every model's own file"
            )
        files.update(dict.fromkeys(owners, path))
    for model, path in files.items():
        if not path.is_file():
            raise ConfigError(f"baseline ONNX file {str(path)!r} of model {model!r} does not exist")
    return files


def _baseline_settings(url: str, onnx: Path, specs: list[ModelSpec]) -> tuple[dict, str]:
    """The onnxruntime settings of the served model that runs `onnx`, and which model they came from.

    Candidates in order: the model whose folder holds the file (`REPO/NAME/1/model.onnx`), then the swept
    models and their ensemble steps. The first that sets threads or optimization wins.
    """
    client = connect(url)
    try:
        index = {m.get("name") for m in client.get_model_repository_index(as_json=True).get("models", [])}
        names = [onnx.resolve().parent.parent.name]
        for spec in specs:
            names += [spec.name, *server_stats.ensemble_steps(spec.config)]
        for name in dict.fromkeys(names):
            if name not in index:
                continue
            try:
                config = client.get_model_config(name, as_json=True).get("config", {})
            except Exception:  # a model we cannot read only loses the hint
                continue
            settings = ort_settings_from_config(config)
            if settings:
                return settings, f"the {name} model config"
    finally:
        client.close()
    return {}, "onnxruntime defaults (no served model sets intra-op threads or optimization)"


def _measure(
    url: str,
    spec: ModelSpec,
    gen: str,
    concurrency: int,
    batch_size: int,
    payloads,
    duration_s: float,
    warmup_s: float,
    input_data: Path | None,
    shapes,
    raw_dir: Path,
) -> PointResult:
    point = PointResult(spec.name, gen, concurrency, batch_size)
    if warmup_s > 0:
        run_load(url, spec, payloads, concurrency=concurrency, duration_s=warmup_s, warmup_s=0)
    client = connect(url)
    try:
        watched = [spec.name, *server_stats.ensemble_steps(spec.config)]
        before = {m: server_stats.snapshot(client, m) for m in watched}
        with server_stats.GpuSampler() as gpu:
            if gen == Generator.PERF_ANALYZER.value:
                pa = run_perf_analyzer(
                    url, spec, concurrency=concurrency, batch_size=batch_size, duration_s=duration_s,
                    csv_path=raw_dir / f"perf_analyzer_{spec.name}_b{batch_size}_c{concurrency}.csv",
                    shapes=shapes, input_data=input_data,
                )  # fmt: skip
                row = pa.row
                m = re.search(r"Request count:\s*(\d+)", pa.stdout)
                point.requests = int(m.group(1)) if m else None
                point.failures = 0  # perf_analyzer stops at the first failure; getting here means none
                point.images_per_s = row["images_per_s"]
                point.requests_per_s = row["images_per_s"] / batch_size
                if point.requests and point.requests_per_s:
                    point.window_s = point.requests / point.requests_per_s
                for p in (50, 90, 95, 99):
                    setattr(point, f"p{p}_us", row[f"p{p}_us"])
            else:
                res = run_load(
                    url, spec, payloads, concurrency=concurrency, duration_s=duration_s, warmup_s=0
                )
                point.window_s = res.window_s
                point.requests = res.requests
                point.failures = res.failures
                point.requests_per_s = res.requests_per_s
                point.images_per_s = res.images_per_s
                for p, v in res.percentiles_us().items():
                    setattr(point, f"p{p}_us", v)
                point.error_samples = res.errors
                if res.requests == 0:
                    point.error = "no request succeeded" + (f": {res.errors[0]}" if res.errors else "")
        after = {m: server_stats.snapshot(client, m) for m in watched}
    finally:
        client.close()
    d = server_stats.delta(before[spec.name], after[spec.name])
    for step in watched[1:]:
        sd = server_stats.delta(before[step], after[step])
        point.server_steps[step] = {
            "requests": sd.requests, "queue_us": sd.queue_us, "compute_input_us": sd.compute_input_us,
            "compute_infer_us": sd.compute_infer_us, "compute_output_us": sd.compute_output_us,
            "avg_batch": sd.avg_batch,
        }  # fmt: skip
    point.server_requests = d.requests
    point.server_queue_us = d.queue_us
    point.server_compute_input_us = d.compute_input_us
    point.server_compute_infer_us = d.compute_infer_us
    point.server_compute_output_us = d.compute_output_us
    point.server_avg_batch = d.avg_batch
    point.gpu_util_pct = gpu.util_pct
    point.gpu_mem_used_mib = gpu.mem_used_mib
    point.check_percentiles()
    return point


def run_sweep(
    url: str,
    models: str | list[str],
    concurrencies: list[int],
    batch_sizes: list[int],
    *,
    generator: str | Generator = Generator.BOTH,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    max_total_s: float = 600.0,
    out_dir: str | Path | None = None,
    images: str | Path | None = None,
    shapes: dict[str, list[int]] | None = None,
    onnx: str | Path | dict[str, str | Path] | None = None,
    repository: str | Path | None = None,
    baseline_threads: int | None = None,
    command: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Measure every (model, batch size, concurrency, generator) point against the Triton server at `url`.

    `url` is the gRPC endpoint (host:port). Inputs come from each model's metadata: numeric inputs are
    random (fixed seed), BYTES inputs carry the images of `images` (a folder). With `repository` (the
    local Triton model repository) or `onnx` ({model: file}, or one file, which belongs to the model
    whose folder holds it), each model's own ONNX file is also run in-process (onnxruntime CPU, the served
    model's threads and graph optimization, threads overridden by `baseline_threads`) at each batch size,
    and every point of that model gets `efficiency` = its images/s over its own baseline's at the same
    batch size. A baseline that fails is kept with its error. No point starts after
    `max_total_s`; finished points are kept and `truncated`/`note` say so. With `out_dir` the CSV, JSON,
    plots and Markdown report are written there (see `vitserve.perf.report`).
    """
    t_start = time.monotonic()
    models = [models] if isinstance(models, str) else list(models)
    if not models:
        raise ConfigError("give at least one model")
    try:
        gen = Generator(generator)
    except ValueError as e:
        raise ConfigError(
            f"generator must be one of {[g.value for g in Generator]}, got {generator!r}"
        ) from e
    concurrencies = _positive_ints(concurrencies, "concurrencies")
    batch_sizes = _positive_ints(batch_sizes, "batch sizes")
    if duration_s <= 0 or warmup_s < 0 or max_total_s <= 0:
        raise ConfigError(
            f"need duration_s > 0, warmup_s >= 0, max_total_s > 0; got {duration_s}, {warmup_s}, {max_total_s}"
        )
    # Everything the sweep needs is checked before the first measurement: a typo fails in a second.
    specs = [describe_model(url, m) for m in models]
    baseline_files = _baseline_files(specs, onnx, repository)
    image_files = list_images(images) if images is not None else None
    for spec in specs:
        for b in batch_sizes:
            make_payloads(spec, b, shapes=shapes, images=image_files, count=1)  # batch, shapes, BYTES
    generators = gen.generators()
    result = SweepResult(
        url=url, models=models, concurrencies=concurrencies, batch_sizes=batch_sizes, generator=gen.value,
        duration_s=duration_s, warmup_s=warmup_s, max_total_s=max_total_s,
        planned_points=len(models) * len(batch_sizes) * len(concurrencies) * len(generators),
        started_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), command=command,
        images=str(images) if images is not None else None,
        out_dir=str(out_dir) if out_dir is not None else None,
        baseline_files={m: str(p) for m, p in baseline_files.items()},
    )  # fmt: skip
    work_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vitserve-perf-"))
    raw_dir = work_dir / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)

    def out_of_time() -> bool:
        return time.monotonic() - t_start >= max_total_s

    try:
        for path in dict.fromkeys(baseline_files.values()):
            settings, source = _baseline_settings(url, path, specs)
            if baseline_threads is not None:
                settings["threads"] = baseline_threads
                source += f", threads {baseline_threads} given"
            result.baseline_settings[str(path)] = (
                f"intra-op threads {settings.get('threads', 'default')}, graph optimization "
                f"{settings.get('optimization', 'all')} (from {source})"
            )
            for b in batch_sizes:
                try:
                    base = run_baseline(path, b, duration_s=duration_s, shapes=shapes, **settings)
                except Exception as e:  # onnxruntime raises its own untyped errors; the sweep goes on
                    log.error("in-process baseline %s at batch %d failed: %s", path, b, e)
                    base = BaselineResult.failed(path, b, f"{type(e).__name__}: {e}", **settings)
                result.baselines.append(base)
        _sweep(result, specs, generators, image_files, shapes, work_dir, raw_dir, out_of_time, progress)
    except KeyboardInterrupt:
        result.truncated = True
        result.note = f"interrupted after {len(result.points)} of {result.planned_points} points"
        raise
    finally:
        result.elapsed_s = time.monotonic() - t_start
        if out_dir is not None:
            from vitserve.perf.report import write_report

            write_report(result, out_dir)
    return result


def _sweep(result, specs, generators, image_files, shapes, work_dir, raw_dir, out_of_time, progress) -> None:
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the sweep runs without it
        tqdm = None
    bar = tqdm(total=result.planned_points, desc="perf", unit="point", disable=not progress) if tqdm else None
    try:
        for spec in specs:
            has_bytes = any(t.datatype == "BYTES" for t in spec.inputs)
            input_data = None
            if has_bytes and image_files and Generator.PERF_ANALYZER.value in generators:
                input_data = write_input_data(spec, image_files, work_dir / f"input_data_{spec.name}.json")
            for b in result.batch_sizes:
                payloads = make_payloads(spec, b, shapes=shapes, images=image_files)
                for c in result.concurrencies:
                    for gen in generators:
                        if out_of_time():
                            result.truncated = True
                            result.note = (
                                f"stopped after {len(result.points)} of {result.planned_points} points: the time "
                                f"bound max_total_s={result.max_total_s:g} s was reached; finished points are kept"
                            )
                            log.warning(result.note)
                            return
                        if bar is not None:
                            bar.set_description(f"{spec.name} b{b} c{c} {gen}")
                        t0 = time.monotonic()
                        try:
                            point = _measure(
                                result.url, spec, gen, c, b, payloads, result.duration_s, result.warmup_s,
                                input_data, shapes, raw_dir,
                            )  # fmt: skip
                        except ServerError as e:
                            result.points.append(PointResult(spec.name, gen, c, b, error=str(e)))
                            result.truncated = True
                            result.note = f"stopped: the server failed during the sweep: {e}"
                            log.error(result.note)
                            return
                        except VitServeError as e:
                            point = PointResult(spec.name, gen, c, b, error=str(e))
                            log.error("%s", e)
                        point.wall_s = time.monotonic() - t0
                        base = result.baseline_for(spec.name, b)
                        if base is not None and base.ok and point.ok and point.images_per_s:
                            point.efficiency = point.images_per_s / base.images_per_s
                        result.points.append(point)
                        if bar is not None:
                            bar.update(1)
                            if point.images_per_s:
                                bar.set_postfix(
                                    img_s=f"{point.images_per_s:.1f}",
                                    p99_ms=f"{(point.p99_us or 0) / 1e3:.2f}",
                                )
    finally:
        if bar is not None:
            bar.close()
