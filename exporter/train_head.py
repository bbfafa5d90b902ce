"""A linear head from a folder of labelled images: DIR/class_name/*.jpg -> head.pt that `linear:` accepts.

The backbone's pooled features (the `features` output of a model built with `heads:`, i.e. exactly what its
head models receive when served) are computed once per image set and cached; a multinomial logistic
regression (L2-regularized, sklearn's default C=1 objective, L-BFGS) is fitted on a stratified training
split and scored on the held-out rest. With a random-init backbone (offline machines) the features carry no
meaning: training then checks the mechanics only, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vitserve.errors import ConfigError, ExportError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
FEATURES_DIR = "features"


def find_images(folder: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, class index)]) of `folder/CLASS/*.jpg`; refuses a folder that cannot train a
    classifier (missing, fewer than 2 classes, a class with fewer than 2 images)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--images {folder}: not a folder; expected DIR/class_name/*.jpg")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items, few = [], []
    for i, name in enumerate(classes):
        files = sorted(
            f for f in (root / name).rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if len(files) < 2:
            few.append(f"{name} ({len(files)})")
        items += [(f, i) for f in files]
    if len(classes) < 2:
        raise ConfigError(
            f"--images {folder}: found {len(classes)} class folder(s); a classifier needs at least 2 "
            "(DIR/class_name/*.jpg)"
        )
    if few:
        raise ConfigError(
            f"--images {folder}: every class needs at least 2 images (one to train, one held out): "
            + ", ".join(few)
        )
    return classes, items


def split(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, held-out) indices: per class, round(holdout * n) images held out, at least 1
    and at most n - 1; deterministic for a seed."""
    if not 0 < holdout < 1:
        raise ConfigError(f"--holdout {holdout}: must be between 0 and 1")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = min(len(idx) - 1, max(1, round(holdout * len(idx))))
        test += idx[:k].tolist()
        train += idx[k:].tolist()
    return np.array(sorted(train)), np.array(sorted(test))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, num_classes: int, c: float = 1.0, max_iter: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on raw features: (weight [C, D], bias [C]) such that
    softmax(x @ weight.T + bias) are the class probabilities. Minimizes sklearn's objective
    0.5 * |W|^2 + c * sum(cross-entropy) on standardized features (L-BFGS, float64), then folds the
    standardization into the weights."""
    import torch

    x = np.asarray(x, np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-8
    xs = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )
    l2 = 1.0 / (c * len(x))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w.T + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = w.detach().numpy() / std
    b_raw = b.detach().numpy() - w_raw @ mean
    return w_raw.astype(np.float32), b_raw.astype(np.float32)


def accuracy(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the linear head (weight, bias) on features `x`."""
    return float(((x @ weight.T + bias).argmax(1) == y).mean())


def _features(fp32_dir: Path, manifest: dict[str, Any], items: list[tuple[Path, int]], cache: Path, recipe):
    """The backbone's `features` of every image, its pixels made with `recipe` (the model's one recipe,
    `spec.served_preprocess(manifest)`: what the served heads receive), cached by (the FP32 model's files,
    the recipe, the images' bytes and labels)."""
    from PIL import Image

    from vitserve.exporter import onnxrt
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.export import ONNX_NAME, to_pixels
    from vitserve.exporter.identity import artifact_key, files_digest

    key = artifact_key(
        "train-head-features",
        models={"fp32": fp32_dir / ONNX_NAME},
        recipe=recipe,
        images=files_digest([f for f, _ in items]),
        labels=[label for _, label in items],
    )
    path = cache / f"{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["features"], True, path
    session = onnxrt.cpu_session(fp32_dir / ONNX_NAME)
    entry = get_backbone(manifest["backbone"])
    chunks, bad = [], []
    for i in range(0, len(items), 16):
        images = []
        for f, _ in items[i : i + 16]:
            try:
                with Image.open(f) as im:
                    im.load()
                    images.append((str(f), im.copy()))
            except Exception as e:
                bad.append(f"{f} ({type(e).__name__}: {e})")
        if images:
            _, pixels = to_pixels(entry, images, recipe)
            chunks.append(onnxrt.run(session, pixels)["features"])
    if bad:
        raise ConfigError(f"{len(bad)} image(s) could not be read; remove or fix them: " + "; ".join(bad))
    features = np.concatenate(chunks)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{path.name}.{os.getpid()}.tmp.npz"
    np.savez(tmp, features=features)
    tmp.replace(path)
    return features, False, path


def train_head(
    config: str | Path,
    model: str,
    images: str | Path,
    out: str | Path,
    artifacts: str | Path = "artifacts",
    holdout: float = 0.2,
    seed: int = 0,
    c: float = 1.0,
) -> dict[str, Any]:
    """Train a linear probe on model `model`'s backbone features of `images` (DIR/class/*.jpg) and write
    `out` (a state dict {weight, bias}, what `linear:` loads) and its labels next to it
    (`out` with suffix .labels.txt). Returns the report (also printed): counts, accuracies, files."""
    import torch

    from vitserve.exporter.config import load_models
    from vitserve.exporter.export import ONNX_NAME, read_manifest

    specs = {s.name: s for s in load_models(config)}
    if model not in specs:
        raise ConfigError(f"--model {model!r} is not in {config} (models: {', '.join(specs)})")
    fp32_dir = Path(artifacts) / model / "fp32"
    if not (fp32_dir / ONNX_NAME).is_file():
        raise ExportError(
            f"model {model} is not built in {artifacts}/ (no {fp32_dir / ONNX_NAME}); build it first: "
            f"make engines (or `vitserve build --config {config} --only {model}`)"
        )
    manifest = read_manifest(fp32_dir)
    if "features" not in manifest.get("outputs", []):
        raise ConfigError(
            f"model {model}'s backbone has no `features` output: train-head trains on the features that "
            "heads consume, which a model with `heads:` in models.yaml exports; give it `heads:` and rebuild"
        )
    classes, items = find_images(images)
    labels = np.array([c_ for _, c_ in items])
    recipe = specs[model].served_preprocess(manifest)
    features, cached, cache_file = _features(
        fp32_dir, manifest, items, Path(artifacts) / model / FEATURES_DIR, recipe
    )
    train, test = split(labels, holdout, seed)
    weight, bias = fit_logistic(features[train], labels[train], len(classes), c=c)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    torch.save({"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}, tmp)
    tmp.replace(out)
    labels_file = out.with_suffix(".labels.txt")
    labels_file.write_text("\n".join(classes) + "\n", encoding="utf-8")
    report = {
        "model": model,
        "backbone": manifest["backbone"],
        "random_init_backbone": bool(manifest.get("random_init")),
        "classes": classes,
        "images": len(items),
        "train_images": len(train),
        "held_out_images": len(test),
        "train_accuracy": accuracy(weight, bias, features[train], labels[train]),
        "held_out_accuracy": accuracy(weight, bias, features[test], labels[test]),
        "chance_accuracy": float(np.bincount(labels[test]).max() / len(test)),
        "features_cached": cached,
        "features_cache": str(cache_file),
        "head": str(out),
        "labels": str(labels_file),
        "regression": f"multinomial logistic regression, L2 C={c:g}, L-BFGS, standardized features "
        f"(folded into the weights), stratified held-out split {holdout:g}, seed {seed}",
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['model']} ({report['backbone']}): {len(report['classes'])} classes, "
        f"{report['images']} images ({report['train_images']} train, {report['held_out_images']} held out); "
        f"features {'from cache' if report['features_cached'] else 'computed'} ({report['features_cache']})"
    )
    print(
        f"accuracy: train {report['train_accuracy']:.3f}, held-out {report['held_out_accuracy']:.3f} "
        f"(chance {report['chance_accuracy']:.3f}); {report['regression']}"
    )
    if report["random_init_backbone"]:
        print(
            "WARNING: the backbone has RANDOM-INIT weights: its features mean nothing, so this accuracy "
            "checks the training mechanics only, not a classifier you can use."
        )
    print(
        f"wrote {report['head']} and {report['labels']}: use it as "
        f"`heads: {{NAME: {{head: linear:{report['head']}, labels: {report['labels']}}}}}`"
    )


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register `vitserve train-head`."""
    p = sub.add_parser(
        "train-head",
        help="train a linear head (logistic regression) on a built model's backbone features of "
        "DIR/class_name/*.jpg; the output is a `linear:` head",
    )
    p.add_argument("--model", required=True, help="a model of --config, built with `heads:`")
    p.add_argument("--images", required=True, help="DIR/class_name/*.jpg")
    p.add_argument("--out", required=True, help="head file to write (labels go to OUT.labels.txt)")
    p.add_argument("--config", default="models.yaml")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--holdout", type=float, default=0.2, help="share of each class held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--c", type=float, default=1.0, help="inverse L2 strength (sklearn's C)")
    p.add_argument("--json", default=None, help="also write the report to this file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    report = train_head(
        args.config, args.model, args.images, args.out, args.artifacts, args.holdout, args.seed, args.c
    )
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
