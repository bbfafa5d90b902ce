"""Server-side preprocessing, measured: images/s per core of each path and size, in-process and served, the
fast mode's and the DALI graph's parity, and the bytes ensemble against the tensor path. Never asserted.

    python -m vitserve.perf.bench_preprocess [--duration-s 8] [--skip-served]

Writes perf/results/preprocess.md and .json with this command and the host CPU.

- in-process, one thread: the python model's function (`preprocess_bytes`) in `exact` mode (Pillow's
  numerics; also as it was before this change, float normalize and a copy for EXIF, to measure the change),
  in `fast` mode (JPEG DCT draft), and the DALI graph with CPU operators (1 thread, batch 8), for a 640x480
  and a 4032x3024 JPEG to 224 / 336 / 518 px;
- served: `NAME_preprocess` (python backend, 1 instance, so images/s = per core) through the real
  tritonserver, measured with perf_analyzer at concurrency 4, batch 1, for each mode and size (and, for
  comparison only, the 224 px model with dynamic batching);
- ratio: the bytes ensemble `vitb32` (640x480 JPEGs) against its own cpu-int8 backbone fed tensors
  (`vitb32_cpu-int8_cpu`), both at concurrency 4, batch 1, in one server, 3 rounds alternated A B A B A B.
The DALI model itself runs only in Triton's DALI backend on a GPU host (not measurable here).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.contract import (
    PREPROCESS_SOURCE,
    Kind,
    Precision,
    PreprocessParams,
    backbone_model_name,
    preprocess_model_name,
)
from vitserve.exporter.compare import format_table

RESULTS = Path(__file__).parent / "results"
# the results file's tables (exporter/compare.py owns the helper)
_md = functools.partial(format_table, markdown=True, float_format=".6g")
COMMAND = "python -m vitserve.perf.bench_preprocess"
BACKBONES = {"ViT-B-32": 224, "EVA02-L-14-336": 336, "DINOv2-L": 518}
INPUTS = {"640x480 JPEG q90": (640, 480), "4032x3024 JPEG q90": (4032, 3024)}
NOTE = (
    "RANDOM-INIT weights where a backbone is served (offline machine). Speeds are of this shared 2-core host "
    "under whatever load other users put on it: compare rows of one run, as ratios."
)


def host_cpu() -> dict[str, Any]:
    """lscpu model name and the SIMD flags that change CPU speed (AVX2 / AVX-512 / VNNI / AMX)."""
    import os

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]
    return {
        "model": fields.get("Model name", "?").strip(),
        "cores": os.cpu_count(),
        "simd": [f for f in wanted if f in flags],
    }


def _jpeg(size: tuple[int, int]) -> bytes:
    from PIL import Image

    from vitserve.exporter.samples import eval_photos

    im = eval_photos()[0][1].resize(size, Image.Resampling.BICUBIC)
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=90)
    return b.getvalue()


def _rate(fn, seconds: float, per_call: int = 1, windows: int = 5) -> float:
    """Best of `windows` windows (seconds in all): other users' load on a shared host only slows a window
    down, so the best one is the closest to the code's own speed."""
    fn()
    best = 0.0
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds / windows:
            fn()
            n += per_call
        best = max(best, n / (time.perf_counter() - t0))
    return best


def _before(data: bytes, cfg: PreprocessParams, exif_copy: bool = True) -> np.ndarray:
    """The exact path as it was before this change (RGB photos): EXIF transpose into a copy (`exif_copy`;
    else in place, as now), float normalize. Used only where its output equals today's."""
    from PIL import Image, ImageOps

    from vitserve.exporter.triton_models import preprocess as P

    im = P.decode(data, cfg.max_image_pixels, exif_transpose=False)
    if exif_copy:
        im = ImageOps.exif_transpose(im)
    else:
        ImageOps.exif_transpose(im, in_place=True)
    size, resize_size = cfg.size, cfg.resize_size
    im = P.to_rgb(im)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resize_size * long / short)
    new_w, new_h = (resize_size, new_long) if w <= h else (new_long, resize_size)
    im = im.resize((new_w, new_h), Image.Resampling[cfg.interpolation.upper()])
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def in_process(seconds: float) -> list[dict[str, Any]]:
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    try:
        from vitserve.exporter import dali
    except ImportError:
        dali = None
    rows = []
    for label, size in INPUTS.items():
        data = _jpeg(size)
        for backbone, px in BACKBONES.items():
            cfg = PreprocessParams(**get_backbone(backbone).preprocess.as_dict())
            exact = preprocess_bytes(data, cfg)
            row: dict[str, Any] = {"input": label, "output": f"3x{px}x{px}", "backbone": backbone}
            fast = replace(cfg, preprocess="fast")
            if np.array_equal(_before(data, cfg), exact):
                row["exact_before"] = round(_rate(lambda d=data, c=cfg: _before(d, c), seconds), 1)
                row["exact_no_lut"] = round(_rate(lambda d=data, c=cfg: _before(d, c, False), seconds), 1)
            row["exact"] = round(_rate(lambda d=data, c=cfg: preprocess_bytes(d, c), seconds), 1)
            row["fast"] = round(_rate(lambda d=data, c=fast: preprocess_bytes(d, c), seconds), 1)
            if dali is not None:
                pipe = dali.build_pipeline(
                    cfg.recipe.as_dict(), 8, gpu=False, num_threads=1, prefetch_queue_depth=1
                )
                pipe.build()
                arr = np.frombuffer(data, dtype=np.uint8)

                def run(pipe=pipe, arr=arr):
                    pipe.feed_input(dali.INPUT, [arr] * 8)
                    pipe.run()

                row["dali_cpu"] = round(_rate(run, seconds, per_call=8), 1)
            rows.append(row)
            print(row, flush=True)
    return rows


def fast_parity() -> list[dict[str, Any]]:
    """`fast` against `exact` per backbone: the bundled photos and calibration views as JPEG, each also at
    3x its size (so that the draft applies): cosine min / mean, and how many came out identical."""
    from PIL import Image

    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.samples import calibration_photos, eval_photos
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    images = []
    for _, im in eval_photos() + calibration_photos(12):
        for scale in (1, 3):
            b = io.BytesIO()
            im.resize((im.width * scale, im.height * scale), Image.Resampling.BICUBIC).save(
                b, format="JPEG", quality=92
            )
            images.append(b.getvalue())
    rows = []
    for backbone in BACKBONES:
        cfg = PreprocessParams(**get_backbone(backbone).preprocess.as_dict())
        cos, same = [], 0
        for d in images:
            a, b = (
                preprocess_bytes(d, replace(cfg, preprocess="fast")).ravel(),
                preprocess_bytes(d, cfg).ravel(),
            )
            same += int(np.array_equal(a, b))
            cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
        rows.append(
            {
                "backbone": backbone,
                "images": len(images),
                "identical": same,
                "cosine_min": round(min(cos), 5),
                "cosine_mean": round(float(np.mean(cos)), 6),
            }
        )
        print(rows[-1], flush=True)
    return rows


def dali_parity() -> list[dict[str, Any]]:
    try:
        import nvidia.dali  # noqa: F401

        from vitserve.exporter import dali
    except Exception as e:  # not installed: say so in the results
        return [{"backbone": "-", "operators": f"DALI unavailable: {e}"}]
    return [dali.parity(b) for b in BACKBONES]


def _preprocess_repository(root: Path) -> list[str]:
    """NAME_preprocess models only (no backbone needed): exact and fast, 224 / 336 / 518 px, 1 instance."""
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.config import ModelSpec
    from vitserve.exporter.repository import copy_served_source, preprocess_config, read_config, write_config

    names = []
    for backbone, px in BACKBONES.items():
        entry = get_backbone(backbone)
        manifest = {"input": {"shape": [-1, 3, px, px]}, "preprocess": entry.preprocess.as_dict()}
        for mode in ("pillow", "fast"):
            spec = ModelSpec(name=f"p{px}_{mode}", backbone=backbone, preprocess=mode, preprocess_instances=1)
            name = preprocess_model_name(spec.name)
            write_config(root / name, preprocess_config(name, spec, manifest))
            copy_served_source(PREPROCESS_SOURCE, root / name / "1")
            names.append(name)
    # measurement only (the repository never writes it, see repository.preprocess_config): what dynamic
    # batching would give the python model, 224 px exact
    cfg = read_config(root / preprocess_model_name("p224_pillow") / "config.pbtxt")
    cfg.name = preprocess_model_name("p224_pillow_batched")
    cfg.dynamic_batching.max_queue_delay_microseconds = 2000
    write_config(root / cfg.name, cfg)
    copy_served_source(PREPROCESS_SOURCE, root / cfg.name / "1")
    names.append(cfg.name)
    return names


def served(work: Path, duration_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import yaml

    from vitserve.exporter.pipeline import build_all
    from vitserve.server import TritonServer

    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    (images / "photo_640x480.jpg").write_bytes(_jpeg((640, 480)))
    repo = work / "pre_repo"
    names = _preprocess_repository(repo)
    best: dict[str, Any] = {}
    with TritonServer(repo, log_path=work / "pre_server.log") as server:
        for _ in range(ROUNDS):  # round-robin, best round kept: other users' load only slows a round down
            for name in names:
                pt = _point(server, name, duration_s, images)
                if name not in best or pt.images_per_s > best[name].images_per_s:
                    best[name] = pt
                print(name, round(pt.images_per_s, 1), flush=True)
    rows = [
        {
            "model": name,
            "input": "640x480 JPEG q90",
            "instances": 1,
            "concurrency": 4,
            "images_per_s": round(best[name].images_per_s, 1),
            "p99_ms": round(best[name].p99_us / 1000, 1),
        }
        for name in names
    ]
    # the bytes ensemble vs the tensor path of the same backbone variant
    model = {
        "name": "vitb32",
        "backbone": "ViT-B-32",
        "weights": "random",
        "head": "none",
        "precisions": ["fp32", "cpu-int8"],
        "kinds": ["cpu"],
        "profile": {"min": 1, "opt": 8, "max": 16},
        "dynamic_batching": {"preferred_batch_sizes": [4, 8, 16], "max_queue_delay_us": 2000},
        "calibration": {"num_images": 16},
    }
    (work / "models.yaml").write_text(yaml.safe_dump({"models": [model]}))
    build_all(work / "models.yaml", work / "repo", work / "artifacts", random_init=True)
    ens, tensor = "vitb32", backbone_model_name("vitb32", Precision.CPU_INT8, Kind.CPU)
    pre = preprocess_model_name(ens)
    pre_cfg = (work / "repo" / pre / "config.pbtxt").read_text()
    runs: dict[str, list[float]] = {ens: [], tensor: []}
    with TritonServer(work / "repo", log_path=work / "server.log") as server:
        for _ in range(ROUNDS):
            for name in runs:
                pt = _point(server, name, duration_s, images if name == ens else None)
                runs[name].append(round(pt.images_per_s, 2))
                print(name, runs[name], flush=True)
    ratio = {
        "ensemble": f"{ens} (image bytes: 640x480 JPEG q90 -> {pre} -> {tensor})",
        "tensor": f"{tensor} (preprocessed FP32 tensors)",
        "concurrency": 4,
        "batch": 1,
        "ensemble_images_per_s_runs": runs[ens],
        "tensor_images_per_s_runs": runs[tensor],
        "ratio": round(max(runs[ens]) / max(runs[tensor]), 3),  # best round over best round
        "ratio_of_means": round(float(np.mean(runs[ens]) / np.mean(runs[tensor])), 3),
        "target": 0.8,
        "preprocess_config": pre_cfg,
    }
    return rows, ratio


ROUNDS = 3


def _point(server, model: str, duration_s: float, images: Path | None):
    """One perf_analyzer point: concurrency 4, batch 1."""
    from vitserve.perf.harness import run_sweep

    res = run_sweep(
        server.grpc_url,
        model,
        [4],
        [1],
        generator="perf_analyzer",
        duration_s=duration_s,
        images=images,
        progress=False,
    )
    return res.points[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND)
    p.add_argument("--duration-s", type=float, default=8.0, help="per served measurement")
    p.add_argument("--seconds", type=float, default=3.0, help="per in-process measurement")
    p.add_argument("--skip-served", action="store_true", help="in-process numbers and parity only")
    args = p.parse_args(argv)
    command = COMMAND + (f" --duration-s {args.duration_s}" if args.duration_s != 8.0 else "")
    command += (f" --seconds {args.seconds}" if args.seconds != 3.0 else "") + (
        " --skip-served" if args.skip_served else ""
    )
    import os

    data: dict[str, Any] = {"command": command, "note": NOTE, "cpu": host_cpu()}
    data["load_average_start"] = [round(x, 1) for x in os.getloadavg()]
    data["in_process"] = in_process(args.seconds)
    data["fast_parity"] = fast_parity()
    data["dali_cpu_parity"] = dali_parity()
    if not args.skip_served:
        work = Path(tempfile.mkdtemp(prefix="vitserve-bench-pre-"))
        try:
            data["served"], data["ensemble_vs_tensor"] = served(work, args.duration_s)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    data["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "preprocess.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "preprocess.md").write_text(report(data))
    print(report(data))
    return 0


def report(data: dict[str, Any]) -> str:
    cpu = data["cpu"]
    md = [
        "# Server-side preprocessing",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Host: {cpu['model']}, {cpu['cores']} cores, SIMD: {', '.join(cpu['simd']) or 'none of AVX2/AVX-512'}. "
        + data["note"]
        + (
            f" Load average (1/5/15 min) at start {data['load_average_start']}, at end "
            f"{data['load_average_end']}."
            if "load_average_start" in data
            else ""
        ),
        "",
        "## In-process, one thread: images/s per core",
        "",
        "Best of 5 windows per cell. `exact` is what `NAME_preprocess` computes by default (Pillow's numerics, bit-identical to before); "
        "`exact_before` is the same function before this change (float normalize, EXIF copy), measured "
        "with identical output, `exact_no_lut` with only the EXIF copy removed (so the two changes are "
        "measured apart); `fast` is `preprocess: fast` (JPEG DCT draft while both sides keep 2x the "
        "resize); `dali_cpu` the DALI graph with CPU operators, 1 thread, batch 8 (the GPU model runs nvJPEG "
        "and GPU resize instead).",
        "",
        _md(
            data["in_process"],
            ["input", "output", "backbone", "exact_before", "exact_no_lut", "exact", "fast", "dali_cpu"],
        ),
        "",
        "## `preprocess: fast` against exact, per backbone",
        "",
        "Bundled photos and calibration views as JPEG q92, each at 1x and 3x its size.",
        "",
        _md(data["fast_parity"], ["backbone", "images", "identical", "cosine_min", "cosine_mean"]),
        "",
        "## DALI graph (CPU operators) against the backbone's reference transform",
        "",
        "Bundled photos as JPEG and PNG plus portrait crops; GPU operators are checked with "
        "`make gpu-check` on a GPU host.",
        "",
        _md(
            data["dali_cpu_parity"],
            ["backbone", "operators", "images", "cosine_min", "worst_image", "max_abs"],
        ),
    ]
    if "served" in data:
        r = data["ensemble_vs_tensor"]
        md += [
            "",
            "## Served: NAME_preprocess through tritonserver (perf_analyzer, concurrency 4, batch 1)",
            "",
            "One python-backend instance = one core: images/s here is per core, Triton's own overhead included. "
            "Best of 3 round-robin rounds. `p224_pillow_batched` is the 224 px model with dynamic batching, "
            "measured for comparison only (the repository does not batch it: README, Operating it).",
            "",
            _md(data["served"], ["model", "input", "instances", "concurrency", "images_per_s", "p99_ms"]),
            "",
            "## Bytes ensemble vs tensor path, one server, concurrency 4, batch 1",
            "",
            f"- ensemble: {r['ensemble']}: {r['ensemble_images_per_s_runs']} images/s",
            f"- tensor: {r['tensor']}: {r['tensor_images_per_s_runs']} images/s",
            f"- **ratio {r['ratio']}** (best round over best round; ratio of the means "
            f"{r['ratio_of_means']}; target >= {r['target']})",
        ]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
