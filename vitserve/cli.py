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
    p.add_argument("extra", nargs="*", help="extra tritonserver flags, after --")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from vitserve.server import TritonServer

    server = TritonServer(
        args.repository,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
        log_path=args.log,
        extra_args=args.extra,
    )
    server.start()
    print(f"tritonserver ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vitserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    from vitserve.exporter.cli import add_commands as add_exporter_commands

    add_exporter_commands(sub)
    _add_serve(sub)
    _add_demo(sub)
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
