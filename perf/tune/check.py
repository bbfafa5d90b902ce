"""The chosen configuration -> served (tuned) against the same engine and file in-process.

Run after the search, in interleaved rounds (see `compare_in_process`): what serving costs over the network
itself, over the served model's own executor run in this process, and what the bytes ensemble costs over
the tensor path. In-process is the served model's own code initialised here (`bench_overhead.in_process`):
it picks the engine and file (flavour) the server picks on this host, by the same probe. `check_summary` is
the acceptance view: per variant, transport and concurrency, the client batch size that served best within
the p99 budget.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vitserve.contract import CpuBackboneParams
from vitserve.perf.tune.configs import cpu_params, served_params
from vitserve.perf.tune.measurer import Measurer
from vitserve.perf.tune.search import Knobs, Point, routed_to

CHECK_ROUNDS = 2


def compare_in_process(measure: Measurer, chosen: Knobs, repository: Path, batches: list[int],
                       concurrencies: list[int], duration_s: float, out_of_time: Callable[[], bool],
                       rounds: int = CHECK_ROUNDS, transports: tuple[str, ...] = ("none", "system"),
                       p99_budget_us: float | None = None) -> dict:  # fmt: skip
    """Served (tuned settings) against in-process onnxruntime on the same ONNX with every usable core, at
    its best batch size, for each CPU backbone variant's tensor path; then the bytes ensemble against the
    tensor path of the variant it routes to. Where the choice is one instance with lanes, the served model's
    own executor (onnx_cpu.py, lanes as chosen) is also run in-process at each batch size: served over that
    is the cost of serving alone (transfer, queue, the python stub).

    On a shared or throttled host speed drifts by more than the effect measured, so the runs are
    interleaved: per round and batch size, in-process, then the executor, then served at each concurrency,
    back to back; each ratio is taken within its round (against that round's best in-process batch size)
    and the median over `rounds` is reported, with the median served point. Served is measured with the
    tensors in the gRPC messages and in system shared memory (`transports`: a client on the server's host,
    as the python client's `shared_memory="system"` does): the difference is what the transfer costs."""
    import numpy as np

    from vitserve.exporter.triton_models.onnx_cpu import usable_cores
    from vitserve.perf.bench_lanes import read_dims
    from vitserve.perf.bench_overhead import in_process, served_file, timed_runs

    target = measure.target
    cores = usable_cores()
    rows, inproc, ensemble_rows = [], {}, []
    rng = np.random.default_rng(0)
    for variant, model in target.backbones.items():
        cfg = target.configs[model]
        knobs = routed_to(chosen, variant)  # the chosen flavour pin is the chosen variant's only
        # the server's pick (or the pinned flavour): same engine, file and threads
        ref = in_process(repository / model, cores, knobs.flavour)
        engine, onnx = served_file(repository / model, ref)
        shape = read_dims(repository / model)
        opt = served_params(CpuBackboneParams, cfg).optimization
        max_batch = int(cfg.get("max_batch_size", 1))
        lanes = chosen.instances == 1 and (chosen.cpu_lanes or 1) > 1
        sizes = [b for b in sorted({1, 8, 16, *batches}) if b <= max_batch]
        base: dict[int, list[dict]] = {}
        executor: dict[int, list[float]] = {}
        served: dict[tuple[int, str, int], list[Point]] = {}
        for _ in range(rounds):
            for b in sizes:
                if out_of_time():
                    break
                x = rng.standard_normal([b, *shape]).astype(np.float32)
                ips, lat = timed_runs(ref, x, duration_s)
                p50, p99 = (float(v) * 1e6 for v in np.percentile(lat, [50, 99]))
                base.setdefault(b, []).append(
                    {"batch_size": b, "images_per_s": ips, "p50_us": p50, "p99_us": p99}
                )
                if b not in batches:
                    continue
                if lanes:
                    executor.setdefault(b, []).append(_executor_ips(repository / model, knobs, b, duration_s))
                for shm in transports:
                    for p in measure(knobs, "check", tensor=True, batch_size=b, concurrencies=concurrencies,
                                     shared_memory=shm):  # fmt: skip
                        served.setdefault((b, shm, p.concurrency), []).append(p)
        ref.finalize()
        if not base:
            break
        n = min(len(v) for v in base.values())  # complete rounds (the time bound may cut the last one)
        best_per_round = [max(base[b][i]["images_per_s"] for b in base) for i in range(n)]
        runs = [_median_row(v) for v in base.values()]
        best = max(runs, key=lambda r: r["images_per_s"])
        inproc[variant] = {"onnx": str(onnx), "engine": engine, "threads": cores, "optimization": opt, "rounds": n,
                           "runs": runs, "best": best}  # fmt: skip
        if executor:
            inproc[variant]["executor"] = {"lanes": chosen.cpu_lanes, "threads": chosen.cpu_threads or cores,
                                           "runs": [{"batch_size": b, "images_per_s": statistics.median(v)}
                                                    for b, v in executor.items()]}  # fmt: skip
        for (b, _, _), points in sorted(served.items()):
            ok = [p for p in points if p.ok]
            p = sorted(ok, key=lambda q: q.images_per_s)[(len(ok) - 1) // 2] if ok else points[-1]

            def ratio(ref: list[float], points=points) -> float | None:
                got = [q.images_per_s / ref[i] for i, q in enumerate(points[: len(ref)]) if q.ok]
                return statistics.median(got) if got else None

            rows.append({"variant": variant, "point": p, "rounds": len(ok),
                         "ratio": ratio(best_per_round),
                         "same_batch_ratio": ratio([r["images_per_s"] for r in base[b]]),
                         "executor_ratio": ratio(executor[b]) if b in executor else None})  # fmt: skip
    if target.ensemble is not None and measure.images is not None and not out_of_time():
        tensor = {
            (r["variant"], r["point"].batch_size, r["point"].concurrency): r["point"]
            for r in rows
            if r["point"].shared_memory == "none"
        }
        for b in sorted({1, *batches}):
            if out_of_time() or not any(k[:2] == (chosen.variant, b) for k in tensor):
                continue
            for p in measure(chosen, "check", tensor=False, batch_size=b, concurrencies=concurrencies):
                t = tensor.get((chosen.variant, b, p.concurrency))
                ok = p.ok and t is not None and t.ok
                ensemble_rows.append(
                    {"point": p, "tensor": t, "ratio": p.images_per_s / t.images_per_s if ok else None}
                )
    return {"cores": cores, "rounds": rounds, "in_process": inproc, "tensor": rows, "ensemble": ensemble_rows,
            "p99_budget_us": p99_budget_us, "summary": check_summary(rows, p99_budget_us)}  # fmt: skip


def _median_row(runs: list[dict]) -> dict:
    """The run with the median images/s (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: r["images_per_s"])[(len(runs) - 1) // 2]


def _executor_ips(model_dir: Path, knobs: Knobs, batch: int, duration_s: float) -> float:
    """Images/s of the served model's own code, in this process, with the chosen threads, lanes and spinning
    (as `backbone_override` serves them: spinning None leaves onnxruntime's default, whatever the
    repository's file says); threads not chosen: every usable core."""
    import numpy as np

    from vitserve.exporter.repository import read_config, read_params
    from vitserve.exporter.triton_models.onnx_cpu import usable_cores
    from vitserve.perf.bench_lanes import images_per_s, load, read_dims

    served = read_params(read_config(model_dir / "config.pbtxt"), CpuBackboneParams)
    model = load(
        model_dir, cpu_params(served, replace(knobs, cpu_threads=knobs.cpu_threads or usable_cores()))
    )
    try:
        x = np.random.default_rng(0).standard_normal([batch, *read_dims(model_dir)]).astype(np.float32)
        return images_per_s(model, x, duration_s)
    finally:
        model.finalize()


def check_summary(rows: list[dict], p99_budget_us: float | None = None) -> list[dict]:
    """Per variant, transport and concurrency, the served tensor path at the client batch size that served
    it best with p99 within the budget (none fits: the best of all, marked), against in-process at its best
    batch size: the issue's acceptance view (a client picks its batch size as the in-process caller does,
    within its latency budget)."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        p = row["point"]
        if p.ok:
            groups.setdefault((row["variant"], p.shared_memory, p.concurrency), []).append(row)
    out = []
    for (v, shm, c), group in sorted(groups.items()):
        fits = [r for r in group if p99_budget_us is None or r["point"].p99_us <= p99_budget_us]
        r = max(fits or group, key=lambda r: r["point"].images_per_s)
        out.append({"variant": v, "shared_memory": shm, "concurrency": c, "batch_size": r["point"].batch_size,
                    "images_per_s": r["point"].images_per_s, "p99_us": r["point"].p99_us, "ratio": r["ratio"],
                    "within_budget": bool(fits)})  # fmt: skip
    return out
