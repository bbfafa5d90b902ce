"""CPU engines side by side on this host: onnxruntime and OpenVINO on vitserve's own ONNX files.

    python -m vitserve.perf.bench_cpu_engines --backbones ViT-B-32 ViT-B-16

For each backbone (RANDOM-INIT weights: these machines are offline) the files `make engines` writes are
made once into `--work` (kept between runs): the FP32 export, the explicit Q/DQ INT8 ONNX made for TensorRT
(ModelOpt, calibrated on the bundled photos) and onnxruntime's cpu-int8 per call (`dynamic`) and per token
(`token`, what the INT8 and cpu-int8 models carry now), in the flavour this host's int8 ISA picks. Rows (the
served model's flavour names where it has one): onnxruntime FP32, onnxruntime dynamic cpu-int8 (issue 26's
"today": the CPU default before it), onnxruntime per-token cpu-int8, OpenVINO FP32 (`openvino-fp32`), OpenVINO BF16 (`openvino-bf16`,
only where the host has BF16), OpenVINO on the Q/DQ ONNX (`openvino-int8`), onnxruntime on the Q/DQ ONNX.
Per row: in-process images/s at batch 1 and 8 (`--threads` threads; every engine measured in turn, round
after round, the median over `--rounds`), cosine to FP32 (mean, min) on the held-out photos, and batch
invariance: the max abs difference of an image's L2-normalised embedding alone vs inside a batch of 8 and
of 16. Results go to perf/results/cpu_engines.{md,json} (section `## Engines: ISA host`, one per CPU class,
with the host line and this command); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.contract import ONNX_FILE
from vitserve.exporter.precision import CPU_INT8_FLAVOURS
from vitserve.perf.report import host_heading, write_section

VNNI_FILE = CPU_INT8_FLAVOURS["vnni"]["file"]

RESULTS = Path(__file__).parent / "results"
SECTION = "## Engines"
MARKDOWN = "cpu_engines.md"
TITLE = "# CPU serving: engines and per-request overhead"
EVAL_IMAGES = 16


def files_for(backbone: str, work: Path) -> dict[str, Path]:
    """The FP32 export, the Q/DQ INT8 ONNX and the dynamic cpu-int8 flavours of `backbone`, made once."""
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.config import Calibration
    from vitserve.exporter.export import export_model
    from vitserve.exporter.precision import calibration_files, load_pixels, make_cpu_int8, make_int8

    root = work / backbone
    fp32 = root / "fp32" / ONNX_FILE
    if not fp32.exists():
        export_model(backbone, fp32.parent, weights="random", head="none")
    entry = get_backbone(backbone)
    calib = None
    qdq = root / "int8" / ONNX_FILE
    cpu = root / "cpu-int8"
    token = root / "cpu-int8-token"
    if not qdq.exists() or not (cpu / VNNI_FILE).exists() or not (token / VNNI_FILE).exists():
        _, calib = load_pixels(calibration_files(Calibration(), work), entry, entry.preprocess)
    if not qdq.exists():
        qdq.parent.mkdir(parents=True, exist_ok=True)
        make_int8(fp32, qdq, calib, "max")
    if not (cpu / VNNI_FILE).exists():
        cpu.mkdir(parents=True, exist_ok=True)
        make_cpu_int8(fp32, cpu, calib, "dynamic")
    if not (token / VNNI_FILE).exists():
        make_cpu_int8(fp32, token, calib, "token")
    return {
        "fp32": fp32,
        "qdq": qdq,
        **{k: cpu / f["file"] for k, f in CPU_INT8_FLAVOURS.items()},
        **{f"token-{k}": token / f["file"] for k, f in CPU_INT8_FLAVOURS.items()},
    }


def engines(files: dict[str, Path], threads: int, isa: str) -> dict[str, Any]:
    """name -> session with `run(names, feed)` (onnxruntime, or onnx_cpu.OpenVinoSession)."""
    from vitserve.exporter import onnxrt
    from vitserve.exporter.triton_models.onnx_cpu import OpenVinoSession, have_openvino, int8_isa

    flavour = int8_isa(set(), {}, isa)
    out: dict[str, Any] = {
        "onnxruntime fp32": onnxrt.cpu_session(files["fp32"], threads=threads),
        f"onnxruntime cpu-int8 dynamic ({flavour})": onnxrt.cpu_session(files[flavour], threads=threads),
        f"onnxruntime cpu-int8 per token ({flavour})": onnxrt.cpu_session(
            files[f"token-{flavour}"], threads=threads
        ),
    }
    if have_openvino() is None:
        out["openvino fp32 (openvino-fp32)"] = OpenVinoSession(str(files["fp32"]), threads, "f32")
        if isa in ("amx", "bf16"):
            out["openvino bf16 (openvino-bf16)"] = OpenVinoSession(str(files["fp32"]), threads, "bf16")
        out["openvino Q/DQ int8 (openvino-int8)"] = OpenVinoSession(str(files["qdq"]), threads, None)
    out["onnxruntime Q/DQ int8"] = onnxrt.cpu_session(files["qdq"], threads=threads, optimization="extended")
    return out


def _emb(session, x: np.ndarray) -> np.ndarray:
    from vitserve.contract import EMBEDDINGS, PIXELS

    return session.run([EMBEDDINGS], {PIXELS: np.ascontiguousarray(x)})[0]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def img_s(session, x: np.ndarray, seconds: float) -> float:
    """Images per second over at least `seconds` (and two calls) after one warm-up call."""
    _emb(session, x)
    n, t0 = 0, time.perf_counter()
    while n < 2 * len(x) or time.perf_counter() - t0 < seconds:
        _emb(session, x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def bench(backbone: str, work: Path, threads: int, rounds: int, seconds: float, isa: str) -> list[dict]:
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.precision import eval_pixels

    files = files_for(backbone, work)
    entry = get_backbone(backbone)
    _, pixels = eval_pixels(entry, entry.preprocess, EVAL_IMAGES)
    pixels = np.ascontiguousarray(pixels, np.float32)
    runs = engines(files, threads, isa)
    ref = None
    rows = {}
    for name, s in runs.items():
        alone = np.concatenate([_emb(s, pixels[i : i + 1]) for i in range(len(pixels))])
        b8 = np.concatenate([_emb(s, pixels[i : i + 8]) for i in range(0, len(pixels), 8)])
        b16 = _emb(s, pixels)
        ref = b8 if ref is None else ref  # the first row is onnxruntime FP32
        cos = (_unit(ref) * _unit(b8)).sum(1)
        rows[name] = {
            "backbone": backbone,
            "engine": name,
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
            "batch_max_abs": float(max(np.abs(_unit(alone) - _unit(b)).max() for b in (b8, b16))),
            "b1": [],
            "b8": [],
        }
    for _ in range(rounds):  # interleaved: every engine in turn, each round
        for name, s in runs.items():
            for b in (1, 8):
                rows[name][f"b{b}"].append(img_s(s, pixels[:b], seconds))
    base = rows["onnxruntime fp32"]
    today = next(r for n, r in rows.items() if "cpu-int8 dynamic" in n)
    for r in rows.values():
        for b in ("b1", "b8"):
            r[f"{b}_runs"] = r[b]
            r[b] = float(np.median(r[b]))
    for r in rows.values():
        r["vs_fp32"] = f"{r['b1'] / base['b1']:.2f} / {r['b8'] / base['b8']:.2f}"
        r["vs_cpu_int8"] = f"{r['b1'] / today['b1']:.2f} / {r['b8'] / today['b8']:.2f}"
    return list(rows.values())


def write(rows: list[dict], host: str, command: str, threads: int, rounds: int, isa: str) -> str:
    """Replace this host class's section (`## Engines: ISA host`) of perf/results/cpu_engines.md (other
    sections, other hosts' among them, are kept) and cpu_engines.json's `engines` entry for `isa`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    jpath = RESULTS / "cpu_engines.json"
    data = json.loads(jpath.read_text()) if jpath.exists() else {}
    data.setdefault("engines", {})[isa] = {
        "host": host, "command": command, "threads": threads, "rounds": rounds, "rows": rows,
    }  # fmt: skip
    jpath.write_text(json.dumps(data, indent=2) + "\n")
    heading = host_heading(SECTION, isa)
    lines = [
        heading,
        "",
        f"Host: {host}",
        "",
        f"Command: `{command}`",
        "",
        f"RANDOM-INIT weights; {threads} threads, in-process, every engine measured in turn ({rounds} rounds,"
        f" median img/s). Cosine: L2-normalised embeddings at batch 8 vs onnxruntime FP32 on {EVAL_IMAGES}"
        " views of the held-out photos. Batch invariance: max abs difference of an image's normalised"
        " embedding alone vs in a batch of 8 and of 16 (issue 26's bound: 1e-4).",
        "",
        "| backbone | engine | img/s b1 | img/s b8 | vs ORT FP32 (b1 / b8) | vs today's cpu-int8 (b1 / b8) |"
        " cos mean | cos min | alone vs batch max abs |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['engine']} | {r['b1']:.1f} | {r['b8']:.1f} | {r['vs_fp32']} | "
            f"{r['vs_cpu_int8']} | {r['cos_mean']:.6f} | {r['cos_min']:.6f} | {r['batch_max_abs']:.1e} |"
        )
    if isa != "amx":
        lines += [
            "",
            f"This host has no AMX (CPU class '{isa}'): the AMX acceptance numbers are not measured here."
            + ("" if isa == "bf16" else " Nor is OpenVINO BF16 (no AVX512-BF16 either).")
            + " Measured on an Intel Xeon with AVX-512 + VNNI + AMX (2 cores,"
            " shared/ENVIRONMENT.md, 2026-12-02, NOT this host), img/s b1 / b8: ViT-B-32 onnxruntime FP32"
            " 20.6 / 30.3, dynamic cpu-int8 62.9 / 102.2, OpenVINO BF16 56.0 / 116.4, OpenVINO on the Q/DQ ONNX"
            " 78.6 / 146.8 (1.25x / 1.44x today's cpu-int8, cos 0.99975); ViT-B-16 onnxruntime FP32 8.2 / 7.9,"
            " dynamic cpu-int8 27.0 / 28.8, OpenVINO BF16 29.8 / 35.1, OpenVINO on the Q/DQ ONNX 41.7 / 50.4"
            " (1.54x / 1.75x, cos mean 0.99983).",
        ]
    section = "\n".join(lines) + "\n"
    write_section(RESULTS / MARKDOWN, heading, section, TITLE)
    return section


def main(argv: list[str] | None = None) -> int:
    from vitserve.exporter.hostinfo import cpu_summary
    from vitserve.exporter.triton_models.onnx_cpu import cpu_flags, host_isa

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--work", type=Path, default=Path("/tmp/vitserve-bench-cpu-engines"), help="kept files")
    a = p.parse_args(argv)
    command = "python -m vitserve.perf.bench_cpu_engines " + " ".join(sys.argv[1:] if argv is None else argv)
    isa = host_isa(cpu_flags())
    rows = []
    for b in a.backbones:
        rows += bench(b, a.work, a.threads, a.rounds, a.seconds, isa)
    print(write(rows, cpu_summary(), command.strip(), a.threads, a.rounds, isa))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
