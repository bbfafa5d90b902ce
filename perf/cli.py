"""`vitserve perf`: a thin command over `vitserve.perf.harness.run_sweep`."""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys

from vitserve.errors import ConfigError


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers ("1,2,4")."""
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    try:
        values = [int(d) for d in dims.split(",")]
    except ValueError:
        values = []
    if not sep or not name or not values:
        raise argparse.ArgumentTypeError(f"expected NAME:D1,D2,... (dims without batch), got {text!r}")
    return name, values


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `perf` to the `vitserve` command line."""
    p = sub.add_parser(
        "perf",
        help="measure served models: throughput and latency over concurrency x batch size",
        description="Sweep served models with perf_analyzer and/or the built-in generator; writes CSV, JSON, "
        "plots and a Markdown report into --out.",
    )
    p.add_argument(
        "--url", default="localhost:8001", help="Triton gRPC endpoint host:port (default %(default)s)"
    )
    p.add_argument("--model", action="append", required=True, help="served model; repeat to compare variants")
    p.add_argument("--concurrency", type=int_list, default=[1, 2, 4], help="e.g. 1,2,4 (requests in flight)")
    p.add_argument("--batch", type=int_list, default=[1], help="batch sizes per request, e.g. 1,8")
    p.add_argument("--generator", choices=["perf_analyzer", "builtin", "both"], default="both")
    p.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup-s", type=float, default=1.0, help="warm-up seconds before each point")
    p.add_argument("--max-total-s", type=float, default=600.0, help="no point starts after this many seconds")
    p.add_argument("--out", default=None, help="output folder (default perf/results/<UTC time>)")
    p.add_argument("--images", default=None, help="folder of images for BYTES (encoded image) inputs")
    p.add_argument(
        "--shape", type=_shape, action="append", default=[], help="NAME:D1,D2 for variable input dims"
    )
    p.add_argument("--repository", default=None,
                   help="the local model repository: each model's own ONNX runs in-process as its baseline")  # fmt: skip
    p.add_argument("--onnx", action="append", default=[], metavar="[MODEL=]PATH",
                   help="a model's ONNX file for its in-process baseline (repeat; without MODEL=, the model "
                   "whose folder holds the file)")  # fmt: skip
    p.add_argument("--baseline-threads", type=int, default=None,
                   help="baseline intra-op threads (default: the served model's setting, else onnxruntime's)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_perf)


def _command(args: argparse.Namespace, out: str) -> str:
    """The canonical command line that reproduces this run (every setting spelled out)."""
    argv = ["vitserve", "perf", "--url", args.url]
    for m in args.model:
        argv += ["--model", m]
    argv += [
        "--concurrency", ",".join(map(str, args.concurrency)), "--batch", ",".join(map(str, args.batch)),
        "--generator", args.generator, "--duration-s", f"{args.duration_s:g}", "--warmup-s", f"{args.warmup_s:g}",
        "--max-total-s", f"{args.max_total_s:g}", "--out", out,
    ]  # fmt: skip
    if args.images:
        argv += ["--images", args.images]
    for name, dims in args.shape:
        argv += ["--shape", f"{name}:{','.join(map(str, dims))}"]
    if args.repository:
        argv += ["--repository", args.repository]
    for onnx in args.onnx:
        argv += ["--onnx", onnx]
    if args.baseline_threads is not None:
        argv += ["--baseline-threads", str(args.baseline_threads)]
    return shlex.join(argv)


def _perf(args: argparse.Namespace) -> int:
    from vitserve.perf.harness import run_sweep

    shapes = dict(args.shape)
    if len(shapes) != len(args.shape):
        raise ConfigError("--shape names an input twice")
    out = args.out or f"perf/results/{_dt.datetime.now(_dt.UTC).strftime('%Y%m%dT%H%M%SZ')}"
    named = dict(o.split("=", 1) for o in args.onnx if "=" in o)
    bare = [o for o in args.onnx if "=" not in o]
    if bare and (named or len(bare) > 1):
        raise ConfigError("give several --onnx files as MODEL=PATH each")
    onnx = named or (bare[0] if bare else None)
    result = run_sweep(
        args.url, args.model, args.concurrency, args.batch, generator=args.generator,
        duration_s=args.duration_s, warmup_s=args.warmup_s, max_total_s=args.max_total_s, out_dir=out,
        images=args.images, shapes=shapes or None, onnx=onnx, repository=args.repository,
        baseline_threads=args.baseline_threads,
        command=_command(args, out), progress=not args.no_progress,
    )  # fmt: skip
    for p in result.points:
        if p.ok:
            eff = f"  efficiency {p.efficiency:.2f}" if p.efficiency is not None else ""
            print(
                f"{p.model:24s} {p.generator:13s} b{p.batch_size:<3d} c{p.concurrency:<3d} "
                f"{p.images_per_s:9.1f} img/s  p50 {p.p50_us / 1e3:7.2f} ms  p99 {p.p99_us / 1e3:7.2f} ms"
                f"  failures {p.failures}{eff}"
            )
        else:
            print(
                f"{p.model:24s} {p.generator:13s} b{p.batch_size:<3d} c{p.concurrency:<3d} ERROR: {p.error}"
            )
    if result.truncated:
        print(f"note: {result.note}", file=sys.stderr)
    print(f"report: {result.files.get('markdown', out)}")
    return 0 if any(p.ok for p in result.points) else 1
