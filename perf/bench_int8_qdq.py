"""The TensorRT-shaped FP16 and INT8 ONNX variants, scored on the CPU: placement of Q/DQ and FP16, fidelity.

    python -m vitserve.perf.bench_int8_qdq --backbones ViT-B-16 EVA02-B-16 DINOv2-S

For each backbone (RANDOM-INIT weights: these machines are offline): the FP32 export, the FP16 variant
(`make_fp16`) and the INT8 variant (`make_int8`: Q/DQ on the weight matmuls, the rest FP16) are made, and
scored against FP32 on the held-out photos:
- FP16 on onnxruntime's CPU provider at ORT_ENABLE_EXTENDED (how the precision stage evaluates FP16);
- INT8 as fake quantization (session config `session.disable_quant_qdq=1`: Q/DQ run in float, the
  quantization error is kept, no CPU int8 kernel is involved) at ORT_ENABLE_EXTENDED, so its FP16 parts
  are evaluated the way FP16 is.
The graph is also inspected: which MatMul/Gemm take a dequantized constant weight, which (the attention
matmuls) take no Q/DQ, and how many float initializers are FP16. Nothing here is asserted; results go
to perf/results/int8_qdq_fp16.{md,json}. No TensorRT is involved (none can be installed here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
NOTE = "RANDOM-INIT weights (offline machine): fidelity is of untrained models, not of accuracy."


def placement(path: Path) -> dict[str, Any]:
    """Where the Q/DQ nodes and the FP16 tensors are in the variant's graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def from_dq_const(t: str) -> bool:
        """`t` is a constant weight through DequantizeLinear (int8 initializer, or Q/DQ of a float one)."""
        n = producer.get(t)
        while n is not None and n.op_type in ("Transpose", "Reshape", "Cast"):
            n = producer.get(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return False
        q = producer.get(n.input[0])
        return n.input[0] in inits or (
            q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits
        )

    def from_dq(t: str) -> bool:
        n = producer.get(t)
        return n is not None and n.op_type == "DequantizeLinear"

    mm = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    weight_q = [n.name for n in mm if any(from_dq_const(i) for i in n.input[:2])]
    no_qdq = [n.name for n in mm if not any(from_dq(i) for i in n.input[:2])]
    dtypes: dict[str, int] = {}
    for i in g.initializer:
        name = onnx.TensorProto.DataType.Name(i.data_type)
        dtypes[name] = dtypes.get(name, 0) + 1
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    fp32_kept = sorted(
        {n.op_type for n in g.node if n.op_type in ("LayerNormalization", "Softmax", "ReduceL2")}
    )
    return {
        "matmul_gemm": len(mm),
        "matmul_with_int8_weight": len(weight_q),
        "matmul_with_int8_weight_names": weight_q[:6],
        "matmul_without_qdq": len(no_qdq),
        "matmul_without_qdq_names": no_qdq[:6],
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "cast": ops.get("Cast", 0),
        "initializer_dtypes": dtypes,
        "fp32_op_types_present": fp32_kept,
    }


def run(backbone: str, work: Path, num_calib: int, eval_count: int) -> list[dict[str, Any]]:
    from vitserve.exporter import onnxrt
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.compare import compare_outputs
    from vitserve.exporter.config import Calibration
    from vitserve.exporter.export import ONNX_NAME, export_model
    from vitserve.exporter.precision import (
        attention_matmuls,
        calibration_files,
        eval_pixels,
        load_pixels,
        make_fp16,
        make_int8,
    )

    out = work / backbone
    t0 = time.perf_counter()
    export_model(backbone, out / "fp32", weights="random", head="none")
    fp32 = out / "fp32" / ONNX_NAME
    entry = get_backbone(backbone)
    files = calibration_files(Calibration(num_images=num_calib), work)
    _, calib = load_pixels(files, entry, entry.preprocess)
    _, pixels = eval_pixels(entry, entry.preprocess, eval_count)
    ref = onnxrt.run(onnxrt.cpu_session(fp32), pixels)
    rows = []
    for precision in ("fp16", "int8"):
        dst = out / precision / ONNX_NAME
        dst.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        if precision == "fp16":
            make_fp16(fp32, dst, calib, dst.parent)
        else:
            make_int8(fp32, dst, calib, "max")
        build_s = time.perf_counter() - t
        # INT8: Q/DQ as fake quantization (onnxrt.exact_session), its FP16 parts as FP16 is evaluated
        session, how = onnxrt.exact_session(dst, optimization="extended")
        got = onnxrt.run(session, pixels)
        fake = precision == "int8"
        m = compare_outputs(ref, got)["embeddings"]
        row = {
            "backbone": backbone,
            "variant": precision,
            "evaluator": f"ORT CPU EXTENDED, {how}",
            "calibration_images": len(calib),
            "eval_images": len(pixels),
            "build_s": round(build_s, 1),
            "emb_cos_min": m["cosine_min"],
            "emb_cos_mean": m["cosine_mean"],
            "emb_max_abs": m["max_abs_err"],
            "attention_matmuls_excluded": len(attention_matmuls(fp32)) if fake else None,
            "placement": placement(dst),
        }
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    print(f"{backbone}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["ViT-B-16"])
    ap.add_argument("--calibration-images", type=int, default=32)
    ap.add_argument("--eval-images", type=int, default=32)
    ap.add_argument("--out", default=str(RESULTS / "int8_qdq_fp16"))
    args = ap.parse_args(argv)
    command = "python -m vitserve.perf.bench_int8_qdq " + " ".join(argv if argv is not None else sys.argv[1:])
    from vitserve.exporter.compare import format_table
    from vitserve.perf.bench_pipeline import machine

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for b in args.backbones:
            rows += run(b, Path(work), args.calibration_images, args.eval_images)
    try:
        import subprocess

        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?")
        flags = next((ln.split(":", 1)[1].split() for ln in lscpu.splitlines() if ln.startswith("Flags")), [])
        cpu = f"{model}; " + " ".join(
            f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags
        )
    except OSError:
        cpu = "?"
    table = format_table(
        [
            {**r, **{k: r["placement"][k] for k in ("matmul_with_int8_weight", "matmul_without_qdq")}}
            for r in rows
        ],
        [
            "backbone",
            "variant",
            "evaluator",
            "calibration_images",
            "eval_images",
            "build_s",
            "emb_cos_min",
            "emb_cos_mean",
            "emb_max_abs",
            "matmul_with_int8_weight",
            "matmul_without_qdq",
        ],
        markdown=True,
        float_format=".4g",
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"command": command, "note": NOTE, "machine": machine(), "cpu": cpu, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    placements = "\n".join(f"- {r['backbone']} {r['variant']}: {json.dumps(r['placement'])}" for r in rows)
    out.with_suffix(".md").write_text(
        f"# FP16 and INT8 (Q/DQ + FP16) ONNX variants for TensorRT, scored on the CPU\n\n"
        f"Command: `{command}`\n\n{NOTE}\n\nMachine: {machine()}; CPU: {cpu}\n\n{table}\n\n"
        f"Graph placement (MatMul/Gemm with a dequantized int8 constant weight; those without any Q/DQ are "
        f"the attention matmuls; initializer dtypes):\n\n{placements}\n"
    )
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
