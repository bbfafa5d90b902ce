"""Lanes vs one session: the CPU backbone's own model code (onnx_cpu.py), in this process, on this host.

    python -m vitserve.perf.bench_lanes --repository model_repository --models vitb32_fp32_cpu vitb32_cpu-int8_cpu

Each served CPU backbone of a built repository is initialised as the python backend would do it, twice
with every usable core as intra-op threads: `lanes 1` (one session: the whole batch on one call, as
in-process onnxruntime runs it) and `lanes N` (a batch of >= N images cut into N slices run at once on
1-thread sessions; a smaller batch on the wide session). Both run the same batches in turns (round-robin,
`--rounds`), and each batch size's ratio is the median of the per-round ratios. No server, no client:
this is what the executor alone gains; `vitserve tune` measures it served. Nothing is asserted; results
go to perf/results/lanes.{md,json} with this host's CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from vitserve.contract import CpuBackboneParams

RESULTS = Path(__file__).parent / "results"


def load(model_dir: Path, params: CpuBackboneParams | None = None, **overrides):
    """The real onnx_cpu model of `model_dir`, initialised in this process with its parameters, or `params`,
    and `overrides` (fields of contract.CpuBackboneParams: `cpu_threads`, `cpu_lanes`, `cpu_spinning`, ...)."""
    from google.protobuf import json_format

    from vitserve.exporter.repository import read_config, read_params, set_params
    from vitserve.exporter.triton_models.onnx_cpu import TritonPythonModel

    cfg = read_config(model_dir / "config.pbtxt")
    set_params(cfg, replace(params or read_params(cfg, CpuBackboneParams), **overrides))
    model = TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
            "model_repository": str(model_dir),
            "model_version": "1",
        }
    )
    return model


def images_per_s(model, x: np.ndarray, seconds: float) -> float:
    model._run(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model._run(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def run(repository: Path, models: list[str], batches: list[int], rounds: int, seconds: float) -> dict:
    from vitserve.exporter.hostinfo import cpu_summary
    from vitserve.exporter.triton_models.onnx_cpu import usable_cores

    cores = usable_cores()
    out = {"host": cpu_summary(), "cores": cores, "rounds": rounds, "seconds": seconds, "models": {}}
    rng = np.random.default_rng(0)
    for name in models:
        model_dir = repository / name
        if not (model_dir / "config.pbtxt").is_file():
            raise SystemExit(f"{model_dir}: no such model in the repository (build it with `make engines`)")
        shape = [int(d) for d in read_dims(model_dir)]
        # onnxruntime's default spinning for the wide sessions (as in-process onnxruntime runs), whatever
        # the repository's config says; 1-thread lanes have no pool to spin
        one = load(model_dir, cpu_threads=cores, cpu_lanes=1, cpu_spinning=True)
        lanes = load(model_dir, cpu_threads=cores, cpu_lanes=cores, cpu_spinning=True)
        rows = []
        try:
            for b in batches:
                x = rng.standard_normal([b, *shape]).astype(np.float32)
                pairs = [
                    (images_per_s(one, x, seconds), images_per_s(lanes, x, seconds)) for _ in range(rounds)
                ]
                rows.append(
                    {
                        "batch_size": b,
                        "one_session": statistics.median(p[0] for p in pairs),
                        "lanes": statistics.median(p[1] for p in pairs),
                        "ratio": statistics.median(p[1] / p[0] for p in pairs),
                    }
                )
                print(f"{name} b{b}: {rows[-1]}", flush=True)
        finally:
            one.finalize()
            lanes.finalize()
        out["models"][name] = {"lanes": lanes.lanes, "lanes_note": lanes.lanes_note, "rows": rows}
    return out


def read_dims(model_dir: Path) -> list[int]:
    from vitserve.exporter.repository import read_config

    return list(read_config(model_dir / "config.pbtxt").input[0].dims)


def write(result: dict, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lanes.json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    lines = [
        "# Lanes vs one session (the CPU backbone's executor, in-process)",
        "",
        f"Command: `{command}`",
        "",
        f"- host: {result['host']}",
        f"- both with {result['cores']} intra-op threads (spinning on, onnxruntime's default); {result['rounds']} rounds of {result['seconds']:g} s "
        "per batch size and executor, in turns; medians; RANDOM-INIT weights (same graph, same speed)",
        "",
        "| model | lanes | batch | one session img/s | lanes img/s | lanes / one session |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in result["models"].items():
        for r in m["rows"]:
            lines.append(
                f"| {name} | {m['lanes']} | {r['batch_size']} | {r['one_session']:.1f} | {r['lanes']:.1f} | "
                f"{r['ratio']:.2f} |"
            )
    lines += [
        "",
        "A batch smaller than the lanes runs on the wide session in both columns (the same code path).",
    ]
    (RESULTS / "lanes.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--models", nargs="+", required=True, help="CPU backbone models of the repository")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    result = run(Path(args.repository), args.models, args.batches, args.rounds, args.seconds)
    write(result, shlex.join(["python", "-m", "vitserve.perf.bench_lanes", *argv]))
    print(f"wrote {RESULTS / 'lanes.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
