"""`make gpu-check`: the GPU validation kit, run by a user on a GPU host with Docker + NVIDIA container toolkit.

    python -m vitserve.perf.gpu_check [--dry-run] [--config models.yaml] [--random-init] [all]
    python -m vitserve.perf.gpu_check [--dry-run] image | engines-gpu | self-check

`all` runs, in order (every command is printed before it runs; `--dry-run` only prints them):
1. image        docker build of docker/Dockerfile on the pinned NGC release (vitserve.exporter.gpu_release)
2. engines      `vitserve build` on the host (export, FP16/INT8 ONNX, build.sh, verify sets; CPU work)
3. engines-gpu  `vitserve build-engines` inside the image on the host's GPU: plans (cached under
                artifacts/engines), each verified against FP32 on the held-out photos; failures withheld
4. serve        tritonserver in the image (its entrypoint runs `vitserve check-engines` first)
5. perf         perf_analyzer (the release's SDK image) over batch x concurrency for every published plan,
                fed a real preprocessed photo, with GPU metrics
6. report       perf/results/gpu-<gpu name>/report.md (+ .json): throughput, p50/p99, GPU utilisation,
                fidelity of each plan, the exact versions and commands
The equivalent trtexec command of each plan is printed too (it is each plan's build.sh).

`image` builds on the pinned release only: the image reads its own libnvinfer while it is built and
installs the TensorRT Python package of that version (`gpu_release.py image-tensorrt`), then shows what it
recorded (`IMAGE_TENSORRT_RECORD`). `self-check` runs inside the image while it is built: the libnvinfer
Triton loads and the TensorRT Python package must be one TensorRT, the one recorded, else the build stops
naming the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vitserve.contract import PIXELS
from vitserve.exporter.gpu_release import (
    IMAGE_TENSORRT_RECORD,
    TENSORRT_VERSION,
    TRITON_IMAGE,
    TRITON_RELEASE,
    version_tuple,
)
from vitserve.exporter.repository import WARMUP_FILE

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TAG = f"vitserve-triton:{TRITON_RELEASE}"
SDK_IMAGE = f"{TRITON_IMAGE}-sdk"  # nvcr.io/nvidia/tritonserver:<yy.mm>-py3-sdk: perf_analyzer of the release
CONTAINER = "vitserve-gpu-check"
BATCHES = (1, 8, 64)
CONCURRENCY = (1, 4, 16)


def image_build_command(tag: str = IMAGE_TAG) -> list[str]:
    """`docker build` of the serving image on the release gpu_release names; no TensorRT version is
    passed: the build reads the image's own (docker/Dockerfile)."""
    return [
        "docker", "build", "-f", "docker/Dockerfile",
        "--build-arg", f"TRITON_IMAGE={TRITON_IMAGE}",
        "-t", tag, ".",
    ]  # fmt: skip


def image_record_command(tag: str = IMAGE_TAG) -> list[str]:
    """What the built image recorded about its TensorRT (libnvinfer and the Python package)."""
    return ["docker", "run", "--rm", "--entrypoint", "cat", tag, IMAGE_TENSORRT_RECORD]


# What the image build runs to pick its TensorRT (docker/Dockerfile), shown by `image --dry-run`.
IMAGE_TENSORRT_STEPS = (
    f"python3 exporter/gpu_release.py image-tensorrt {IMAGE_TENSORRT_RECORD}"
    "   # reads `dpkg-query -W 'libnvinfer*'` (else libnvinfer.so.X.Y.Z) and CUDA, prints tensorrt-cuNN==X.Y.Z.B.*",
    'python3 -m pip install ... "tensorrt-cuNN==<that version>.*"',
    "python3 -m vitserve.perf.gpu_check self-check   # libnvinfer == tensorrt Python == recorded, else stop",
)


def _user() -> list[str]:
    return ["--user", f"{os.getuid()}:{os.getgid()}"] if hasattr(os, "getuid") else []


def engines_gpu_command(repository: Path, cache: Path, tag: str = IMAGE_TAG) -> list[str]:
    """The engine stage inside the image on the host's GPU, as the calling user (files stay theirs)."""
    return [
        "docker", "run", "--rm", "--gpus", "all", *_user(),
        "-v", f"{repository.resolve()}:/models", "-v", f"{cache.resolve()}:/cache",
        tag, "vitserve", "build-engines", "--repository", "/models", "--cache", "/cache",
    ]  # fmt: skip


def serve_command(repository: Path, ports: tuple[int, int, int], tag: str = IMAGE_TAG) -> list[str]:
    http, grpc, metrics = ports
    return [
        "docker", "run", "-d", "--rm", "--name", CONTAINER, "--gpus", "all", "--shm-size", "1g",
        "-p", f"127.0.0.1:{http}:8000", "-p", f"127.0.0.1:{grpc}:8001", "-p", f"127.0.0.1:{metrics}:8002",
        "-v", f"{repository.resolve()}:/models", tag, "tritonserver", "--model-repository=/models",
    ]  # fmt: skip


def perf_command(
    model: str, batch: int, concurrency: int, inputs: Path, out_csv: Path, ports: tuple[int, int, int]
) -> list[str]:
    """perf_analyzer from the release's SDK image against the served model, real photo as input, GPU
    metrics collected from the server's metrics endpoint."""
    _, grpc, metrics = ports
    return [
        "docker", "run", "--rm", "--net", "host", *_user(),
        "-v", f"{inputs.resolve()}:/inputs:ro", "-v", f"{out_csv.parent.resolve()}:/out",
        SDK_IMAGE, "perf_analyzer", "-m", model, "-u", f"localhost:{grpc}", "-i", "grpc",
        "-b", str(batch), "--concurrency-range", f"{concurrency}:{concurrency}",
        "--input-data", "/inputs", "--measurement-interval", "5000", "--percentile", "99",
        "--collect-metrics", "--metrics-url", f"localhost:{metrics}/metrics", "--verbose-csv",
        "-f", f"/out/{out_csv.name}",
    ]  # fmt: skip


def trtexec_commands(config: Path, repository: Path) -> list[list[str]]:
    """The trtexec command equivalent to each TensorRT plan of `config` (what its build.sh runs)."""
    from vitserve.exporter.backbones import get_backbone
    from vitserve.exporter.config import Kind, Precision, load_models
    from vitserve.exporter.engine import EngineSettings, trtexec_command
    from vitserve.exporter.repository import backbone_model_name

    cmds = []
    for spec in load_models(config):
        if Kind.TENSORRT not in spec.kinds:
            continue
        size = get_backbone(spec.backbone).image_size
        for p in spec.precisions:
            if p is Precision.CPU_INT8:
                continue
            mdir = repository / backbone_model_name(spec.name, p, Kind.TENSORRT)
            settings = EngineSettings(profile=spec.profile, timing_cache=mdir / "timing.cache")
            cmds.append(
                trtexec_command(
                    mdir / "onnx" / "model.onnx",
                    mdir / "1" / "model.plan",
                    PIXELS,
                    (3, size, size),
                    settings,
                )
            )
    return cmds


# ----------------------------------------------------------------------------------------- inside the image


def image_tensorrt_problems(lib_version: str | None, python_version: str | None, recorded: str) -> list[str]:
    """Why the image's TensorRT (libnvinfer, which Triton loads, and the Python package, which builds the
    plans) is not the one the image recorded while it was built (`recorded`, read from its libnvinfer
    package or file); empty when both match it on major.minor.patch."""
    problems = []
    for what, found in (
        ("libnvinfer (Triton's TensorRT backend)", lib_version),
        ("tensorrt Python", python_version),
    ):
        if found is None:
            problems.append(f"{what}: not found in the image (its libnvinfer is TensorRT {recorded})")
        elif version_tuple(found) != version_tuple(recorded):
            problems.append(
                f"{what} is TensorRT {found}, but this image's libnvinfer is {recorded} "
                f"({IMAGE_TENSORRT_RECORD}): a plan built with one does not load in the other; rebuild the "
                "image (make image) and report the versions if it persists"
            )
    return problems


def self_check(record_path: str = IMAGE_TENSORRT_RECORD) -> int:
    """Inside the image: the loaded libnvinfer and `import tensorrt` against the recorded TensorRT; adds
    the Python package's version to the record."""
    import ctypes

    try:
        record = json.loads(Path(record_path).read_text())
    except (OSError, ValueError) as e:
        print(f"error: {record_path} unreadable ({e}); build the image with make image", file=sys.stderr)
        return 1
    lib = None
    for name in ("libnvinfer.so.10", "libnvinfer.so.11"):
        try:
            n = int(ctypes.CDLL(name).getInferLibVersion())
            lib = f"{n // 10000}.{n // 100 % 100}.{n % 100}"
            break
        except (OSError, AttributeError):
            continue
    try:
        import tensorrt

        py = tensorrt.__version__
    except (ImportError, OSError) as e:
        py = None
        print(f"import tensorrt failed: {e}", file=sys.stderr)
    problems = image_tensorrt_problems(lib, py, record["tensorrt"])
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    record.update(libnvinfer_loaded=lib, tensorrt_python=py)
    Path(record_path).write_text(json.dumps(record, indent=1) + "\n")
    print(f"TensorRT {record['tensorrt']} ({record['source']}): libnvinfer {lib} and Python {py} match")
    if version_tuple(record["tensorrt"]) != version_tuple(TENSORRT_VERSION):
        print(
            f"NOTE: vitserve.exporter.gpu_release documents TensorRT {TENSORRT_VERSION} (unverified) for "
            f"{TRITON_IMAGE}; this image carries {record['tensorrt']}: update that note and the `gpu` extra"
        )
    return 0


# ----------------------------------------------------------------------------------------- report


def gpu_utilisation(cell: str) -> float | None:
    """perf_analyzer's "Avg GPU Utilization" cell ("GPU-uuid:0.93;GPU-uuid2:0.10;") -> mean fraction."""
    values = [float(v) for v in re.findall(r":([0-9.]+)", cell or "")]
    return sum(values) / len(values) if values else None


def parse_point(csv_path: Path) -> dict[str, Any]:
    """One perf_analyzer CSV (one concurrency) -> images/s, p50/p99 ms, GPU utilisation."""
    import csv

    from vitserve.perf.perf_analyzer import parse_csv

    (row,) = parse_csv(csv_path)
    with open(csv_path, newline="") as f:
        raw = next(csv.DictReader(f))
    return {
        "images_per_s": row["images_per_s"],
        "p50_ms": row["p50_us"] / 1000,
        "p99_ms": row["p99_us"] / 1000,
        "gpu_util": gpu_utilisation(raw.get("Avg GPU Utilization", "")),
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def write_report(out_dir: Path, data: dict[str, Any]) -> Path:
    """report.md + report.json from the collected points, plan records and versions."""
    from vitserve.exporter.compare import format_table

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    plans = format_table(
        data["plans"],
        [
            "plan",
            "published",
            "tensorrt_version",
            "compute_capability",
            "emb_cos_mean",
            "emb_cos_min",
            "gate",
        ],
        markdown=True,
        float_format=".4g",
    )
    points = format_table(
        data["points"],
        ["model", "precision", "batch", "concurrency", "images_per_s", "p50_ms", "p99_ms", "gpu_util"],
        markdown=True,
        float_format=".4g",
    )
    versions = "\n".join(f"- {k}: {v}" for k, v in data["versions"].items())
    commands = "\n".join(f"    {c}" for c in data["commands"])
    md = (
        f"# GPU check: {data['versions'].get('gpu')}\n\n"
        f"Command: `{data['command']}`\n\n{data.get('note', '')}\n\n## Versions\n\n{versions}\n\n"
        f"## Plans (verified against FP32 on the held-out photos)\n\n{plans}\n\n"
        f"## perf_analyzer (gRPC, real preprocessed photo, closed loop)\n\n{points}\n\n"
        f"## Every command run\n\n{commands}\n"
    )
    path = out_dir / "report.md"
    path.write_text(md)
    return path


# ----------------------------------------------------------------------------------------- driver


class Runner:
    """Prints each command; runs it unless dry-run. Keeps the list for the report."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.commands: list[str] = []

    def __call__(self, cmd: list[str], *, check: bool = True, capture: bool = False, cwd: Path = ROOT) -> str:
        text = shlex.join(cmd)
        self.commands.append(text)
        print(("[dry-run] " if self.dry_run else "+ ") + text, flush=True)
        if self.dry_run:
            return ""
        proc = subprocess.run(cmd, cwd=cwd, check=False, text=True, capture_output=capture)
        if check and proc.returncode != 0:
            detail = (proc.stderr or "")[-3000:] if capture else ""
            raise SystemExit(f"error: command failed with exit code {proc.returncode}: {text}\n{detail}")
        return proc.stdout or ""


def _gpu_name(run: Runner) -> str:
    if run.dry_run or shutil.which("nvidia-smi") is None:
        return "<gpu name>"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out.split(",")[0].strip() or "unknown GPU"


def _wait_ready(port: int, timeout_s: float = 900) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(
        f"error: tritonserver not ready on port {port} after {timeout_s:.0f} s: docker logs {CONTAINER}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", nargs="?", default="all", choices=["all", "image", "engines-gpu", "self-check"])
    ap.add_argument("--dry-run", action="store_true", help="print every command, run none")
    ap.add_argument(
        "--config", default="models.gpu.yaml" if (ROOT / "models.gpu.yaml").exists() else "models.yaml"
    )
    ap.add_argument("--repository", default="model_repository")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument(
        "--random-init", action="store_true", help="untrained weights (offline hosts), loudly labelled"
    )
    ap.add_argument("--batch", default=",".join(map(str, BATCHES)))
    ap.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    ap.add_argument("--ports", default="8000,8001,8002")
    args = ap.parse_args(argv)
    if args.step == "self-check":
        return self_check()
    run = Runner(args.dry_run)
    repo, cache = Path(args.repository), Path(args.artifacts) / "engines"
    print(
        f"NGC release {TRITON_RELEASE}: {TRITON_IMAGE}; its TensorRT is read from the image while it is built"
    )
    image_record: dict[str, Any] = {}
    if args.step in ("all", "image"):
        run(image_build_command())
        for step in IMAGE_TENSORRT_STEPS:
            print(f"  (inside the build) {step}")
        out = run(image_record_command(), capture=True)
        if out:
            print(out.strip())
            image_record = json.loads(out)
    if args.step == "image":
        return 0
    if args.step == "all":
        vitserve = str(Path(sys.executable).parent / "vitserve")
        run([vitserve, "build", "--config", args.config, "--repository", str(repo), "--artifacts", args.artifacts]
            + (["--random-init"] if args.random_init else []))  # fmt: skip
    config = Path(args.config)
    trtexec = trtexec_commands(config, repo)
    if not trtexec:
        print(f"NOTE: {config} has no model with `kinds: [tensorrt]`: no plans to build")
    for cmd in trtexec:
        print(f"  (equivalent trtexec, in build.sh) {shlex.join(cmd)}")
    if not args.dry_run:
        cache.mkdir(parents=True, exist_ok=True)
    run(engines_gpu_command(repo, cache))
    if args.step == "engines-gpu":
        return 0

    ports = tuple(int(p) for p in args.ports.split(","))
    batches = [int(b) for b in args.batch.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    manifest: dict[str, Any] = {"models": {}}
    if not args.dry_run:
        manifest = json.loads((repo / "vitserve-manifest.json").read_text())
    published = [
        (name, e, rec["config"]["profile"]["max"])
        for rec in manifest["models"].values()
        for name, e in (rec.get("engines") or {}).items()
        if e.get("published")
    ]
    if args.dry_run:  # what would be published if every plan passes
        plans = [next(a for a in cmd if a.startswith("--saveEngine=")).split("=", 1)[1] for cmd in trtexec]
        published = [(Path(p).parent.parent.name, {}, max(batches)) for p in plans]
    gpu = _gpu_name(run)
    out_dir = ROOT / "perf" / "results" / f"gpu-{slug(gpu)}"
    points: list[dict[str, Any]] = []
    run(["docker", "rm", "-f", CONTAINER], check=False, capture=True)
    run(serve_command(repo, ports))  # type: ignore[arg-type]
    try:
        if not args.dry_run:
            _wait_ready(ports[0])
        for name, _, max_batch in published:
            inputs = out_dir / "inputs" / name
            if not args.dry_run:
                inputs.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(repo / name / "warmup" / WARMUP_FILE, inputs / PIXELS)
            for b in (b for b in batches if b <= max_batch):
                for c in concurrencies:
                    csv_path = out_dir / "csv" / f"{name}_b{b}_c{c}.csv"
                    if not args.dry_run:
                        csv_path.parent.mkdir(parents=True, exist_ok=True)
                    run(perf_command(name, b, c, inputs, csv_path, ports))  # type: ignore[arg-type]
                    if not args.dry_run:
                        precision = name.rsplit("_", 2)[-2]
                        points.append({"model": name, "precision": precision, "batch": b, "concurrency": c}
                                      | parse_point(csv_path))  # fmt: skip
    finally:
        run(["docker", "stop", CONTAINER], check=False, capture=True)
    if args.dry_run:
        print(f"[dry-run] would write {out_dir / 'report.md'}")
        return 0
    plans = []
    for name, e, _ in [
        (n, e, None) for rec in manifest["models"].values() for n, e in (rec.get("engines") or {}).items()
    ]:
        emb = ((e.get("fidelity") or {}).get("outputs") or {}).get("embeddings", {})
        plans.append({
            "plan": name, "published": e.get("published"), "tensorrt_version": e.get("tensorrt_version"),
            "compute_capability": e.get("compute_capability"), "emb_cos_mean": emb.get("cosine_mean"),
            "emb_cos_min": emb.get("cosine_min"), "gate": (e.get("fidelity") or {}).get("gate"),
        })  # fmt: skip
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    git = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    random_init = any(rec["export"].get("random_init") for rec in manifest["models"].values())
    data = {
        "command": "python -m vitserve.perf.gpu_check "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": "RANDOM-INIT weights: speeds are the architectures', fidelity is of untrained models."
        if random_init
        else "",
        "versions": {
            "gpu": gpu,
            "driver": driver,
            "triton_image": TRITON_IMAGE,
            "tensorrt": image_record.get("tensorrt", "see " + IMAGE_TENSORRT_RECORD),
            "tensorrt_python": image_record.get("tensorrt_python"),
            "perf_analyzer_image": SDK_IMAGE,
            "vitserve_git": git,
        },
        "plans": plans,
        "points": points,
        "commands": run.commands,
    }
    print(f"report: {write_report(out_dir, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
