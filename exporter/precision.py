"""Stage 2, ONNX -> FP16 / INT8 ONNX, with a fidelity report against FP32 on held-out real photographs.

TensorRT 11 builds strongly typed networks: precision is decided in the ONNX.
- fp16: ModelOpt AutoCast (I/O kept FP32); LayerNormalization, Softmax and the embedding L2 norm stay
  FP32, and so does any node whose activations on the calibration images leave [-data_max, data_max].
  The nodes kept in FP32 are reported with ModelOpt's reason.
- int8: ModelOpt ONNX PTQ, explicit symmetric Q/DQ (what TensorRT consumes), calibrated (max or entropy)
  on images run through the backbone's own preprocessing. The attention matmuls (Q.K^T and softmax.V:
  MatMuls of two activations) are left unquantized: quantizing them collapses ViT fidelity.
- bf16: the FP32 ONNX itself, run in bfloat16 by OpenVINO on hosts with BF16 (AMX, AVX512-BF16); scored
  on an emulation (every MatMul/Gemm/Conv input rounded to bfloat16 by Cast nodes, float32 sums), which
  runs on any CPU.
- cpu-int8: onnxruntime int8 for the CPU serving kind (config.CPU_INT8_MODES): per token (the default,
  exporter/token_int8.py: the same embedding alone or in any batch), dynamic (onnxruntime's per-call
  scales: an image's embedding depends on its batch-mates) or static QDQ; per-channel weights, attention
  matmuls kept in float. The INT8 variant carries the per-token flavours too (CPU_INT8_SUBDIR), for CPU
  hosts where OpenVINO's int8 kernels do not fit the Q/DQ model.
Every variant the CPU kind serves carries a probe (PROBE_NAME): held-out pixels and, per flavour, the
embeddings its arithmetic computes, which the served model reproduces on its host before it serves.
Quantized models are cached by `identity.artifact_key` of (the FP32 model's files, the images, the pixel
recipe, settings), so an unchanged rebuild is instant. Every pixel (calibration, fidelity, the probe) is
made with the model's one recipe, `spec.served_preprocess(manifest)`: what the server sends.
FP16 is evaluated on the CPU with onnxruntime at ORT_ENABLE_EXTENDED (ORT_ENABLE_ALL has killed the
process opening AutoCast models); the report says which evaluator ran.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.contract import EMBEDDINGS, PIXELS, PROBE_FILE, Preprocess
from vitserve.errors import CalibrationError, ConfigError
from vitserve.exporter.compare import compare_outputs, format_table
from vitserve.exporter.config import (
    CPU_INT8_DEFAULT_MODE,
    CPU_INT8_MODES,
    Calibration,
    Gates,
    ModelSpec,
    Precision,
)
from vitserve.exporter.export import EXTERNAL_DATA_NAME, ONNX_NAME, read_manifest, sha256_file

log = logging.getLogger(__name__)

FP16_KEEP_OP_TYPES = ["LayerNormalization", "Softmax", "ReduceL2"]
FP16_DATA_MAX = 512.0  # ModelOpt AutoCast's default: a margin below FP16's 65504 for what follows
FP16_RANGE_IMAGES = 16
# Past this many bytes of weights an FP16 variant is saved with one external-data file (model.onnx.data):
# ViT-g-14's FP16 ONNX reached 2.03 GB as one protobuf (94% of protobuf's 2 GiB limit).
FP16_EXTERNAL_DATA_BYTES = 1 << 30
VARIANT_REPORT = "variant.json"


# ----------------------------------------------------------------------------------------- images


def calibration_files(cal: Calibration, cache_dir: Path) -> list[Path]:
    """The calibration image files: `cal.images` (recursive) or the bundled calibration photos,
    sampled deterministically to `cal.num_images`."""
    from vitserve.exporter.samples import list_images, write_calibration_images

    if cal.images is None:
        return write_calibration_images(
            cache_dir / f"calibration-{cal.num_images}-{cal.seed}", cal.num_images, cal.seed
        )
    folder = Path(cal.images)
    if not folder.is_dir():
        raise CalibrationError(
            f"calibration folder {folder} does not exist; pass a folder of jpg/png/webp images"
        )
    files = list_images(folder)
    if not files:
        raise CalibrationError(
            f"calibration folder {folder} holds no jpg/png/webp images (searched recursively)"
        )
    if len(files) > cal.num_images:
        rng = np.random.default_rng(cal.seed)
        files = sorted(files[i] for i in rng.choice(len(files), cal.num_images, replace=False))
    return files


def load_pixels(
    files: list[Path], entry, recipe: Preprocess, what: str = "calibration"
) -> tuple[list[Path], np.ndarray]:
    """Files as pixels made with `recipe`, the model's one pixel recipe (`spec.served_preprocess(manifest)`;
    required, see `export.to_pixels`): vitserve's EXIF orientation and 16-bit scaling as the served model
    applies them, then the library's own eval transform built from the recipe (open_clip / timm: RGB
    conversion where the library does it). Unreadable files are skipped with a warning naming them (an
    error when none is left)."""
    import torch
    from PIL import Image

    from vitserve.exporter.backbones import library_transform_for, prepare_image

    tf = library_transform_for(entry, recipe)
    good, tensors, bad = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                tensors.append(tf(prepare_image(im, recipe)))
            good.append(f)
        except Exception as e:
            bad.append(f"{f} ({type(e).__name__}: {e})")
    if bad:
        log.warning("skipped %d unreadable %s image(s): %s", len(bad), what, "; ".join(bad))
        print(f"WARNING: skipped {len(bad)} unreadable {what} image(s): " + "; ".join(bad))
    if not tensors:
        raise CalibrationError(f"none of the {len(files)} {what} images could be read: " + "; ".join(bad))
    return good, torch.stack(tensors).numpy()


def eval_pixels(entry, recipe: Preprocess, count: int = 32) -> tuple[list[str], np.ndarray]:
    """Views of the held-out photographs (no calibration photo, near-duplicate or crop of one) as pixels
    made with `recipe` (see `load_pixels`). Views beyond the distinct photos are crops/flips of them: the
    names say which source each view comes from (`samples.distinct_sources(names)` counts them)."""
    from vitserve.exporter.export import to_pixels
    from vitserve.exporter.samples import distinct_sources, eval_views

    names, pixels = to_pixels(entry, eval_views(count), recipe)
    log.info(
        "fidelity set: %d views of %d distinct held-out photographs", len(names), distinct_sources(names)
    )
    return names, pixels


# ----------------------------------------------------------------------------------------- graphs


def attention_matmuls(onnx_path: Path) -> list[str]:
    """Names of MatMul nodes whose both inputs are activations (Q.K^T and softmax.V in a ViT)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)
    ]


def count_ops(onnx_path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


SHAPE_OPS = {
    "Shape",
    "Gather",
    "Concat",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Constant",
    "ConstantOfShape",
    "Expand",
    "Range",
    "Equal",
    "Where",
    "Cast",
    "Identity",
}


@contextlib.contextmanager
def running_modelopt():
    """ModelOpt as vitserve runs it: its logs quiet (it logs every node at INFO on its own handlers; its
    warnings are kept) and its AutoCast dead-node cleanup linear in the graph (`_cleanup_no_consumers`)."""
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    loggers = [
        logging.getLogger(n)
        for n in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast", "modelopt.onnx.quantization")
    ]
    saved = [(lg, lg.propagate, [(h, h.level) for h in lg.handlers]) for lg in loggers]
    for lg in loggers:
        lg.propagate = False
        for h in lg.handlers:
            if not isinstance(h, _Collect):
                h.setLevel(logging.WARNING)
    cleanup = PrecisionConverter._cleanup_no_consumer_nodes
    if _modelopt_version() == MODELOPT_CLEANUP_READ:
        PrecisionConverter._cleanup_no_consumer_nodes = _cleanup_no_consumers
    try:
        yield
    finally:
        PrecisionConverter._cleanup_no_consumer_nodes = cleanup
        for lg, propagate, handlers in saved:
            lg.propagate = propagate
            for h, level in handlers:
                h.setLevel(level)


# The ModelOpt release whose `PrecisionConverter._cleanup_no_consumer_nodes` `_cleanup_no_consumers` was
# checked against (tests/test_precision.py); another release keeps its own.
MODELOPT_CLEANUP_READ = "0.47.0"


def _modelopt_version() -> str:
    import modelopt

    return modelopt.__version__


def _cleanup_no_consumers(converter) -> None:
    """ModelOpt 0.47's `PrecisionConverter._cleanup_no_consumer_nodes`, the same removals, with the graph's
    consumed tensors gathered once. Its own asks `get_consumer_nodes` (a scan of every node) for each
    output of each node: quadratic. ViT-B-32's INT8 variant (its FP16 parts go through AutoCast) took
    170 s with it and 140 s with this, the same bytes written; more on the larger backbones. A node goes
    when none of its outputs is a network output or consumed by a node; the graph is read whole before
    anything is removed, as there."""
    graph = converter.model.graph
    kept = {o.name for o in graph.output} | {t for n in graph.node for t in n.input}
    for node in [n for n in graph.node if not any(out in kept for out in n.output)]:
        graph.node.remove(node)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.kept: dict[str, str] = {}

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Skipping node "):
            name, _, reason = msg[len("Skipping node ") :].partition(": ")
            self.kept[name] = reason


def activation_absmax(src: Path, calib: np.ndarray, work: Path) -> dict[str, float]:
    """absmax of every float tensor of `src` over `calib`, one image at a time.

    ModelOpt AutoCast's own range check keeps every intermediate tensor of every reference image in
    memory (EVA02-L-14 on 8 images was OOM-killed at 21 GB here); streaming costs one image's worth.
    """
    import onnx
    from polygraphy import constants
    from polygraphy.backend.onnx import modify_outputs

    from vitserve.exporter import onnxrt

    model = modify_outputs(onnx.load(str(src)), outputs=constants.MARK_ALL)
    marked = work / "all_outputs.onnx"
    external = sum(t.ByteSize() for t in model.graph.initializer) >= 2**31 - 1
    onnx.save_model(model, str(marked), save_as_external_data=external, location="all_outputs.onnx.data")
    del model
    session = onnxrt.cpu_session(marked, optimization="disabled")
    names = [o.name for o in session.get_outputs()]
    absmax: dict[str, float] = {PIXELS: float(np.abs(calib).max())}
    for i in range(len(calib)):
        for name, value in zip(names, session.run(names, {PIXELS: calib[i : i + 1]}), strict=True):
            if np.issubdtype(value.dtype, np.floating) and value.size:
                absmax[name] = max(absmax.get(name, 0.0), float(np.abs(value).max()))
    return absmax


def make_fp16(src: Path, dst: Path, calib: np.ndarray, work: Path) -> dict[str, Any]:
    """AutoCast `src` to FP16 (I/O FP32) into `dst`, keeping in FP32 the rule-based op types and every
    node whose activations on `calib` leave [-FP16_DATA_MAX, FP16_DATA_MAX]; returns the kept nodes."""
    import modelopt.onnx.autocast.nodeclassifier  # noqa: F401  (its import resets the logger's handlers)
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    images = calib[:FP16_RANGE_IMAGES]
    absmax = activation_absmax(src, images, work)
    graph = onnx.load(str(src), load_external_data=False).graph
    out_of_range = {}
    for node in graph.node:
        peak = max((absmax.get(t, 0.0) for t in [*node.input, *node.output]), default=0.0)
        if peak > FP16_DATA_MAX and node.op_type not in FP16_KEEP_OP_TYPES:
            out_of_range[node.name] = (
                f"activations reach |x| = {peak:.4g} > {FP16_DATA_MAX:g} on the calibration images"
            )
    collect = _Collect()
    mlog = logging.getLogger("modelopt.onnx.autocast")
    level = mlog.level
    mlog.setLevel(logging.INFO)  # its per-node decisions are logged at INFO; running_modelopt hides them
    mlog.addHandler(collect)
    try:
        with running_modelopt():
            model = convert_to_mixed_precision(
                onnx_path=str(src),
                low_precision_type="fp16",
                keep_io_types=True,
                op_types_to_exclude=FP16_KEEP_OP_TYPES,
                nodes_to_exclude=[_exact(n) for n in out_of_range],
                data_max=np.inf,  # the range check above replaces AutoCast's in-memory reference run
                providers=["cpu"],
            )
    finally:
        mlog.removeHandler(collect)
        mlog.setLevel(level)
    save_onnx(model, dst)
    del model
    op_type = {n.name: n.op_type for n in graph.node}
    kept = {
        n: ("LayerNorm/Softmax/L2-norm kept FP32 by rule" if r == "DisabledOpTypes" else r)
        for n, r in collect.kept.items()
        if op_type.get(n) not in SHAPE_OPS
    }
    kept.update(out_of_range)
    return {
        "kept_fp32": kept,
        "kept_op_types": FP16_KEEP_OP_TYPES,
        "data_max": FP16_DATA_MAX,
        "range_check_images": len(images),
    }


def save_onnx(model, dst: Path, threshold_bytes: int = FP16_EXTERNAL_DATA_BYTES) -> bool:
    """Save `model` to `dst`, its weights in one `<dst>.data` file when they pass `threshold_bytes`.

    External data also keeps the peak down: the tensors are written one by one instead of serializing the
    whole model into one in-memory protobuf first. Returns whether external data was used.
    """
    import onnx

    external = sum(t.ByteSize() for t in model.graph.initializer) >= threshold_bytes
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
        size_threshold=1024,
    )
    return external


def make_int8(
    src: Path, dst: Path, calib: np.ndarray, method: str, quantize_attention: bool = False
) -> dict[str, Any]:
    """ModelOpt explicit Q/DQ INT8 of `src` into `dst` for TensorRT: Q/DQ on the weight matmuls, the rest
    FP16 (ModelOpt's `high_precision_dtype="fp16"`, its default for TensorRT), I/O kept FP32.

    The attention matmuls (MatMuls of two activations, found structurally) get no Q/DQ unless asked. We
    keep our structural rule rather than ModelOpt's MHA handling: for int8, ModelOpt quantizes every MHA
    whose sequence is <= 512 tokens (every ViT here: that is the 0.77-cosine collapse), and its
    `disable_mha_qdq` relies on matching the MatMul-Softmax-MatMul pattern, which the EVA (rotary) and
    DINOv2 exports need not follow; "both inputs are activations" holds for every export. LayerNorm,
    Softmax and the embedding L2 norm stay FP32, the same rule as the FP16 variant
    (`op_types_to_exclude_fp16`). Evaluate the result as fake quantization (session config
    `session.disable_quant_qdq=1`) at ORT_ENABLE_EXTENDED, the level FP16 is evaluated at.
    """
    from modelopt.onnx.quantization import quantize

    excluded = [] if quantize_attention else attention_matmuls(src)
    with running_modelopt():
        quantize(
            onnx_path=str(src),
            quantize_mode="int8",
            calibration_data={PIXELS: calib},
            calibration_method=method,
            calibration_eps=["cpu"],
            nodes_to_exclude=[_exact(n) for n in excluded],
            high_precision_dtype="fp16",
            op_types_to_exclude_fp16=FP16_KEEP_OP_TYPES,
            output_path=str(dst),
            log_level="WARNING",
        )
    return {
        "method": method,
        "excluded_attention_matmuls": len(excluded),
        "high_precision_dtype": "fp16",
        "kept_fp32_op_types": FP16_KEEP_OP_TYPES,
    }


def _exact(name: str) -> str:
    import re

    return "^" + re.escape(name) + "$"


class _Reader:
    def __init__(self, calib: np.ndarray, batch: int = 1):
        self._it = iter([{PIXELS: calib[i : i + batch]} for i in range(0, len(calib), batch)])

    def get_next(self):
        return next(self._it, None)


# onnxruntime's x86 int8 kernels multiply u8 activations by s8 weights. Without VNNI they add pairs of
# products in int16 (vpmaddubsw), which saturates for full-range weights: ViT-B-32's cosine to FP32 fell to
# 0.992 on an AVX2-only host while a VNNI host (exact int32 sums) gave 0.9999. Weights in 7 bits
# (`reduce_range`) cannot saturate (2 * 255 * 64 < 32767), so that flavour is exact on every x86-64 host, at
# a little precision and speed. Both are built; the CPU model picks by the serving host's CPU flags at load
# time and proves its pick on a probe batch (triton_models/onnx_cpu.py). perf/results/cpu_isa.md measures it.
CPU_INT8_FLAVOURS: dict[str, dict[str, Any]] = {
    "vnni": {
        "file": "model.vnni.onnx",
        "reduce_range": False,
        "exact_on": "hosts with VNNI (AVX512-VNNI, AVX-VNNI, AMX): int8 weights, full range",
    },
    "avx2": {
        "file": ONNX_NAME,
        "reduce_range": True,
        "exact_on": "every x86-64 host (AVX2 and up): 7-bit weights, no int16 saturation",
    },
}
PORTABLE_FLAVOUR = "avx2"  # what every host can fall back to; the variant is published only if it passes
PROBE_NAME = PROBE_FILE  # held-out pixels and each flavour's embeddings, checked when a CPU model loads
PROBE_IMAGES = 4
# The probe gate must tell a broken (saturating) kernel from a different CPU's kernels. Measured on the probe
# (ViT-B-32, random init; perf/results/cpu_engines.md, "Probe gate"), as 1 - cosine:
# - another ISA's kernels (the cross-ISA spread): the `avx2` flavour with SSE4.x kernels (qemu `-cpu
#   Nehalem`) 9.8e-5 per call, 1.04e-4 per token (0 under `-cpu Haswell`), with AVX2 kernels against a
#   reference built on AVX-512 (qemu `-cpu Haswell`, issue 26) 7.8e-5; FP32 (OpenVINO f32, AVX2 vs SSE4.2)
#   < 1e-7; `openvino-int8` (OpenVINO's default precision: bf16 non-quantized parts where the CPU has BF16)
#   on AMX vs VNNI kernels (oneDNN's ONEDNN_MAX_CPU_ISA on a Sapphire Rapids Xeon) 3.1e-4 between the two
#   outputs, 2.7e-4 to 3.0e-4 from the reference on every ISA with exact int8 (AMX, AVX512-BF16, VNNI);
# - saturation (u8 x s8 pairs summed in int16 without VNNI): the `vnni` flavour on an AVX2 EPYC 9.2e-3
#   (1.9e-2 under Haswell), per token 2.2e-2, OpenVINO on the Q/DQ INT8 ONNX there 2.6e-2 (2.3e-2 with
#   oneDNN capped at AVX512_CORE or AVX2 on the Xeon).
# 0.998 passes `openvino-int8` (the widest spread) with 2e-3 - 3.0e-4 = 1.7e-3 to spare, 5.5x the spread
# between its AMX and VNNI outputs (>= 5x asked; 0.999 left 2.3x), per token 18x its spread; every
# saturation of a flavour published by default misses it by 11x or more (the dynamic `vnni` flavour, only
# when asked for, by 4.6x).
PROBE_MIN_COSINE = 0.998
# The probe's `int8` reference: the Q/DQ INT8 ONNX as OpenVINO computes it. Against the file's TensorRT
# arithmetic (FP16 parts in FP16) OpenVINO's exact VNNI int8 gave 1 - cosine 2.4e-3 on ViT-B-32's probe (an
# AVX-512 VNNI + BF16 Xeon), so the flavour was refused on every host that could run it; against this
# reference: 1.7e-4 (f32) and 2.9e-4 (bf16 non-quantized parts; perf/results/cpu_engines.md, "Probe gate").
PROBE_INT8_REFERENCE = "fake quantization, FP16 parts in FP32"


CPU_INT8_SUBDIR = "cpu-int8"  # the INT8 variant's per-token CPU flavours, beside its Q/DQ model.onnx


def make_cpu_int8(
    src: Path, dst_dir: Path, calib: np.ndarray, mode: str = CPU_INT8_DEFAULT_MODE
) -> dict[str, Any]:
    """onnxruntime int8 for the CPU, one file per flavour of CPU_INT8_FLAVOURS in `dst_dir`: int8 weights
    per channel on MatMul/Gemm, attention matmuls in float, activations as CPU_INT8_MODES[mode] says."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from vitserve.exporter.token_int8 import quantize_per_token

    if mode not in CPU_INT8_MODES:
        raise ConfigError(f"cpu-int8 mode {mode!r}: expected one of {', '.join(CPU_INT8_MODES)}")
    excluded = attention_matmuls(src)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for flavour in CPU_INT8_FLAVOURS.values():
        dst = str(dst_dir / flavour["file"])
        common = {
            "per_channel": True,
            "reduce_range": flavour["reduce_range"],
            "weight_type": QuantType.QInt8,
            "op_types_to_quantize": ["MatMul", "Gemm"],
            "nodes_to_exclude": excluded,
        }
        if mode == "token":
            quantize_per_token(src, Path(dst), flavour["reduce_range"])
        elif mode == "dynamic":
            quantize_dynamic(str(src), dst, **common)
        else:
            quantize_static(
                str(src),
                dst,
                _Reader(calib),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                **common,
            )
    return {
        "mode": mode,
        "activations": CPU_INT8_MODES[mode],
        "excluded_attention_matmuls": len(excluded),
        "weights": "int8 per-channel",
        "flavours": {k: {"file": v["file"], "exact_on": v["exact_on"]} for k, v in CPU_INT8_FLAVOURS.items()},
    }


def score_flavours(
    folder: Path, fp32: Path, pixels: np.ndarray, reference: dict[str, np.ndarray], own: dict | None = None
) -> dict[str, dict[str, Any]]:
    """Each CPU_INT8_FLAVOURS file in `folder` scored against FP32 (`fidelity`, hardware-independent);
    `own`: a flavour's score already taken (the cpu-int8 variant's own model.onnx)."""
    out = {}
    for flavour, f in CPU_INT8_FLAVOURS.items():
        path = folder / f["file"]
        out[flavour] = {
            "file": f["file"],
            "exact_on": f["exact_on"],
            "fidelity": (own or {}).get(flavour)
            or fidelity(fp32, path, Precision.CPU_INT8, pixels, reference),
            "sha256": sha256_file(path),
        }
    return out


def write_probe(
    out: Path, pixels: np.ndarray, references: dict[str, Path], native: tuple[str, ...] = ()
) -> None:
    """`out` (.npz): a held-out batch and, per reference name (onnx_cpu.PROBE_REFERENCE: fp32, int8, bf16,
    vnni, avx2), the embeddings the file's verified arithmetic gives (`onnxrt.exact_session`: Q/DQ as fake
    quantization, integer matmuls exact, float graphs as they are). The `int8` reference is the Q/DQ file
    with its FP16 parts in FP32 (PROBE_INT8_REFERENCE): the arithmetic of the flavour that serves it on a
    CPU, OpenVINO, which runs FP16 parts at its own inference precision (the fidelity report scores the
    file as TensorRT computes it, FP16 parts in FP16). The CPU model runs the batch when it
    loads and refuses a flavour whose embeddings on the serving host differ (cosine < PROBE_MIN_COSINE):
    that host's kernels do not compute the model that was verified (triton_models/onnx_cpu.py). `native`:
    references computed with this host's own kernels instead (static cpu-int8: onnxruntime's QLinear
    kernels requantize between ops, which fake quantization does not; with 7-bit weights they cannot
    saturate, so every x86-64 host computes the same integers, and a full-range flavour built on a host
    without VNNI is refused where it does not reproduce them, falling back to the portable one)."""
    from vitserve.exporter import onnxrt

    pixels = np.ascontiguousarray(pixels, np.float32)
    arrays = {PIXELS: pixels}
    for name, path in references.items():
        if name in native:
            session = onnxrt.cpu_session(path)
        elif name == Precision.INT8.value:  # the Q/DQ file as the `openvino-int8` flavour computes it
            session, _ = onnxrt.exact_session(path, optimization="extended", float32=True)
        else:
            session, _ = onnxrt.exact_session(path)
        arrays[f"{EMBEDDINGS}_{name}"] = onnxrt.run(session, pixels, batch_size=len(pixels))[EMBEDDINGS]
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    tmp.replace(out)


def fp32_probe(fp32_dir: Path, out_dir: Path, spec: ModelSpec) -> Path:
    """The FP32 CPU model's probe (its `fp32` reference only) in `out_dir`, rebuilt when the export
    changes (its manifest's build key)."""
    from vitserve.exporter.backbones import get_backbone

    manifest = read_manifest(fp32_dir)
    out = out_dir / PROBE_NAME
    stamp = out_dir / "build_key"
    key = str(manifest.get("build_key") or sha256_file(fp32_dir / ONNX_NAME))
    if out.exists() and stamp.exists() and stamp.read_text() == key:
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    _, pixels = eval_pixels(
        get_backbone(manifest["backbone"]), spec.served_preprocess(manifest), PROBE_IMAGES
    )
    write_probe(out, pixels[:PROBE_IMAGES], {"fp32": fp32_dir / ONNX_NAME})
    stamp.write_text(key)
    return out


BF16_OPS = ("MatMul", "Gemm", "Conv")


def make_bf16(src: Path, dst: Path) -> dict[str, Any]:
    """The BF16 emulation of `src` into `dst`: every float input of MatMul/Gemm/Conv rounded to bfloat16
    (Cast to bfloat16 and back), sums in float32: what a BF16 matmul unit (AMX, AVX512-BF16) computes.
    It is only scored: the served file is the FP32 ONNX, which OpenVINO runs in bf16 on hosts that have it."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    nodes, rounded = [], {}
    for n in model.graph.node:
        if n.op_type in BF16_OPS:
            for k, x in enumerate(n.input):
                if not x or k == 2 or (x in inits and inits[x].data_type != TensorProto.FLOAT):
                    continue  # biases (the third input) are added in float32
                if x not in rounded:
                    b, f = f"{x}/bf16", f"{x}/bf16_f32"
                    nodes.append(helper.make_node("Cast", [x], [b], to=TensorProto.BFLOAT16, name=b))
                    nodes.append(helper.make_node("Cast", [b], [f], to=TensorProto.FLOAT, name=f))
                    rounded[x] = f
                n.input[k] = rounded[x]
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save_onnx(model, dst)
    return {"emulation": "MatMul/Gemm/Conv inputs rounded to bfloat16, float32 sums", "rounded": len(rounded)}


# ----------------------------------------------------------------------------------------- fidelity


def fidelity(
    fp32: Path,
    variant: Path,
    precision: Precision,
    pixels: np.ndarray,
    reference: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Variant vs FP32 with onnxruntime (CPU) on `pixels`: per output cosine/abs error, top-1/top-5.

    The score does not depend on the CPU that computes it: quantized graphs run through
    `onnxrt.exact_session` (Q/DQ as fake quantization, integer matmuls exact), never through the host's
    int8 kernels. FP16 and the FP16 parts of the INT8 graph run at ORT_ENABLE_EXTENDED (ORT_ENABLE_ALL has
    killed the process opening AutoCast models). `reference`: FP32 outputs on `pixels`, when already known.
    """
    from vitserve.exporter import onnxrt

    level = "extended" if precision in (Precision.FP16, Precision.INT8) else "all"
    ref = reference if reference is not None else onnxrt.run(onnxrt.cpu_session(fp32), pixels)
    t0 = time.perf_counter()
    session, how = onnxrt.exact_session(variant, optimization=level)
    got = onnxrt.run(session, pixels)
    metrics = compare_outputs(ref, got)
    return {
        "evaluator": f"onnxruntime CPUExecutionProvider, graph optimization {level.upper()}, {how}",
        "hardware_independent": True,
        "images": len(pixels),
        "seconds": round(time.perf_counter() - t0, 2),
        "outputs": metrics,
    }


def check_gate(precision: Precision, report: dict[str, Any], gates: Gates) -> tuple[bool, str]:
    """(passed, "PASS|FAIL: metric value >= threshold, ...") with `<` on each metric that failed."""
    emb = report["outputs"]["embeddings"]["cosine_mean"]
    top1 = report["outputs"].get("logits", {}).get("top1_agreement")
    threshold = {
        Precision.FP16: gates.fp16_mean_cosine,
        Precision.BF16: gates.bf16_mean_cosine,
        Precision.CPU_INT8: gates.cpu_int8_mean_cosine,
    }.get(precision, gates.int8_mean_cosine)
    checks = [("embeddings mean cosine", emb, threshold, 6)]
    if precision is Precision.INT8 and top1 is not None:
        checks.append(("top-1 agreement", top1, gates.int8_top1_agreement, 3))
    ok = all(value >= limit for _, value, limit, _ in checks)
    text = ", ".join(
        f"{name} {value:.{digits}f} {'>=' if value >= limit else '<'} {limit}"
        for name, value, limit, digits in checks
    )
    return ok, ("PASS: " if ok else "FAIL: ") + text


def fidelity_table(reports: dict[str, dict[str, Any]]) -> str:
    """One row per variant (per flavour for cpu-int8): cosine, max abs error, top-1/top-5, gate."""
    rows = []
    for precision, r in reports.items():
        flavours = r.get("flavours") or {None: r}
        for flavour, f in flavours.items():
            o = f["fidelity"]["outputs"]
            row = {
                "variant": precision if flavour is None else f"{precision} ({flavour})",
                "emb_cos_min": o["embeddings"]["cosine_min"],
                "emb_cos_mean": o["embeddings"]["cosine_mean"],
                "emb_max_abs": o["embeddings"]["max_abs_err"],
            }
            if "logits" in o:
                row |= {
                    "top1": o["logits"]["top1_agreement"],
                    "top5": o["logits"]["top5_agreement"],
                    "logits_max_abs": o["logits"]["max_abs_err"],
                }
            row["gate"] = f["gate"].split(":")[0]
            rows.append(row)
    cols = ["variant", "emb_cos_min", "emb_cos_mean", "emb_max_abs", "top1", "top5", "logits_max_abs", "gate"]
    return format_table(rows, cols)


def publishable(passed: dict[str, bool]) -> tuple[bool, list[str]]:
    """The one rule for a cpu-int8 variant's flavours, given whether each passed its gates: each flavour
    that passed is published, and the variant only when its portable flavour is among them (every host
    can fall back to it). Returns (variant published, published flavours)."""
    published = [k for k, ok in passed.items() if ok]
    return PORTABLE_FLAVOUR in published, published


def _gate_flavours(report: dict[str, Any], gates: Gates) -> None:
    """Gate each cpu-int8 flavour of `report` (cpu-int8 arithmetic: the cpu-int8 threshold) and list the
    ones published (`publishable`)."""
    for f in report["flavours"].values():
        f["passed"], f["gate"] = check_gate(Precision.CPU_INT8, f["fidelity"], gates)
    _, report["published_flavours"] = publishable({k: f["passed"] for k, f in report["flavours"].items()})


def apply_gates(precision: Precision, report: dict[str, Any], gates: Gates) -> dict[str, Any]:
    """Apply `gates` to a report (and to each cpu-int8 flavour); a cpu-int8 variant passes when its
    portable flavour does (every host can fall back to it), and publishes each flavour that passes
    (`publishable`). The INT8 variant passes on its own Q/DQ model's score; its per-token CPU flavours
    (`cpu_int8`) are published each on its own score. The heads of a many-heads model gate the cpu-int8
    variant's flavours again (multihead.gate_heads)."""
    if "flavours" in report:
        _gate_flavours(report, gates)
        portable = report["flavours"][PORTABLE_FLAVOUR]
        report["passed"], report["gate"] = portable["passed"], portable["gate"]
    else:
        report["passed"], report["gate"] = check_gate(precision, report["fidelity"], gates)
    if "cpu_int8" in report:
        _gate_flavours(report["cpu_int8"], gates)
    return report


# ----------------------------------------------------------------------------------------- stage


def _onnxruntime_version() -> str:
    """The installed onnxruntime wheel's version, whichever wheel it is (-gpu with ModelOpt, or the CPU one)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import onnxruntime

    return onnxruntime.__version__


def variant_key(
    precision: Precision,
    fp32: Path,
    files: list[Path],
    settings: dict[str, Any],
    recipe,
    eval_count: int,
) -> str:
    """What makes a variant and its report: the FP32 model (all its files), the calibration images and
    the pixel recipe they and the held-out photos go through, the settings, the quantizers' versions."""
    from importlib.metadata import version

    from vitserve.exporter.identity import artifact_key, files_digest

    return artifact_key(
        f"variant-{precision.value}",
        models={"fp32": fp32},
        recipe=recipe,
        images=files_digest(files),
        settings=settings,
        eval_count=eval_count,
        modelopt=version("nvidia-modelopt"),
        onnxruntime=_onnxruntime_version(),
    )


def _anchor(report: dict[str, Any], precision: Precision, out_dir: Path, fp32: Path) -> None:
    """The report's file paths where the variant is now: a cached report read from an artifacts folder that
    was moved or copied must not point into the old one (which may hold another model by now)."""
    report["onnx"] = str(out_dir / ONNX_NAME)
    if precision is Precision.BF16:  # scored on the emulation, served as the FP32 file
        report["emulation"], report["onnx"] = report["onnx"], str(fp32)


def make_variant(
    precision: Precision,
    fp32_dir: Path,
    out_dir: Path,
    spec: ModelSpec,
    cpu_int8_mode: str = CPU_INT8_DEFAULT_MODE,
    eval_count: int = 32,
    cached_only: bool = False,
) -> dict[str, Any] | None:
    """Make the `precision` variant of the FP32 export in `fp32_dir` into `out_dir`, score it against
    FP32 on held-out photos, apply the gate; returns the report (also `out_dir/variant.json`), or with
    `cached_only` the cached report where its key is unchanged, else None (nothing made). Every pixel
    (calibration, fidelity, the cpu-int8 probe) is made with the model's one recipe,
    `spec.served_preprocess(manifest)`: what the served preprocess model sends."""
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.export import atomic_directory

    precision = Precision(precision)
    manifest = read_manifest(fp32_dir)
    entry = get_backbone(manifest["backbone"])
    recipe = spec.served_preprocess(manifest)
    fp32 = fp32_dir / ONNX_NAME
    files = calibration_files(spec.calibration, out_dir.parent)
    if len(files) < spec.calibration.num_images:
        print(
            f"WARNING: {spec.name}: asked for {spec.calibration.num_images} calibration images, "
            f"found {len(files)} in {spec.calibration.images}; calibrating on {len(files)}"
        )
    settings: dict[str, Any] = {
        "method": spec.calibration.method,
        "num_images": spec.calibration.num_images,
        "seed": spec.calibration.seed,
    }
    if precision is Precision.INT8:
        settings["quantize_attention"] = spec.calibration.quantize_attention
        settings["high_precision_dtype"] = "fp16"  # the Q/DQ graph's non-quantized parts (make_int8)
        # and its per-token CPU flavours (CPU_INT8_SUBDIR), for CPU hosts where OpenVINO's int8 does not fit
        settings["cpu_int8"] = {k: v["reduce_range"] for k, v in CPU_INT8_FLAVOURS.items()}
    # The per-token files are written as one protobuf each: an FP32 export past 2 GiB (external data: ViT-H,
    # ViT-g, EVA02-E) gets none (its CPU int8 model serves OpenVINO on the Q/DQ file or FP32), rather than
    # files the repository could not carry whole.
    token_flavours = precision is Precision.INT8 and not (fp32_dir / EXTERNAL_DATA_NAME).exists()
    if precision is Precision.CPU_INT8:
        settings["mode"] = cpu_int8_mode
        settings["flavours"] = {k: v["reduce_range"] for k, v in CPU_INT8_FLAVOURS.items()}
    if precision is Precision.FP16:
        settings = {"keep": FP16_KEEP_OP_TYPES}
    if precision is Precision.BF16:
        settings = {"emulate": BF16_OPS}
    probed = precision in (Precision.INT8, Precision.CPU_INT8, Precision.BF16)
    if probed:
        settings["probe"] = {"images": PROBE_IMAGES, "references": 3}  # the probe's layout
        if precision is Precision.INT8:
            settings["probe"]["int8"] = PROBE_INT8_REFERENCE
    key = variant_key(precision, fp32, files, settings, recipe, eval_count)
    cached = out_dir / VARIANT_REPORT
    if cached.exists():
        report = json.loads(cached.read_text())
        if (
            report.get("key") == key
            and (out_dir / ONNX_NAME).exists()
            and (not probed or (out_dir / PROBE_NAME).exists())
        ):
            apply_gates(precision, report, spec.gates)
            _anchor(report, precision, out_dir, fp32)
            report["cached"] = True
            log.info("%s %s: unchanged (key %s), reusing %s", spec.name, precision.value, key, out_dir)
            return report
    if cached_only:
        return None
    t0 = time.perf_counter()
    used, calib = load_pixels(files, entry, recipe)
    with atomic_directory(out_dir) as tmp, tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        dst = tmp / ONNX_NAME
        # The quantizers write next to their input (ModelOpt rewrote model.onnx in place here):
        # give them a private copy so the FP32 export stays byte-identical to its manifest.
        src = Path(work) / "src" / ONNX_NAME
        src.parent.mkdir()
        for f in fp32_dir.iterdir():
            if f.name.startswith(ONNX_NAME):
                shutil.copy2(f, src.parent / f.name)
        if precision is Precision.FP16:
            details = make_fp16(src, dst, calib, Path(work))
        elif precision is Precision.INT8:
            details = make_int8(src, dst, calib, spec.calibration.method, spec.calibration.quantize_attention)
            if token_flavours:  # from the FP32 export itself (ModelOpt may have rewritten its copy `src`)
                details["cpu_int8"] = make_cpu_int8(fp32, tmp / CPU_INT8_SUBDIR, calib, CPU_INT8_DEFAULT_MODE)
        elif precision is Precision.CPU_INT8:
            details = make_cpu_int8(src, tmp, calib, cpu_int8_mode)
        elif precision is Precision.BF16:
            details = make_bf16(src, dst)
        else:
            raise ConfigError(f"no variant to make for precision {precision.value}")
        build_s = time.perf_counter() - t0
        names, pixels = eval_pixels(entry, recipe, eval_count)
        from vitserve.exporter import onnxrt
        from vitserve.exporter.samples import distinct_sources

        reference = onnxrt.run(onnxrt.cpu_session(fp32), pixels)
        fid = fidelity(fp32, dst, precision, pixels, reference)
        fid["eval_images"] = names
        fid["eval_sources"] = distinct_sources(names)  # distinct photographs behind the views
        report = {
            "precision": precision.value,
            "key": key,
            "preprocess": recipe.as_dict(),  # the pixel recipe of calibration, fidelity and the probe
            "details": details,
            "fidelity": fid,
            "build_seconds": round(build_s, 2),
            "calibration_images": [str(f) for f in used],
            "ops": {
                k: v
                for k, v in count_ops(dst).items()
                if k
                in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "Cast")
            },
            "sha256": sha256_file(dst),
            "cached": False,
        }
        _anchor(report, precision, out_dir, fp32)
        if precision is Precision.CPU_INT8:
            report["flavours"] = score_flavours(
                tmp,
                fp32,
                pixels,
                reference,
                {k: fid for k, f in CPU_INT8_FLAVOURS.items() if f["file"] == ONNX_NAME},
            )
        if precision is Precision.INT8 and token_flavours:
            report["cpu_int8"] = {
                "mode": details["cpu_int8"]["mode"],
                "folder": CPU_INT8_SUBDIR,
                "flavours": score_flavours(tmp / CPU_INT8_SUBDIR, fp32, pixels, reference),
            }
        if probed:
            refs = {"fp32": fp32}
            if precision is Precision.CPU_INT8:
                refs |= {k: tmp / f["file"] for k, f in CPU_INT8_FLAVOURS.items()}
            else:
                refs[precision.value] = dst
            if precision is Precision.INT8 and token_flavours:
                refs |= {k: tmp / CPU_INT8_SUBDIR / f["file"] for k, f in CPU_INT8_FLAVOURS.items()}
            native = (
                tuple(CPU_INT8_FLAVOURS)
                if precision is Precision.CPU_INT8 and cpu_int8_mode == "static"
                else ()
            )
            write_probe(tmp / PROBE_NAME, pixels[:PROBE_IMAGES], refs, native)
        apply_gates(precision, report, spec.gates)
        gate = report["gate"]
        (tmp / VARIANT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"[{spec.name}] {precision.value}: {gate} ({fid['evaluator']}; {len(pixels)} views of "
        f"{fid['eval_sources']} held-out photographs)"
    )
    return report
