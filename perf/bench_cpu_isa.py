"""CPU INT8 per ISA and recipe: speed vs FP32 and cosine to FP32, on this host.

    python -m vitserve.perf.bench_cpu_isa --backbones ViT-B-32 ViT-B-16

For each backbone (RANDOM-INIT weights: these machines are offline) the FP32 export is quantized with
onnxruntime's `quantize_dynamic` (per-channel, MatMul/Gemm, attention matmuls in float) in three recipes:
- `vnni`: int8 weights, full range (vitserve's flavour for VNNI hosts);
- `avx2`: int8 weights in 7 bits (`reduce_range`, vitserve's portable flavour: no int16 saturation);
- `u8u8`: uint8 weights (onnxruntime's other non-saturating choice; not shipped: slower, see the table).
Each is scored against FP32 on the held-out photos twice: with this host's int8 kernels (`native`, what
this host would serve) and with the integer matmuls computed exactly (`exact`, the same on every host:
the build's gate). Speed: batch 8, `--threads` intra-op threads, FP32 and each recipe measured in turns
(round-robin, `--rounds`), the median of each recipe's per-round ratio to the FP32 run beside it. Nothing
is asserted; results go to perf/results/cpu_isa.{md,json} with this host's CPU and ISA flags, appended per
host (the file keeps one section per int8 ISA seen).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
RECIPES = {"vnni": {"reduce_range": False}, "avx2": {"reduce_range": True}, "u8u8": {"weight_type": "QUInt8"}}


def quantize(src: Path, dst: Path, recipe: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vitserve.exporter.precision import attention_matmuls

    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=True,
        reduce_range=recipe.get("reduce_range", False),
        weight_type=getattr(QuantType, recipe.get("weight_type", "QInt8")),
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=attention_matmuls(src),
    )


def throughput(session, x: np.ndarray, seconds: float) -> float:
    """Images per second over `seconds` after two warm-up runs."""
    feed = {session.get_inputs()[0].name: x}
    for _ in range(2):
        session.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feed)
        n += len(x)
    return n / (time.perf_counter() - t0)


def cosines(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    c = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return float(c.min()), float(c.mean())


def bench(backbone: str, work: Path, threads: int, rounds: int, seconds: float, batch: int) -> list[dict]:
    from vitserve.exporter import onnxrt
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.export import export_model
    from vitserve.exporter.precision import eval_pixels

    fp32 = work / backbone / "fp32"
    export_model(backbone, fp32, weights="random", head="none")
    src = fp32 / "model.onnx"
    _, pixels = eval_pixels(get_backbone(backbone), get_backbone(backbone).preprocess, 32)
    ref = onnxrt.run(onnxrt.cpu_session(src), pixels)["embeddings"]
    sessions = {"fp32": onnxrt.cpu_session(src, threads=threads)}
    rows: dict[str, dict[str, Any]] = {}
    for name, recipe in RECIPES.items():
        path = work / backbone / f"{name}.onnx"
        quantize(src, path, recipe)
        native = onnxrt.run(onnxrt.cpu_session(path), pixels)["embeddings"]
        exact_session, _ = onnxrt.exact_session(path)
        exact = onnxrt.run(exact_session, pixels)["embeddings"]
        rows[name] = {"native": cosines(ref, native), "exact": cosines(ref, exact), "ratios": [], "img_s": []}
        sessions[name] = onnxrt.cpu_session(path, threads=threads)
    x = np.ascontiguousarray(pixels[:batch])
    fp32_speeds = []
    for _ in range(rounds):
        base = throughput(sessions["fp32"], x, seconds)
        fp32_speeds.append(base)
        for name in RECIPES:
            v = throughput(sessions[name], x, seconds)
            rows[name]["img_s"].append(v)
            rows[name]["ratios"].append(v / base)
    out = [{"backbone": backbone, "recipe": "fp32", "img_s": float(np.median(fp32_speeds)), "speedup": 1.0}]
    for name, r in rows.items():
        out.append(
            {
                "backbone": backbone,
                "recipe": name,
                "img_s": float(np.median(r["img_s"])),
                "speedup": float(np.median(r["ratios"])),
                "native_cos_min": r["native"][0],
                "native_cos_mean": r["native"][1],
                "exact_cos_min": r["exact"][0],
                "exact_cos_mean": r["exact"][1],
            }
        )
    return out


def write(rows: list[dict], host: dict[str, Any], command: str, threads: int, batch: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cpu_isa.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    data["runs"][host["int8_isa"]] = {"host": host, "command": command, "rows": rows, "threads": threads}
    path.write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# CPU INT8 per ISA and recipe",
        "",
        "RANDOM-INIT weights (offline machines). `native`: cosine to FP32 with this host's int8 kernels (what it"
        " would serve); `exact`: integer matmuls computed exactly (hardware-independent; what the build's gate"
        " uses). Speed: batch 8, images/s median over round-robin rounds, speed-up = median per-round ratio to FP32"
        " measured beside it. vitserve ships `vnni` (picked on VNNI hosts) and `avx2` (everywhere else, and the"
        " fallback); `u8u8` is shown for comparison.",
        "",
        f"Command: `{command}`",
        "",
        "(the last run's; one section per int8 ISA seen, each with the command that produced it; a run replaces"
        " its own host's section).",
    ]
    for isa, run in sorted(data["runs"].items()):
        h = run["host"]
        lines += [
            "",
            f"## int8 kernels: {isa}  ({h['model']}; ISA: {', '.join(h['isa'])}; {h['usable_cores']} cores)",
            "",
            f"    {run['command']}",
            "",
            f"{run.get('threads', '?')} onnxruntime threads, batch {batch}. {run.get('note', '')}".rstrip(),
            "",
            "| backbone | recipe | img/s | speed-up vs FP32 | native cos min / mean | exact cos min / mean |",
            "|---|---|---:|---:|---|---|",
        ]
        for r in run["rows"]:
            if r["recipe"] == "fp32":
                lines.append(f"| {r['backbone']} | fp32 | {r['img_s']:.1f} | 1.00x | | |")
                continue
            lines.append(
                f"| {r['backbone']} | {r['recipe']} | {r['img_s']:.1f} | {r['speedup']:.2f}x | "
                f"{r['native_cos_min']:.5f} / {r['native_cos_mean']:.5f} | "
                f"{r['exact_cos_min']:.5f} / {r['exact_cos_mean']:.5f} |"
            )
    (RESULTS / "cpu_isa.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from vitserve.exporter.hostinfo import cpu_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["ViT-B-32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--batch", type=int, default=8)
    a = p.parse_args(argv)
    command = "python -m vitserve.perf.bench_cpu_isa " + " ".join(sys.argv[1:] if argv is None else argv)
    host = cpu_info()
    print(f"host: {host}")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for b in a.backbones:
            rows += bench(b, Path(work), a.threads, a.rounds, a.seconds, a.batch)
    write(rows, host, command.strip(), a.threads, a.batch)
    print((RESULTS / "cpu_isa.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
