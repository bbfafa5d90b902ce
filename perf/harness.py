"""Sweep served models over concurrency x batch size with perf_analyzer and/or the built-in generator.

    result = run_sweep("localhost:8001", ["vitb32", "vitb32_fp32_cpu", "vitb32_cpu-int8_cpu"], [1, 2, 4],
                       [1, 8], generator="both", duration_s=5, max_total_s=600, out_dir="perf/results/run1",
                       images="tests/data/images", repository="model_repository")

Each point is measured the same way whichever generator runs it (`vitserve.perf.measure`, as `vitserve tune`
measures): `warmup_s` of closed-loop load at the point's concurrency, a snapshot of Triton's statistics,
`duration_s` of measured load, a second snapshot. The results are `vitserve.perf.sweep_result` types.
The sweep is bounded in points (models x batch sizes x concurrencies x generators) and in time: once
`max_total_s` has passed no new point starts, the finished ones are kept and the result says so.

Two ratios, never mixed: a point's `efficiency` is its images/s over the in-process images/s of the ONNX
file that same model runs (serving overhead; each model has its own baseline), and the precision speed-up
(`sweep_result.precision_speedups`) is an INT8/FP16 model's images/s over its FP32 sibling's, served and in-process.
A point or baseline that fails is kept with its error, and reported as a failure.
"""

from __future__ import annotations

import datetime as _dt
import logging
import tempfile
import time
from pathlib import Path

from vitserve.contract import CPU_BACKBONE_PARAM, ONNX_FILE, CpuBackboneParams
from vitserve.errors import ConfigError, ServerError, VitServeError
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
from vitserve.perf.measure import Generator, measure_point
from vitserve.perf.sweep_result import PointResult, SweepResult

log = logging.getLogger(__name__)


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
                if (repo / name / "1" / ONNX_FILE).is_file():
                    files[spec.name] = served_file(repo / name)
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


def served_file(model_dir: Path) -> Path:
    """The ONNX file a model folder's model runs on this host: `1/model.onnx`, or, for a vitserve CPU model
    with flavours, the file of the flavour its probe picks here (onnx_cpu.probe_flavours: the int8 model
    serves its per-token file on an AVX2 host, not the Q/DQ model.onnx); `served_flavour` names it."""
    flavour = served_flavour(model_dir)
    if flavour is None:
        return model_dir / "1" / ONNX_FILE
    from vitserve.exporter.repository import read_config, read_params

    params = read_params(read_config(model_dir / "config.pbtxt"), CpuBackboneParams)
    return model_dir / "1" / params.flavours[flavour]


def served_flavour(model_dir: Path) -> str | None:
    """The flavour (contract.CPU_FLAVOURS) a vitserve CPU model folder serves on this host, None for other
    models."""
    from vitserve.exporter.repository import read_config, read_params
    from vitserve.exporter.triton_models.onnx_cpu import probe_flavours

    config = model_dir / "config.pbtxt"
    if not config.is_file():
        return None
    cfg = read_config(config)
    if CPU_BACKBONE_PARAM not in cfg.parameters:  # not a vitserve CPU backbone
        return None
    params = read_params(cfg, CpuBackboneParams)
    if not params.flavours:
        return None
    return probe_flavours(str(model_dir), isa=params.isa)["serves"]


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
    m = measure_point(
        url, spec, generator=gen, concurrency=concurrency, batch_size=batch_size, duration_s=duration_s,
        warmup_s=warmup_s, payloads=payloads, input_data=input_data, shapes=shapes,
        csv_path=raw_dir / f"perf_analyzer_{spec.name}_b{batch_size}_c{concurrency}.csv",
    )  # fmt: skip
    point = PointResult(
        spec.name, gen, concurrency, batch_size, window_s=m.window_s, requests=m.requests, failures=m.failures,
        requests_per_s=m.requests_per_s, images_per_s=m.images_per_s, error_samples=m.errors,
        gpu_util_pct=m.gpu_util_pct, gpu_mem_used_mib=m.gpu_mem_used_mib,
    )  # fmt: skip
    for p, v in m.percentiles_us.items():
        setattr(point, f"p{p}_us", v)
    if gen == Generator.BUILTIN.value and m.requests == 0:
        point.error = "no request succeeded" + (f": {m.errors[0]}" if m.errors else "")
    d = m.server[spec.name]
    point.server_steps = {step: m.server_row(step) for step in list(m.server)[1:]}
    point.server_requests = d.requests
    point.server_queue_us = d.queue_us
    point.server_compute_input_us = d.compute_input_us
    point.server_compute_infer_us = d.compute_infer_us
    point.server_compute_output_us = d.compute_output_us
    point.server_avg_batch = d.avg_batch
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
            flavour = served_flavour(Path(path).parent.parent)
            if flavour is not None:
                result.baseline_settings[str(path)] += f", the {flavour} flavour this host serves"
            for b in batch_sizes:
                try:
                    base = run_baseline(
                        path, b, duration_s=duration_s, shapes=shapes, flavour=flavour, **settings
                    )
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
