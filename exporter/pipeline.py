"""`make engines`: every model of models.yaml through every stage, into one Triton model repository.

export (fp32 ONNX, parity-checked) -> precision variants (fp16 / int8 / cpu-int8, fidelity-gated) ->
engines (TensorRT plans where TensorRT exists, build.sh everywhere) -> repository.

Unchanged inputs are not rebuilt: every artifact is keyed by `identity.artifact_key` over what makes it:
the export by (backbone, weights and their config files, head, labels), the quantized models by (the FP32
model's files, graph and external data, the images, the pixel recipe, settings), TensorRT plans
(artifacts/engines) by (the ONNX's files, TensorRT version, compute capability, profile, builder options). A plan that fails verification against FP32 is
withheld (unless `force`) and the ensemble routes to the best one that passed. The repository is written
next to the old one and swapped in only when complete, so an interrupted build leaves the previous
repository intact and loadable.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vitserve.contract import (
    PIXELS,
    backbone_model_name,
    head_ensemble_name,
    preprocess_model_name,
)
from vitserve.errors import ConfigError, ExportError
from vitserve.exporter.config import Kind, ModelSpec, Precision, check_pretrained_tags, load_models
from vitserve.exporter.export import (
    EXTERNAL_DATA_NAME,
    LABELS_NAME,
    ONNX_NAME,
    export_model,
    labels_file,
    read_manifest,
)
from vitserve.exporter.identity import sha256_file
from vitserve.exporter.repository import REPOSITORY_MANIFEST, WARMUP_FILE, Variant, write_model

log = logging.getLogger(__name__)


def export_key(spec: ModelSpec, weights: str, labels: Path | None) -> str:
    """What defines the FP32 export: backbone, weights (a checkpoint's bytes and the config files next to
    it, which choose its architecture and pixel recipe; random init's seed), head (and its file's bytes),
    labels."""
    from vitserve.exporter import backbones
    from vitserve.exporter.identity import artifact_key, file_digest

    head_file = spec.head.partition(":")[2] or None
    parts: dict[str, Any] = {
        "backbone": spec.backbone,
        **backbones.weights_identity(weights),
        "head": spec.head.partition(":")[0],
        "head_sha": file_digest(head_file),
        "labels_sha": file_digest(str(labels) if labels else None),
    }
    if spec.heads:  # a backbone shared by heads outputs features; the heads themselves are not in the key
        parts["outputs"] = "embeddings+features"
    return artifact_key("export", **parts)


def export_stage(spec: ModelSpec, model_dir: Path, random_init: bool) -> tuple[Path, dict[str, Any]]:
    """The FP32 export of `spec` in `model_dir/fp32`, reused when its key is unchanged."""
    weights = "random" if random_init else spec.weights
    labels = labels_file(spec.labels, model_dir / "labels.in.txt")
    key = export_key(spec, weights, labels)
    fp32 = model_dir / "fp32"
    if (fp32 / "manifest.json").exists():
        manifest = read_manifest(fp32)
        if manifest.get("build_key") == key and (fp32 / ONNX_NAME).exists():
            log.info("%s: export unchanged (key %s), reusing %s", spec.name, key, fp32)
            return fp32, manifest
    manifest = export_model(
        spec.backbone, fp32, weights=weights, head=spec.head, labels=labels, features=bool(spec.heads)
    )
    print(f"[{spec.name}] export parity (PyTorch vs onnxruntime):\n{manifest.pop('parity_table')}")
    manifest["build_key"] = key
    from vitserve.exporter.export import write_manifest

    write_manifest(fp32, manifest)
    return fp32, manifest


# What making one variant of an FP32 export holds in memory at its peak, as a multiple of the export's size:
# ModelOpt's INT8 quantization, the largest, peaked at 4.9 GB RSS for ViT-B-32's 335 MiB export (14.7x).
# Variants are made at once only where that many fit in the memory available.
VARIANT_MEMORY_FACTOR = 15
BUILD_JOBS_ENV = "VITSERVE_BUILD_JOBS"


def variant_jobs(setting: int | str | None, fp32_bytes: int, variants: int) -> tuple[int, str]:
    """How many precision variants to make at once, and why. `setting` (`vitserve build --jobs`, else
    $VITSERVE_BUILD_JOBS): a number is taken as it is; "auto" (default): one per usable core, as many as
    fit in the available memory at VARIANT_MEMORY_FACTOR x the FP32 export each, at most `variants`."""
    from vitserve.exporter.triton_models.onnx_cpu import usable_cores

    setting = setting if setting is not None else os.environ.get(BUILD_JOBS_ENV) or "auto"
    if str(setting) != "auto":
        try:
            n = int(setting)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(
                f"build jobs {setting!r}: expected a positive number or 'auto' (--jobs, ${BUILD_JOBS_ENV})"
            )
        return min(n, max(variants, 1)), f"jobs {n} (asked for)"
    cores = usable_cores()
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fit = max(1, avail // max(1, VARIANT_MEMORY_FACTOR * fp32_bytes))
    n = max(1, min(cores, fit, variants))
    return n, (
        f"jobs {n} (auto: {cores} usable core(s), {avail / 2**30:.1f} GiB available fits {fit} at "
        f"{VARIANT_MEMORY_FACTOR} x the {fp32_bytes / 2**20:.0f} MiB FP32 export each, {variants} variant(s))"
    )


def _die_with_parent() -> None:
    """Worker initializer: a variant worker is killed with the build that started it (Linux), so a killed
    build leaves no process writing into its artifacts."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def make_variants(
    spec: ModelSpec, fp32_dir: Path, model_dir: Path, jobs: int | str | None = None
) -> dict[Precision, dict[str, Any]]:
    """Every precision variant of `spec` but FP32 (precision.make_variant, each into `model_dir/PRECISION`),
    in `spec.precisions` order; those whose key is unchanged are reused as they are. With more than one job
    (`variant_jobs`) the others are made at once in worker processes, the slowest (INT8: ModelOpt's Q/DQ)
    first: on 2 cores the test suite's ViT-B-32 build (export, fp16, int8, bf16 and cpu-int8 variants,
    repository) took 233 s against 331 s one after another. Each variant writes only its own folder
    (atomically) and its key decides reuse, so a variant is the same made either way (tests/test_build_jobs.py)."""
    from vitserve.exporter.precision import calibration_files, make_variant

    precisions = [p for p in spec.precisions if p is not Precision.FP32]
    mode = spec.cpu_int8_mode
    reports = {
        p: make_variant(p, fp32_dir, model_dir / p.value, spec, mode, cached_only=True) for p in precisions
    }
    todo = [p for p in precisions if reports[p] is None]
    size = sum(f.stat().st_size for f in fp32_dir.iterdir() if f.name.startswith(ONNX_NAME))
    n, why = variant_jobs(jobs, size, len(todo))
    if n < 2:
        return {
            p: reports[p] or make_variant(p, fp32_dir, model_dir / p.value, spec, mode) for p in precisions
        }
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    print(f"[{spec.name}] making {len(todo)} variants at once: {why}")
    calibration_files(spec.calibration, model_dir)  # written once, before the workers read them
    order = sorted(todo, key=lambda p: p is not Precision.INT8)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch/onnxruntime threads
    with ProcessPoolExecutor(n, mp_context=ctx, initializer=_die_with_parent) as pool:
        futures = {p: pool.submit(make_variant, p, fp32_dir, model_dir / p.value, spec, mode) for p in order}
        return {p: reports[p] or futures[p].result() for p in precisions}


def build_model(
    spec: ModelSpec, artifacts: Path, random_init: bool = False, jobs: int | str | None = None
) -> dict[str, Any]:
    """Export and make the precision variants of one model (`jobs` at once, see `variant_jobs`); returns its
    build record."""
    model_dir = artifacts / spec.name
    fp32_dir, manifest = export_stage(spec, model_dir, random_init)
    ext = fp32_dir / EXTERNAL_DATA_NAME
    onnx_by_precision: dict[Precision, tuple[Path, Path | None]] = {
        Precision.FP32: (fp32_dir / ONNX_NAME, ext if ext.exists() else None)
    }
    fidelity: dict[str, Any] = {}
    cpu_int8_flavours: tuple[tuple[str, Path], ...] = ()
    reports = make_variants(spec, fp32_dir, model_dir, jobs)
    for precision, report in reports.items():
        fidelity[precision.value] = report
        if report["passed"] or spec.force:
            if not report["passed"]:
                print(
                    f"[{spec.name}] WARNING: {precision.value} failed its gate but is published (force: true)"
                )
            variant_onnx = Path(report["onnx"])
            data = variant_onnx.with_name(variant_onnx.name + ".data")  # FP16 past 1 GiB (save_onnx)
            onnx_by_precision[precision] = (variant_onnx, data if data.exists() else None)
            if precision is Precision.CPU_INT8:
                cpu_int8_flavours = _flavour_files(report, variant_onnx.parent)
        else:
            print(
                f"[{spec.name}] {precision.value} failed its fidelity gate and is NOT published: {report['gate']}"
            )
    if fidelity:
        from vitserve.exporter.precision import fidelity_table

        print(f"[{spec.name}] fidelity vs FP32 on held-out photos:\n{fidelity_table(fidelity)}")
    heads, head_fidelity = {}, {}
    if spec.heads:  # models.yaml `heads:` (exporter/multihead.py); a variant a head fails is not published
        from vitserve.exporter import multihead

        weights = "random" if random_init else spec.weights
        heads = multihead.build_heads(spec, fp32_dir, manifest, model_dir, weights)
        others: dict[Precision, Any] = {
            p: o for p, (o, _) in onnx_by_precision.items() if p is not Precision.FP32
        }
        if Precision.CPU_INT8 in others:  # every flavour that can serve is run with the heads
            others[Precision.CPU_INT8] = {k: f for k, f in cpu_int8_flavours if k != "probe"}
        head_fidelity = multihead.head_fidelity(spec, heads, fp32_dir, others, model_dir)
        for p in multihead.gate_heads(spec, head_fidelity, fidelity):
            onnx_by_precision.pop(p)
        if Precision.CPU_INT8 in onnx_by_precision:  # less the flavours a head failed
            report = fidelity[Precision.CPU_INT8.value]
            cpu_int8_flavours = _flavour_files(report, Path(report["onnx"]).parent)
    # The CPU kind serves what is worth serving on a CPU (cpu_precisions: fp32, int8 and bf16 by default),
    # each with its flavours (cpu_flavours); the GPU kinds serve what they can run (never cpu-int8, bf16).
    from vitserve.exporter.config import KIND_PRECISIONS

    variants = [
        Variant(
            p,
            k,
            onnx,
            data,
            cpu_flavours(
                p, model_dir, fidelity, onnx_by_precision[Precision.FP32][0], cpu_int8_flavours, spec
            )
            if k is Kind.CPU
            else (),
        )
        for k in spec.kinds
        for p, (onnx, data) in onnx_by_precision.items()
        if (p in spec.cpu_precisions if k is Kind.CPU else p in KIND_PRECISIONS[k])
    ]
    return {
        "spec": spec,
        "fp32_dir": fp32_dir,
        "manifest": manifest,
        "variants": variants,
        "fidelity": fidelity,
        "heads": heads,
        "head_fidelity": head_fidelity,
        "text": text_stage(spec, model_dir, random_init) if spec.text else None,
    }


def text_stage(spec: ModelSpec, model_dir: Path, random_init: bool) -> dict[str, Any]:
    """`text: true`: the text tower's FP32 export (exporter/text.py, parity-checked, keyed), its FP16/INT8
    variants where `precisions` asks for them (fidelity-gated), and the variants the repository serves: FP32
    on every cpu/onnxruntime kind of the model, FP16/INT8 that passed their gate on the onnxruntime kind
    (the CPU kind serves the text tower in FP32 only: the same embedding for a string alone or in a batch)."""
    from vitserve.exporter.text import TEXT_VARIANTS, make_text_variant, text_export_stage, text_params

    fp32_dir, manifest = text_export_stage(spec, model_dir, random_init)
    ext = fp32_dir / EXTERNAL_DATA_NAME
    onnx, data = fp32_dir / ONNX_NAME, (ext if ext.exists() else None)
    kinds = [k for k in spec.kinds if k is not Kind.TENSORRT]  # at least one (ModelSpec checks it)
    variants = [Variant(Precision.FP32, k, onnx, data) for k in kinds]
    fidelity: dict[str, Any] = {}
    for precision in (p for p in spec.precisions if p.value in TEXT_VARIANTS):
        report = make_text_variant(precision, fp32_dir, model_dir / "text" / precision.value, spec.gates)
        fidelity[precision.value] = report
        published = report["passed"] or spec.force
        print(
            f"[{spec.name}] text {precision.value}: {report['gate']}"
            + ("" if published else " (NOT published)")
        )
        if published and Kind.ONNXRUNTIME in kinds:
            variant_onnx = Path(report["onnx"])
            vdata = variant_onnx.with_name(variant_onnx.name + ".data")
            variants.append(
                Variant(precision, Kind.ONNXRUNTIME, variant_onnx, vdata if vdata.exists() else None)
            )
    return {
        "fp32_dir": fp32_dir,
        "manifest": manifest,
        "params": text_params(manifest),
        "variants": variants,
        "fidelity": fidelity,
    }


def cpu_flavours(
    precision: Precision,
    model_dir: Path,
    fidelity: dict[str, Any],
    fp32: Path,
    cpu_int8: tuple[tuple[str, Path], ...],
    spec: ModelSpec,
) -> tuple[tuple[str, Path], ...]:
    """(flavour, source file) of a CPU variant, plus ("probe", file): its own engines (OpenVINO on the Q/DQ
    INT8 ONNX, OpenVINO BF16, the cpu-int8 flavours), then the FP32 ones every CPU model falls back to
    (onnx_cpu.py tries them in the host's order; repository.py names the files in the model's folder)."""
    from vitserve.contract import FP32_FLAVOURS, OPENVINO_BF16, OPENVINO_INT8
    from vitserve.exporter.precision import PROBE_NAME, fp32_probe

    if precision is Precision.FP16:  # onnxruntime's FP16 kernels, no flavours (listed in cpu_precisions only)
        return ()
    fp32_only = tuple((f, fp32) for f in FP32_FLAVOURS)
    if precision is Precision.FP32:
        return (*fp32_only, ("probe", fp32_probe(fp32.parent, model_dir / "fp32-probe", spec)))
    if precision is Precision.CPU_INT8:
        return (
            *(f for f in cpu_int8 if f[0] != "probe"),
            *fp32_only,
            *(f for f in cpu_int8 if f[0] == "probe"),
        )
    report = fidelity[precision.value]
    probe = Path(report.get("emulation") or report["onnx"]).parent
    own = {Precision.INT8: OPENVINO_INT8, Precision.BF16: OPENVINO_BF16}[precision]
    report_onnx = Path(report["onnx"])
    # INT8: the per-token cpu-int8 flavours beside the Q/DQ model, for hosts where OpenVINO's int8 kernels
    # do not fit it (AVX2); not for a many-heads model, whose heads are gated on the Q/DQ model only
    token = (
        ()
        if spec.heads or "cpu_int8" not in report
        else _flavour_files(report["cpu_int8"], probe / report["cpu_int8"]["folder"])
    )
    token = tuple(f for f in token if f[0] != "probe")
    return ((own, report_onnx), *token, *fp32_only, ("probe", probe / PROBE_NAME))


def _flavour_files(report: dict[str, Any], folder: Path) -> tuple[tuple[str, Path], ...]:
    """(flavour, file) of each published cpu-int8 flavour, plus ("probe", file) of the load-time probe."""
    from vitserve.exporter.precision import PROBE_NAME

    published = report.get("published_flavours") or list(report["flavours"])
    files = tuple((k, folder / report["flavours"][k]["file"]) for k in published)
    return (*files, ("probe", folder / PROBE_NAME))


VERIFY_SET = "verify.npz"  # held-out photos as pixel_values + the FP32 outputs, in each *_tensorrt model
VERIFY_IMAGES = 32  # views of the held-out photos in it


def write_verify_set(record: dict[str, Any], model_dir: Path) -> Path:
    """`model_dir/verify.npz`: the held-out photos as pixels made with the model's one recipe
    (`spec.served_preprocess(manifest)`: what the served preprocess model sends) and the FP32 ONNX's
    outputs on them (`ref_<output>`), so plans can be verified where only TensorRT is installed (the
    serving image). Reused while its key (the FP32 model's files, the recipe) is unchanged."""
    import numpy as np

    from vitserve.exporter import onnxrt
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.identity import artifact_key
    from vitserve.exporter.precision import eval_pixels

    manifest, fp32 = record["manifest"], record["fp32_dir"] / ONNX_NAME
    recipe = record["spec"].served_preprocess(manifest)
    key = artifact_key("verify-set", models={"fp32": fp32}, recipe=recipe, count=VERIFY_IMAGES)
    path = model_dir / VERIFY_SET
    if path.is_file():
        with np.load(path) as old:
            if "key" in old.files and str(old["key"]) == key:
                return path
    names, pixels = eval_pixels(get_backbone(manifest["backbone"]), recipe, VERIFY_IMAGES)
    ref = onnxrt.run(onnxrt.cpu_session(fp32), pixels)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{VERIFY_SET}.tmp-{os.getpid()}.npz"
    np.savez(
        tmp,
        pixels=pixels.astype(np.float32),
        key=np.array(key),
        names=np.array(names),
        **{f"ref_{k}": v for k, v in ref.items()},
    )
    tmp.replace(path)
    return path


def write_warmup_input(verify: Path, model_dir: Path) -> Path:
    """`model_dir/warmup/pixel_values.bin`: the first held-out photo, preprocessed (Triton's warmup
    `input_data_file`; Triton repeats it over the warmup batch)."""
    import numpy as np

    with np.load(verify) as data:
        photo = np.ascontiguousarray(data["pixels"][0], dtype="<f4")
    path = model_dir / "warmup" / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(photo.tobytes())
    return path


def _input_chw(model_dir: Path) -> tuple[int, int, int]:
    """(C, H, W) of a backbone model, from its config.pbtxt (H and W need not be equal)."""
    from vitserve.exporter.repository import read_config

    dims = tuple(int(d) for d in read_config(model_dir / "config.pbtxt").input[0].dims)
    if len(dims) != 3:
        raise ExportError(f"{model_dir}/config.pbtxt: input dims {list(dims)}, expected [C, H, W]")
    return dims  # type: ignore[return-value]


def engine_stage(record: dict[str, Any], repo: Path, artifacts: Path | None = None) -> dict[str, Any]:
    """Build the TensorRT plans of a model's `tensorrt` variants (or their build.sh when TensorRT is
    unavailable) and verify each against FP32; returns engine records by Triton model name.

    Each `*_tensorrt` model gets `verify.npz` (held-out photos + FP32 outputs) so that the serving image
    can build and verify its plans later (`vitserve build-engines`, `make engines-gpu`). Plans and the
    timing cache are cached under `artifacts/engines`. Publication (`publish_engines`) is decided after.
    """
    spec = record["spec"]
    names = [
        backbone_model_name(spec.name, v.precision, v.kind)
        for v in record["variants"]
        if v.kind is Kind.TENSORRT
    ]
    if not names:
        return {}
    artifacts = Path(artifacts) if artifacts is not None else record["fp32_dir"].parent.parent
    verify = write_verify_set(record, artifacts / spec.name)
    for name in names:
        shutil.copyfile(verify, repo / name / VERIFY_SET)
    return build_model_engines(repo, spec, names, artifacts / "engines")


def build_model_engines(repo: Path, spec: ModelSpec, names: list[str], cache_dir: Path) -> dict[str, Any]:
    """Plans for the `*_tensorrt` models `names` of `repo` (from each one's onnx/model.onnx, input shape
    from its config.pbtxt), verified against `verify.npz`; build.sh only, where TensorRT is unavailable."""
    from vitserve.exporter.engine import (
        EngineSettings,
        build_engine_cached,
        tensorrt_unavailable_reason,
        write_build_script,
    )

    reason = tensorrt_unavailable_reason()
    engines: dict[str, Any] = {}
    for name in names:
        mdir = repo / name
        plan = mdir / "1" / "model.plan"
        onnx = mdir / "onnx" / ONNX_NAME
        chw = _input_chw(mdir)
        # build.sh keeps its timing cache next to the model (it runs in the final repository);
        # build_engine_cached uses the one under artifacts/.
        settings = EngineSettings(profile=spec.profile, timing_cache=mdir / "timing.cache")
        if reason is not None:
            write_build_script(plan.parent, onnx, plan, PIXELS, chw, settings)
            engines[name] = {"built": False, "build_script": f"{name}/1/build.sh", "reason": reason}
            continue
        meta = build_engine_cached(
            onnx, plan, PIXELS, chw, settings, cache_dir, max_batch_size=spec.profile.max
        )
        precision = Precision(name.removeprefix(f"{spec.name}_").removesuffix(f"_{Kind.TENSORRT.value}"))
        fidelity = meta.get("fidelity") if meta.get("cached") else None
        if fidelity is None or fidelity.get("verify_sha256") != sha256_file(mdir / VERIFY_SET):
            fidelity = verify_engine(plan, mdir / VERIFY_SET, precision, spec)
            if meta.get("cache_key"):
                _remember_fidelity(cache_dir / meta["cache_key"], fidelity)
        fidelity["passed"], fidelity["gate"] = _engine_gate(precision, fidelity, spec)
        engines[name] = {**meta, "built": True, "fidelity": fidelity}
    return engines


def _remember_fidelity(entry: Path, fidelity: dict[str, Any]) -> None:
    """Store a plan's verification next to it in the cache: an unchanged rebuild skips the GPU run."""
    meta_file = entry / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        meta["fidelity"] = fidelity
        tmp = meta_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        tmp.replace(meta_file)


def _engine_gate(precision: Precision, report: dict[str, Any], spec: ModelSpec) -> tuple[bool, str]:
    from vitserve.exporter.precision import check_gate

    # An FP32 plan is held to the FP16 gate: TensorRT may run FP32 layers in TF32.
    return check_gate(Precision.FP16 if precision is Precision.FP32 else precision, report, spec.gates)


def verify_engine(plan: Path, verify: Path, precision: Precision, spec: ModelSpec) -> dict[str, Any]:
    """The plan against the FP32 ONNX's outputs stored in `verify` (held-out photos), in batches within
    the profile, with the variant's gate: the same metrics as the precision stage's fidelity report."""
    import numpy as np

    from vitserve.exporter.compare import compare_outputs, concat_outputs
    from vitserve.exporter.engine import run_engine

    with np.load(verify) as data:
        pixels = data["pixels"]
        ref = {k.removeprefix("ref_"): data[k] for k in data.files if k.startswith("ref_")}
    step = spec.profile.max
    chunks = [
        run_engine(plan, np.ascontiguousarray(pixels[i : i + step])) for i in range(0, len(pixels), step)
    ]
    got = concat_outputs(chunks)
    missing = sorted(set(ref) - set(got))
    if missing:
        raise ExportError(f"{plan} has no output(s) {missing}; its outputs are {sorted(got)}")
    report = {
        "evaluator": "TensorRT engine (run_engine) vs FP32 ONNX outputs (onnxruntime CPU) in verify.npz",
        "images": len(pixels),
        "verify_sha256": sha256_file(verify),
        "outputs": compare_outputs(ref, {k: got[k].astype(np.float32) for k in ref}),
    }
    report["passed"], report["gate"] = _engine_gate(precision, report, spec)
    print(f"[{spec.name}] engine {plan.parent.parent.name}: {report['gate']}")
    return report


def engine_decisions(engines: dict[str, Any], force: bool) -> dict[str, str | None]:
    """Triton model name -> None when its plan may be served, else why it is withheld.

    A built plan is served only when its verification passed its gate (or with `force: true`). A plan
    not built here (no TensorRT: build.sh written) is left to `make engines-gpu`, which decides again.
    """
    decisions: dict[str, str | None] = {}
    for name, e in engines.items():
        fid = e.get("fidelity") or {}
        if e.get("built", True) and not fid.get("passed", False) and not force:
            decisions[name] = fid.get("gate") or "not verified"
        else:
            decisions[name] = None
    return decisions


def publish_engines(
    repo: Path, spec: ModelSpec, variants: list[Variant], engines: dict[str, Any]
) -> tuple[list[Variant], str]:
    """Withhold the plans that failed verification and route the ensemble to the best published variant.

    A withheld model's folder leaves the repository (Triton never loads it), its record stays in
    `engines` with `published: false` and the reason. Returns the published variants and the backbone the
    ensemble `spec.name` now routes to.
    """
    from vitserve.exporter.repository import read_config, serving_variant, write_config

    decisions = engine_decisions(engines, spec.force)
    for name, reason in decisions.items():
        engines[name]["published"] = reason is None
        engines[name]["withheld"] = reason
        if reason is not None:
            print(f"[{spec.name}] {name}: plan failed verification and is NOT published ({reason})")
            shutil.rmtree(repo / name, ignore_errors=True)
        elif engines[name].get("built", True) and not engines[name]["fidelity"]["passed"]:
            print(f"[{spec.name}] WARNING: {name} failed verification but is published (force: true)")
    kept = [v for v in variants if decisions.get(backbone_model_name(spec.name, v.precision, v.kind)) is None]
    try:
        serve = serving_variant(spec, kept)
    except ConfigError as e:
        withheld = {n: r for n, r in decisions.items() if r}
        raise ExportError(
            f"model {spec.name}: every plan it could serve failed verification {withheld}"
        ) from e
    backbone = backbone_model_name(spec.name, serve.precision, serve.kind)
    for ensemble in [spec.name, *(head_ensemble_name(spec.name, h.name) for h in spec.heads)]:
        ens = repo / ensemble / "config.pbtxt"
        if not ens.is_file():  # a head's ensemble, before multihead.write_heads
            continue
        cfg = read_config(ens)
        steps = [s for s in cfg.ensemble_scheduling.step if s.model_name != preprocess_model_name(spec.name)]
        if steps and steps[0].model_name != backbone:
            print(f"[{ensemble}] ensemble routes to {backbone} (was {steps[0].model_name})")
            steps[0].model_name = backbone
            write_config(ens.parent, cfg)
    return kept, backbone


def engine_table(engines: dict[str, Any]) -> str:
    """One row per plan: built or cached, fidelity vs FP32, gate, published or withheld."""
    from vitserve.exporter.compare import format_table

    rows = []
    for name, e in engines.items():
        emb = ((e.get("fidelity") or {}).get("outputs") or {}).get("embeddings", {})
        rows.append(
            {
                "plan": name,
                "built": ("cached" if e.get("cached") else "yes")
                if e.get("built", True)
                else "no (build.sh)",
                "emb_cos_mean": emb.get("cosine_mean", "-"),
                "emb_cos_min": emb.get("cosine_min", "-"),
                "gate": ((e.get("fidelity") or {}).get("gate") or "-").split(":")[0],
                "published": "pending"
                if not e.get("built", True)
                else ("yes" if e.get("published") else "WITHHELD"),
            }
        )
    return format_table(rows, ["plan", "built", "emb_cos_mean", "emb_cos_min", "gate", "published"])


def build_engines(repository: str | Path, cache_dir: str | Path) -> dict[str, Any]:
    """`vitserve build-engines`: build, verify and publish the plans of a repository written by `make
    engines`, in place, where TensorRT and a GPU are (the serving image: `make engines-gpu`).

    Everything comes from the repository itself (its manifest, each `*_tensorrt` model's onnx/,
    config.pbtxt and verify.npz), so the image needs neither torch nor the sample photos. Plans and the
    timing cache are kept in `cache_dir`. The manifest records each plan's provenance and verdict.
    """
    from vitserve.exporter.engine import tensorrt_unavailable_reason

    repository = Path(repository)
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ExportError(
            f"TensorRT not available: {reason}; run this in the serving image (make engines-gpu)"
        )
    manifest_path = repository / REPOSITORY_MANIFEST
    if not manifest_path.is_file():
        raise ExportError(
            f"{repository} has no {REPOSITORY_MANIFEST}; write the repository first: make engines"
        )
    summary = json.loads(manifest_path.read_text())
    for model, rec in summary["models"].items():
        spec = ModelSpec.from_dict({**rec["config"], "name": model})
        backbones = {n: t for n, t in rec["triton_models"].items() if t.get("role") == "backbone"}
        variants = [Variant(Precision(t["precision"]), Kind(t["kind"]), Path()) for t in backbones.values()]
        names = [n for n, t in backbones.items() if t["kind"] == Kind.TENSORRT.value]
        engines = build_model_engines(repository, spec, names, Path(cache_dir))
        _, serve = publish_engines(repository, spec, variants, engines)
        print(f"[{model}] TensorRT plans:\n{engine_table(engines)}")
        rec["engines"] = {**(rec.get("engines") or {}), **engines}
        rec["triton_models"] = {
            n: t
            for n, t in rec["triton_models"].items()
            if t.get("role") != "backbone" or n not in engines or engines[n]["published"]
        }
        rec["triton_models"][model] = {**rec["triton_models"].get(model, {}), "backbone": serve}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(manifest_path)
    return summary


def build_all(
    config: str | Path,
    repository: str | Path = "model_repository",
    artifacts: str | Path = "artifacts",
    random_init: bool = False,
    only: list[str] | None = None,
    jobs: int | str | None = None,
) -> dict[str, Any]:
    """Build every model of `config` into `repository` (replaced atomically when the build is whole);
    `jobs`: precision variants made at once (`variant_jobs`)."""
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
    else:
        check_pretrained_tags(specs)  # before model 1 is built, not when model 2's turn comes
    artifacts, repository = Path(artifacts), Path(repository)
    records = [build_model(spec, artifacts, random_init, jobs) for spec in specs]
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
                cpu_share=sum(r["spec"].kinds[0] is Kind.CPU for r in records) or 1,
            )
            engines = engine_stage(rec, staging, artifacts)
            if engines:
                rec["variants"], serve = publish_engines(staging, spec, rec["variants"], engines)
                written = {n: w for n, w in written.items() if n not in engines or engines[n]["published"]}
                written[spec.name] = {**written[spec.name], "backbone": serve}
                print(f"[{spec.name}] TensorRT plans:\n{engine_table(engines)}")
            if spec.heads:
                from vitserve.exporter.multihead import head_summary, write_heads

                serve = written[spec.name]["backbone"]
                written |= write_heads(staging, spec, rec["heads"], serve, rec["manifest"]["feature_dim"])
                heads_record = head_summary(rec["heads"], rec["head_fidelity"])
            if rec["text"] is not None:
                from vitserve.exporter.repository import write_text_models

                t = rec["text"]
                cpu_share = sum(r["spec"].kinds[0] is Kind.CPU for r in records) or 1
                written |= write_text_models(
                    staging, spec, t["manifest"], t["params"], t["variants"], cpu_share
                )
            _write_warmup_inputs(staging, spec, rec, artifacts)
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
            if spec.heads:
                summary["models"][spec.name]["heads"] = heads_record
            if rec["text"] is not None:
                t = rec["text"]["manifest"]
                summary["models"][spec.name]["text"] = {
                    "export": {
                        k: t.get(k)
                        for k in ("backbone", "weights", "random_init", "feature_dim", "build_key")
                    },
                    "tokenizer": t["tokenizer"],
                    "parity_cosine_min": min(c["cosine_min"] for c in t["parity"]["cases"].values()),
                    "fidelity": rec["text"]["fidelity"],
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
        from vitserve.exporter.gpu_release import TRITON_IMAGE

        print(
            f"NOTE: TensorRT engines were NOT built ({tensorrt_unavailable_reason()}). The FP16/INT8 ONNX "
            f"and a build.sh per engine are in the repository. On the GPU host: `make engines-gpu` builds, "
            f"verifies and publishes them inside the serving image ({TRITON_IMAGE}); or run each build.sh "
            f"inside that container on the target GPU: "
            + ", ".join(s.replace(staging.name, str(repository)) for s in engines_missing)
        )
    print(
        f"repository {repository}: "
        + ", ".join(m for rec in summary["models"].values() for m in rec["triton_models"])
    )
    return summary


def _write_warmup_inputs(repo: Path, spec: ModelSpec, record: dict[str, Any], artifacts: Path) -> None:
    """A preprocessed real photo for the warmup of every GPU backbone model (see repository.backbone_config)."""
    gpu = [
        backbone_model_name(spec.name, v.precision, v.kind)
        for v in record["variants"]
        if v.kind in (Kind.TENSORRT, Kind.ONNXRUNTIME)
    ]
    gpu = [n for n in gpu if (repo / n).is_dir()]
    if gpu:
        verify = write_verify_set(record, artifacts / spec.name)
        for name in gpu:
            write_warmup_input(verify, repo / name)


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
