"""`vitserve classify` and `vitserve embed`: a thin layer over VitClient.

vitserve classify --url localhost:8001 --model vitb32 --top-k 5 img1.jpg img2.png
vitserve classify --model vitb32 --labels cat,dog,car img1.jpg    # labels chosen now (the text side)
vitserve embed --url localhost:8000 --protocol http --model vitb32 imgs/*.jpg --out emb.npy
vitserve embed --model vitb32 --text "a photo of a cat" --text "a dog" --out text.npy
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def _common(p: argparse.ArgumentParser, images: str = "+") -> None:
    p.add_argument("images", nargs=images, help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument(
        "--url", default=None, help="tritonserver host:port (default localhost:8001 gRPC, :8000 HTTP)"
    )
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--model", default="vitb32", help="the ensemble model (default vitb32)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=30.0, help="deadline of every call to the server")
    p.add_argument("--shared-memory", choices=["none", "system", "cuda"], default="none")
    p.add_argument("--strict", action="store_true", help="fail the whole run when any image fails")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `classify` and `embed` on the `vitserve` command line."""
    p = sub.add_parser("classify", help="top-k labels and scores of images from a deployed model")
    _common(p)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--head", default=None, help="which head, for a model with several (models.yaml `heads:`)")
    p.add_argument(
        "--labels",
        default=None,
        metavar="A,B,C",
        help="classify against these class names instead (comma-separated; a CLIP model served with its "
        "text side): the zero-shot classifier of the model's prompt templates, made at request time",
    )
    p.set_defaults(func=_classify)
    p = sub.add_parser(
        "embed", help="embeddings of images (or, with --text, of sentences) from a deployed model, as .npy"
    )
    _common(p, images="*")
    p.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="embed this sentence instead of images (repeat for several; the model's NAME_text ensemble, "
        "the image embeddings' space)",
    )
    p.add_argument(
        "--out", required=True, help="output .npy file: (N, D) float32, NaN rows for failed images"
    )
    p.set_defaults(func=_embed)


def _client(args: argparse.Namespace):
    from vitserve.client import VitClient

    return VitClient(
        args.url,
        args.model,
        protocol=args.protocol,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout_s,
        shared_memory=args.shared_memory,
    )


def _report_errors(args: argparse.Namespace, errors: dict[int, str], inputs: list[str] | None = None) -> int:
    inputs = args.images if inputs is None else inputs
    for i in sorted(errors):
        print(f"{inputs[i]}: error: {errors[i]}", file=sys.stderr)
    return 1 if errors else 0


def _labels(text: str | None) -> list[str] | None:
    from vitserve.errors import ConfigError

    if text is None:
        return None
    labels = [x.strip() for x in text.split(",")]
    if not all(labels):
        raise ConfigError(f"--labels {text!r}: expected class names separated by commas, e.g. cat,dog,car")
    return labels


def _classify(args: argparse.Namespace) -> int:
    labels = _labels(args.labels)
    with _client(args) as client:
        result = client.classify(
            args.images, top_k=args.top_k, strict=args.strict, head=args.head, labels=labels
        )
    for path, top in zip(args.images, result.predictions, strict=True):
        if top is None:
            continue
        print(path)
        for label, score in top:
            print(f"  {score:.6f}  {label}")
    return _report_errors(args, result.errors)


def _embed(args: argparse.Namespace) -> int:
    from vitserve.errors import ConfigError

    if bool(args.images) == bool(args.text):
        raise ConfigError(
            "vitserve embed takes image files or --text sentences (one kind per run: two runs give two .npy "
            "files in the same space)"
        )
    with _client(args) as client:
        if args.text:
            result = client.embed_text(args.text, strict=args.strict)
        else:
            result = client.embed(args.images, strict=args.strict)
    out = Path(args.out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")  # what np.save would do, said out loud
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, result.embeddings)
    tmp.replace(out)
    n, d = result.embeddings.shape
    failed = f", {len(result.errors)} failed (NaN rows)" if result.errors else ""
    print(f"wrote {out}: {n} x {d} float32{failed}")
    return _report_errors(args, result.errors, args.text or args.images)
