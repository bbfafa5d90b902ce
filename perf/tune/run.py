"""The whole tune: a served model + a p99 budget -> the serving settings with the most images/s on this host.

Serves (the real tritonserver with explicit model control, started here or at `url`), discovers what is
tuned (tune/configs.py), searches (tune/search.py) by measuring configurations (tune/measurer.py) within the
time bound, checks the choice against in-process onnxruntime (tune/check.py), writes `tuned:` into
models.yaml (tune/writeback.py) and the report (tune/report.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from vitserve.errors import ConfigError
from vitserve.perf.tune.check import CHECK_ROUNDS, compare_in_process
from vitserve.perf.tune.configs import Reloader, current_knobs, discover, engine_candidates
from vitserve.perf.tune.measurer import MEASUREMENTS, Measurer, load_earlier, signature
from vitserve.perf.tune.report import TuneResult, write_tune_report
from vitserve.perf.tune.search import (
    Knobs,
    Point,
    Space,
    choose,
    default_space,
    pareto_front,
    search,
    untuned_over_tuned,
)
from vitserve.perf.tune.writeback import tuned_section, write_tuned


def run_tune(
    model: str,
    *,
    url: str | None = None,
    repository: str | Path = "model_repository",
    config: str | Path | None = None,
    p99_ms: float | None = None,
    max_minutes: float = 20.0,
    concurrencies: list[int] | None = None,
    batch_sizes: list[int] | None = None,
    duration_s: float = 4.0,
    warmup_s: float = 1.0,
    tensor: bool = False,
    images: str | Path | None = None,
    out_dir: str | Path | None = None,
    fresh: bool = False,
    write: bool = True,
    check: bool = True,
    check_batches: list[int] | None = None,
    space: Space | None = None,
    command: str | None = None,
    progress: bool = True,
) -> TuneResult:
    """Tune `model` (an ensemble of models.yaml, or any model of the repository) on this host; see the
    docstring of `vitserve.perf.tune`. Without `url`, starts tritonserver on `repository` with explicit model control and
    stops it at the end; with `url`, uses that server and leaves the chosen configuration loaded."""
    from vitserve.exporter.hostinfo import cpu_summary
    from vitserve.exporter.triton_models.onnx_cpu import usable_cores
    from vitserve.perf.inputs import connect, list_images

    t0 = time.monotonic()
    load_start = os.getloadavg()[0]
    concurrencies = sorted(set(concurrencies or [1, 4]))
    batch_sizes = sorted(set(batch_sizes or [1]))
    if min(concurrencies) < 1 or min(batch_sizes) < 1 or duration_s <= 0 or max_minutes <= 0:
        raise ConfigError(
            f"need concurrencies >= 1, batch sizes >= 1, duration_s > 0 and max_minutes > 0; got {concurrencies}, "
            f"{batch_sizes}, {duration_s}, {max_minutes}"
        )
    if p99_ms is not None and p99_ms <= 0:
        raise ConfigError(f"--p99-ms must be > 0, got {p99_ms}")
    check_batches = check_batches or [1, 2, 4, 8, 16]
    repository = Path(repository)
    budget_us = p99_ms * 1e3 if p99_ms is not None else None
    deadline = t0 + max_minutes * 60
    out = Path(out_dir or f"perf/results/tune-{model}")
    out.mkdir(parents=True, exist_ok=True)
    # perf_analyzer's CSVs, its image input file and the server log are scratch: tune.json keeps every number
    raw = Path(tempfile.mkdtemp(prefix=f"vitserve-tune-{model}-"))
    if write and config is not None:
        from vitserve.exporter.config import load_models

        if model not in {s.name for s in load_models(config)}:
            raise ConfigError(
                f"{config} has no model {model!r} to write the tuned settings into (or pass --no-write)"
            )
    host = cpu_summary()
    server = None
    if url is None:
        from vitserve.server import TritonServer

        server = TritonServer(
            repository, log_path=raw / "tritonserver.log",
            extra_args=["--model-control-mode=explicit", "--load-model=*"],
        )  # fmt: skip
        server.start()
        url = server.grpc_url
        mode = (
            f"tritonserver started by the tuner on {repository} (explicit model control, config-override "
            f"reloads; log {server.log_path})"
        )
    else:
        mode = f"the running tritonserver at {url} (explicit model control, config-override reloads)"
    client = connect(url)
    try:
        target = discover(client, model)
        current = current_knobs(target)
        image_files = None
        if target.ensemble is not None:
            if images is None:
                from vitserve.exporter.samples import write_eval_images

                images = raw / "images"
                write_eval_images(images)
            image_files = list_images(images)
        if target.ensemble is not None and not tensor:
            measured_name = f"{model} (bytes ensemble: the held-out JPEGs or --images)"
        elif target.ensemble is not None:
            measured_name = f"{model} tensor path (pixel_values into the routed backbone)"
        else:
            measured_name = model
        sig = signature(measured_name, batch_sizes, duration_s, host)
        sig["concurrencies"] = concurrencies
        store = out / MEASUREMENTS
        if fresh and store.exists():
            store.rename(out / f"measurements.{int(time.time())}.jsonl")
        earlier = load_earlier(store, sig)
        cores = usable_cores()
        max_batch = int(target.configs[target.backbones[current.variant]].get("max_batch_size", 1))
        # the engines each variant can be pinned to: its flavours scored on its probe here (seconds each; a
        # given `space` sweeps its own `flavours`, the report shows these)
        engines = engine_candidates(target, repository, cores)
        space = space or default_space(
            list(target.backbones), cores, target.onnx_cpu, max_batch, concurrencies, current,
            ensemble=target.ensemble is not None and not tensor, shared_cores=True,
            flavours={v: e["sweep"] for v, e in engines.items()},
        )  # fmt: skip
        reloader = Reloader(client, target)
        measure = Measurer(
            url, client, target, reloader, tensor=tensor, concurrencies=concurrencies, batch_sizes=batch_sizes,
            duration_s=duration_s, warmup_s=warmup_s, images=image_files, raw_dir=raw, sig=sig,
        )  # fmt: skip
        per_config_s = 6 + len(concurrencies) * len(batch_sizes) * (duration_s + warmup_s + 2.5)
        check_s = 0.0
        if check and target.onnx_cpu and target.ensemble is not None:
            per_point = duration_s + warmup_s + 2.5
            in_process_s = (len({1, 8, 16, *check_batches}) + len(check_batches)) * (duration_s + 1)
            check_s = len(target.backbones) * (
                6 + CHECK_ROUNDS * (2 * len(check_batches) * len(concurrencies) * per_point + in_process_s)
            )
            check_s += 6 + len(concurrencies) * per_point
        search_deadline = deadline - check_s

        def save(new: list[Point]) -> None:
            with open(store, "a") as f:
                for p in new:
                    f.write(p.to_json() + "\n")

        spent: list[float] = []

        def timed(knobs: Knobs, stage: str) -> list[Point]:
            t = time.monotonic()
            try:
                return measure(knobs, stage)
            finally:
                spent.append(time.monotonic() - t)

        def out_of_time() -> bool:  # the next configuration would end past the deadline
            expected = max(per_config_s, sum(spent) / len(spent)) if spent else per_config_s
            return time.monotonic() + expected > search_deadline

        bar = _bar(progress)
        first = reused_first = 0
        if current not in {p.knobs for p in earlier if p.ok} and not out_of_time():
            # the reference for untuned / tuned is measured first, so that a run the time bound cuts has it
            new = timed(current, "untuned")
            save(new)
            earlier = [*earlier, *new]
            first, reused_first = 1, int(all(p.ok for p in new))
        outcome = search(
            space, current, timed, p99_budget_us=budget_us, out_of_time=out_of_time,
            earlier=earlier, on_points=save, progress=bar,
        )  # fmt: skip
        outcome.measured, outcome.reused = outcome.measured + first, outcome.reused - reused_first
        if bar is not None:
            bar.close()
        chosen = choose(outcome.points, budget_us)
        result = TuneResult(
            model=model, measured_model=measured_name, host=host, command=command, p99_budget_ms=p99_ms,
            max_minutes=max_minutes, concurrencies=concurrencies, batch_sizes=batch_sizes, duration_s=duration_s,
            server_mode=mode, current=current, points=outcome.points, front=pareto_front(outcome.points),
            chosen=chosen, measured_configs=outcome.measured, reused_configs=outcome.reused,
            truncated=outcome.truncated, note=outcome.note, elapsed_s=0.0, engines=engines,
        )  # fmt: skip
        if chosen is not None:
            result.untuned = untuned_over_tuned(outcome.points, current, chosen.knobs)
            result.tuned = tuned_section(chosen.knobs, target, host=host, p99_ms=p99_ms, report=str(out))
            if check_s:
                result.check = compare_in_process(
                    measure, chosen.knobs, repository, check_batches, concurrencies, duration_s,
                    out_of_time=lambda: time.monotonic() > deadline, p99_budget_us=budget_us,
                )  # fmt: skip
            if server is None:
                reloader.apply(chosen.knobs)  # the user's server goes on serving the choice
            if write and config is not None:
                write_tuned(config, model, result.tuned)
                result.written_to = str(config)
    finally:
        client.close()
        if server is not None:
            server.stop()
    result.elapsed_s = time.monotonic() - t0
    result.load_avg = [load_start, os.getloadavg()[0]]
    result.files = write_tune_report(result, out)
    return result


def _bar(enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(unit="config", desc="tune")

    def update(label: str, i: int, n: int) -> None:
        bar.total = max(bar.total or 0, bar.n + (n - i))
        bar.set_description(label[:60])
        bar.update(1)

    update.close = bar.close  # type: ignore[attr-defined]
    return update
