"""One backbone, many heads: models.yaml `heads:` -> one shared backbone + one small model per head.

    backbone (pixel_values -> embeddings, features): exported, made into variants and engines as any model;
        its cache keys do not include the heads, so adding, changing or removing a head reuses all of it
    head NAME (features -> logits, probs): a tiny ONNX per head, keyed by its own file, labels and the
        backbone's export key; checked against PyTorch on the backbone's features of real photographs, and
        through every published backbone variant (cpu-int8: every flavour that can serve) against FP32 with
        that variant's gate; a flavour a head fails is not published
    Triton: MODEL_NAME_head (the head on onnxruntime, CPU or GPU kind as the backbone), the ensembles
        MODEL_NAME (image bytes -> that head's logits, probs with labels) and MODEL (image bytes ->
        embeddings + NAME_logits, NAME_probs of every head, one backbone pass)

Heads are separate models rather than one folded model: a head change then reloads one tiny model, and
the measured cost of the extra ensemble steps is in perf/results/heads.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from vitserve.contract import (
    CPU_BACKBONE_SOURCE,
    EMBEDDINGS,
    FEATURES,
    LABELS_FILE,
    LOGITS,
    ONNX_FILE,
    PROBS,
    CpuBackboneParams,
    head_ensemble_name,
    head_model_name,
)
from vitserve.errors import ConfigError, ExportError, ParityError
from vitserve.exporter.config import Kind, ModelSpec, NamedHead, Precision

log = logging.getLogger(__name__)

HEADS_DIR = "heads"
HEAD_REPORT = "head.json"
HEAD_PARITY_COSINE = 0.99999


def head_labels_file(head: NamedHead, folder: Path) -> Path | None:
    """The head's labels as a file (inline labels are written to `folder/NAME.labels.in.txt`)."""
    from vitserve.exporter.export import labels_file

    return labels_file(head.labels, folder / f"{head.name}.labels.in.txt")


def head_key(head: NamedHead, labels: Path | None, backbone_key: str) -> str:
    """What defines a head model: its kind, its weights file's bytes, its labels, and the backbone export
    it sits on (a zero-shot head is the backbone's own text tower)."""
    from vitserve.exporter.identity import artifact_key, file_digest

    kind, _, file = head.head.partition(":")
    return artifact_key(
        "head",
        head_kind=kind,
        head_sha=file_digest(file) if file else None,
        labels_sha=file_digest(labels),
        backbone=backbone_key,
    )


def _head_module(head: NamedHead, entry, weights: str, labels: list[str] | None, loaded: dict):
    """The head as a torch module (zero-shot heads load the backbone's CLIP model once, into `loaded`)."""
    from vitserve.exporter.heads import HeadSpec, build_head

    spec = HeadSpec.parse(head.head)
    if spec.kind == "zeroshot":
        if "backbone" not in loaded:
            from vitserve.exporter.backbones import create_backbone

            loaded["backbone"] = create_backbone(entry.name, weights)
        backbone = loaded["backbone"]
    else:  # linear / mlp heads need only the feature dim
        backbone = SimpleNamespace(entry=entry, clip_model=None)
    try:
        return build_head(spec, backbone, labels)
    except ExportError as e:
        raise ExportError(f"head {head.name!r}: {e}") from e


def _with_probs(head):
    """features -> (logits, probs) as a torch module around `head` (what a head model computes)."""
    from torch import nn

    class HeadModel(nn.Module):
        output_names = ("logits", "probs")

        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, features):
            logits = self.head(features)
            return logits, logits.softmax(dim=-1)

    return HeadModel(head).eval()


def _run_torch(model, features: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        logits, probs = model(torch.from_numpy(np.ascontiguousarray(features, np.float32)))
    return {"logits": logits.float().numpy(), "probs": probs.float().numpy()}


def run_head(session, features: np.ndarray) -> dict[str, np.ndarray]:
    """A head ONNX session on `features` (N, D): {logits, probs}."""
    logits, probs = session.run(["logits", "probs"], {FEATURES: np.ascontiguousarray(features, np.float32)})
    return {"logits": logits, "probs": probs}


def export_head(model, feature_dim: int, out_dir: Path, eval_features: np.ndarray) -> dict[str, Any]:
    """Trace `model` (features -> logits, probs) to `out_dir/model.onnx` (dynamic batch) and check it
    against PyTorch on `eval_features` (the backbone's features of real photographs) and random features;
    raises ParityError below cosine HEAD_PARITY_COSINE. Returns the parity metrics."""
    import torch

    from vitserve.exporter import onnxrt
    from vitserve.exporter.compare import compare_outputs

    path = out_dir / "model.onnx"
    with torch.inference_mode(False), torch.enable_grad():
        torch.onnx.export(
            model,
            (torch.zeros(2, feature_dim),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[FEATURES],
            output_names=list(model.output_names),
            dynamic_axes={n: {0: "batch"} for n in [FEATURES, *model.output_names]},
        )
    session = onnxrt.cpu_session(path)
    rng = np.random.default_rng(0)
    cases = {
        "backbone features of photos": eval_features,
        "random features (batch 3)": rng.standard_normal((3, feature_dim)).astype(np.float32),
        "batch 1": eval_features[:1],
    }
    report, failures = {}, []
    for case, x in cases.items():
        metrics = compare_outputs(_run_torch(model, x), run_head(session, x))
        report[case] = metrics
        failures += [
            f"{case} / {o}: cosine_min {m.get('cosine_min')}"
            for o, m in metrics.items()
            if "error" in m or m["cosine_min"] < HEAD_PARITY_COSINE
        ]
    if failures:
        raise ParityError(f"head ONNX disagrees with PyTorch (cosine < {HEAD_PARITY_COSINE}): {failures}")
    return report


def _eval_outputs(
    onnx: Path, precision: Precision, cache: Path, pixels: np.ndarray, recipe, flavour: str | None = None
) -> dict[str, np.ndarray]:
    """{embeddings, features} of a backbone ONNX (a cpu-int8 `flavour`'s file) on the held-out photos
    (`pixels`, made with `recipe`), scored as the fidelity report scores it (quantized graphs independent
    of the host's int8 kernels); cached by (the model's files, the recipe, the number of photos)."""
    from vitserve.exporter import onnxrt
    from vitserve.exporter.identity import artifact_key

    key = artifact_key("head-eval-outputs", models={"backbone": onnx}, recipe=recipe, images=len(pixels))
    prefix = f".eval-{precision.value}-" + (f"{flavour}-" if flavour else "")
    path = cache / f"{prefix}{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    level = "extended" if precision in (Precision.FP16, Precision.INT8) else "all"
    session, _ = onnxrt.exact_session(onnx, optimization=level)
    out = onnxrt.run(session, pixels)
    if FEATURES not in out:
        raise ExportError(f"{onnx} has no `{FEATURES}` output: re-export the backbone (make engines)")
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{prefix}*.npz"):
        if old.name.removeprefix(prefix).count("-") == 0:  # not another flavour's
            old.unlink()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(path)
    return out


def build_heads(
    spec: ModelSpec, fp32_dir: Path, manifest: dict[str, Any], model_dir: Path, weights: str
) -> dict[str, dict[str, Any]]:
    """Every head of `spec` as `model_dir/heads/NAME/model.onnx` (+ labels.txt, head.json), reusing each
    one whose key is unchanged, and removing the folders of heads no longer listed. Returns head records."""
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.export import ONNX_NAME, atomic_directory
    from vitserve.exporter.heads import read_labels
    from vitserve.exporter.precision import eval_pixels

    entry = get_backbone(manifest["backbone"])
    recipe = spec.served_preprocess(manifest)
    root = model_dir / HEADS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.is_dir() and not old.name.startswith(".") and old.name not in {h.name for h in spec.heads}:
            shutil.rmtree(old)
            print(f"[{spec.name}] head {old.name!r} removed")
    records: dict[str, dict[str, Any]] = {}
    loaded: dict[str, Any] = {}
    eval_feats = None
    for head in spec.heads:
        labels_file = head_labels_file(head, root)
        key = head_key(head, labels_file, manifest["build_key"])
        out = root / head.name
        report_path = out / HEAD_REPORT
        if report_path.is_file() and (out / ONNX_NAME).is_file():
            report = json.loads(report_path.read_text())
            if report.get("key") == key:
                log.info("%s: head %s unchanged (key %s), reusing %s", spec.name, head.name, key, out)
                records[head.name] = {**report, "dir": out, "cached": True}
                continue
        if eval_feats is None:
            _, pixels = eval_pixels(entry, recipe)
            eval_feats = _eval_outputs(fp32_dir / ONNX_NAME, Precision.FP32, root, pixels, recipe)[FEATURES]
        labels = read_labels(labels_file) if labels_file else None
        module = _head_module(head, entry, weights, labels, loaded)
        wrapped = _with_probs(module)
        classes = int(_run_torch(wrapped, eval_feats[:1])["logits"].shape[-1])
        if labels is None:
            labels = [f"class_{i}" for i in range(classes)]
            print(
                f"[{spec.name}] head {head.name!r}: no labels; classes are named class_0..class_{classes - 1}"
            )
        with atomic_directory(out) as tmp:
            parity = export_head(wrapped, entry.feature_dim, tmp, eval_feats)
            (tmp / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
            report = {
                "name": head.name,
                "head": head.head,
                "kind": head.head.partition(":")[0],
                "key": key,
                "num_classes": classes,
                "feature_dim": entry.feature_dim,
                "random_init_backbone": manifest.get("random_init"),
                "parity": parity,
            }
            (tmp / HEAD_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        worst = min(m["cosine_min"] for ms in parity.values() for m in ms.values())
        print(
            f"[{spec.name}] head {head.name!r} ({report['kind']}, {classes} classes) exported; "
            f"ONNX vs PyTorch on the backbone's features: cosine min {worst:.7f}"
        )
        records[head.name] = {**report, "dir": out, "cached": False}
    return records


def head_fidelity(
    spec: ModelSpec,
    heads: dict[str, dict[str, Any]],
    fp32_dir: Path,
    variants: dict[Precision, Path | dict[str, Path]],
    model_dir: Path,
) -> dict[str, dict[str, Any]]:
    """Each head through each backbone variant against the head on the FP32 backbone, on the held-out
    photos (made with the model's one recipe), with the variant's gate (embeddings cosine; INT8 also the
    head's top-1 agreement). A variant given as {flavour: file} (cpu-int8: every flavour that can serve)
    is scored per flavour, each flavour's arithmetic computed independently of this host's CPU
    (`onnxrt.exact_session`), and its report holds `flavours` {flavour: report}; it passes when every
    flavour does. Returns {precision: {head: report with passed, gate}}."""
    from vitserve.exporter import onnxrt
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.compare import compare_outputs
    from vitserve.exporter.export import ONNX_NAME, read_manifest
    from vitserve.exporter.precision import check_gate, eval_pixels

    if not variants or not heads:
        return {}
    manifest = read_manifest(fp32_dir)
    recipe = spec.served_preprocess(manifest)
    _, pixels = eval_pixels(get_backbone(manifest["backbone"]), recipe)
    cache = model_dir / HEADS_DIR
    ref = _eval_outputs(fp32_dir / ONNX_NAME, Precision.FP32, cache, pixels, recipe)
    sessions = {n: onnxrt.cpu_session(r["dir"] / ONNX_NAME) for n, r in heads.items()}
    ref_heads = {n: run_head(s, ref[FEATURES]) for n, s in sessions.items()}

    def score(precision: Precision, onnx: Path, flavour: str | None) -> dict[str, dict[str, Any]]:
        got = _eval_outputs(onnx, precision, cache, pixels, recipe, flavour)
        emb = compare_outputs({"embeddings": ref["embeddings"]}, {"embeddings": got["embeddings"]})
        reports = {}
        for name, session in sessions.items():
            metrics = {**emb, **compare_outputs(ref_heads[name], run_head(session, got[FEATURES]))}
            report = {"images": len(pixels), "outputs": metrics}
            report["passed"], report["gate"] = _gate(precision, report, spec.gates, check_gate)
            reports[name] = report
        return reports

    out: dict[str, dict[str, Any]] = {}
    for precision, onnx in variants.items():
        if not isinstance(onnx, dict):
            out[precision.value] = score(precision, Path(onnx), None)
            continue
        by_flavour = {f: score(precision, Path(file), f) for f, file in onnx.items()}
        out[precision.value] = {}
        for name in sessions:
            flavours = {f: reports[name] for f, reports in by_flavour.items()}
            ok = all(r["passed"] for r in flavours.values())
            out[precision.value][name] = {
                "images": len(pixels),
                "flavours": flavours,
                "passed": ok,
                "gate": ("PASS: " if ok else "FAIL: ")
                + "; ".join(f"{f} {r['gate']}" for f, r in flavours.items()),
            }
    return out


def _gate(precision: Precision, report: dict[str, Any], gates, check_gate) -> tuple[bool, str]:
    """The variant's gate (backbone embeddings; INT8: the head's top-1 agreement too), and the head's own
    logits held to the variant's cosine threshold."""
    ok, text = check_gate(precision, report, gates)
    limit = {
        Precision.FP16: gates.fp16_mean_cosine,
        Precision.CPU_INT8: gates.cpu_int8_mean_cosine,
    }.get(precision, gates.int8_mean_cosine)
    cos = report["outputs"]["logits"]["cosine_mean"]
    ok_head = cos >= limit
    text = text.split(": ", 1)[1] + f", head logits mean cosine {cos:.6f} {'>=' if ok_head else '<'} {limit}"
    return ok and ok_head, ("PASS: " if ok and ok_head else "FAIL: ") + text


def head_fidelity_table(fidelity: dict[str, dict[str, Any]]) -> str:
    """One row per (variant, head): the head's logits/probs vs the head on the FP32 backbone, and the gate."""
    from vitserve.exporter.compare import format_table

    rows = [
        {
            "variant": p if flavour is None else f"{p} ({flavour})",
            "head": h,
            "emb_cos_mean": r["outputs"]["embeddings"]["cosine_mean"],
            "logits_cos_min": r["outputs"]["logits"]["cosine_min"],
            "probs_cos_min": r["outputs"]["probs"]["cosine_min"],
            "top1": r["outputs"]["logits"]["top1_agreement"],
            "gate": r["gate"].split(":")[0],
        }
        for p, heads in fidelity.items()
        for h, report in heads.items()
        for flavour, r in (report.get("flavours") or {None: report}).items()
    ]
    return format_table(
        rows, ["variant", "head", "emb_cos_mean", "logits_cos_min", "probs_cos_min", "top1", "gate"]
    )


def gate_heads(
    spec: ModelSpec, fidelity: dict[str, dict[str, Any]], variants: dict[str, dict[str, Any]] | None = None
) -> set[Precision]:
    """The variants that must not serve the heads: one of its heads failed the variant's gate (unless
    `force`). A variant scored per flavour (cpu-int8) loses each flavour a head failed: it leaves the
    variant's `published_flavours` in `variants` (the precision stage's reports, by precision) with the
    reason recorded as the flavour's `withheld`, and the variant is refused when the flavours left no longer
    make it publishable (`precision.publishable`: its portable flavour must be among them). Prints the
    table and each refusal."""
    if not fidelity:
        return set()
    print(f"[{spec.name}] heads through each backbone variant vs FP32:\n{head_fidelity_table(fidelity)}")
    refused = set()
    for p, heads in fidelity.items():
        if any("flavours" in r for r in heads.values()):
            if _gate_flavours(spec, p, heads, (variants or {}).get(p)):
                refused.add(Precision(p))
            continue
        failed = {h: r["gate"] for h, r in heads.items() if not r["passed"]}
        if failed and not spec.force:
            print(f"[{spec.name}] {p} is NOT published: head(s) failed its gate: {failed}")
            refused.add(Precision(p))
        elif failed:
            print(
                f"[{spec.name}] WARNING: {p} heads failed its gate but it is published (force: true): {failed}"
            )
    return refused


def _gate_flavours(spec: ModelSpec, p: str, heads: dict[str, Any], variant: dict[str, Any] | None) -> bool:
    """Drop the flavours of variant `p` that a head failed (see `gate_heads`); True when the variant is
    refused."""
    from vitserve.exporter.precision import publishable

    flavours = list(next(iter(heads.values()))["flavours"])
    failed: dict[str, dict[str, str]] = {}
    for f in flavours:
        bad = {h: r["flavours"][f]["gate"] for h, r in heads.items() if not r["flavours"][f]["passed"]}
        if bad:
            failed[f] = bad
    if not failed:
        return False
    if spec.force:
        print(
            f"[{spec.name}] WARNING: {p} heads failed the gate of flavour(s) {failed} but are published (force: true)"
        )
        return False
    published = (variant or {}).get("published_flavours", flavours)
    for f, bad in failed.items():
        reason = f"head(s) failed its gate: {bad}"
        print(f"[{spec.name}] {p} flavour {f!r} is NOT published: {reason}")
        if variant is not None and f in variant.get("flavours", {}):
            variant["flavours"][f]["withheld"] = reason
    ok, kept = publishable({f: f in published and f not in failed for f in flavours})
    if variant is not None:
        variant["published_flavours"] = kept
    if not ok:
        print(f"[{spec.name}] {p} is NOT published: flavours left after the heads' gates: {kept or 'none'}")
    return not ok


# ------------------------------------------------------------------------------------------ repository


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def head_config(name: str, spec: ModelSpec, record: dict[str, Any]):
    """ModelConfig of a head model: features [D] -> logits [C], probs [C] (labels.txt), on onnxruntime:
    the python model (triton_models/onnx_cpu.py) for the CPU kind, onnxruntime_onnx on a GPU otherwise."""
    from vitserve.exporter.repository import _common, set_params

    mc = _pb()
    cfg = mc.ModelConfig(name=name)
    cpu = spec.kinds[0] is Kind.CPU
    if cpu:
        cfg.backend = "python"
        # a few hundred kFLOP per image: one thread, never a share of the backbone's cores
        set_params(cfg, CpuBackboneParams(cpu_threads=1, share=1, optimization="all", cpu_lanes=1))
    else:
        cfg.platform, cfg.backend = "onnxruntime_onnx", "onnxruntime"
    _common(cfg, spec, gpu=not cpu)
    # Its requests come from the backbone, already batched: waiting for more only adds latency.
    cfg.dynamic_batching.ClearField("preferred_batch_size")
    cfg.dynamic_batching.max_queue_delay_microseconds = 0
    cfg.input.add(name=FEATURES, data_type=mc.TYPE_FP32, dims=[record["feature_dim"]])
    classes = record["num_classes"]
    cfg.output.add(name=LOGITS, data_type=mc.TYPE_FP32, dims=[classes])
    cfg.output.add(name=PROBS, data_type=mc.TYPE_FP32, dims=[classes], label_filename=LABELS_FILE)
    return cfg


def heads_ensemble_config(
    name: str,
    spec: ModelSpec,
    backbone: str,
    feature_dim: int,
    heads: dict[str, dict[str, Any]],
    all_heads: bool,
):
    """The ensemble `name`: images -> preprocess -> `backbone` (its features) -> each head of `heads`; with
    `all_heads` the embeddings and every head's outputs (labels_HEAD.txt), else the one head's logits/probs."""
    from vitserve.exporter.repository import ensemble_front

    mc = _pb()
    cfg, bb = ensemble_front(name, spec, backbone)
    bb.output_map[FEATURES] = FEATURES
    if all_heads:
        cfg.output.add(name=EMBEDDINGS, data_type=mc.TYPE_FP32, dims=[feature_dim])
        bb.output_map[EMBEDDINGS] = EMBEDDINGS
    for h, rec in heads.items():
        prefix = f"{h}_" if all_heads else ""
        step = cfg.ensemble_scheduling.step.add(model_name=head_model_name(spec.name, h), model_version=-1)
        step.input_map[FEATURES] = FEATURES
        for out in (LOGITS, PROBS):
            step.output_map[out] = prefix + out
        classes = rec["num_classes"]
        cfg.output.add(name=prefix + LOGITS, data_type=mc.TYPE_FP32, dims=[classes])
        cfg.output.add(
            name=prefix + PROBS,
            data_type=mc.TYPE_FP32,
            dims=[classes],
            label_filename=f"labels_{h}.txt" if all_heads else LABELS_FILE,
        )
    return cfg


def write_heads(
    repo: Path, spec: ModelSpec, heads: dict[str, dict[str, Any]], backbone: str, feature_dim: int
) -> dict[str, Any]:
    """The head models and the ensembles of a many-heads model into `repo`: MODEL_NAME_head and
    MODEL_NAME per head, and MODEL (replacing the single-head ensemble write_model wrote), every ensemble
    routed to `backbone`. Returns what was written, by Triton model name."""
    from vitserve.exporter.repository import _link_or_copy, copy_served_source, write_config

    if set(heads) != {h.name for h in spec.heads}:
        raise ConfigError(
            f"model {spec.name}: heads built {sorted(heads)} != configured {[h.name for h in spec.heads]}"
        )
    written: dict[str, Any] = {}
    for h, rec in heads.items():
        name = head_model_name(spec.name, h)
        mdir = repo / name
        write_config(mdir, head_config(name, spec, rec))
        _link_or_copy(rec["dir"] / ONNX_FILE, mdir / "1" / ONNX_FILE)
        _link_or_copy(rec["dir"] / LABELS_FILE, mdir / LABELS_FILE)
        if spec.kinds[0] is Kind.CPU:
            copy_served_source(CPU_BACKBONE_SOURCE, mdir / "1")
        written[name] = {"role": "head", "head": h, "kind": rec["kind"], "num_classes": rec["num_classes"]}
        ens = head_ensemble_name(spec.name, h)
        write_config(
            repo / ens, heads_ensemble_config(ens, spec, backbone, feature_dim, {h: rec}, all_heads=False)
        )
        (repo / ens / "1").mkdir(parents=True, exist_ok=True)
        _link_or_copy(rec["dir"] / LABELS_FILE, repo / ens / LABELS_FILE)
        written[ens] = {"role": "ensemble", "backbone": backbone, "heads": [h]}
    ens_dir = repo / spec.name
    write_config(
        ens_dir, heads_ensemble_config(spec.name, spec, backbone, feature_dim, heads, all_heads=True)
    )
    (ens_dir / "1").mkdir(parents=True, exist_ok=True)
    for h, rec in heads.items():
        _link_or_copy(rec["dir"] / LABELS_FILE, ens_dir / f"labels_{h}.txt")
    written[spec.name] = {"role": "ensemble", "backbone": backbone, "heads": list(heads)}
    return written


def head_summary(heads: dict[str, dict[str, Any]], fidelity: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of each head: what it is, its key, whether it was reused, its fidelity."""
    return {
        h: {
            "head": r["head"],
            "kind": r["kind"],
            "num_classes": r["num_classes"],
            "key": r["key"],
            "cached": r["cached"],
            "fidelity": {p: f[h] for p, f in fidelity.items() if h in f},
        }
        for h, r in heads.items()
    }
