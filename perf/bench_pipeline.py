"""Benchmarks of the build stages and of CPU serving, written to perf/results/ (never asserted in tests).

    python -m vitserve.perf.bench_pipeline export     # export wall time + peak RSS per backbone
    python -m vitserve.perf.bench_pipeline precision  # FP16/INT8 build time, RSS, fidelity, ORT speed
    python -m vitserve.perf.bench_pipeline serving    # served vs in-process, FP32 vs CPU INT8
    python -m vitserve.perf.bench_pipeline preprocess # server-side JPEG preprocessing, images/s per core

Every model here has RANDOM-INIT weights (these machines are offline): speeds are those of the real
architectures; fidelity numbers are those of untrained models and say nothing about accuracy.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.contract import EMBEDDINGS, Kind, Precision, PreprocessParams, backbone_model_name
from vitserve.exporter.compare import format_table

RESULTS = Path(__file__).parent / "results"
# the committed defaults (a source checkout): what `bench_serving` measures
MODELS_YAML = Path(__file__).resolve().parents[1] / "models.yaml"
# the results files' tables (exporter/compare.py owns the helper)
_md = functools.partial(format_table, markdown=True, float_format=".4g")
NOTE = "RANDOM-INIT weights (offline machine): speeds are the real architectures'; fidelity is of untrained models."


def machine() -> dict[str, Any]:
    """This host, as every results file of these benchmarks names it."""
    from vitserve.exporter.hostinfo import cpu_summary

    return {
        "cpu": cpu_summary(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _write(name: str, data: dict[str, Any], table: str, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "note": NOTE, "machine": machine(), **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    md = f"# {name}\n\nCommand: `{command}`\n\n{NOTE}\n\nMachine: {machine()}\n\n{table}\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(md)


def _run_child(cmd: list[str], timeout_s: float) -> tuple[int, float, float, str]:
    """(returncode, wall seconds, peak RSS GiB of that child, output tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -9, time.perf_counter() - t0, float("nan"), out[-2000:]
    wall = time.perf_counter() - t0
    # The child reports its own peak (RUSAGE_CHILDREN would be the max over every child so far).
    rss = [float(line.split("=", 1)[1]) for line in out.splitlines() if line.startswith("PEAK_RSS_GIB=")]
    return proc.returncode, wall, rss[-1] if rss else float("nan"), out[-2000:]


def bench_export(backbones: list[str], out_root: Path) -> None:
    """One fresh process per backbone (so peak RSS is that export's): export with --random-init."""
    rows = []
    for name in backbones:
        cmd = [
            sys.executable,
            "-m",
            "vitserve.perf.bench_pipeline",
            "_export_one",
            name,
            str(out_root / name),
        ]
        rc, wall, rss, tail = _run_child(cmd, 3600)
        row: dict[str, Any] = {
            "backbone": name,
            "ok": rc == 0,
            "wall_s_total": round(wall, 1),
            "peak_rss_gib": round(rss, 2),
        }
        result = out_root / name / "result.json"
        if rc == 0 and result.exists():
            row |= json.loads(result.read_text())
        else:
            row["error"] = tail[-500:]
        rows.append(row)
        print(row, flush=True)
    cols = [
        "backbone",
        "ok",
        "export_s",
        "parity_s",
        "wall_s_total",
        "peak_rss_gib",
        "onnx_gib",
        "min_cosine",
    ]
    _write("export", {"rows": rows}, _md(rows, cols), "python -m vitserve.perf.bench_pipeline export")


def _export_one(name: str, out: str) -> None:
    from vitserve.exporter.export import export_model

    t0 = time.perf_counter()
    m = export_model(name, out, weights="random")
    size = sum(f["bytes"] for f in m["files"].values()) / 2**30
    cos = min(v["cosine_min"] for c in m["parity"]["cases"].values() for v in c.values())
    result = {
        "export_s": m["export_seconds"],
        "parity_s": round(time.perf_counter() - t0 - m["export_seconds"], 1),
        "onnx_gib": round(size, 2),
        "min_cosine": cos,
        "external_data": m["external_data"],
    }
    (Path(out) / "result.json").write_text(json.dumps(result))


def _ort_speed(path: Path, batch: int, optimization: str = "all", seconds: float = 10.0) -> float:
    from vitserve.exporter import onnxrt

    sess = onnxrt.cpu_session(path, optimization=optimization)
    inp = sess.get_inputs()[0]
    size = inp.shape[2] if isinstance(inp.shape[2], int) else 224
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    sess.run(None, {inp.name: x})  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, {inp.name: x})
        n += batch
    return n / (time.perf_counter() - t0)


def bench_precision(
    backbones: list[str], num_images: int, out_root: Path, precisions: list[str], eval_count: int
) -> None:
    """Per backbone: FP32 export, then each variant in its own process (time + peak RSS), fidelity, speed."""
    rows = []
    for name in backbones:
        fp32 = out_root / name / "fp32"
        if not (fp32 / "model.onnx").exists():
            rc, *_, tail = _run_child(
                [sys.executable, "-m", "vitserve.perf.bench_pipeline", "_export_one", name, str(fp32)], 3600
            )
            if rc != 0:
                rows.append({"backbone": name, "variant": "fp32", "error": tail[-300:]})
                continue
        for p in precisions:
            cmd = [
                sys.executable,
                "-m",
                "vitserve.perf.bench_pipeline",
                "_variant_one",
                name,
                p,
                str(num_images),
                str(out_root / name),
                str(eval_count),
            ]
            rc, wall, rss, tail = _run_child(cmd, 3600)
            row: dict[str, Any] = {
                "backbone": name,
                "variant": p,
                "calibration_images": num_images,
                "wall_s": round(wall, 1),
                "peak_rss_gib": round(rss, 2),
            }
            rep = out_root / name / p / "variant.json"
            if rc == 0 and rep.exists():
                r = json.loads(rep.read_text())
                o = r["fidelity"]["outputs"]["embeddings"]
                row |= {
                    "build_s": r["build_seconds"],
                    "emb_cos_min": o["cosine_min"],
                    "emb_cos_mean": o["cosine_mean"],
                    "emb_max_abs": o["max_abs_err"],
                    "gate": r["gate"],
                    "evaluator": r["fidelity"]["evaluator"],
                }
                if "logits" in r["fidelity"]["outputs"]:
                    row |= {"top1": r["fidelity"]["outputs"]["logits"]["top1_agreement"]}
            else:
                row["error"] = (
                    f"exit code {rc}" + (" (killed: out of memory?)" if rc < 0 else "") + f": {tail[-300:]}"
                )
            rows.append(row)
            print(row, flush=True)
    speed_rows = []
    for name in backbones:
        for p in ["fp32", *precisions]:
            path = out_root / name / p / "model.onnx"
            if path.exists():
                for batch in (1, 8):
                    ips = _ort_speed(path, batch, "extended" if p == "fp16" else "all")
                    speed_rows.append(
                        {"backbone": name, "variant": p, "batch": batch, "images_per_s": round(ips, 2)}
                    )
                    print(speed_rows[-1], flush=True)
    for r in speed_rows:
        base = next(
            s
            for s in speed_rows
            if s["backbone"] == r["backbone"] and s["variant"] == "fp32" and s["batch"] == r["batch"]
        )
        r["vs_fp32"] = round(r["images_per_s"] / base["images_per_s"], 2)
    table = _md(
        rows,
        [
            "backbone",
            "variant",
            "calibration_images",
            "build_s",
            "wall_s",
            "peak_rss_gib",
            "emb_cos_min",
            "emb_cos_mean",
            "top1",
            "gate",
        ],
    )
    table += "\n\nonnxruntime CPU speed (2 threads; FP16 at ORT_ENABLE_EXTENDED):\n\n"
    table += _md(speed_rows, ["backbone", "variant", "batch", "images_per_s", "vs_fp32"])
    _write(
        f"precision_{'_'.join(backbones)}_{'_'.join(precisions)}",
        {"rows": rows, "speed": speed_rows},
        table,
        f"python -m vitserve.perf.bench_pipeline precision --backbones {' '.join(backbones)} --images {num_images} "
        f"--precisions {' '.join(precisions)} --eval-images {eval_count}",
    )


def _variant_one(name: str, precision: str, num_images: str, root: str, eval_count: str = "32") -> None:
    from vitserve.exporter.config import Calibration, ModelSpec, Precision
    from vitserve.exporter.precision import make_variant

    spec = ModelSpec(
        name="bench",
        backbone=name,
        weights="random",
        precisions=(Precision.FP32, Precision(precision)),
        calibration=Calibration(num_images=int(num_images)),
    )
    make_variant(
        Precision(precision), Path(root) / "fp32", Path(root) / precision, spec, eval_count=int(eval_count)
    )


def bench_preprocess(seconds: float = 10.0) -> None:
    """The preprocess model's own function on a 640x480 JPEG, one thread: images/s per core."""
    from PIL import Image

    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.samples import eval_photos
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    rows = []
    for name in ("ViT-B-32", "DINOv2-S"):
        cfg = PreprocessParams(**get_backbone(name).preprocess.as_dict())
        im = eval_photos()[0][1].resize((640, 480), Image.Resampling.BICUBIC)
        b = io.BytesIO()
        im.save(b, format="JPEG", quality=90)
        data = b.getvalue()
        preprocess_bytes(data, cfg)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            preprocess_bytes(data, cfg)
            n += 1
        rows.append(
            {
                "backbone": name,
                "input": "640x480 JPEG q90",
                "output": f"3x{cfg.size}x{cfg.size}",
                "images_per_s_per_core": round(n / (time.perf_counter() - t0), 1),
            }
        )
    _write(
        "preprocess",
        {"rows": rows},
        _md(rows, list(rows[0])),
        "python -m vitserve.perf.bench_pipeline preprocess",
    )


def _serving_name(backbone: str) -> str:
    """The model name `serving_config` gives a backbone (ViT-B-32 -> vitb32; NAMEdyn beside it)."""
    return backbone.lower().replace("-", "")


def serving_config(backbones: list[str], template: Path = MODELS_YAML) -> dict[str, Any]:
    """The side-by-side build of `bench_serving`: per backbone, the first model of `template` (the committed
    models.yaml: its precisions, CPU defaults and batching) with random weights, no head and no text tower,
    `force: true` (a random head fails int8's top-1 gate; pretrained weights pass it), and beside it
    NAMEdyn, which serves `cpu-int8` in `cpu_int8_mode: dynamic`: the per-call dynamic int8 that was the CPU
    default before issue 26 ("today's cpu-int8")."""
    import yaml

    base = yaml.safe_load(template.read_text())["models"][0]
    models = []
    for b in backbones:
        n = _serving_name(b)
        m = {
            **base,
            "name": n,
            "backbone": b,
            "weights": "random",
            "head": "none",
            "text": False,
            "force": True,
        }
        m.pop("labels", None)
        dyn = {**m, "name": f"{n}dyn", "precisions": [Precision.FP32.value, Precision.CPU_INT8.value],
               "cpu_precisions": [Precision.CPU_INT8.value]}  # fmt: skip
        models += [m, dyn | {"cpu_int8_mode": "dynamic"}]
    return {"models": models}


def bench_serving(backbones: list[str], rounds: int, seconds: float, work: str) -> None:
    """The published default CPU model against today's cpu-int8, served and in-process, in one run per host.

    Builds `serving_config` into WORK/repo (random init), serves it with the real tritonserver and measures,
    per backbone, the backbone its ensemble routes to and NAMEdyn's cpu-int8 model with
    `bench_overhead.run` (served over the same engine and file in this process, back-to-back pairs).
    Every CPU backbone is served with `share` 1 (the cores of the host: one model is measured at a time)."""
    import yaml

    from vitserve.contract import CpuBackboneParams
    from vitserve.exporter.pipeline import build_all
    from vitserve.exporter.repository import (
        published_backbones,
        read_config,
        read_params,
        set_params,
        write_config,
    )
    from vitserve.perf import bench_overhead
    from vitserve.server import TritonServer

    root = Path(work)
    root.mkdir(parents=True, exist_ok=True)
    config = serving_config(backbones)
    (root / "models.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    build_all(root / "models.yaml", root / "repo", root / "artifacts", random_init=True)
    repo = root / "repo"
    for cfg_path in repo.glob("*/config.pbtxt"):
        cfg = read_config(cfg_path)
        if CpuBackboneParams.KEY in cfg.parameters:
            set_params(cfg, replace(read_params(cfg, CpuBackboneParams), share=1))
            write_config(cfg_path.parent, cfg)
    pairs = []  # (backbone, the published default, today's cpu-int8)
    for b in backbones:
        n = _serving_name(b)
        pairs.append(
            (b, published_backbones(repo, n)[0], backbone_model_name(f"{n}dyn", Precision.CPU_INT8, Kind.CPU))
        )
    models = [m for _, default, today in pairs for m in (default, today)]
    command = (
        f"python -m vitserve.perf.bench_pipeline serving --backbones {' '.join(backbones)} "
        f"--rounds {rounds} --seconds {seconds:g} --work {work}"
    )
    with TritonServer(repo, log_path=root / "server.log") as server:
        result = bench_overhead.run(server.grpc_url, repo, models, rounds, seconds, root)
    rows = []
    for b, default, today in pairs:
        d, t = result["models"][default]["points"], result["models"][today]["points"]
        for point in d:
            rows.append({
                "backbone": b, "point": point,
                "default": f"{default} ({result['models'][default]['engine']})",
                "today": f"{today} ({result['models'][today]['engine']})",
                "served_default": round(d[point]["served_images_per_s"], 1),
                "served_today": round(t[point]["served_images_per_s"], 1),
                "served_ratio": round(d[point]["served_images_per_s"] / t[point]["served_images_per_s"], 2),
                "in_process_default": round(d[point]["in_process_images_per_s"], 1),
                "in_process_today": round(t[point]["in_process_images_per_s"], 1),
                "in_process_ratio": round(
                    d[point]["in_process_images_per_s"] / t[point]["in_process_images_per_s"], 2
                ),
            })  # fmt: skip
    fidelity = {}
    for b in backbones:
        n = _serving_name(b)
        for name, precision in ((n, Precision.INT8), (f"{n}dyn", Precision.CPU_INT8)):
            r = json.loads((root / "artifacts" / name / precision / "variant.json").read_text())
            fidelity[f"{b} {precision}"] = {
                k: r["fidelity"]["outputs"][EMBEDDINGS][k] for k in ("cosine_min", "cosine_mean")
            }
    table = (
        "The published default CPU model (the backbone each ensemble routes to) against today's cpu-int8 "
        "(`cpu_int8_mode: dynamic`), images/s, medians of back-to-back pairs; c = clients in flight, b = "
        "images per request (in-process: the batch the server could make of them):\n\n"
    )
    table += _md(rows, ["backbone", "point", "default", "today", "served_default", "served_today",
                        "served_ratio", "in_process_default", "in_process_today", "in_process_ratio"])  # fmt: skip
    table += "\n\nINT8 fidelity vs FP32 (embeddings, held-out photo views):\n\n"
    table += _md([{"variant": k, **v} for k, v in fidelity.items()], ["variant", "cosine_min", "cosine_mean"])
    # bench_overhead's section without its cpu_engines.md heading and command (this file names the command)
    overhead = "\n".join(line for line in bench_overhead.section(result, command).splitlines()[1:]
                         if not line.startswith("Command:"))  # fmt: skip
    table += "\n\n## Served over in-process, per model\n" + overhead
    _write("serving_cpu", {"rows": rows, "fidelity": fidelity, "overhead": result}, table, command)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("_export_one", "_variant_one"):
        import resource

        (_export_one if argv[0] == "_export_one" else _variant_one)(*argv[1:])
        print(f"PEAK_RSS_GIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f}")
        return 0
    p = argparse.ArgumentParser(prog="python -m vitserve.perf.bench_pipeline")
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("export")
    e.add_argument(
        "--backbones", nargs="+", default=["ViT-B-32", "ViT-B-16", "ViT-L-14", "EVA02-L-14", "DINOv2-L"]
    )
    e.add_argument("--work", default="artifacts/bench")
    q = sub.add_parser("precision")
    q.add_argument("--backbones", nargs="+", default=["ViT-B-16"])
    q.add_argument("--images", type=int, default=64)
    q.add_argument("--precisions", nargs="+", default=["fp16", "int8", "cpu-int8"])
    q.add_argument("--eval-images", type=int, default=32, help="held-out photo views for the fidelity report")
    q.add_argument("--work", default="artifacts/bench")
    s = sub.add_parser("serving")
    s.add_argument("--backbones", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    s.add_argument("--work", default="/tmp/vitserve-bench-serving", help="the build and repository (kept)")
    sub.add_parser("preprocess")
    args = p.parse_args(argv)
    if args.what == "export":
        bench_export(args.backbones, Path(args.work) / "export")
    elif args.what == "precision":
        bench_precision(
            args.backbones, args.images, Path(args.work) / "precision", args.precisions, args.eval_images
        )
    elif args.what == "serving":
        bench_serving(args.backbones, args.rounds, args.seconds, args.work)
    else:
        bench_preprocess()
    return 0


if __name__ == "__main__":
    sys.exit(main())
