"""`make engines`: every model of models.yaml through every stage, into one Triton model repository.

export (fp32 ONNX, parity-checked) -> precision variants (fp16 / int8 / cpu-int8, fidelity-gated) ->
engines (TensorRT plans where TensorRT exists, build.sh everywhere) -> repository.

Unchanged inputs are not rebuilt: the export is keyed by a hash of what defines it, the quantized models
by a hash of (model, images, settings). The repository is written next to the old one and swapped in
only when complete, so an interrupted build leaves the previous repository intact and loadable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitserve.errors import ExportError
from vitserve.exporter.config import Kind, ModelSpec, Precision, load_models
from vitserve.exporter.export import EXTERNAL_DATA_NAME, LABELS_NAME, ONNX_NAME, export_model, read_manifest
from vitserve.exporter.repository import REPOSITORY_MANIFEST, Variant, backbone_model_name, write_model

log = logging.getLogger(__name__)


def _file_digest(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_key(spec: ModelSpec, weights: str, labels: Path | None) -> str:
    """What defines the FP32 export: backbone, weights, head (and its file's bytes), labels."""
    head_file = spec.head.partition(":")[2] or None
    parts = {
        "backbone": spec.backbone,
        "weights": weights,
        "weights_sha": _file_digest(weights),
        "head": spec.head.partition(":")[0],
        "head_sha": _file_digest(head_file),
        "labels_sha": _file_digest(str(labels) if labels else None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _labels_file(spec: ModelSpec, model_dir: Path) -> Path | None:
    if spec.labels is None:
        return None
    if isinstance(spec.labels, tuple | list):
        path = model_dir / "labels.in.txt"
        text = "\n".join(spec.labels) + "\n"
        if not path.exists() or path.read_text() != text:
            model_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return path
    return Path(spec.labels)


def export_stage(spec: ModelSpec, model_dir: Path, random_init: bool) -> tuple[Path, dict[str, Any]]:
    """The FP32 export of `spec` in `model_dir/fp32`, reused when its key is unchanged."""
    weights = "random" if random_init else spec.weights
    labels = _labels_file(spec, model_dir)
    key = export_key(spec, weights, labels)
    fp32 = model_dir / "fp32"
    if (fp32 / "manifest.json").exists():
        manifest = read_manifest(fp32)
        if manifest.get("build_key") == key and (fp32 / ONNX_NAME).exists():
            log.info("%s: export unchanged (key %s), reusing %s", spec.name, key, fp32)
            return fp32, manifest
    manifest = export_model(spec.backbone, fp32, weights=weights, head=spec.head, labels=labels)
    print(f"[{spec.name}] export parity (PyTorch vs onnxruntime):\n{manifest.pop('parity_table')}")
    manifest["build_key"] = key
    from vitserve.exporter.export import write_manifest

    write_manifest(fp32, manifest)
    return fp32, manifest


def build_model(spec: ModelSpec, artifacts: Path, random_init: bool = False) -> dict[str, Any]:
    """Export and make the precision variants of one model; returns its build record."""
    from vitserve.exporter.precision import make_variant

    model_dir = artifacts / spec.name
    fp32_dir, manifest = export_stage(spec, model_dir, random_init)
    ext = fp32_dir / EXTERNAL_DATA_NAME
    onnx_by_precision: dict[Precision, tuple[Path, Path | None]] = {
        Precision.FP32: (fp32_dir / ONNX_NAME, ext if ext.exists() else None)
    }
    fidelity: dict[str, Any] = {}
    for precision in spec.precisions:
        if precision is Precision.FP32:
            continue
        report = make_variant(precision, fp32_dir, model_dir / precision.value, spec, spec.cpu_int8_mode)
        fidelity[precision.value] = report
        if report["passed"] or spec.force:
            if not report["passed"]:
                print(
                    f"[{spec.name}] WARNING: {precision.value} failed its gate but is published (force: true)"
                )
            onnx_by_precision[precision] = (Path(report["onnx"]), None)
        else:
            print(
                f"[{spec.name}] {precision.value} failed its fidelity gate and is NOT published: {report['gate']}"
            )
    if fidelity:
        from vitserve.exporter.precision import fidelity_table

        print(f"[{spec.name}] fidelity vs FP32 on held-out photos:\n{fidelity_table(fidelity)}")
    variants = [
        Variant(p, k, onnx, data)
        for k in spec.kinds
        for p, (onnx, data) in onnx_by_precision.items()
        if p is not Precision.CPU_INT8 or k is Kind.CPU
    ]
    return {
        "spec": spec,
        "fp32_dir": fp32_dir,
        "manifest": manifest,
        "variants": variants,
        "fidelity": fidelity,
    }


def engine_stage(record: dict[str, Any], repo: Path) -> dict[str, Any]:
    """Build the TensorRT plans of a model's `tensorrt` variants (or their build.sh when TensorRT is
    unavailable); returns engine metadata by Triton model name."""
    from vitserve.exporter.engine import EngineSettings, build_engine, tensorrt_unavailable_reason

    spec, manifest = record["spec"], record["manifest"]
    size = manifest["input"]["shape"][2]
    reason = tensorrt_unavailable_reason()
    engines: dict[str, Any] = {}
    for v in record["variants"]:
        if v.kind is not Kind.TENSORRT:
            continue
        name = backbone_model_name(spec.name, v.precision, v.kind)
        plan = repo / name / "1" / "model.plan"
        settings = EngineSettings(profile=spec.profile, timing_cache=repo / name / "timing.cache")
        onnx = repo / name / "onnx" / ONNX_NAME
        if reason is None:
            engines[name] = build_engine(
                onnx, plan, "pixel_values", (3, size, size), settings, max_batch_size=spec.profile.max
            )
            engines[name]["fidelity"] = verify_engine(plan, record, v.precision)
        else:
            from vitserve.exporter.engine import write_build_script

            write_build_script(plan.parent, onnx, plan, "pixel_values", (3, size, size), settings)
            engines[name] = {"built": False, "build_script": f"{name}/1/build.sh", "reason": reason}
    return engines


def verify_engine(plan: Path, record: dict[str, Any], precision: Precision) -> dict[str, Any]:
    """The engine against the FP32 ONNX (onnxruntime) on the held-out photos, with the variant's gate:
    the same metrics as the precision stage's fidelity report, in batches within the profile."""
    import numpy as np

    from vitserve.exporter import onnxrt
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.compare import compare_outputs, concat_outputs
    from vitserve.exporter.engine import run_engine
    from vitserve.exporter.precision import check_gate, eval_pixels

    spec = record["spec"]
    _, pixels = eval_pixels(get_backbone(record["manifest"]["backbone"]))
    ref = onnxrt.run(onnxrt.cpu_session(record["fp32_dir"] / ONNX_NAME), pixels)
    step = spec.profile.max
    chunks = [
        run_engine(plan, np.ascontiguousarray(pixels[i : i + step])) for i in range(0, len(pixels), step)
    ]
    got = concat_outputs(chunks)
    report = {
        "evaluator": "TensorRT engine (run_engine) vs FP32 ONNX on onnxruntime CPU",
        "images": len(pixels),
        "outputs": compare_outputs(ref, {k: got[k].astype(np.float32) for k in ref}),
    }
    gate_precision = Precision.FP16 if precision is Precision.FP32 else precision
    report["passed"], report["gate"] = check_gate(gate_precision, report, spec.gates)
    print(f"[{spec.name}] engine {plan.parent.parent.name}: {report['gate']}")
    return report


def build_all(
    config: str | Path,
    repository: str | Path = "model_repository",
    artifacts: str | Path = "artifacts",
    random_init: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Build every model of `config` into `repository` (replaced atomically when the build is whole)."""
    specs = load_models(config)
    if only:
        unknown = set(only) - {s.name for s in specs}
        if unknown:
            raise ExportError(
                f"--only {sorted(unknown)}: not in {config} (models: {[s.name for s in specs]})"
            )
        specs = [s for s in specs if s.name in only]
    if random_init:
        print("WARNING: --random-init: every model gets RANDOM, UNTRAINED weights; outputs are meaningless.")
    artifacts, repository = Path(artifacts), Path(repository)
    records = [build_model(spec, artifacts, random_init) for spec in specs]
    repository.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(repository)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}.tmp-{os.getpid()}-", dir=repository.parent))
    staging.chmod(0o755)
    try:
        summary: dict[str, Any] = {"models": {}}
        engines_missing: list[str] = []
        for rec in records:
            spec = rec["spec"]
            labels = rec["fp32_dir"] / LABELS_NAME
            written = write_model(
                staging,
                spec,
                rec["manifest"],
                rec["variants"],
                labels if labels.exists() else None,
            )
            engines = engine_stage(rec, staging)
            engines_missing += [
                f"{staging.name}/{e['build_script']}" for e in engines.values() if not e.get("built", True)
            ]
            summary["models"][spec.name] = {
                "config": {k: v for k, v in asdict(spec).items() if k != "gates"}
                | {"gates": asdict(spec.gates)},
                "export": {
                    k: rec["manifest"].get(k)
                    for k in ("backbone", "weights", "random_init", "feature_dim", "build_key")
                },
                "fidelity": rec["fidelity"],
                "triton_models": written,
                "engines": engines,
            }
        (staging / REPOSITORY_MANIFEST).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        readme = repository / "README.md"
        if readme.exists():
            shutil.copy2(readme, staging / "README.md")
        _swap(staging, repository)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if engines_missing:
        from vitserve.exporter.engine import tensorrt_unavailable_reason

        print(
            f"NOTE: TensorRT engines were NOT built ({tensorrt_unavailable_reason()}). The FP16/INT8 ONNX "
            f"and a build.sh per engine are in the repository; run each inside the NGC Triton container on "
            f"the target GPU: " + ", ".join(s.replace(staging.name, str(repository)) for s in engines_missing)
        )
    print(
        f"repository {repository}: "
        + ", ".join(m for rec in summary["models"].values() for m in rec["triton_models"])
    )
    return summary


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap(staging: Path, repository: Path) -> None:
    """Put `staging` in place of `repository`: one atomic exchange, so that at every instant one whole
    repository is at that path; two renames (with a short gap) where the exchange is unsupported."""
    if not repository.exists():
        staging.rename(repository)
        return
    if _exchange(staging, repository):
        shutil.rmtree(staging, ignore_errors=True)  # now the old repository
        return
    old = repository.parent / f".{repository.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    repository.rename(old)
    staging.rename(repository)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_staging(repository: Path) -> None:
    """Staging folders of builds that were killed (their pid is gone) are removed."""
    for stale in repository.parent.glob(f".{repository.name}.tmp-*"):
        pid = stale.name.removeprefix(f".{repository.name}.tmp-").split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            shutil.rmtree(stale, ignore_errors=True)
