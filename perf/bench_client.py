"""Throughput of the Python client's `embed` (images/s) over gRPC, HTTP, system shared memory and asyncio.

    python perf/bench_client.py --repository /tmp/x/repo          # starts a tritonserver on it
    python perf/bench_client.py --url localhost:8001 --http-url localhost:8000

Each configuration embeds the same `--images` JPEG photographs (deterministic views of the held-out
photos, in memory, so disk reads are not measured) in requests of `--batch-size`, after a warm-up call,
`--repeats` times, round-robin across configurations; the median run is reported. Two tensor configurations send the same images preprocessed
(CHW float32) straight to the backbone, where shared memory carries the 600 KB-per-image input. Writes
perf/results/client_embed.json and .md with the exact command. Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vitserve.client import AsyncVitClient, VitClient
from vitserve.exporter.hostinfo import cpu_summary

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    name: str
    protocol: str
    mode: str  # sync (VitClient) or async (AsyncVitClient)
    shared_memory: str
    inputs: str  # jpeg (to the ensemble) or tensor (to its backbone)


CONFIGS = [
    Config("grpc", "grpc", "sync", "none", "jpeg"),
    Config("http", "http", "sync", "none", "jpeg"),
    Config("grpc + system shm", "grpc", "sync", "system", "jpeg"),
    Config("async grpc", "grpc", "async", "none", "jpeg"),
    Config("grpc tensor", "grpc", "sync", "none", "tensor"),
    Config("grpc tensor + system shm", "grpc", "sync", "system", "tensor"),
]


@dataclass
class Result:
    config: Config
    images: int
    batch_size: int
    max_in_flight: int
    runs_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)  # this process's CPU time per run
    load_1min: list[float] = field(default_factory=list)  # the machine's load average after each run
    errors: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / statistics.median(self.runs_s)

    def row(self) -> dict:
        return {
            **asdict(self.config),
            "images": self.images,
            "batch_size": self.batch_size,
            "max_in_flight": self.max_in_flight,
            "runs_s": [round(t, 4) for t in self.runs_s],
            "images_per_s_median": round(self.images_per_s, 2),
            "images_per_s_best": round(self.images / min(self.runs_s), 2),
            "images_per_s_runs": [round(self.images / t, 2) for t in self.runs_s],
            "client_cpu_s_runs": [round(t, 3) for t in self.client_cpu_s],
            "load_1min_runs": [round(x, 2) for x in self.load_1min],
            "failed_images": self.errors,
        }


def jpeg_images(count: int) -> list[bytes]:
    from vitserve.exporter.samples import eval_views

    out = []
    for _, im in eval_views(count, seed=1):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pixel_values(url: str, model: str, images: list[bytes]) -> np.ndarray:
    """The images preprocessed with the server's own preprocess parameters (read from its config)."""
    import tritonclient.grpc as grpcclient

    from vitserve.contract import PreprocessParams, preprocess_model_name
    from vitserve.exporter.triton_models.preprocess import preprocess_bytes

    name = preprocess_model_name(model)
    params = PreprocessParams.from_model_config(
        grpcclient.InferenceServerClient(url).get_model_config(name, as_json=True)["config"]
    )
    return np.stack([preprocess_bytes(b, params) for b in images])


class Runner:
    """One configuration's client, kept open across its runs (sync, or async on a loop of its own)."""

    def __init__(self, config: Config, url: str, args: argparse.Namespace, payload) -> None:
        self.config, self.payload = config, payload
        kwargs = dict(
            protocol=config.protocol,
            batch_size=args.batch_size,
            max_in_flight=args.max_in_flight,
            timeout_s=args.timeout_s,
            shared_memory=config.shared_memory,
        )
        self.result = Result(config, len(payload), args.batch_size, args.max_in_flight)
        if config.mode == "sync":
            self.client = VitClient(url, args.model, **kwargs)
            self.loop = None
        else:
            self.loop = asyncio.new_event_loop()
            self.client = AsyncVitClient(url, args.model, **kwargs)

    def _embed(self, images, strict: bool = False):
        if self.loop is None:
            return self.client.embed(images, strict=strict)
        return self.loop.run_until_complete(self.client.embed(images, strict=strict))

    def warm_up(self, count: int) -> None:
        self._embed(self.payload[:count], strict=True)

    def run(self) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        out = self._embed(self.payload)
        self.result.runs_s.append(time.perf_counter() - start)
        self.result.client_cpu_s.append(time.process_time() - cpu)
        self.result.load_1min.append(os.getloadavg()[0])
        self.result.errors = max(self.result.errors, len(out.errors))

    def close(self) -> None:
        if self.loop is None:
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.close())
            self.loop.close()


def measure(
    configs: list[Config], urls: dict[str, str], args: argparse.Namespace, payloads: dict
) -> list[Result]:
    """Warm every configuration up, then run them round-robin `repeats` times, so that load from anything
    else on the machine falls on all of them alike."""
    runners = []
    try:
        for config in configs:
            runner = Runner(config, urls[config.protocol], args, payloads[config.inputs])
            runners.append(runner)
            runner.warm_up(2 * args.batch_size)
        for repeat in range(args.repeats):
            for runner in runners:
                runner.run()
                t = runner.result.runs_s[-1]
                print(
                    f"run {repeat + 1}  {runner.config.name:26s} {len(runner.payload) / t:8.1f} images/s",
                    flush=True,
                )
    finally:
        for runner in runners:
            runner.close()
    return [r.result for r in runners]


def write(results: list[Result], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "results": [r.row() for r in results]}
    json_path, md_path = out_dir / "client_embed.json", out_dir / "client_embed.md"
    lines = [
        "# Python client: `embed` throughput",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['date']}, {meta['host']['cpus']} CPUs ({meta['host']['machine']}, shared with other work; "
        f"{meta['host'].get('cpu', 'CPU not recorded')}), "
        f"model `{meta['model']}` (backbone `{meta['backbone']}`, max batch {meta['max_batch_size']}) served by the "
        "CPU tritonserver"
        + (f" on `{meta['repository']}`" if meta.get("repository") else f" at {meta['url']}")
        + f". {results[0].images} JPEG images per run, batch {results[0].batch_size}, "
        f"{results[0].max_in_flight} requests in flight, warm-up first, median of {meta['repeats']} runs "
        "taken round-robin across the configurations.",
        "",
        "| configuration | protocol | client | shared memory | input | images/s (median) | images/s (best) "
        "| runs (images/s) "
        "| client CPU s/run (median) | load avg after each run |",
        "|---|---|---|---|---|---:|---:|---|---:|---|",
    ]
    for r in results:
        c = r.config
        runs = ", ".join(f"{r.images / t:.1f}" for t in r.runs_s)
        load = ", ".join(f"{x:.1f}" for x in r.load_1min)
        lines.append(
            f"| {c.name} | {c.protocol} | {c.mode} | {c.shared_memory} | {c.inputs} | {r.images_per_s:.1f} "
            f"| {r.images / min(r.runs_s):.1f} | {runs} "
            f"| {statistics.median(r.client_cpu_s):.2f} | {load} |"
        )
    lines += [
        "",
        "Shared memory carries tensor inputs and the `embeddings` output; the ensemble's encoded-image input is "
        "BYTES and always travels over the network. The `tensor` rows send preprocessed CHW float32 straight "
        "to the backbone the ensemble routes to, so they skip server-side JPEG decoding. The server and the "
        "client share the machine's CPUs; a load average above their count means other work competed for "
        "them during the run, and the server's compute, not the client, sets the pace (see client CPU s/run): "
        "the best run is the one least disturbed.",
        "",
    ]
    for path, text in ((json_path, json.dumps(doc, indent=2) + "\n"), (md_path, "\n".join(lines))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", default="model_repository", help="start a tritonserver on this repository")
    p.add_argument("--url", default=None, help="use a running server's gRPC endpoint instead (host:port)")
    p.add_argument("--http-url", default=None, help="its HTTP endpoint (default: gRPC port - 1)")
    p.add_argument("--model", default="vitb32")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-in-flight", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    command = "python perf/bench_client.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    configs = [c for c in CONFIGS if not args.only or c.name in args.only]

    server = None
    if args.url is None:
        from vitserve.server import TritonServer

        server = TritonServer(args.repository).start()
        grpc_url, http_url = server.grpc_url, server.http_url
    else:
        grpc_url = args.url
        host, port = args.url.rsplit(":", 1)
        http_url = args.http_url or f"{host}:{int(port) - 1}"
    try:
        with VitClient(grpc_url, args.model) as client:
            client.wait_until_ready(60)
            served = {
                "backbone": client.model_info(tensor=True).name,
                "max_batch_size": client.model_info().max_batch_size,
            }
        images = jpeg_images(args.images)
        pixels = (
            pixel_values(grpc_url, args.model, images) if any(c.inputs == "tensor" for c in configs) else None
        )
        urls = {"grpc": grpc_url, "http": http_url}
        results = measure(configs, urls, args, {"jpeg": images, "tensor": pixels})
    finally:
        if server is not None:
            server.stop()
    meta = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": {
            "cpus": len(os.sched_getaffinity(0)),
            "cpu": cpu_summary(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "model": args.model,
        "repository": str(args.repository) if args.url is None else None,
        "url": None if args.url is None else args.url,
        **served,
        "repeats": args.repeats,
        "units": {"images_per_s_median": "images/s", "runs_s": "s"},
    }
    json_path, md_path = write(results, meta, Path(args.out_dir))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
