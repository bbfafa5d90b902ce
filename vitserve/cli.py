"""`vitserve` command line: a thin layer over the stage functions; each stage folder owns its commands."""

from __future__ import annotations

import argparse
import logging
import sys

from vitserve import __version__
from vitserve.errors import VitServeError


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the real tritonserver (CPU, from nvidia-pytriton) on a model repository"
    )
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log", default=None, help="server log file (default: a temp file, printed)")
    p.add_argument(
        "--supervise",
        action="store_true",
        help="restart the server when it dies and bring back a model whose python stub died (Triton 2.51 "
        "keeps reporting such a model ready); with --model-control-mode=explicit only that model is reloaded",
    )
    p.add_argument("--poll-s", type=float, default=2.0, help="supervisor polling period (with --supervise)")
    p.add_argument(
        "--open-apis",
        default="",
        metavar="APIS",
        help="control APIs left open to every client: 'all', or some of model-repository,shared-memory,"
        "statistics,trace,logging (perf_analyzer over gRPC cannot send the key: it needs 'statistics', and "
        "'shared-memory' for its shared-memory runs). Default: all behind the key ($VITSERVE_API_KEY or the "
        "key file)",
    )
    p.add_argument("extra", nargs="*", help="extra tritonserver flags, after --")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from vitserve.apikey import API_KEY_ENV, API_KEY_HEADER, CONTROL_APIS, GRPC_API_KEY_HEADER, check_apis
    from vitserve.server import TritonServer

    opened = (
        CONTROL_APIS if args.open_apis == "all" else check_apis([a for a in args.open_apis.split(",") if a])
    )
    server = TritonServer(
        args.repository,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        log_path=args.log,
        extra_args=args.extra,
        restricted=tuple(a for a in CONTROL_APIS if a not in opened),
    )
    server.start()
    print(f"tritonserver ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}")
    if server.restricted:
        print(
            f"{', '.join(server.restricted)}: need header {API_KEY_HEADER} (gRPC: {GRPC_API_KEY_HEADER}), "
            f"key from {server.key_source}; clients read ${API_KEY_ENV} or that file"
        )
    else:
        print("WARNING: every control API is open to every client (--open-apis all)")
    # flushed: whatever runs `vitserve serve` reads these lines through a pipe while it runs
    print(f"log: {server.log_path}   (Ctrl-C stops it)", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        if args.supervise:
            from vitserve.supervisor import Supervisor

            print(f"supervising: polling every {args.poll_s:g} s", flush=True)
            Supervisor(server, poll_s=args.poll_s).run(done)
            return 0
        while not done.wait(1.0):
            if not server.is_running():
                print(f"tritonserver exited; log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _add_api(sub: argparse._SubParsersAction) -> None:
    from vitserve.api import DEFAULT_PORT, DEFAULT_TRITON_URL, MAX_BODY_BYTES, MAX_INPUTS

    p = sub.add_parser(
        "api",
        help="the OpenAI-compatible embeddings endpoint (POST /v1/embeddings, GET /v1/models) in front of a "
        "running tritonserver (make api)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument(
        "--triton-url", default=DEFAULT_TRITON_URL, help="tritonserver gRPC host:port (grpcs:// for TLS)"
    )
    p.add_argument(
        "--open",
        action="store_true",
        help="serve without a bearer key (default: requests need `Authorization: Bearer KEY`, KEY from "
        "$VITSERVE_EMBEDDINGS_KEY or the key file, made on first start)",
    )
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="request body limit")
    p.add_argument("--max-inputs", type=int, default=MAX_INPUTS, help="strings and images per request")
    p.add_argument("--batch-size", type=int, default=8, help="images or strings per request to Triton")
    p.add_argument("--max-in-flight", type=int, default=64, help="requests to Triton at once, per model")
    p.add_argument("--timeout-s", type=float, default=60.0, help="deadline of every call to Triton")
    p.set_defaults(func=_api)


def _api(args: argparse.Namespace) -> int:
    from vitserve.api import ApiSettings, serve
    from vitserve.apikey import EMBEDDINGS_KEY_ENV, EMBEDDINGS_KEY_FILE, server_key

    key, source = (None, None) if args.open else server_key(EMBEDDINGS_KEY_ENV, EMBEDDINGS_KEY_FILE)
    settings = ApiSettings(
        triton_url=args.triton_url,
        bearer_key=key,
        open_access=args.open,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_inputs=args.max_inputs,
        batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout_s,
    )
    print(
        f"vitserve api: http://{args.host}:{args.port}/v1 (OpenAI embeddings) -> tritonserver {args.triton_url}"
    )
    if key is None:
        print("WARNING: no bearer key (--open): every client that reaches the port is served")
    else:
        print(f"requests need `Authorization: Bearer KEY` (OpenAI clients: api_key=KEY); key from {source}")
    print("Ctrl-C stops it", flush=True)
    serve(settings, args.host, args.port)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="build the default model, serve it, classify the sample photos (make demo)"
    )
    p.add_argument("--config", default="models.yaml")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--artifacts", default="artifacts")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from vitserve.demo import run_demo

    run_demo(args.config, args.repository, args.artifacts)
    return 0


def _add_engines(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-engines",
        help="refuse TensorRT plans built with another TensorRT version or GPU architecture than this host's",
    )
    p.add_argument("--repository", default="model_repository")
    p.set_defaults(func=_check_engines)
    p = sub.add_parser(
        "build-engines",
        help="build, verify and publish the TensorRT plans of a repository (inside the serving image: "
        "make engines-gpu)",
    )
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--cache", default="artifacts/engines", help="plans and timing cache, kept between builds")
    p.set_defaults(func=_build_engines)


def _check_engines(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitserve.exporter.engine import check_repository, host_provenance

    if str(args.repository).startswith("s3://"):  # the published manifest, read from S3 (Kubernetes)
        from vitserve.publish import check_published_engines

        host = host_provenance()
        count, problems = check_published_engines(args.repository, host)
    else:
        count = len(list(Path(args.repository).glob("*/1/model.plan")))
        host = host_provenance() if count else {}
        problems = check_repository(args.repository, host) if count else []
    if not count:
        print(f"no TensorRT plans in {args.repository}: nothing to check")
        return 0
    if problems:
        print(
            f"error: {len(problems)} TensorRT plan(s) in {args.repository} will not load here:",
            file=sys.stderr,
        )
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 3
    print(
        f"{count} TensorRT plan(s) in {args.repository} match this host (TensorRT {host['tensorrt_version']}, "
        f"{host['gpu_name']}, compute capability {host['compute_capability']})"
    )
    return 0


def _build_engines(args: argparse.Namespace) -> int:
    from vitserve.exporter.pipeline import build_engines

    build_engines(args.repository, args.cache)
    return 0


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish", help="upload a built repository to S3 as a new version, then point CURRENT at it"
    )
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--to", required=True, metavar="s3://BUCKET/PREFIX")
    p.add_argument(
        "--endpoint-url", default=None, help="S3-compatible storage (default: AWS_ENDPOINT_URL or AWS)"
    )
    p.add_argument("--region", default=None)
    p.add_argument(
        "--force",
        action="store_true",
        help="publish even TensorRT models without a verified plan (only build.sh, or failed verification)",
    )
    p.set_defaults(func=_publish)
    p = sub.add_parser(
        "published", help="the current version under s3://BUCKET/PREFIX and its tritonserver URL"
    )
    p.add_argument("url", metavar="s3://BUCKET/PREFIX")
    p.add_argument("--endpoint-url", default=None)
    p.set_defaults(func=_published)
    p = sub.add_parser(
        "cluster-demo",
        help="rehearse a Kubernetes deployment on this machine: moto S3, N tritonserver replicas, nginx, "
        "prometheus; SIGKILL one replica and terminate another under load (make cluster-demo)",
    )
    p.add_argument("--config", default="models.yaml")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--requests", type=int, default=600, help="requests of the failover run")
    p.add_argument("--duration-s", type=float, default=90.0, help="time bound of the failover run")
    p.add_argument("--concurrency", type=int, default=4, help="workers per protocol (gRPC and HTTP)")
    p.add_argument(
        "--throughput",
        metavar="OUT",
        default=None,
        help="instead: images/s through nginx with 1..N replicas, written to OUT.md and OUT.json",
    )
    p.add_argument("--out", default=None, help="also write the failover table to OUT.md and OUT.json")
    p.set_defaults(func=_cluster_demo)


def _publish(args: argparse.Namespace) -> int:
    from vitserve.publish import publish

    p = publish(
        args.repository, args.to, endpoint_url=args.endpoint_url, region=args.region, force=args.force
    )
    print(f"published {p.files} files ({p.bytes / 1e6:.1f} MB) as {p.version_url}; CURRENT -> {p.version}")
    print(f"tritonserver --model-repository={p.triton_url}")
    print(f"pin it in deploy/: MODEL_REPOSITORY={p.version_url}")
    return 0


def _published(args: argparse.Namespace) -> int:
    from vitserve.publish import current

    p = current(args.url, endpoint_url=args.endpoint_url)
    print(f"current: {p.version_url} ({p.files} files, {p.bytes / 1e6:.1f} MB)")
    print(f"tritonserver --model-repository={p.triton_url}")
    return 0


def _cluster_demo(args: argparse.Namespace) -> int:
    from vitserve.perf.cluster import run_cluster_demo

    return run_cluster_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vitserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    from vitserve.exporter.cli import add_commands as add_exporter_commands

    add_exporter_commands(sub)
    from vitserve.exporter.train_head import add_command as add_train_head

    add_train_head(sub)
    _add_serve(sub)
    _add_api(sub)
    _add_demo(sub)
    _add_cluster(sub)
    _add_engines(sub)
    try:
        from vitserve.client.cli import add_commands as add_client_commands
    except ImportError:  # the client folder may be absent in a trimmed install
        pass
    else:
        add_client_commands(sub)
    try:
        from vitserve.perf.cli import add_commands as add_perf_commands
    except ImportError:
        pass
    else:
        add_perf_commands(sub)
        from vitserve.perf.tune import add_command as add_tune_command

        add_tune_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Third-party libraries (onnxruntime's quantizer, open_clip) log every step at INFO: keep theirs at
    # WARNING and ours at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitserve").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except VitServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
