"""Stage 1, torch -> ONNX: a backbone with its head to an ONNX model proven to compute the same thing.

`export_model(...)` builds the backbone and head, traces them to ONNX (opset >= 17, dynamic batch,
inputs `pixel_values`, outputs `embeddings` [+ `logits`, `probs`]), stores weights as one external-data
file past 2 GB, runs onnx.checker, then checks PyTorch against onnxruntime on real photographs and random
inputs at batch 1 and > 1. The output folder appears only when everything passed: the work happens in
a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.contract import LABELS_FILE as LABELS_NAME
from vitserve.contract import ONNX_FILE as ONNX_NAME
from vitserve.contract import PIXELS as INPUT_NAME
from vitserve.contract import Preprocess
from vitserve.errors import ConfigError, ExportError, ParityError
from vitserve.exporter.compare import compare_outputs, concat_outputs, format_table
from vitserve.exporter.identity import sha256_file

log = logging.getLogger(__name__)

EXTERNAL_DATA_NAME = "model.onnx.data"
MANIFEST_NAME = "manifest.json"
# Weights of this many bytes or more go to one external-data file (protobuf's 2 GiB limit); a module
# constant so a test can send a small model down the same path.
EXTERNAL_DATA_BYTES = 2**31 - 1
PARITY_COSINE = 0.99999


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    simplify: bool = False
    min_cosine: float = PARITY_COSINE
    parity_batch: int = 4

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ConfigError(f"opset {self.opset}: vitserve exports opset 17 or newer (LayerNormalization)")
        if not 0 < self.min_cosine <= 1:
            raise ConfigError(f"min_cosine {self.min_cosine}: must be in (0, 1]")


def labels_file(labels: str | tuple[str, ...] | list[str] | None, path: Path) -> Path | None:
    """`labels` as a file: a file name is returned as is; inline labels are written to `path` (rewritten
    only when they changed, so its mtime and the build keys stay put)."""
    if labels is None:
        return None
    if not isinstance(labels, tuple | list):
        return Path(labels)
    text = "\n".join(labels) + "\n"
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "open_clip_torch",
        "timm",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "nvidia-modelopt",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: Path):
    """Yield a temporary sibling of `out_dir`; on success it replaces `out_dir`, on failure it vanishes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_pixels(entry, images: list, recipe: Preprocess) -> tuple[list[str], np.ndarray]:
    """(name, PIL image) pairs as (names, N x 3 x H x W) pixels made with `recipe`, the model's one pixel
    recipe (a `Preprocess`: at export, the loaded weights' `loaded.preprocess`; in a build,
    `spec.served_preprocess(manifest)`; `entry.preprocess` is what random-init and default-tag weights
    imply; required, so that no caller gets another model's pixels by omission): vitserve's EXIF/16-bit handling as the recipe sets it, then the library's own eval
    transform built from the recipe (`backbones.library_transform_for`)."""
    import torch

    from vitserve.exporter.backbones import library_transform_for, prepare_image

    tf = library_transform_for(entry, recipe)
    return [n for n, _ in images], torch.stack([tf(prepare_image(im, recipe)) for _, im in images]).numpy()


def photo_batch(entry, recipe: Preprocess, count: int | None = None) -> tuple[list[str], np.ndarray]:
    """The held-out photographs as pixels made with `recipe` (see `to_pixels`)."""
    from vitserve.exporter.samples import eval_photos

    return to_pixels(entry, eval_photos()[:count], recipe)


def _torch_run(model, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            y = model(torch.from_numpy(x[i : i + batch]))
            y = (y,) if isinstance(y, torch.Tensor) else y
            outs.append({n: t.float().numpy() for n, t in zip(model.output_names, y, strict=True)})
    return concat_outputs(outs)


def check_parity(model, onnx_path: Path, entry, options: ExportOptions, recipe=None) -> dict[str, Any]:
    """PyTorch vs onnxruntime on real photos (batch 1 and >1, pixels made with `recipe`: the loaded
    weights' own) and random inputs; raise ParityError below `options.min_cosine`, after reporting the
    worst error of every output."""
    from vitserve.exporter import onnxrt

    session = onnxrt.cpu_session(onnx_path)
    names, photos = photo_batch(entry, recipe)
    rng = np.random.default_rng(0)
    size = entry.image_size
    cases = {
        f"photos (n={len(photos)}, batch {options.parity_batch})": (photos, options.parity_batch),
        "photo (batch 1)": (photos[:1], 1),
        "random normal (batch 2)": (rng.standard_normal((2, 3, size, size)).astype(np.float32), 2),
    }
    results, failures = {}, []
    for case, (x, batch) in cases.items():
        ref = _torch_run(model, x, batch)
        got = onnxrt.run(session, x, batch)
        metrics = compare_outputs(ref, got)
        results[case] = metrics
        for out, m in metrics.items():
            if "error" in m or m["cosine_min"] < options.min_cosine:
                failures.append(f"{case} / {out}: {m}")
    table = format_table(
        [{"case": c, "output": o, **m} for c, ms in results.items() for o, m in ms.items()],
        ["case", "output", "cosine_min", "cosine_mean", "max_abs_err", "max_rel_err"],
    )
    report = {
        "threshold_cosine": options.min_cosine,
        "images": names,
        "cases": results,
        "table": table,
        "passed": not failures,
    }
    if failures:
        raise ParityError(
            f"ONNX model disagrees with PyTorch (cosine < {options.min_cosine}):\n"
            + "\n".join(failures)
            + f"\n{table}"
        )
    return report


def _torch_export(model, path: Path, entry, opset: int) -> None:
    import torch

    dummy = torch.zeros(2, 3, entry.image_size, entry.image_size)
    outputs = model.output_names
    # Grad mode on while tracing: under no_grad, nn.MultiheadAttention takes its fused fast path
    # (aten::_native_multi_head_attention), which has no ONNX symbolic.
    with torch.inference_mode(False), torch.enable_grad():
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *outputs]},
            do_constant_folding=True,
        )


def _finalize_onnx(raw: Path, dest: Path, simplify: bool) -> None:
    """Re-save `raw` as `dest`: one external-data file past 2 GB (the TorchScript exporter leaves one file
    per tensor), optionally simplified; then onnx.checker on the path (works with external data)."""
    import onnx

    model = onnx.load(str(raw))
    if simplify:
        import onnxslim

        model = onnxslim.slim(model)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size >= EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            str(dest),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_NAME,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(dest))
    del model
    onnx.checker.check_model(str(dest))


def export_model(
    backbone: str,
    out_dir: str | Path,
    weights: str | None = "pretrained",
    head: str | None = "none",
    labels: str | Path | None = None,
    options: ExportOptions | None = None,
    features: bool = False,
) -> dict[str, Any]:
    """Export `backbone` (+ `head`) to `out_dir/model.onnx` with a verified manifest; returns the manifest.

    `weights`: "pretrained[:TAG]" (downloads through open_clip/timm), a checkpoint path, or "random"
    (untrained; loudly labelled). `head`: none | zeroshot | linear:FILE | mlp:FILE. `features`: also output
    the pooled `features` (no head): the backbone that models.yaml `heads:` share (exporter/multihead.py).
    """
    import torch

    from vitserve.exporter.backbones import create_backbone, get_backbone
    from vitserve.exporter.heads import HeadSpec, ServingModel, build_head, read_labels

    options = options or ExportOptions()
    entry = get_backbone(backbone)
    spec = HeadSpec.parse(head)
    label_names = read_labels(labels) if labels else None
    if spec.kind == "none" and label_names:
        raise ConfigError("--labels was given without a head; add --head linear:FILE, mlp:FILE or zeroshot")
    t0 = time.perf_counter()
    loaded = create_backbone(backbone, weights)
    head_module = build_head(spec, loaded, label_names)
    model = ServingModel(loaded.encoder, head_module, features=features).eval()
    num_classes = None
    if head_module is not None:
        with torch.no_grad():
            num_classes = int(head_module(torch.zeros(1, entry.feature_dim)).shape[-1])
        if label_names is None:
            label_names = [f"class_{i}" for i in range(num_classes)]
            log.warning("no labels file: classes are named class_0..class_%d", num_classes - 1)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        raw_dir = tmp / "raw"
        raw_dir.mkdir()
        t_export = time.perf_counter()
        try:
            _torch_export(model, raw_dir / ONNX_NAME, entry, options.opset)
            _finalize_onnx(raw_dir / ONNX_NAME, tmp / ONNX_NAME, options.simplify)
        except Exception as e:
            raise ExportError(f"ONNX export of {backbone} failed: {type(e).__name__}: {e}") from e
        shutil.rmtree(raw_dir)
        export_s = time.perf_counter() - t_export
        parity = check_parity(model, tmp / ONNX_NAME, entry, options, loaded.preprocess)
        if label_names:
            (tmp / LABELS_NAME).write_text("\n".join(label_names) + "\n", encoding="utf-8")
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {
            "vitserve_manifest": 1,
            "backbone": entry.name,
            "source": entry.source,
            "model_id": entry.model_id,
            "family": entry.family,
            "weights": loaded.weights.describe(),
            "random_init": loaded.weights.kind == "random",
            "checkpoint_report": loaded.checkpoint_report or None,
            "head": {"kind": spec.kind, "file": spec.file, "num_classes": num_classes},
            "labels": LABELS_NAME if label_names else None,
            "input": {
                "name": INPUT_NAME,
                "shape": [-1, 3, entry.image_size, entry.image_size],
                "dtype": "float32",
            },
            "outputs": model.output_names,
            "feature_dim": entry.feature_dim,
            # The preprocessing of the weights actually loaded (a tag or checkpoint config can change it).
            "preprocess": loaded.preprocess.as_dict(),
            "architecture": loaded.architecture,
            "opset": options.opset,
            "simplified": options.simplify,
            **export_record(tmp, files, parity, export_s, t0),
        }
        write_manifest(tmp, manifest)
        log.info("parity %s (%s):\n%s", entry.name, "PASSED", parity["table"])
    manifest["parity_table"] = parity["table"]
    return manifest


def export_record(
    folder: Path, files: list[Path], parity: dict[str, Any], export_s: float, t0: float
) -> dict[str, Any]:
    """The manifest fields every export records (image and text): its files' hashes and sizes, whether the
    weights are external data, the library versions, timings, the parity result and no variants yet."""
    return {
        "external_data": (folder / EXTERNAL_DATA_NAME).exists(),
        "versions": library_versions(),
        "export_seconds": round(export_s, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "parity": {k: v for k, v in parity.items() if k != "table"},
        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files},
        "variants": {},
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json atomically."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: v for k, v in manifest.items() if k != "parity_table"}, indent=2) + "\n")
    tmp.replace(path)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{folder} holds no {MANIFEST_NAME}; export the model first (`vitserve export`)")
    return json.loads(path.read_text())
