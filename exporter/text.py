"""Stage 1 for the text side, torch -> ONNX: a CLIP backbone's text tower as an ONNX model proven to compute
what open_clip's `encode_text` computes.

    tokens (int64 [batch, context_length], open_clip's tokenizer) -> embeddings (L2-normalised, the image
    embeddings' space)

`export_text(...)` builds the CLIP model with the same weights the image export loads (random init: the same
seed), traces `normalize(encode_text(tokens))` to ONNX (dynamic batch), stores weights as one external-data
file past 2 GB, runs onnx.checker, then checks PyTorch against onnxruntime on real sentences (non-ASCII,
emoji, text longer than the context, which open_clip truncates ending with the end token) at batch 1 and > 1
and on random token ids; cosine >= export.PARITY_COSINE or no folder appears (atomic_directory). The manifest
records the tokenizer, context length and logit scale the served tokenizer (NAME_text_tokenize) and the
clients need (contract.TextParams). A backbone without a text tower (DINOv2, NV-DINOv2) is refused.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.contract import EMBEDDINGS, ONNX_FILE, TOKENS, TextParams
from vitserve.errors import ConfigError, ExportError, ParityError
from vitserve.exporter.compare import compare_outputs, format_table
from vitserve.exporter.export import (
    PARITY_COSINE,
    _finalize_onnx,
    atomic_directory,
    export_record,
    library_versions,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

# Real sentences the parity check runs (and the tokenizer tests start from): short and long, punctuation,
# non-ASCII scripts, emoji, digits, and one longer than any context (truncated, ending with the end token).
PARITY_SENTENCES = (
    "a photo of a cat.",
    "A red double-decker bus drives past Big Ben on a rainy afternoon in London.",
    "two dogs playing with a frisbee on the beach at sunset",
    "Ein Foto von einem Hund, der über die Straße läuft.",
    "une tasse de café crème sur une table en bois à Paris",
    "東京の夜景と富士山の写真",
    "фотография космонавта на луне",
    "🚀 rocket launch at night 🌌✨",
    "a close-up photo of cells under a microscope, 400x magnification, H&E stain",
    "Q: what's in the picture?! A: 3 cats & 2 dogs -- really :)",
    " ".join(["a very long caption that keeps going"] * 20),
    "naïve café résumé coöperate façade jalapeño",
)
TEXT_PARITY_BATCH = 4


def require_text_tower(entry) -> None:
    """Refuse a backbone without a text tower (anything but open_clip's CLIP family), naming it."""
    if not entry.is_clip:
        raise ConfigError(
            f"{entry.name} ({entry.family}) has no text tower: text embeddings (text: true) need a CLIP-family "
            "backbone (open_clip ViT-*, EVA02-*); serve this backbone's image embeddings only (text: false)"
        )


def logit_scale(clip_model) -> float:
    """CLIP's learned temperature exp(logit_scale): the zero-shot logits' scale (heads.zeroshot_head)."""
    return float(clip_model.logit_scale.detach().exp()) if hasattr(clip_model, "logit_scale") else 100.0


def text_params(manifest: dict[str, Any]) -> TextParams:
    """NAME_text_tokenize's parameters from the text export's manifest (limits: the contract's defaults)."""
    t = manifest["tokenizer"]
    return TextParams(
        tokenizer=t["name"],
        context_length=int(t["context_length"]),
        logit_scale=float(manifest["logit_scale"]),
    )


def tokenize(tokenizer, texts: list[str] | tuple[str, ...], context_length: int) -> np.ndarray:
    """open_clip's tokens for `texts` as int64 [N, context_length] (what NAME_text_tokenize serves)."""
    return tokenizer(list(texts), context_length=context_length).numpy().astype(np.int64)


def _text_module(clip_model):
    """tokens -> normalize(clip_model.encode_text(tokens)): what is exported."""
    import torch.nn.functional as F
    from torch import nn

    class TextEncoder(nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, tokens):
            return F.normalize(self.clip.encode_text(tokens), dim=-1)

    return TextEncoder(clip_model).eval()


def _torch_export(module, path: Path, sample: np.ndarray, opset: int) -> None:
    import torch

    # Grad mode on while tracing: under no_grad, nn.MultiheadAttention takes its fused fast path
    # (aten::_native_multi_head_attention), which has no ONNX symbolic (as export._torch_export).
    with torch.inference_mode(False), torch.enable_grad():
        torch.onnx.export(
            module,
            (torch.from_numpy(sample),),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[TOKENS],
            output_names=[EMBEDDINGS],
            dynamic_axes={TOKENS: {0: "batch"}, EMBEDDINGS: {0: "batch"}},
            do_constant_folding=True,
        )


def random_tokens(tokenizer, count: int, context_length: int, seed: int = 0) -> np.ndarray:
    """`count` rows shaped like open_clip's tokens (start, random vocabulary ids, end, zero padding), of
    random lengths: inputs no sentence list covers."""
    rng = np.random.default_rng(seed)
    sot, eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
    vocab = int(getattr(tokenizer, "vocab_size", eot))
    out = np.zeros((count, context_length), np.int64)
    for i in range(count):
        n = int(rng.integers(1, context_length - 1))
        ids = rng.integers(1, min(vocab, sot), n)
        out[i, : n + 2] = [sot, *ids, eot]
    return out


def check_text_parity(
    module, onnx_path: Path, tokenizer, context_length: int, min_cosine: float = PARITY_COSINE
) -> dict[str, Any]:
    """PyTorch vs onnxruntime on PARITY_SENTENCES (batch 1 and > 1) and random token ids; raise ParityError
    below `min_cosine`, after reporting the worst error of every case."""
    import torch

    from vitserve.exporter import onnxrt

    session = onnxrt.cpu_session(onnx_path)
    sentences = tokenize(tokenizer, PARITY_SENTENCES, context_length)
    cases = {
        f"sentences (n={len(sentences)}, batch {TEXT_PARITY_BATCH})": (sentences, TEXT_PARITY_BATCH),
        "sentence (batch 1)": (sentences[1:2], 1),
        "random token ids (batch 3)": (random_tokens(tokenizer, 3, context_length), 3),
    }
    results, failures = {}, []
    for case, (x, batch) in cases.items():
        ref, got = [], []
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                ref.append(module(torch.from_numpy(x[i : i + batch])).float().numpy())
                got.append(session.run([EMBEDDINGS], {TOKENS: x[i : i + batch]})[0])
        m = compare_outputs({EMBEDDINGS: np.concatenate(ref)}, {EMBEDDINGS: np.concatenate(got)})[EMBEDDINGS]
        results[case] = m
        if "error" in m or m["cosine_min"] < min_cosine:
            failures.append(f"{case}: {m}")
    table = format_table(
        [{"case": c, **m} for c, m in results.items()],
        ["case", "cosine_min", "cosine_mean", "max_abs_err", "max_rel_err"],
    )
    if failures:
        raise ParityError(
            f"text ONNX model disagrees with open_clip's encode_text (cosine < {min_cosine}):\n"
            + "\n".join(failures)
            + f"\n{table}"
        )
    return {
        "threshold_cosine": min_cosine,
        "sentences": list(PARITY_SENTENCES),
        "cases": results,
        "table": table,
        "passed": True,
    }


def export_text(backbone: str, out_dir: str | Path, weights: str | None = "pretrained", opset: int = 17):
    """Export the text tower of CLIP backbone `backbone` to `out_dir/model.onnx` with a verified manifest;
    returns the manifest. `weights` as for export.export_model (the same weights give the same model)."""
    from vitserve.exporter.backbones import create_backbone, get_backbone

    entry = get_backbone(backbone)
    require_text_tower(entry)
    t0 = time.perf_counter()
    loaded = create_backbone(backbone, weights)
    clip, tokenizer = loaded.clip_model, loaded.tokenizer
    if clip is None or tokenizer is None or not hasattr(clip, "encode_text"):
        raise ConfigError(f"{entry.name}: the loaded model has no text tower (encode_text)")
    context_length = int(getattr(tokenizer, "context_length", None) or clip.context_length)
    module = _text_module(clip)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        raw_dir = tmp / "raw"
        raw_dir.mkdir()
        t_export = time.perf_counter()
        try:
            _torch_export(
                module, raw_dir / ONNX_FILE, tokenize(tokenizer, PARITY_SENTENCES[:2], context_length), opset
            )
            _finalize_onnx(raw_dir / ONNX_FILE, tmp / ONNX_FILE, simplify=False)
        except Exception as e:
            raise ExportError(
                f"ONNX export of {backbone}'s text tower failed: {type(e).__name__}: {e}"
            ) from e
        shutil.rmtree(raw_dir)
        export_s = time.perf_counter() - t_export
        parity = check_text_parity(module, tmp / ONNX_FILE, tokenizer, context_length)
        dim = int(
            module(__import__("torch").from_numpy(tokenize(tokenizer, ["a"], context_length))).shape[-1]
        )
        if dim != entry.feature_dim:
            raise ExportError(
                f"{entry.name}: text embeddings have {dim} dims but image embeddings {entry.feature_dim}; "
                "they would not share one space"
            )
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {
            "vitserve_manifest": 1,
            "tower": "text",
            "backbone": entry.name,
            "source": entry.source,
            "model_id": entry.model_id,
            "family": entry.family,
            "weights": loaded.weights.describe(),
            "random_init": loaded.weights.kind == "random",
            "tokenizer": {
                "name": entry.model_id,
                "class": type(tokenizer).__name__,
                "context_length": context_length,
            },
            "logit_scale": logit_scale(clip),
            "input": {"name": TOKENS, "shape": [-1, context_length], "dtype": "int64"},
            "outputs": [EMBEDDINGS],
            "feature_dim": dim,
            "opset": opset,
            **export_record(tmp, files, parity, export_s, t0),
        }
        write_manifest(tmp, manifest)
        log.info("text parity %s (PASSED):\n%s", entry.name, parity["table"])
    manifest["parity_table"] = parity["table"]
    return manifest


def text_export_key(backbone: str, weights: str) -> str:
    """What defines the text export: the backbone and its weights (a checkpoint's bytes and the config
    files next to it; random init's seed); heads and labels do not change the text tower."""
    from vitserve.exporter import backbones
    from vitserve.exporter.identity import artifact_key

    parts: dict[str, Any] = {"backbone": backbone, **backbones.weights_identity(weights)}
    return artifact_key("text-export", **parts)


def text_export_stage(spec, model_dir: Path, random_init: bool) -> tuple[Path, dict[str, Any]]:
    """The FP32 text export of `spec` in `model_dir/text/fp32`, reused while its key is unchanged."""
    weights = "random" if random_init else spec.weights
    key = text_export_key(spec.backbone, weights)
    fp32 = model_dir / "text" / "fp32"
    if (fp32 / "manifest.json").exists():
        manifest = read_manifest(fp32)
        if manifest.get("build_key") == key and (fp32 / ONNX_FILE).exists():
            log.info("%s: text export unchanged (key %s), reusing %s", spec.name, key, fp32)
            return fp32, manifest
    manifest = export_text(spec.backbone, fp32, weights=weights)
    print(
        f"[{spec.name}] text export parity (open_clip encode_text vs onnxruntime):\n{manifest.pop('parity_table')}"
    )
    manifest["build_key"] = key
    write_manifest(fp32, manifest)
    return fp32, manifest


# ------------------------------------------------------------------------------- precision variants

# Calibration sentences of the FP16 range check and INT8 Q/DQ (captions and prompts, none of them among the
# held-out PARITY_SENTENCES the variants are scored on).
CALIBRATION_SENTENCES = (
    "a photo of a dog.",
    "a bad photo of a car.",
    "a photo of the large rocket.",
    "a cropped photo of a woman.",
    "a close-up photo of a flower.",
    "a bright photo of a bird.",
    "a photo of a nice motorcycle.",
    "a photo of the small cup of coffee.",
    "a man riding a wave on top of a surfboard",
    "a plate of food with broccoli, rice and chicken",
    "a living room with a couch, a television and a lamp",
    "a group of people standing around a kitchen island",
    "a black and white cat sleeping on a laptop keyboard",
    "a train traveling down tracks next to a forest",
    "an aerial view of a city at night with lit streets",
    "a child holding an umbrella in the rain",
    "a bowl of ramen with an egg and green onions",
    "a satellite image of farmland and rivers",
    "a histology slide stained with hematoxylin and eosin",
    "a red stop sign on a snowy street corner",
    "eine Katze sitzt auf dem Fensterbrett",
    "un perro corriendo en el parque",
    "夕焼けの海と砂浜",
    "кошка на диване",
    "🐶🐱 pets 🐾",
    "screenshot of a spreadsheet with charts",
    "a vintage poster advertising a circus, 1920s",
    "macro photograph of a bee on a sunflower",
    "two giraffes standing in a savanna under a blue sky",
    "a hand-drawn sketch of a castle",
    "people waiting at a bus stop, blurry motion",
    " ".join(["an extremely long description of a busy market street with many stalls"] * 8),
)
TEXT_VARIANTS = ("fp16", "int8")  # models.yaml precisions the text tower is built in besides fp32
TEXT_VARIANT_REPORT = "variant.json"


def _text_fidelity(fp32: Path, variant: Path, held_out: np.ndarray) -> dict[str, Any]:
    """The variant vs FP32 on held-out tokens, scored independently of this CPU's int8 kernels
    (onnxrt.exact_session: Q/DQ as fake quantization), FP16 parts at ORT_ENABLE_EXTENDED."""
    from vitserve.exporter import onnxrt

    ref = onnxrt.cpu_session(fp32).run([EMBEDDINGS], {TOKENS: held_out})[0]
    t0 = time.perf_counter()
    session, how = onnxrt.exact_session(variant, optimization="extended")
    got = session.run([EMBEDDINGS], {TOKENS: held_out})[0]
    return {
        "evaluator": f"onnxruntime CPUExecutionProvider, graph optimization EXTENDED, {how}",
        "hardware_independent": True,
        "sentences": len(held_out),
        "seconds": round(time.perf_counter() - t0, 2),
        "outputs": compare_outputs({EMBEDDINGS: ref}, {EMBEDDINGS: got}),
    }


def make_text_variant(precision, fp32_dir: Path, out_dir: Path, gates) -> dict[str, Any]:
    """The FP16 (AutoCast, LayerNorm/Softmax/L2 norm and out-of-range nodes kept FP32) or INT8 (ModelOpt
    explicit Q/DQ, attention matmuls unquantized, rest FP16) text tower from the FP32 export in `fp32_dir`
    into `out_dir`, calibrated on CALIBRATION_SENTENCES, scored against FP32 on the held-out sentences and
    random token ids, gated like the image side (`precision.check_gate`); returns the report (also
    `out_dir/variant.json`), reused while its key is unchanged."""
    import json

    import open_clip

    from vitserve.contract import Precision
    from vitserve.exporter.identity import artifact_key
    from vitserve.exporter.precision import (
        FP16_DATA_MAX,
        FP16_KEEP_OP_TYPES,
        _exact,
        attention_matmuls,
        check_gate,
        running_modelopt,
        save_onnx,
    )

    precision = Precision(precision)
    if precision.value not in TEXT_VARIANTS:
        raise ConfigError(f"text variant {precision.value!r}: the text tower is built in {TEXT_VARIANTS}")
    manifest = read_manifest(fp32_dir)
    fp32 = fp32_dir / ONNX_FILE
    t = manifest["tokenizer"]
    tokenizer = open_clip.get_tokenizer(t["name"], context_length=t["context_length"])
    calib = tokenize(tokenizer, CALIBRATION_SENTENCES, t["context_length"])
    held_out = np.concatenate(
        [
            tokenize(tokenizer, PARITY_SENTENCES, t["context_length"]),
            random_tokens(tokenizer, 4, t["context_length"]),
        ]
    )
    settings = {"keep": FP16_KEEP_OP_TYPES, "data_max": FP16_DATA_MAX}
    if precision is Precision.INT8:
        settings |= {"method": "max", "excluded": "attention matmuls", "high_precision_dtype": "fp16"}
    key = artifact_key(
        f"text-variant-{precision.value}",
        models={"fp32": fp32},
        calibration=calib.tolist(),
        held_out=held_out.tolist(),
        settings=settings,
        versions=library_versions(),
    )
    cached = out_dir / TEXT_VARIANT_REPORT
    if cached.is_file() and (out_dir / ONNX_FILE).is_file():
        report = json.loads(cached.read_text())
        if report.get("key") == key:
            report["passed"], report["gate"] = check_gate(precision, report["fidelity"], gates)
            report["onnx"] = str(out_dir / ONNX_FILE)  # where it is now (the artifacts may have moved)
            return report
    t0 = time.perf_counter()
    with atomic_directory(out_dir) as tmp, tempfile.TemporaryDirectory(dir=out_dir.parent) as work:
        dst = tmp / ONNX_FILE
        # ModelOpt rewrites its input in place (as precision.make_variant found): it gets a private copy, so
        # the FP32 export stays byte-identical to its manifest (and to the repository's hard link of it).
        src = Path(work) / ONNX_FILE
        for f in fp32_dir.iterdir():
            if f.name.startswith(ONNX_FILE):
                shutil.copy2(f, Path(work) / f.name)
        if precision is Precision.FP16:
            from modelopt.onnx.autocast import convert_to_mixed_precision

            np.savez(Path(work) / "calibration.npz", **{TOKENS: calib})
            with running_modelopt():
                model = convert_to_mixed_precision(
                    onnx_path=str(src),
                    low_precision_type="fp16",
                    keep_io_types=True,
                    op_types_to_exclude=FP16_KEEP_OP_TYPES,
                    data_max=FP16_DATA_MAX,  # AutoCast's own range check, on the calibration sentences
                    calibration_data=str(Path(work) / "calibration.npz"),
                    providers=["cpu"],
                )
            save_onnx(model, dst)
            del model
            made = {"autocast": "fp16", "kept_op_types": FP16_KEEP_OP_TYPES, "data_max": FP16_DATA_MAX}
        else:
            from modelopt.onnx.quantization import quantize

            excluded = attention_matmuls(src)
            with running_modelopt():
                quantize(
                    onnx_path=str(src),
                    quantize_mode="int8",
                    calibration_data={TOKENS: calib},
                    calibration_method="max",
                    calibration_eps=["cpu"],
                    nodes_to_exclude=[_exact(n) for n in excluded],
                    high_precision_dtype="fp16",
                    op_types_to_exclude_fp16=FP16_KEEP_OP_TYPES,
                    output_path=str(dst),
                    log_level="WARNING",
                )
            made = {
                "method": "max",
                "excluded_attention_matmuls": len(excluded),
                "high_precision_dtype": "fp16",
            }
        report = {
            "precision": precision.value,
            "tower": "text",
            "key": key,
            "onnx": str(out_dir / ONNX_FILE),
            "calibration_sentences": len(calib),
            "made": made,
            "seconds": round(time.perf_counter() - t0, 2),
            "fidelity": _text_fidelity(fp32, dst, held_out),
        }
        report["passed"], report["gate"] = check_gate(precision, report["fidelity"], gates)
        (tmp / TEXT_VARIANT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
