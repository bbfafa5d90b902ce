"""CLI commands of the build stages: `backbones`, `export`, `build` (what `make engines` runs)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backbones", help="list the backbone registry")
    p.set_defaults(func=_backbones)

    p = sub.add_parser("export", help="export a backbone (+ head) to a parity-checked ONNX model")
    p.add_argument("--backbone", required=True, help="registry name, see `vitserve backbones`")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--pretrained", metavar="TAG", help="pretrained tag (default: the registry's)")
    w.add_argument("--weights", metavar="FILE", help="local checkpoint (open_clip, timm or TAO)")
    w.add_argument("--random-init", action="store_true", help="untrained weights (tests/offline demos only)")
    p.add_argument("--head", default="none", help="none | zeroshot | linear:FILE | mlp:FILE")
    p.add_argument("--labels", help="class names, one per line")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    p.add_argument("--out", required=True, help="output folder (replaced only when the export passes)")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "build", help="build every model of models.yaml into a Triton repository (make engines)"
    )
    p.add_argument("--config", default="models.yaml")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--artifacts", default="artifacts", help="exports, variants, caches and build scripts")
    p.add_argument(
        "--random-init", action="store_true", help="override every model's weights with random init"
    )
    p.add_argument("--only", action="append", help="build only these model names")
    p.add_argument(
        "--jobs",
        default=None,
        help="precision variants made at once: N or 'auto' (default: $VITSERVE_BUILD_JOBS, else auto: one"
        " per usable core, as many as fit in memory)",
    )
    p.set_defaults(func=_build)


def _backbones(args: argparse.Namespace) -> int:
    from vitserve.exporter.backbones import backbone_table
    from vitserve.exporter.compare import format_table

    rows = backbone_table()
    print(format_table(rows, list(rows[0])))
    return 0


def _export(args: argparse.Namespace) -> int:
    from vitserve.exporter.export import ExportOptions, export_model

    if args.random_init:
        weights = "random"
    elif args.weights:
        weights = args.weights
    else:
        weights = f"pretrained:{args.pretrained}" if args.pretrained else "pretrained"
    manifest = export_model(
        args.backbone,
        args.out,
        weights=weights,
        head=args.head,
        labels=args.labels,
        options=ExportOptions(opset=args.opset, simplify=args.simplify),
    )
    print(manifest["parity_table"])
    if manifest["random_init"]:
        print("WARNING: RANDOM-INIT WEIGHTS: this model is untrained; its outputs are meaningless.")
    print(f"exported {manifest['backbone']} -> {args.out}/model.onnx (parity passed)")
    return 0


def _build(args: argparse.Namespace) -> int:
    from vitserve.exporter.pipeline import build_all

    build_all(
        args.config,
        args.repository,
        args.artifacts,
        random_init=args.random_init,
        only=args.only,
        jobs=args.jobs,
    )
    return 0
