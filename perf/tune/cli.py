"""A served model + a p99 budget -> the serving settings that give the most images/s on this host.

`vitserve tune`, a thin command over `vitserve.perf.tune.run.run_tune`: the choice is written into the
model's `tuned:` section of models.yaml.
"""

from __future__ import annotations

import argparse
import shlex

from vitserve.errors import ClientError
from vitserve.perf.cli import int_list
from vitserve.perf.tune.run import run_tune


def add_command(sub: argparse._SubParsersAction) -> None:
    """Add `tune` to the `vitserve` command line."""
    p = sub.add_parser(
        "tune",
        help="find the serving settings (variant, instances, threads, spinning, dynamic batching) with the "
        "most images/s within a p99 budget on this host, and write them into models.yaml",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="the model of models.yaml (its ensemble) to tune")
    p.add_argument("--p99-ms", type=float, default=None, help="p99 latency budget in ms (default: none)")
    p.add_argument("--max-minutes", type=float, default=20.0, help="time bound of the whole run")
    p.add_argument("--config", default="models.yaml", help="where the choice is written (tuned: section)")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--url", default=None,
                   help="a running tritonserver (gRPC host:port) started with --model-control-mode=explicit; "
                   "default: start one on --repository")  # fmt: skip
    p.add_argument(
        "--concurrency", type=int_list, default=[1, 4], help="client concurrencies per configuration"
    )
    p.add_argument(
        "--batch", type=int_list, default=[1, 8],
        help="images per request while tuning (the workload: every configuration at each batch and concurrency)",
    )  # fmt: skip
    p.add_argument("--duration-s", type=float, default=4.0, help="measured seconds per point")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument(
        "--tensor", action="store_true", help="measure the backbone (pixel_values) instead of the ensemble"
    )
    p.add_argument("--images", default=None, help="images for the ensemble (default: the held-out photos)")
    p.add_argument("--out", default=None, help="report folder (default perf/results/tune-MODEL)")
    p.add_argument("--fresh", action="store_true", help="do not resume from earlier measurements in --out")
    p.add_argument("--no-write", action="store_true", help="report only; leave models.yaml as it is")
    p.add_argument("--no-check", action="store_true", help="skip the served vs in-process comparison")
    p.add_argument(
        "--check-batches",
        type=int_list,
        default=[1, 2, 4, 8, 16],
        help="request batch sizes of that comparison (the client picks the best whose p99 fits the budget)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    argv = ["vitserve", "tune", "--model", args.model, "--max-minutes", f"{args.max_minutes:g}",
            "--config", args.config, "--repository", args.repository,
            "--concurrency", ",".join(map(str, args.concurrency)), "--batch", ",".join(map(str, args.batch)),
            "--duration-s", f"{args.duration_s:g}", "--warmup-s", f"{args.warmup_s:g}",
            "--check-batches", ",".join(map(str, args.check_batches))]  # fmt: skip
    for flag, value in (
        ("--p99-ms", args.p99_ms),
        ("--url", args.url),
        ("--images", args.images),
        ("--out", args.out),
    ):
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    argv += [f for f, on in (("--tensor", args.tensor), ("--fresh", args.fresh), ("--no-write", args.no_write),
                             ("--no-check", args.no_check)) if on]  # fmt: skip
    result = run_tune(
        args.model, url=args.url, repository=args.repository, config=args.config, p99_ms=args.p99_ms,
        max_minutes=args.max_minutes, concurrencies=args.concurrency, batch_sizes=args.batch,
        duration_s=args.duration_s, warmup_s=args.warmup_s, tensor=args.tensor, images=args.images,
        out_dir=args.out, fresh=args.fresh, write=not args.no_write, check=not args.no_check,
        check_batches=args.check_batches, command=shlex.join(argv), progress=not args.no_progress,
    )  # fmt: skip
    print(f"server: {result.server_mode}")
    print(
        f"configurations: {result.measured_configs} measured now, {result.reused_configs} from earlier runs"
    )
    if result.truncated:
        print(f"note: {result.note}")
    print(f"report: {result.files.get('markdown')}")
    if result.chosen is None:
        best = min((p for p in result.points if p.ok), key=lambda p: p.p99_us, default=None)
        lowest = (
            f"; the lowest p99 measured was {best.p99_us / 1e3:.1f} ms ({best.knobs.key()})" if best else ""
        )
        raise ClientError(
            f"no configuration of {args.model} met the p99 budget of {args.p99_ms:g} ms{lowest}; nothing written. "
            "Raise --p99-ms, lower --concurrency, or serve a faster variant"
            if args.p99_ms is not None
            else f"no configuration of {args.model} could be measured; see {result.files.get('markdown')}"
        )
    c = result.chosen
    print(
        f"chosen: {c.knobs.key()} at concurrency {c.concurrency}: {c.images_per_s:.1f} img/s, "
        f"p99 {c.p99_us / 1e3:.1f} ms" + (f" (budget {args.p99_ms:g} ms)" if args.p99_ms else "")
    )
    if result.written_to:
        print(f"written to {result.written_to} (tuned: section of {args.model}); `make engines` applies it")
    return 0
